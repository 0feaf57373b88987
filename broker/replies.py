"""Answers to tenants that do not read them: held in bounded, accounted backlogs.

The frontend ROUTER runs with `ROUTER_MANDATORY` and a small per-connection high-water
mark (`REPLY_HWM` messages): a reply to a connection whose queue is full is not dropped
by ZeroMQ and does not block the loop; `send_frames(..., NOBLOCK)` raises `zmq.Again`
and the reply waits here, in that connection's backlog, in order. Every loop turn
`flush` hands backlogs back to ZeroMQ as far as the connections take them.

Each held reply is charged to its tenant's `TenantBook.backlog_bytes`, which new INFER
requests are checked against (broker/quotas.py): a tenant that stops reading gets
QUOTA_EXCEEDED for new work at once, and the broker holds at most its reply quota (plus
`REPLY_HWM` messages inside ZeroMQ) for it. The refusals themselves are small but a
client may keep sending; past twice its quota (or `MAX_HELD` replies) a connection's
new replies are dropped and counted, since its peer reads nothing anyway. A reply to a
connection that is gone (`EHOSTUNREACH`) is dropped, as ZeroMQ did before.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

import zmq

from broker.quotas import TenantBook
from mtcore.protocol import frame_size
from mtcore.transport import NOBLOCK, send_frames

log = logging.getLogger("mtserve.broker")

REPLY_HWM = 32  # messages ZeroMQ queues per tenant connection before `zmq.Again`
MAX_HELD = 100_000  # replies held per connection at most
_UNREACHABLE = zmq.EHOSTUNREACH


class _Held:
    __slots__ = ("book", "frames", "nbytes")

    def __init__(self, frames: list[Any], nbytes: int, book: TenantBook | None) -> None:
        self.frames = frames
        self.nbytes = nbytes
        self.book = book


class ReplyQueue:
    """Per-connection backlogs of replies ZeroMQ could not take yet."""

    def __init__(self, sock: zmq.Socket) -> None:
        """`sock` got its SNDHWM of REPLY_HWM before it bound (a listener copies the
        socket's options when it binds: set later, they would not reach connections)."""
        if sock.getsockopt(zmq.SNDHWM) != REPLY_HWM:
            raise ValueError("the frontend must get SNDHWM = REPLY_HWM before it binds")
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock = sock
        self.backlogs: dict[bytes, deque[_Held]] = {}  # routing id -> held replies, in order
        self.dropped = 0  # replies dropped: connection gone, or a backlog past its bound
        self.held_bytes = 0  # all backlogs together

    def send(self, frames: list[Any], book: TenantBook | None) -> None:
        """Send a reply (`frames[0]` is the routing id), or hold it behind its backlog."""
        peer = frames[0]
        backlog = self.backlogs.get(peer)
        if backlog is None:
            try:
                send_frames(self.sock, frames, NOBLOCK)
                return
            except zmq.Again:
                backlog = self.backlogs[peer] = deque()
            except zmq.ZMQError as exc:
                if exc.errno != _UNREACHABLE:
                    raise
                self.dropped += 1  # the connection is gone
                return
        self._hold(backlog, frames, book)

    def _hold(self, backlog: deque[_Held], frames: list[Any], book: TenantBook | None) -> None:
        nbytes = sum(frame_size(f) for f in frames)
        bound = 2 * book.limits.reply_bytes if book is not None else 0
        if len(backlog) >= MAX_HELD or (book is not None and book.backlog_bytes > bound):
            self.dropped += 1
            if self.dropped % 1000 == 1:
                log.warning("tenant %s reads no replies: dropping some (%d so far)",
                            book.tenant if book else "?", self.dropped)  # fmt: skip
            return
        backlog.append(_Held(frames, nbytes, book))
        self.held_bytes += nbytes
        if book is not None:
            book.backlog_bytes += nbytes

    def flush(self) -> None:
        """Hand every backlog to ZeroMQ as far as its connection takes it."""
        for peer in list(self.backlogs):
            backlog = self.backlogs[peer]
            while backlog:
                held = backlog[0]
                try:
                    send_frames(self.sock, held.frames, NOBLOCK)
                except zmq.Again:
                    break
                except zmq.ZMQError as exc:
                    if exc.errno != _UNREACHABLE:
                        raise
                    self.dropped += len(backlog)  # gone: nobody will read any of them
                    while backlog:
                        self._release(backlog.popleft())
                    break
                self._release(backlog.popleft())
            if not backlog:
                del self.backlogs[peer]

    def _release(self, held: _Held) -> None:
        self.held_bytes -= held.nbytes
        if held.book is not None:
            held.book.backlog_bytes -= held.nbytes

    def __len__(self) -> int:
        return sum(len(b) for b in self.backlogs.values())
