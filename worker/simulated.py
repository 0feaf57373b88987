"""Simulated workers: the worker protocol with time taken from profiles, not models.

One process hosts `count` simulated workers, each with its own DEALER to the broker (so
the broker sees `count` independent workers), served by one I/O loop with a timer heap.
Nothing is computed: an action is answered when a real worker would have finished it,
by the timelines a real worker keeps (one loader, `exec_threads` exec executors, each
busy until its current action ends), with the same windows (an action that cannot
start by its `latest` gets its stage's TOO_LATE), budgets (device bytes; LOAD_NO_ROOM
when the sessions queued or running leave no room) and results (per-stage timings,
tier reports), so the controller cannot tell it from a real one. It is how the
controller is tested and measured with hundreds of workers and thousands of models on
a two-core machine (Clockwork's `worker_dummy` plays the same part).

Durations: a model's profile is drawn once from its sha256 (so every simulated worker
and every run agree): a base batch-1 time between `--min-exec-us` and `--max-exec-us`
(log-uniform), growing by 0.6x of it per extra row; host -> device from its byte size
(fetched once, as a real worker fetches the cold tier; only the size is kept) over a
fixed bandwidth; cold -> host one more full build. Each model charges its byte size
against the device budget, as the broker's planning assumes. Each run then takes its
profile time times lognormal noise (`--noise`, sigma; 0.05 by default), the spread of
execution times measured on the real CPU workers here. PROFILE_MODEL answers with
`samples` such draws per batch size. INFER outputs echo the input frames (one output
per input, renamed `output<i>`): a load generator checks answers, not values.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import itertools
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

import zmq

from mtcore import keys
from mtcore.actions import (
    TENANT_STATUS,
    ActionStatus,
    Infer,
    InferResult,
    LoadModel,
    LoadModelResult,
    ProfileModel,
    ProfileModelResult,
    RequestResult,
    Result,
    TierReport,
    Timing,
    UnloadModel,
    decode_action,
)
from mtcore.errors import MTError
from mtcore.protocol import VERSION, WORKER_TAG, Limits, WCmd, build, parse_body, split_envelope
from mtcore.transport import NOBLOCK, make_socket, recv_frames, send_frames

HOST_BANDWIDTH = 2_000.0  # bytes per microsecond, host -> device (what the CPU tier showed)
_LIMITS = Limits(
    max_frame_bytes=1 << 40, max_message_bytes=1 << 40, max_header_bytes=1 << 24, max_frames=1 << 20
)


@dataclass(frozen=True)
class SimProfile:
    """A simulated model's true durations, microseconds."""

    exec_b1: float
    per_row: float
    load_host: float
    load_cold: float

    def exec_us(self, rows: int) -> float:
        return self.exec_b1 + self.per_row * max(0, rows - 1)


def profile_for(sha: str, nbytes: int, low_us: float, high_us: float) -> SimProfile:
    """The profile of a model, drawn from its sha256: the same everywhere, every run."""
    seed = int.from_bytes(hashlib.sha256(sha.encode()).digest()[:8], "little")
    rng = random.Random(seed)
    base = math.exp(rng.uniform(math.log(low_us), math.log(high_us)))
    load_host = 500.0 + nbytes / HOST_BANDWIDTH
    return SimProfile(base, 0.6 * base, load_host, load_host + 20 * base)


@dataclass
class SimConfig:
    backend: str = "tcp://127.0.0.1:5556"
    count: int = 1  # simulated workers in this process
    name: str = "sim"  # worker i is named f"{name}-{i}"
    memory_budget: int = 1 << 30  # device bytes each
    exec_threads: int = 1
    noise: float = 0.05  # lognormal sigma of each run's time
    min_exec_us: float = 500.0
    max_exec_us: float = 20_000.0
    heartbeat_interval: float = 1.0
    seed: int = 0
    key_file: str = ""  # CURVE: one worker key for every simulated worker of the process


@dataclass
class SimWorker:
    """One simulated worker: its socket, timelines and device tier."""

    index: int
    sock: zmq.Socket
    exec_free: list[float]  # per exec executor: when it is free (monotonic seconds)
    loader_free: float = 0.0
    device: dict[str, int] = field(default_factory=dict)  # sha -> bytes, insertion = LRU
    ready: dict[str, float] = field(default_factory=dict)  # sha -> when its LOAD ends
    host: set[str] = field(default_factory=set)
    waiting: dict[str, list[Any]] = field(default_factory=dict)  # sha -> actions until fetched
    last_sent: float = 0.0
    incarnation: str = ""


class SimulatedWorkers:
    """`count` simulated workers behind one poll loop."""

    def __init__(self, config: SimConfig, ctx: zmq.Context | None = None) -> None:
        self.config = config
        self.ctx = ctx or zmq.Context.instance()
        self.rng = random.Random(config.seed)
        self.timers: list[tuple[float, int, SimWorker, list[Any]]] = []  # (due, seq, to, frames)
        self._seq = itertools.count()
        self.poller = zmq.Poller()
        self.workers = [self._worker(i) for i in range(config.count)]
        self.by_socket = {w.sock: w for w in self.workers}
        self.stopping = False
        self.sent = 0  # results sent, all workers
        self.sizes: dict[str, int] = {}  # sha -> model bytes, learned by fetching once

    def _worker(self, i: int) -> SimWorker:
        sock = make_socket(self.ctx, zmq.DEALER)
        if self.config.key_file:
            keys.read(self.config.key_file).apply_client(sock)
        sock.connect(self.config.backend)
        self.poller.register(sock, zmq.POLLIN)
        worker = SimWorker(i, sock, [0.0] * max(1, self.config.exec_threads))
        worker.incarnation = f"{os.getpid()}-sim{i}"
        self._send(worker, WCmd.READY, self._ready(worker))
        return worker

    def _ready(self, worker: SimWorker) -> dict[str, Any]:
        return {
            "name": f"{self.config.name}-{worker.index}",
            "kind": "sim",
            "pid": os.getpid(),
            "incarnation": worker.incarnation,
            "memory_budget": self.config.memory_budget,
            "host_budget": 1 << 40,
            "exec_threads": len(worker.exec_free),
            "version": VERSION,
        }

    # -- loop -----------------------------------------------------------------------

    def run(self, until: float = math.inf) -> None:
        while not self.stopping and time.monotonic() < until:
            self.turn()

    def turn(self) -> None:
        now = time.monotonic()
        timeout = self.config.heartbeat_interval / 2
        if self.timers:
            timeout = min(timeout, max(0.0, self.timers[0][0] - now))
        for sock, _ in self.poller.poll(int(timeout * 1000) or 1):
            self._drain(self.by_socket[sock])
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            _, _, worker, frames = heapq.heappop(self.timers)
            send_frames(worker.sock, frames)
            worker.last_sent = now
            self.sent += 1
        for worker in self.workers:
            if now - worker.last_sent >= self.config.heartbeat_interval:
                self._send(worker, WCmd.HEARTBEAT, {"tiers": self._tiers(worker).to_wire()})

    def _drain(self, worker: SimWorker) -> None:
        for _ in range(256):
            try:
                frames = recv_frames(worker.sock, NOBLOCK)
            except zmq.Again:
                return
            try:
                _, body = split_envelope(frames, hops=0)
                msg = parse_body(body, WORKER_TAG, WCmd, _LIMITS)
                if msg.cmd is WCmd.DISCONNECT:
                    worker.device.clear()
                    self._send(worker, WCmd.READY, self._ready(worker))
                elif msg.cmd is WCmd.FETCH_MODEL:
                    self.on_fetched(worker, msg.header, msg.payload)
                elif msg.cmd not in (WCmd.READY, WCmd.HEARTBEAT):
                    self.on_action(worker, decode_action(msg.cmd, msg.header), msg.payload)
            except MTError:
                continue  # the broker is trusted; a bad message is dropped, as a worker does

    def _send(self, worker: SimWorker, cmd: WCmd, header: dict[str, Any]) -> None:
        send_frames(worker.sock, build(WORKER_TAG, cmd, header))
        worker.last_sent = time.monotonic()

    def _at(self, due: float, worker: SimWorker, result: Result, payload: list[Any]) -> None:
        frames = build(WORKER_TAG, result.cmd, result.to_header(), payload)
        heapq.heappush(self.timers, (due, next(self._seq), worker, frames))

    # -- actions -------------------------------------------------------------------

    def noisy(self, us: float) -> float:
        return us * math.exp(self.rng.gauss(0.0, self.config.noise))

    def profile(self, sha: str) -> SimProfile:
        c = self.config
        return profile_for(sha, self.sizes[sha], c.min_exec_us, c.max_exec_us)

    def on_fetched(self, worker: SimWorker, header: dict[str, Any], payload: list[Any]) -> None:
        """The model's bytes: only their size is kept (what loads cost, what they hold)."""
        sha = str(header.get("sha256", ""))
        if header.get("status", 0) == 0 and len(payload) == 1:
            self.sizes[sha] = len(payload[0])
        for action in worker.waiting.pop(sha, []):
            if sha not in self.sizes:
                fail = LoadModelResult if isinstance(action, LoadModel) else ProfileModelResult
                status, why = ActionStatus.LOAD_FETCH_FAILED, "the store did not deliver"
                self._at(time.monotonic(), worker, fail(action.action, sha, status, why), [])
            else:
                self.on_action(worker, action, [])

    def on_action(self, worker: SimWorker, action: Any, payload: list[Any]) -> None:
        now = time.monotonic()
        sha = action.sha256
        if sha in worker.waiting:
            worker.waiting[sha].append(action)
            return
        if isinstance(action, (LoadModel, ProfileModel)) and sha not in self.sizes:
            worker.waiting[sha] = [action]  # the cold tier, as a real worker fetches it
            self._send(worker, WCmd.FETCH_MODEL, {"sha256": sha})
            return
        if isinstance(action, UnloadModel):
            if action.all:
                worker.device.clear()
            else:
                worker.device.pop(action.sha256, None)
                if action.forget:
                    worker.host.discard(action.sha256)
        elif isinstance(action, LoadModel):
            self.on_load(worker, action, now)
        elif isinstance(action, Infer):
            self.on_infer(worker, action, payload, now)
        elif isinstance(action, ProfileModel):
            self.on_profile(worker, action, now)

    def on_load(self, worker: SimWorker, action: LoadModel, now: float) -> None:
        sha, size = action.sha256, self.sizes[action.sha256]
        start = max(now + action.earliest, worker.loader_free)
        if start > now + action.latest:
            late = LoadModelResult(action.action, sha, ActionStatus.LOAD_TOO_LATE,
                                   "the loader could not start it in time")  # fmt: skip
            self._at(now, worker, late, [])
            return
        if sha in worker.device:
            self._at(start, worker, LoadModelResult(action.action, sha, tier="device"), [])
            return
        evicted = self._make_room(worker, size)
        if evicted is None:
            full = LoadModelResult(action.action, sha, ActionStatus.LOAD_NO_ROOM,
                                   "the device budget is full")  # fmt: skip
            self._at(start, worker, full, [])
            return
        tier = "host" if sha in worker.host else "cold"
        prof = self.profile(sha)
        took = self.noisy(prof.load_host if tier == "host" else prof.load_cold)
        worker.loader_free = start + took / 1e6
        worker.device[sha] = size
        worker.ready[sha] = worker.loader_free  # an INFER of it waits for this, as on a worker
        worker.host.add(sha)
        timing = Timing(queue=int((start - now) * 1e6), load=int(took))
        timing.total = timing.queue + timing.load
        result = LoadModelResult(action.action, sha, timing=timing, tiers=self._tiers(worker),
                                 evicted=evicted, tier=tier)  # fmt: skip
        self._at(worker.loader_free, worker, result, [])

    def _make_room(self, worker: SimWorker, size: int) -> list[str] | None:
        free = self.config.memory_budget - sum(worker.device.values())
        victims = []
        for sha, held in worker.device.items():
            if free >= size:
                break
            victims.append(sha)
            free += held
        if free < size:
            return None
        for sha in victims:
            del worker.device[sha]
        return victims

    def on_infer(self, worker: SimWorker, action: Infer, payload: list[Any], now: float) -> None:
        sha = action.sha256
        lane = min(range(len(worker.exec_free)), key=worker.exec_free.__getitem__)
        start = max(now + action.earliest, worker.exec_free[lane], worker.ready.get(sha, 0.0))
        status, error = ActionStatus.OK, ""
        if sha not in worker.device:
            status, error = ActionStatus.EXEC_MODEL_MISSING, "the model is not loaded here"
        elif start > now + action.latest:
            missed = (start - now - action.latest) * 1e3
            status, error = ActionStatus.EXEC_TOO_LATE, f"window closed {missed:.1f} ms before"
        if status is not ActionStatus.OK:
            code = int(TENANT_STATUS[status])
            results = [RequestResult(rid, code, error, []) for rid, _ in action.requests]
            self._at(now, worker, InferResult(action.action, sha, status, error,
                                              results=results), [])  # fmt: skip
            return
        rows = sum(_rows(descs) for _, descs in action.requests)
        took = self.noisy(self.profile(sha).exec_us(rows))
        worker.exec_free[lane] = start + took / 1e6
        worker.device[sha] = worker.device.pop(sha)  # most recently used
        results, frames, it = [], [], iter(payload)
        for rid, descs in action.requests:
            outs = [[f"output{i}", d[1], d[2]] for i, d in enumerate(descs)]
            frames.extend(next(it) for _ in descs)
            results.append(RequestResult(rid, 0, None, outs))
        timing = Timing(queue=int((start - now) * 1e6), exec=int(took))
        timing.total = timing.queue + timing.exec
        result = InferResult(action.action, sha, timing=timing, results=results)
        self._at(worker.exec_free[lane], worker, result, frames)

    def on_profile(self, worker: SimWorker, action: ProfileModel, now: float) -> None:
        prof = self.profile(action.sha256)
        samples = {b: [self.noisy(prof.exec_us(b)) for _ in range(action.samples)]
                   for b in action.batches}  # fmt: skip
        took = sum(map(sum, samples.values())) + prof.load_cold
        start = max(now, worker.loader_free)
        worker.loader_free = start + took / 1e6
        worker.host.add(action.sha256)
        result = ProfileModelResult(
            action.action, action.sha256, tiers=self._tiers(worker), profile=samples,
            prepare_us=prof.load_cold, build_us=[self.noisy(prof.load_host) for _ in range(5)],
            fresh_us=prof.load_cold, weight_bytes=self.sizes[action.sha256],
            session_bytes=self.sizes[action.sha256],
        )  # fmt: skip
        self._at(worker.loader_free, worker, result, [])

    def _tiers(self, worker: SimWorker) -> TierReport:
        used = sum(worker.device.values())
        return TierReport(sorted(worker.host), 0, 1 << 40, list(worker.device), used,
                          max(0, self.config.memory_budget - used))  # fmt: skip

    def close(self) -> None:
        for worker in self.workers:
            with contextlib.suppress(zmq.ZMQError):
                self._send(worker, WCmd.DISCONNECT, {})
            worker.sock.close(linger=100)


def _rows(descs: list[Any]) -> int:
    """Rows of one request: the leading dimension of its first input (1 for a scalar)."""
    if not descs or not descs[0][2]:
        return 1
    return int(descs[0][2][0])
