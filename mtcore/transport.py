"""Socket helpers for the hot path: multipart send and receive without pyzmq's sugar.

pyzmq's `send_multipart`/`recv_multipart` cost about 20 us per six-frame message here
(enum flag arithmetic and a `getsockopt(RCVMORE)` per frame); these loops use integer
flags and `Frame.more`, about 3x cheaper (bench: `mtbench frames`). Frames are received
with `copy=False`, so tensor payloads are forwarded without a copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import zmq

SNDMORE = int(zmq.SNDMORE)
NOBLOCK = int(zmq.NOBLOCK)


def send_frames(sock: zmq.Socket, frames: Sequence[Any]) -> None:
    """Send one multipart message; buffers over pyzmq's copy threshold are not copied."""
    send = sock.send
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        send(frame, SNDMORE if i < last else 0, copy=False)


def recv_frames(sock: zmq.Socket, flags: int = 0) -> list[zmq.Frame]:
    """Receive one multipart message as zmq.Frame objects (raises zmq.Again with NOBLOCK)."""
    recv = sock.recv
    frame = recv(flags, copy=False)
    frames = [frame]
    while frame.more:
        frame = recv(0, copy=False)
        frames.append(frame)
    return frames


def make_socket(ctx: zmq.Context, kind: int) -> zmq.Socket:
    """A socket that never blocks on close and never drops for a high-water mark."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    return sock
