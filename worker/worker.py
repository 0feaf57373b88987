"""The worker process: an I/O thread talking to the broker and an exec thread running models.

The I/O thread owns the DEALER to the broker and the host tier (model bytes fetched from
the broker's store, kept under a byte budget). Actions that need bytes it does not hold
wait, in order, until a FETCH_MODEL answer brings them; everything else goes straight to
the exec thread. Results come back over an inproc PAIR and are forwarded unchanged.
If the broker falls silent, the worker reconnects and registers again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import time
from collections import OrderedDict
from typing import Any

import zmq

from mtcore.config import WorkerConfig
from mtcore.errors import LoadFailed, MTError
from mtcore.protocol import (
    VERSION,
    WORKER_TAG,
    Limits,
    WCmd,
    build,
    frame_bytes,
    parse_body,
    split_envelope,
)
from mtcore.transport import NOBLOCK, make_socket, recv_frames, send_frames
from worker.executor import STOP, UNLOAD_ALL, Executor, Job

log = logging.getLogger("mtserve.worker")

NEEDS_BYTES = (WCmd.LOAD_MODEL, WCmd.PROFILE_MODEL)
_LIMITS = Limits(
    max_frame_bytes=1 << 40, max_message_bytes=1 << 40, max_header_bytes=1 << 24, max_frames=1 << 20
)  # the broker is trusted: bound only absurd input


class HostTier:
    """Model bytes by sha256, least recently used evicted past the byte budget."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.blobs: OrderedDict[str, bytes] = OrderedDict()

    def get(self, sha: str) -> bytes | None:
        data = self.blobs.get(sha)
        if data is not None:
            self.blobs.move_to_end(sha)
        return data

    def put(self, sha: str, data: bytes) -> None:
        self.blobs[sha] = data
        while len(self.blobs) > 1 and sum(map(len, self.blobs.values())) > self.budget:
            self.blobs.popitem(last=False)


class Worker:
    """I/O loop of one worker process."""

    def __init__(self, config: WorkerConfig, ctx: zmq.Context | None = None) -> None:
        self.config = config
        self.ctx = ctx or zmq.Context.instance()
        self.name = config.name or f"worker-{os.getpid()}"
        self.host = HostTier(2 * config.memory_budget)  # bytes fetched from the broker
        self.waiting: dict[str, list[Job]] = {}  # sha -> jobs parked until its bytes arrive
        address = f"inproc://mtserve-exec-{id(self)}"
        self.results = make_socket(self.ctx, zmq.PAIR)  # from the exec thread
        self.results.bind(address)
        self.executor = Executor(
            self.ctx, address, config.memory_budget, config.intra_op_threads, config.max_run_seconds
        )
        self.broker: zmq.Socket | None = None  # DEALER, replaced on reconnect
        self.last_heard = 0.0  # monotonic: last message from the broker
        self.last_sent = 0.0  # monotonic: last message to the broker
        self._stopping = False
        self.poller = zmq.Poller()  # broker and results, rebuilt on reconnect
        self._spin_until = 0.0  # busy-poll until then (config.spin_us after a message)
        self.incarnation = f"{os.getpid()}-{secrets.token_hex(8)}"  # same across reconnects

    def stop(self, *_: Any) -> None:
        self._stopping = True

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def run(self) -> None:
        self.executor.start()
        self.connect()
        try:
            while not self._stopping:
                self.serve_once()
        finally:
            self.close()

    def serve_once(self) -> None:
        now = time.monotonic()
        timeout = 0 if now < self._spin_until else int(self.config.heartbeat_interval * 500)
        events = dict(self.poller.poll(timeout))
        if events and self.config.spin_us:
            self._spin_until = time.monotonic() + self.config.spin_us / 1e6
        if self.results in events:
            self._drain(self.results, self.forward_result)
        if self.broker in events:
            self._drain(self.broker, self.on_broker_message)
        now = time.monotonic()
        if now - self.last_heard > self.config.heartbeat_liveness:
            log.warning(
                "%s: broker silent for %.1f s; reconnecting", self.name, now - self.last_heard
            )
            self.connect()
        elif now - self.last_sent > self.config.heartbeat_interval:
            self.send(WCmd.HEARTBEAT, {})

    def _drain(self, sock: zmq.Socket, handle: Any) -> None:
        for _ in range(256):
            try:
                frames = recv_frames(sock, NOBLOCK)
            except zmq.Again:
                return
            try:
                handle(frames)
            except Exception:  # a bug must not stop the worker's I/O loop
                log.exception("%s: failed to handle a message", self.name)

    def connect(self) -> None:
        """(Re)connect to the broker and register; live models are dropped (fresh start)."""
        if self.broker is not None:
            self.broker.close(linger=0)
            self.forget_broker_state()
        self.broker = make_socket(self.ctx, zmq.DEALER)
        self.broker.connect(self.config.backend)
        self.poller = zmq.Poller()
        self.poller.register(self.broker, zmq.POLLIN)
        self.poller.register(self.results, zmq.POLLIN)
        self.register()

    def forget_broker_state(self) -> None:
        """The broker no longer knows us: drop its queued actions, fetches and live models.

        Jobs of the old registration are skipped by the exec thread (their generation is
        stale): their results would go to a broker that never asked for them.
        """
        self.executor.generation += 1
        self.waiting.clear()
        self.executor.put(UNLOAD_ALL)

    def register(self) -> None:
        self.last_heard = time.monotonic()
        self.send(
            WCmd.READY,
            {
                "name": self.name,
                "kind": self.config.kind,
                "pid": os.getpid(),
                "incarnation": self.incarnation,
                "memory_budget": self.config.memory_budget,
                "version": VERSION,
            },
        )

    def send(self, cmd: WCmd, header: dict[str, Any], payload: list[Any] = ()) -> None:
        send_frames(self.broker, build(WORKER_TAG, cmd, header, payload))
        self.last_sent = time.monotonic()

    def forward_result(self, frames: list[Any]) -> None:
        send_frames(self.broker, frames)
        self.last_sent = time.monotonic()

    # -- from the broker ----------------------------------------------------------

    def on_broker_message(self, frames: list[Any]) -> None:
        self.last_heard = time.monotonic()
        try:
            _, body = split_envelope(frames, hops=0)
            msg = parse_body(body, WORKER_TAG, WCmd, _LIMITS)
        except MTError as exc:
            log.warning("%s: dropped a malformed broker message: %s", self.name, exc)
            return
        if msg.cmd in (WCmd.READY, WCmd.HEARTBEAT):
            return
        if msg.cmd is WCmd.DISCONNECT:
            self.forget_broker_state()
            self.register()
        elif msg.cmd is WCmd.FETCH_MODEL:
            self.on_fetched(msg.header, msg.payload)
        else:
            self.submit(Job(msg.cmd, msg.header, msg.payload, generation=self.executor.generation))

    def submit(self, job: Job) -> None:
        """Hand a job to the exec thread, or park it behind a fetch of its model's bytes."""
        sha = str(job.header.get("sha256", ""))
        if sha in self.waiting:
            self.waiting[sha].append(job)
            return
        if job.cmd in NEEDS_BYTES:
            job.data = self.host.get(sha)
            if job.data is None:
                self.waiting[sha] = [job]
                self.send(WCmd.FETCH_MODEL, {"sha256": sha})
                return
        frames = self.executor.run_inline(job)
        if frames is not None:
            self.forward_result(frames)
        else:
            self.executor.put(job)

    def on_fetched(self, header: dict[str, Any], payload: list[Any]) -> None:
        sha = str(header.get("sha256", ""))
        jobs = self.waiting.pop(sha, [])
        data, error = None, None
        if header.get("status", 0) == 0 and len(payload) == 1:
            data = frame_bytes(payload[0])
            self.host.put(sha, data)
        else:
            error = LoadFailed(f"fetching the model from the broker failed: {header.get('error')}")
        for job in jobs:
            if job.cmd in NEEDS_BYTES:
                job.data, job.error = data, error
            self.executor.put(job)

    def close(self) -> None:
        if self.broker is not None:
            with contextlib.suppress(zmq.ZMQError):
                self.send(WCmd.DISCONNECT, {})
            self.broker.close(linger=200)
        self.executor.put(STOP)
        self.executor.join(timeout=10)
        self.results.close()
