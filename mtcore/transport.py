"""Socket helpers for the hot path: multipart send and receive, and socket options.

`recv_frames`/`send_frames` come from the C core (`ext._frames`, straight on libzmq) or
its pure-Python twin: small received frames arrive as `bytes`, large ones as `zmq.Frame`
(zero-copy); received frames and large buffers are sent without a copy, so tensor
payloads are forwarded without one. pyzmq's `send_multipart`/`recv_multipart` sugar
costs several times more per message.
"""

from __future__ import annotations

import zmq

from ext import recv_frames, recv_from, send_frames

__all__ = ["NOBLOCK", "make_socket", "recv_frames", "recv_from", "send_frames"]

NOBLOCK = int(zmq.NOBLOCK)


def make_socket(ctx: zmq.Context, kind: int) -> zmq.Socket:
    """A socket that never blocks on close and never drops for a high-water mark."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    return sock
