"""The exec thread: runs actions one at a time and sends each result to the I/O thread.

It owns the live models (the device tier: ONNX Runtime sessions under a byte budget)
and one end of an inproc PAIR socket; it never touches the broker socket. Results are
complete worker-protocol messages, which the I/O thread forwards unchanged.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import zmq

from mtcore.errors import ExecFailed, LoadFailed, MTError, Status
from mtcore.protocol import (
    DEFAULT_LIMITS,
    WORKER_TAG,
    TensorDesc,
    WCmd,
    build,
    decode_tensor,
    encode_tensor,
    parse_descs,
)
from mtcore.transport import make_socket, send_frames
from worker.onnx_backend import LiveModel, RequestInputs, load_model, profile, run_batch
from worker.watchdog import Watchdog

log = logging.getLogger("mtserve.worker")


@dataclass
class Job:
    """An action handed from the I/O thread, with model bytes when it needs them."""

    cmd: WCmd
    header: dict[str, Any]
    frames: list[Any] = field(default_factory=list)
    data: bytes | None = None  # model bytes for LOAD/PROFILE
    error: MTError | None = None  # why the bytes could not be fetched
    generation: int = -1  # the worker's registration it belongs to; -1: any
    received: float = field(default_factory=time.monotonic)


STOP = Job(WCmd.DISCONNECT, {})  # sentinel: the thread exits
INLINE_BELOW_US = 50_000.0  # an INFER whose model last ran faster than this may run inline
MAX_OUTPUT_BYTES = DEFAULT_LIMITS.max_message_bytes  # per request: what a tenant may receive
INLINE_LIMIT_S = 0.5  # an inline run taking longer is stopped and rerun on the exec thread
UNLOAD_ALL = Job(WCmd.UNLOAD_MODEL, {"all": True})


class LiveModels:
    """Live sessions under a byte budget, least recently used first."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.models: OrderedDict[str, LiveModel] = OrderedDict()

    def get(self, sha: str) -> LiveModel | None:
        model = self.models.get(sha)
        if model is not None:
            self.models.move_to_end(sha)
        return model

    def make_room(self, need: int) -> list[str]:
        """Evict least-recently-used models until `need` bytes fit; return their shas."""
        evicted = []
        while self.models and self.used() + need > self.budget:
            sha, _ = self.models.popitem(last=False)
            evicted.append(sha)
        return evicted

    def add(self, model: LiveModel) -> None:
        self.models[model.sha256] = model

    def drop(self, sha: str) -> None:
        self.models.pop(sha, None)

    def used(self) -> int:
        return sum(m.nbytes for m in self.models.values())


class Executor(threading.Thread):
    """Runs LOAD, UNLOAD, INFER and PROFILE jobs in arrival order."""

    def __init__(
        self, ctx: zmq.Context, address: str, budget: int, threads: int, max_run_s: float = 60.0
    ) -> None:
        super().__init__(name="mtserve-exec", daemon=True)
        self.ctx = ctx
        self.address = address  # inproc PAIR endpoint bound by the I/O thread
        self.jobs: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self.live = LiveModels(budget)
        self.threads = threads  # ONNX Runtime intra-op threads per session
        # Each counter has one writer (I/O thread, exec thread), so reading both is safe.
        self.submitted = 0  # jobs put on the queue
        self.completed = 0  # jobs the exec thread has finished
        self.generation = 0  # current registration with the broker (I/O thread writes)
        self.max_run_s = max_run_s  # a model run longer than this is stopped
        self.watchdog = Watchdog()
        self._layouts: dict[str, list[TensorDesc]] = {}  # repr of descriptions -> parsed

    def start(self) -> None:
        super().start()
        self.watchdog.start()

    def put(self, job: Job) -> None:
        """Queue a job for the exec thread (called by the I/O thread only)."""
        self.submitted += 1
        self.jobs.put(job)

    def run_inline(self, job: Job) -> list[Any] | None:
        """Run a short INFER on the calling (I/O) thread when the exec thread is idle.

        Handing a job to the exec thread and its result back costs two thread wake-ups,
        a few hundred microseconds on these machines, against tens for a small model.
        When nothing is queued or running, the exec thread is parked and cannot touch
        the live models, so the I/O thread may run the job itself; order is kept because
        only the I/O thread submits jobs. Returns None when the job must be queued.
        """
        if job.cmd is not WCmd.INFER or self.submitted != self.completed:
            return None
        model = self.live.get(job.header.get("sha256", ""))
        if model is None or model.last_exec_us > INLINE_BELOW_US:
            return None
        return self.handle(job, inline=True)

    def run(self) -> None:
        sock = make_socket(self.ctx, zmq.PAIR)
        sock.connect(self.address)
        try:
            while (job := self.jobs.get()) is not STOP:
                frames = self.handle(job)
                if frames:
                    send_frames(sock, frames)
                self.completed += 1  # after the send: an inline result cannot overtake it
        finally:
            sock.close()

    def handle(self, job: Job, inline: bool = False) -> list[Any] | None:
        """Run one job; the result frames, or None when there is nothing to send."""
        if job.generation not in (-1, self.generation):
            return None  # queued for a broker registration that no longer exists
        try:
            if job.cmd is WCmd.LOAD_MODEL:
                return self.load(job)
            if job.cmd is WCmd.UNLOAD_MODEL:
                self.unload(job)
                return None
            if job.cmd is WCmd.INFER and inline:
                return self.infer(job, INLINE_LIMIT_S, requeue_if_stopped=True)
            if job.cmd is WCmd.INFER:
                return self.infer(job)
            if job.cmd is WCmd.PROFILE_MODEL:
                return self.profile(job)
        except Exception as exc:  # a bug: answer the action so its requests are not lost
            log.exception("exec thread failed on %s", job.cmd.name)
            return self._failed(
                job, MTError(f"worker bug in {job.cmd.name}: {exc}", Status.INTERNAL)
            )
        return None

    # -- actions ----------------------------------------------------------------

    def load(self, job: Job) -> list[Any]:
        sha = job.header["sha256"]
        start = time.perf_counter()
        evicted: list[str] = []
        if self.live.get(sha) is None:
            if job.error is not None:
                return self._failed(job, LoadFailed(job.error.message))
            evicted = self.live.make_room(len(job.data))
            try:
                self.live.add(load_model(sha, job.data, self.threads))
            except MTError as exc:
                return self._failed(job, LoadFailed(exc.message), evicted)
        timing = {"load": int((time.perf_counter() - start) * 1e6)}
        return self._result(job, {"status": 0, "timing": timing, "evicted": evicted})

    def unload(self, job: Job) -> None:
        if job.header.get("all"):
            self.live.models.clear()
        else:
            self.live.drop(job.header["sha256"])

    def infer(
        self, job: Job, limit_s: float = 0.0, requeue_if_stopped: bool = False
    ) -> list[Any] | None:
        """Run a batch under the watchdog; a run past `limit_s` fails its requests, or is
        handed back (None) for the exec thread to rerun when `requeue_if_stopped`."""
        start = time.perf_counter()
        waited = time.monotonic() - job.received
        latest = job.header.get("latest")
        if latest is not None and waited > latest:
            error = MTError(
                f"the worker could not start it in time (waited {waited * 1e3:.1f} ms)",
                Status.DEADLINE_EXPIRED,
            )
            return self._failed(job, error)
        model = self.live.get(job.header["sha256"])
        if model is None:
            return self._failed(job, LoadFailed("the model is not loaded on this worker"))
        batch = self._decode_requests(job)
        exec_start = time.perf_counter()
        limit_s = limit_s or self.max_run_s
        with self.watchdog.guard(limit_s) as options:
            outcomes = run_batch(model, batch, options)
        if options.terminate:
            model.last_exec_us = math.inf  # slow now: never inline this model again
            if requeue_if_stopped:
                return None
            return self._failed(
                job, ExecFailed(f"the model ran longer than {limit_s:g} s; stopped")
            )
        exec_us = (time.perf_counter() - exec_start) * 1e6
        model.last_exec_us = exec_us
        results, frames = [], []
        for rid, outputs, error in outcomes:
            if error is not None:
                results.append(
                    [rid, int(getattr(error, "status", Status.EXEC_FAILED)), str(error), []]
                )
                continue
            size = sum(array.nbytes for array in outputs)
            if size > MAX_OUTPUT_BYTES:
                error = f"outputs of {size} bytes exceed the {MAX_OUTPUT_BYTES}-byte reply limit"
                results.append([rid, int(Status.TOO_LARGE), error, []])
                continue
            descs = []
            for name, array in zip(model.output_names, outputs, strict=True):
                desc, buf = encode_tensor(name, array)
                descs.append(desc)
                frames.append(buf)
            results.append([rid, 0, None, descs])
        timing = {
            "exec": int(exec_us),
            "total": int((time.perf_counter() - start) * 1e6),
            "wait": int(waited * 1e6),
        }
        header = {"status": 0, "timing": timing, "results": results}
        return self._result(job, header, frames)

    def _decode_requests(self, job: Job) -> list[RequestInputs]:
        frames = iter(job.frames)
        batch = []
        for rid, descs in job.header["requests"]:
            arrays = [decode_tensor(d, next(frames)) for d in self._parsed(descs)]
            batch.append(RequestInputs(rid, arrays))
        return batch

    def _parsed(self, descs: list[Any]) -> list[TensorDesc]:
        """Parsed descriptions, cached by layout: a batch repeats one layout many times."""
        key = repr(descs)
        parsed = self._layouts.get(key)
        if parsed is None:
            if len(self._layouts) >= 256:
                self._layouts.clear()
            parsed = self._layouts[key] = parse_descs(descs)
        return parsed

    def profile(self, job: Job) -> list[Any]:
        if job.error is not None:
            return self._failed(job, job.error)
        sha = job.header["sha256"]
        try:
            model = self.live.get(sha) or load_model(sha, job.data, self.threads)
            with self.watchdog.guard(self.max_run_s) as options:
                measured = profile(
                    model, [int(b) for b in job.header.get("batches", [1])], 3, options
                )
        except MTError as exc:
            return self._failed(job, MTError(exc.message, Status.MODEL_INVALID))
        except Exception as exc:
            error = f"the model loads but fails to run on random inputs: {str(exc)[:400]}"
            return self._failed(job, MTError(error, Status.MODEL_INVALID))
        header = {
            "status": 0,
            "profile": {str(b): us for b, us in measured.items()},
            "load_us": model.load_us,
        }
        return self._result(job, header)

    # -- results ------------------------------------------------------------------

    def _result(self, job: Job, header: dict[str, Any], frames: list[Any] = ()) -> list[Any]:
        header["action"] = job.header.get("action", 0)
        header["sha256"] = job.header.get("sha256")
        return build(WORKER_TAG, job.cmd, header, frames)

    def _failed(self, job: Job, error: MTError, evicted: list[str] = ()) -> list[Any]:
        header: dict[str, Any] = {
            "status": int(error.status),
            "error": error.message,
            "evicted": list(evicted),
        }
        if job.cmd is WCmd.INFER:
            header["results"] = [
                [rid, int(error.status), error.message, []] for rid, _ in job.header["requests"]
            ]
        return self._result(job, header)
