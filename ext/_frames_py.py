"""Pure-Python twin of `ext._frames`: the same framing rules through pyzmq's Cython layer.

pyzmq's `send_multipart`/`recv_multipart` sugar costs about 20 us per six-frame message
(enum flag arithmetic, a `getsockopt(RCVMORE)` per frame); these loops call the backend's
`send`/`recv` directly with integer flags and follow `Frame.more`. Received frames follow
the C version's rule: under RECV_COPY_BELOW bytes they become `bytes`, larger ones stay
`zmq.Frame`s. Small `bytes` are copied when sent; received `zmq.Frame`s and large
buffers go zero-copy, so tensor payloads are forwarded without a copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import zmq

RECV_COPY_BELOW = 2048  # bytes: smaller received frames become bytes
SEND_COPY_BELOW = 64 * 1024  # bytes: smaller frames are copied into the message

_SNDMORE = int(zmq.SNDMORE)
_send = zmq.backend.Socket.send  # the Cython method under pyzmq's sugar
_recv = zmq.backend.Socket.recv
_Frame = zmq.backend.Frame


def recv_frames(sock: zmq.Socket, flags: int = 0) -> list[Any]:
    """Receive one multipart message: small frames as bytes, large as zmq.Frame.

    Raises zmq.Again if `flags` has NOBLOCK and nothing is waiting.
    """
    if sock.closed:
        raise zmq.ZMQError(zmq.ENOTSOCK)
    frames: list[Any] = []
    more = True
    try:
        while more:
            frame = _recv(sock, flags, False)
            flags = 0  # the rest of a message arrives with its first frame
            more = frame.more
            frames.append(frame.bytes if len(frame) < RECV_COPY_BELOW else frame)
    except BaseException:
        if frames and more:  # never leave a message's tail to be read as the next message
            _discard_rest(sock)
        raise
    return frames


def recv_from(sock: zmq.Socket, flags: int = 0) -> tuple[str | None, list[Any]]:
    """`recv_frames`, and who sent it: `(user_id, frames)`.

    `user_id` is the User-Id the ZAP handler gave the sender's connection (mtserve's is
    the sender's CURVE public key), None for a connection no handler authenticated.
    """
    if sock.closed:
        raise zmq.ZMQError(zmq.ENOTSOCK)
    first = _recv(sock, flags, False)
    try:
        user_id = first.get("User-Id")
    except zmq.ZMQError:
        user_id = None
    frames: list[Any] = [first.bytes if len(first) < RECV_COPY_BELOW else first]
    if first.more:
        try:
            frames += recv_frames(sock, 0)
        except BaseException:
            _discard_rest(sock)
            raise
    return user_id, frames


def _discard_rest(sock: zmq.Socket) -> None:
    more = True
    while more:
        try:
            more = _recv(sock, zmq.NOBLOCK, False).more
        except zmq.ZMQError:
            return


def send_frames(sock: zmq.Socket, frames: Sequence[Any], first_flags: int = 0) -> None:
    """Send one multipart message: bytes, zmq.Frame or any buffer per frame.

    Every frame is checked before the first is sent, so a bad one raises TypeError
    without leaving part of a message on the socket. `first_flags` go with the first
    frame only: NOBLOCK there makes a ROUTER_MANDATORY socket raise zmq.Again, with
    nothing sent, when the peer's queue is full (a ROUTER decides at the routing frame).
    """
    if sock.closed:
        raise zmq.ZMQError(zmq.ENOTSOCK)
    copies = []
    for frame in frames:
        if isinstance(frame, _Frame):
            copies.append(False)  # already a libzmq message: forwarded without a copy
        elif type(frame) is bytes:
            copies.append(len(frame) < SEND_COPY_BELOW)
        else:
            copies.append(memoryview(frame).nbytes < SEND_COPY_BELOW)
    last = len(frames) - 1
    for i, (frame, copy) in enumerate(zip(frames, copies, strict=True)):
        flags = (_SNDMORE if i < last else 0) | (first_flags if i == 0 else 0)
        _send(sock, frame, flags, copy)
