"""The worker process: an I/O thread, a loader executor and exec executors.

The I/O thread owns the DEALER to the broker. It decodes each action once into its
typed struct (`mtcore.actions`), wraps it in a `Job` stamped with its receipt time, and
puts it into the lock-free request table (`ext.ActionTable`) in its lane; the executors
(`worker.executor`) claim from there. Results come back on an inproc PULL and are
forwarded unchanged. Three kinds of job wait in the I/O thread instead:

- a LOAD or PROFILE of a model in neither tier waits for a FETCH_MODEL answer (the cold
  tier is the broker's store), which is sent again if it is lost;
- an INFER of a model whose LOAD is still queued or running waits for that LOAD's
  result, so an exec thread never races its own model's load; likewise an UNLOAD waits
  for the INFERs of its model queued before it (the lanes run in parallel, the broker's
  order must hold);
- a short INFER runs inline on the I/O thread when no exec-lane job is outstanding
  (two thread hand-offs cost more than the run).

If the broker falls silent the worker reconnects and registers again; the host tier
(content-addressed weights) survives that, the device tier does not.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import secrets
import signal
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import zmq

from ext import ActionTable
from mtcore import keys
from mtcore.actions import (
    ActionStatus,
    Infer,
    LoadModel,
    LoadModelResult,
    ProfileModel,
    ProfileModelResult,
    Result,
    UnloadModel,
    decode_action,
)
from mtcore.config import WorkerConfig
from mtcore.errors import LoadFailed, MTError
from mtcore.protocol import (
    VERSION,
    WORKER_TAG,
    Limits,
    WCmd,
    build,
    decode_header,
    frame_bytes,
    parse_body,
    split_envelope,
)
from mtcore.transport import NOBLOCK, make_socket, recv_frames, send_frames
from worker.engines import choose_engine
from worker.executor import EXEC, LOADER, ExecutorThread, Job, result_frames
from worker.loader import NEED_BYTES, Loader
from worker.runner import INLINE_LIMIT_S, STOPPED, Runner
from worker.tiers import DeviceTier, HostTier, set_run_memory
from worker.watchdog import Watchdog

log = logging.getLogger("mtserve.worker")

_LIMITS = Limits(
    max_frame_bytes=1 << 40, max_message_bytes=1 << 40, max_header_bytes=1 << 24, max_frames=1 << 20
)  # the broker is trusted: bound only absurd input
WAKE = b"wake"  # an executor's one-frame note: look at the need-bytes queue
MAX_RESTARTS = 3  # executor threads found dead before the worker gives up and leaves
LANES = {LoadModel: LOADER, UnloadModel: LOADER, ProfileModel: LOADER, Infer: EXEC}


def session_threads(config: WorkerConfig) -> int:
    """ONNX Runtime threads per session: all cores shared by the exec threads, if unset."""
    if config.intra_op_threads:
        return config.intra_op_threads
    if config.exec_threads <= 1:
        return 0  # ORT's own choice: one thread per core
    return max(1, (os.cpu_count() or 1) // config.exec_threads)


class Worker:
    """I/O loop of one worker process."""

    def __init__(self, config: WorkerConfig, ctx: zmq.Context | None = None) -> None:
        self.config = config
        self.ctx = ctx or zmq.Context.instance()
        self.name = config.name or f"worker-{os.getpid()}"
        threads = session_threads(config)
        self.watchdog = Watchdog()
        set_run_memory(config.run_memory)
        workdir = Path(tempfile.mkdtemp(prefix="mtserve-tiers-"))
        self.engine = choose_engine(config.engine, threads, device_bytes=config.memory_budget,
                                    page_size=config.page_size)  # fmt: skip
        self.kind = config.kind or self.engine.kind
        self.host = HostTier(self.engine.host_pool(config.host_budget, config.page_size), workdir)
        self.device = DeviceTier(config.memory_budget, busy=self.has_queued_infers)
        self.loader = Loader(self.host, self.device, threads, self.watchdog,
                             config.max_run_seconds, self.engine)  # fmt: skip
        self.runner = Runner(self.device, self.watchdog, config.max_run_seconds, self.engine)
        self.table = ActionTable(config.table_slots)
        self.address = f"inproc://mtserve-results-{id(self)}"
        self.results = make_socket(self.ctx, zmq.PULL)  # from every executor thread
        self.results.bind(self.address)
        self.wakes = {LOADER: threading.Semaphore(0), EXEC: threading.Semaphore(0)}
        self.submitted = Counter()  # lane -> jobs put into the table (I/O thread writes)
        self.generation = 0  # current registration with the broker
        self.executors: list[ExecutorThread] = []
        self.restarts = 0  # executor threads found dead and replaced
        self.need_bytes: queue.SimpleQueue[Job] = queue.SimpleQueue()  # loader -> I/O
        self.infer_done: queue.SimpleQueue[tuple[int, str]] = queue.SimpleQueue()  # (gen, sha)
        self.waiting: dict[str, list[Job]] = {}  # sha -> jobs parked until its bytes arrive
        self.fetching: dict[str, tuple[float, int]] = {}  # sha -> (sent at, attempts)
        self.loads_pending: Counter[str] = Counter()  # sha -> LOADs in the table
        self.behind_load: dict[str, list[Job]] = {}  # sha -> INFERs waiting for its LOAD
        self.infers_pending: Counter[str] = Counter()  # sha -> INFERs in the table
        self.behind_infers: dict[str, list[Job]] = {}  # sha -> UNLOADs waiting for its INFERs
        self.broker: zmq.Socket | None = None  # DEALER, replaced on reconnect
        self.last_heard = 0.0  # monotonic: last message from the broker
        self.last_sent = 0.0  # monotonic: last message to the broker
        self.heartbeat_every = config.heartbeat_interval  # shortened by the broker's READY
        self._stopping = False
        self.poller = zmq.Poller()  # broker and results, rebuilt on reconnect
        self._spin_until = 0.0  # busy-poll until then (config.spin_us after a message)
        self.incarnation = f"{os.getpid()}-{secrets.token_hex(8)}"  # same across reconnects
        self.key = keys.read(config.key_file) if config.key_file else None  # CURVE identity

    # -- lifecycle ----------------------------------------------------------------

    def stop(self, *_: Any) -> None:
        self._stopping = True

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def start_executors(self) -> None:
        self.watchdog.start()
        self.executors = [self._executor("mtserve-loader", LOADER)]
        for i in range(max(1, self.config.exec_threads)):
            self.executors.append(self._executor(f"mtserve-exec-{i}", EXEC))
        for thread in self.executors:
            thread.start()

    def _executor(self, name: str, lane: int) -> ExecutorThread:
        handle = self.run_loader_job if lane == LOADER else self.run_exec_job
        return ExecutorThread(name, lane, self.table, self.wakes[lane], handle, self.reject,
                              self.ctx, self.address, lambda: self.generation)  # fmt: skip

    def run(self) -> None:
        self.start_executors()
        self.connect()
        try:
            while not self._stopping:
                self.serve_once()
        finally:
            self.close()

    def serve_once(self) -> None:
        now = time.monotonic()
        timeout = 0 if now < self._spin_until else self._next_heartbeat_ms(now)
        events = dict(self.poller.poll(timeout))
        if events and self.config.spin_us:
            self._spin_until = time.monotonic() + self.config.spin_us / 1e6
        if self.results in events:
            self._drain(self.results, self.on_executor_message)
        self.after_executors()
        if self.broker in events:
            self._drain(self.broker, self.on_broker_message)
        now = time.monotonic()
        self.check_executors()
        self.retry_fetches(now)
        if now - self.last_heard > self.config.heartbeat_liveness:
            log.warning(
                "%s: broker silent for %.1f s; reconnecting", self.name, now - self.last_heard
            )
            self.connect()
        elif now - self.last_sent >= self.heartbeat_every:
            self.send(WCmd.HEARTBEAT, self.health())

    def _next_heartbeat_ms(self, now: float) -> int:
        """Sleep until the next heartbeat is due (at most half an interval), so an idle
        or busy worker is heard from every interval, never one and a half."""
        interval = self.heartbeat_every
        due = self.last_sent + interval - now
        return max(1, int(min(due, interval / 2) * 1000))

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
        """(Re)connect to the broker and register; runnable models are dropped."""
        if self.broker is not None:
            self.broker.close(linger=0)
            self.forget_broker_state()
        self.broker = make_socket(self.ctx, zmq.DEALER)
        if self.key is not None:
            self.key.apply_client(self.broker)  # CURVE: the broker checks this key's role
        self.broker.connect(self.config.backend)
        self.poller = zmq.Poller()
        self.poller.register(self.broker, zmq.POLLIN)
        self.poller.register(self.results, zmq.POLLIN)
        self.register()

    def forget_broker_state(self) -> None:
        """The broker no longer knows us: drop its queued actions, fetches and sessions.

        Jobs of the old registration are skipped by the executors (their generation is
        stale): their results would go to a broker that never asked for them. The host
        tier stays: its contents are named by their bytes' hash, valid for any broker.
        """
        self.generation += 1
        self.waiting.clear()
        self.fetching.clear()
        self.behind_load.clear()
        self.loads_pending.clear()
        self.behind_infers.clear()
        self.infers_pending.clear()
        self.put(Job(UnloadModel(0, "", all=True)))

    def register(self) -> None:
        self.last_heard = time.monotonic()
        self.send(
            WCmd.READY,
            {
                "name": self.name,
                "kind": self.kind,
                "engine": self.engine.name,
                "pid": os.getpid(),
                "incarnation": self.incarnation,
                "memory_budget": self.config.memory_budget,
                "host_budget": self.config.host_budget,
                "run_memory": self.config.run_memory,
                "exec_threads": max(1, self.config.exec_threads),
                "version": VERSION,
            },
        )

    def health(self) -> dict[str, Any]:
        """What every heartbeat carries: tier contents and free bytes, executor health."""
        return {
            "tiers": self.loader.tiers().to_wire(),
            "executors": len(self.executors),
            "restarts": self.restarts,
        }

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
            if msg.cmd is WCmd.READY:
                self.on_registered(msg.header)
                return
            if msg.cmd is WCmd.HEARTBEAT:
                return
            if msg.cmd is WCmd.DISCONNECT:
                self.forget_broker_state()
                if msg.header.get("refused"):  # registering again would be refused again
                    log.error("%s: the broker refused us: %s", self.name, msg.header.get("reason"))
                    return  # the liveness timer reconnects and tries later
                self.register()
                return
            if msg.cmd is WCmd.FETCH_MODEL:
                self.on_fetched(msg.header, msg.payload)
                return
            action = decode_action(msg.cmd, msg.header)
        except MTError as exc:
            log.warning("%s: dropped a malformed broker message: %s", self.name, exc)
            return
        self.submit(Job(action, msg.payload, generation=self.generation))

    def on_registered(self, header: dict[str, Any]) -> None:
        """Heartbeat at least three times per broker liveness period, so a busy moment
        (a load holding the GIL, a loaded machine) never reads as a lost worker."""
        liveness = header.get("heartbeat_liveness")
        if isinstance(liveness, (int, float)) and liveness > 0:
            self.heartbeat_every = min(self.config.heartbeat_interval, liveness / 3)

    def submit(self, job: Job, fetched: bool = False) -> None:
        """Route a job: park it behind a fetch, a load or INFERs, run it inline, or queue
        it. `fetched`: it was waiting for its model's bytes, which have now arrived."""
        action, sha = job.action, job.action.sha256
        if not fetched:
            if sha in self.waiting:
                self.waiting[sha].append(job)
                return
            if isinstance(action, (LoadModel, ProfileModel)) and not self.loader.has(sha):
                self.fetch(sha, [job])
                return
        if isinstance(action, Infer):
            if self.loads_pending[sha]:
                self.behind_load.setdefault(sha, []).append(job)
                return
            if self.try_inline(job):
                return
        if isinstance(action, UnloadModel) and self.unload_must_wait(sha):
            self.behind_infers.setdefault(sha, []).append(job)
            return
        self.put(job)

    def unload_must_wait(self, sha: str) -> bool:
        """INFERs of the model came before the UNLOAD: queued, or parked behind its LOAD."""
        return self.infers_pending[sha] > 0 or sha in self.behind_load

    def has_queued_infers(self, sha: str) -> bool:
        """Whether INFERs of this model wait in the table (the device tier keeps it)."""
        return self.infers_pending[sha] > 0

    def put(self, job: Job) -> None:
        lane = LANES[type(job.action)]
        if isinstance(job.action, LoadModel):
            self.loads_pending[job.action.sha256] += 1
        elif isinstance(job.action, Infer):
            self.infers_pending[job.action.sha256] += 1
        try:
            self.table.put(job, lane, job.earliest, job.latest)
        except MemoryError:  # TableFull: answer at once rather than hold it unbounded
            if isinstance(job.action, UnloadModel):  # no answer to give: do it here
                self.unload_here(job.action)
                return
            frames = self.reject(job, _full_status(job), "the worker's request table is full")
            if frames:
                self.on_executor_message(frames)
            return
        self.submitted[lane] += 1
        self.wakes[lane].release()

    def unload_here(self, action: UnloadModel) -> None:
        """Drop sessions from the I/O thread (the device tier takes its lock); the host
        tier is the loader's, so a `forget` leaves its pages to LRU eviction."""
        if action.all:
            self.device.clear()
        else:
            self.device.drop(action.sha256)

    def try_inline(self, job: Job) -> bool:
        """Run a short INFER on this thread when no exec-lane job is outstanding.

        Handing a job to an exec thread and its result back costs two thread wake-ups, a
        few hundred microseconds here, against tens for a small model; order is kept
        because only this thread submits. A run past INLINE_LIMIT_S is stopped and
        queued for an exec thread instead.
        """
        done = sum(t.completed for t in self.executors if t.lane == EXEC)
        if self.submitted[EXEC] != done or not self.runner.can_inline(job):
            return False
        if job.latest < time.monotonic():
            return False  # let an executor answer it as too late
        try:
            outcome = self.runner.infer(job, INLINE_LIMIT_S, inline=True)
        except Exception as exc:  # a bug: answer, or the request waits for action_timeout
            log.exception("%s: inline INFER failed", self.name)
            result, _ = self.runner.failed(job, ActionStatus.INTERNAL, f"worker bug: {exc}")
            self.forward_result(result_frames(result))
            return True
        if outcome is STOPPED:
            return False
        result, payload = outcome
        self.forward_result(result_frames(result, payload))
        return True

    # -- the cold tier -------------------------------------------------------------

    def fetch(self, sha: str, jobs: list[Job]) -> None:
        self.waiting.setdefault(sha, []).extend(jobs)
        if sha not in self.fetching:
            self.fetching[sha] = (time.monotonic(), 1)
            self.send(WCmd.FETCH_MODEL, {"sha256": sha})

    def retry_fetches(self, now: float) -> None:
        """Send a FETCH_MODEL again when its answer is overdue; fail its jobs at the end."""
        for sha, (sent, attempts) in list(self.fetching.items()):
            if now - sent < self.config.fetch_timeout:
                continue
            if attempts >= self.config.fetch_attempts:
                del self.fetching[sha]
                why = f"no answer to FETCH_MODEL after {attempts} attempts"
                self.release_fetched(sha, None, LoadFailed(f"fetching the model failed: {why}"))
                continue
            log.warning("%s: FETCH_MODEL %s unanswered; asking again", self.name, sha[:12])
            self.fetching[sha] = (now, attempts + 1)
            self.send(WCmd.FETCH_MODEL, {"sha256": sha})

    def on_fetched(self, header: dict[str, Any], payload: list[Any]) -> None:
        sha = str(header.get("sha256", ""))
        if self.fetching.pop(sha, None) is None:
            return  # an answer to a fetch we gave up on, or a duplicate
        if header.get("status", 0) == 0 and len(payload) == 1:
            self.release_fetched(sha, frame_bytes(payload[0]), None)
        else:
            error = LoadFailed(f"fetching the model from the broker failed: {header.get('error')}")
            self.release_fetched(sha, None, error)

    def release_fetched(self, sha: str, data: bytes | None, error: MTError | None) -> None:
        for job in self.waiting.pop(sha, []):
            if isinstance(job.action, (LoadModel, ProfileModel)):
                job.data, job.error = data, error
            self.submit(job, fetched=True)

    # -- from the executors --------------------------------------------------------

    def on_executor_message(self, frames: list[Any]) -> None:
        if len(frames) == 1 and frame_bytes(frames[0]) == WAKE:
            return  # the queues are read in after_executors
        self.forward_result(frames)
        if frame_bytes(frames[2]) == WCmd.LOAD_MODEL.value:
            self.load_ended(str(decode_header(frames[3]).get("sha256", "")))

    def load_ended(self, sha: str) -> None:
        """A LOAD's result went to the broker: the INFERs parked behind it may go now, so
        the broker hears of the load before any result of those INFERs."""
        for job in _count_down(self.loads_pending, sha, self.behind_load):
            self.put(job)

    def after_executors(self) -> None:
        """Act on what executors left for this thread: finished actions, missing bytes."""
        for generation, sha in _drained(self.infer_done):
            if generation not in (-1, self.generation):
                continue  # counted under a registration that is gone
            for job in _count_down(self.infers_pending, sha, self.behind_infers):
                self.put(job)
        for job in _drained(self.need_bytes):
            if job.generation not in (-1, self.generation):
                continue
            if isinstance(job.action, LoadModel):
                self.loads_pending[job.action.sha256] -= 1  # put() counts it again
            self.fetch(job.action.sha256, [job])
        self.table.reap()

    def check_executors(self) -> None:
        """Replace an executor thread that died; answer the action it was running.

        A worker whose executors keep dying cannot run work: past MAX_RESTARTS it
        leaves (DISCONNECT), and the broker retries its requests elsewhere.
        """
        for i, thread in enumerate(self.executors):
            if thread.is_alive() or self._stopping:
                continue
            self.restarts += 1
            if self.restarts > MAX_RESTARTS:
                log.error("%s: executors died %d times; leaving", self.name, self.restarts)
                self._stopping = True
            else:
                log.error("%s: executor %s died; starting a new one", self.name, thread.name)
            if thread.current is not None:
                slot, job = thread.current
                frames = self.reject(job, ActionStatus.INTERNAL, f"executor {thread.name} died")
                if frames:
                    self.on_executor_message(frames)
                self.table.finish(slot)
                thread.completed += 1
            if self._stopping:
                return
            fresh = self._executor(thread.name, thread.lane)
            fresh.completed = thread.completed
            self.executors[i] = fresh
            fresh.start()

    # -- handlers (executor threads) -----------------------------------------------

    def run_loader_job(self, job: Job) -> list[Any] | None:
        action = job.action
        if isinstance(action, UnloadModel):
            self.loader.unload(job)
            return None
        load = isinstance(action, LoadModel)
        outcome = self.loader.load(job) if load else self.loader.profile(job)
        if outcome is NEED_BYTES:
            self.need_bytes.put(job)
            return [WAKE]
        return result_frames(outcome)

    def run_exec_job(self, job: Job) -> list[Any]:
        try:
            result, payload = self.runner.infer(job)
        finally:
            self.infer_done.put((job.generation, job.action.sha256))
        return result_frames(result, payload)

    def reject(self, job: Job, status: ActionStatus, error: str) -> list[Any] | None:
        """Frames of a result failing the whole action (any thread)."""
        action = job.action
        result: Result
        if isinstance(action, Infer):
            if job.claimed == 0.0 or status is not ActionStatus.INTERNAL:
                self.infer_done.put((job.generation, action.sha256))  # else counted already
            result, _ = self.runner.failed(job, status, error)
        elif isinstance(action, LoadModel):
            result = LoadModelResult(action.action, action.sha256, status, error)
        elif isinstance(action, ProfileModel):
            result = ProfileModelResult(action.action, action.sha256, status, error)
        else:
            return None
        return result_frames(result)

    def close(self) -> None:
        if self.broker is not None:
            with contextlib.suppress(zmq.ZMQError):
                self.send(WCmd.DISCONNECT, {})
            self.broker.close(linger=200)
        for thread in self.executors:
            thread.stopping = True
            self.wakes[thread.lane].release()
        for thread in self.executors:
            thread.join(timeout=10)
        self.watchdog.stop()  # after the joins: a run still going can still be stopped
        self.results.close()
        if any(thread.is_alive() for thread in self.executors):
            # A run or a load is still using pages: unmapping them under it would crash
            # the process. The OS reclaims them when it exits.
            log.error("%s: an executor did not stop; leaving the pools mapped", self.name)
            return
        self.device.clear()
        self.host.close()
        self.table.close()
        self.engine.close()  # device pool, streams; pinned host pages unregistered
        with contextlib.suppress(BufferError):
            self.host.pool.close()


def _full_status(job: Job) -> ActionStatus:
    if isinstance(job.action, Infer):
        return ActionStatus.EXEC_TOO_LATE
    return ActionStatus.LOAD_TOO_LATE


def _drained(q: queue.SimpleQueue) -> list[Any]:
    """Everything in a queue now, without blocking."""
    items = []
    while True:
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            return items


def _count_down(pending: Counter[str], sha: str, parked: dict[str, list[Job]]) -> list[Job]:
    """One action of `sha` ended; the jobs parked behind its kind, once none is left."""
    pending[sha] -= 1
    if pending[sha] > 0:
        return []
    del pending[sha]
    return parked.pop(sha, [])
