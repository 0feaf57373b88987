"""Executor threads: they claim actions from the request table and send back results.

The I/O thread `put`s every action into `ext.ActionTable` (fixed slots, atomic state,
no lock) in a lane: LOADER for LOAD/UNLOAD/PROFILE, EXEC for INFER. One loader thread
and N exec threads each `claim` the eligible action (`earliest <= now`) with the
smallest `latest` of their lane, run it, and push the result frames on their own inproc
PUSH socket (a socket belongs to one thread) to the I/O thread, which forwards them.
An action still queued past its `latest` is answered by the lane's next free thread with
its stage's TOO_LATE status and the time it missed by, and never run.

A thread sleeps on its lane's semaphore until the I/O thread posts, or until the next
queued action becomes eligible. A thread that dies (a bug outside a handler's own
error handling) is noticed by the I/O thread (`dead`), which answers the action it held
and starts a fresh thread (`ExecutorThread.restarted`).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq

from mtcore.actions import Action, ActionStatus, Infer, Result
from mtcore.errors import MTError
from mtcore.protocol import WORKER_TAG, build
from mtcore.transport import make_socket, send_frames

log = logging.getLogger("mtserve.worker")

LOADER, EXEC = 0, 1  # table lanes
NO_LIMIT_S = 1e9  # `latest` for an action without one: after every real one, in FIFO order


@dataclass(eq=False)
class Job:
    """An action in the worker, from receipt to result."""

    action: Action
    frames: list[Any] = field(default_factory=list)  # INFER input frames
    generation: int = -1  # the broker registration it belongs to; -1: any
    received: float = field(default_factory=time.monotonic)
    data: bytes | None = None  # model bytes fetched from the broker (LOAD/PROFILE)
    error: MTError | None = None  # why the bytes could not be fetched
    claimed: float = 0.0  # when an executor took it

    @property
    def earliest(self) -> float:
        return self.received + self.action.earliest

    @property
    def latest(self) -> float:
        """Monotonic start-by time; unlimited actions line up after all limited ones."""
        if math.isinf(self.action.latest):
            return self.received + NO_LIMIT_S
        return self.received + self.action.latest

    @property
    def has_limit(self) -> bool:
        return not math.isinf(self.action.latest)


Handler = Callable[[Job], "list[Any] | None"]  # result frames, or None: nothing to send
Rejecter = Callable[[Job, ActionStatus, str], "list[Any]"]  # a failed result's frames


class ExecutorThread(threading.Thread):
    """One executor: claims from one lane of the table until stopped."""

    def __init__(
        self,
        name: str,
        lane: int,
        table: Any,  # ext.ActionTable
        wake: threading.Semaphore,
        handle: Handler,
        reject: Rejecter,
        ctx: zmq.Context,
        address: str,
        generation: Callable[[], int],
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.lane = lane
        self.table = table
        self.wake = wake  # posted by the I/O thread after each put into this lane
        self.handle = handle
        self.reject = reject
        self.ctx = ctx
        self.address = address  # the I/O thread's PULL endpoint
        self.generation = generation  # the worker's current registration
        self.completed = 0  # actions this thread finished (only it writes)
        self.current: tuple[int, Job] | None = None  # (slot, job) being run
        self.stopping = False

    def run(self) -> None:
        sock = make_socket(self.ctx, zmq.PUSH)
        sock.connect(self.address)
        try:
            while not self.stopping:
                self._turn(sock)
        finally:
            sock.close()

    def _turn(self, sock: zmq.Socket) -> None:
        now = time.monotonic()
        for slot, job in self.table.expire(self.lane, now):
            self.current = (slot, job)
            self._finish(sock, slot, self._too_late(job, now) if self._current_gen(job) else None)
            self.current = None
        claimed = self.table.claim(self.lane, now)
        if claimed is None:
            wait = self.table.next_earliest(self.lane) - now
            self.wake.acquire(timeout=None if math.isinf(wait) else max(wait, 0.0))
            return
        slot, job = claimed
        self.current = claimed
        job.claimed = time.monotonic()
        frames = None
        if self._current_gen(job):  # else queued for a registration that is gone
            try:
                frames = self.handle(job)
            except Exception as exc:  # a bug: answer so the action's requests are not lost
                log.exception("%s failed on %s", self.name, type(job.action).__name__)
                frames = self.reject(job, ActionStatus.INTERNAL, f"worker bug: {exc}")
            if not self._current_gen(job):
                frames = None  # the broker that asked is gone: its result would mislead
        self._finish(sock, slot, frames)
        self.current = None

    def _current_gen(self, job: Job) -> bool:
        return job.generation in (-1, self.generation())

    def _finish(self, sock: zmq.Socket, slot: int, frames: list[Any] | None) -> None:
        if frames:
            send_frames(sock, frames)
        self.table.finish(slot)
        self.completed += 1  # after the send: an inline result cannot overtake it

    def _too_late(self, job: Job, now: float) -> list[Any]:
        status = (
            ActionStatus.EXEC_TOO_LATE
            if isinstance(job.action, Infer)
            else ActionStatus.LOAD_TOO_LATE
        )
        missed = (now - job.latest) * 1e3
        waited = (now - job.received) * 1e3
        return self.reject(
            job,
            status,
            f"the worker could not start it in time: its window closed {missed:.1f} ms ago"
            f" (waited {waited:.1f} ms, window [{job.action.earliest * 1e3:.1f},"
            f" {job.action.latest * 1e3:.1f}] ms after sending)",
        )


def result_frames(result: Result, payload: list[Any] = ()) -> list[Any]:
    """A result as the frames the worker sends (the I/O thread forwards them unchanged)."""
    return build(WORKER_TAG, result.cmd, result.to_header(), payload)
