"""The exec task: run one INFER batch on a device-tier session and build its result.

Exec threads check the model's session out of the device tier for the run and back in
after, so the loader never releases a session (or the pages under it) mid-run. Every
stage is timed: queue (received -> claimed), input (frames -> arrays), exec, output.
"""

from __future__ import annotations

import math
import time
from typing import Any

from mtcore.actions import (
    TENANT_STATUS,
    ActionStatus,
    Infer,
    InferResult,
    RequestResult,
    Timing,
)
from mtcore.errors import MTError, Status
from mtcore.protocol import DEFAULT_LIMITS, TensorDesc, decode_tensor, encode_tensor, parse_descs
from worker.engines import Engine, OnnxEngine
from worker.executor import Job
from worker.onnx_backend import RequestInputs
from worker.tiers import DeviceTier
from worker.watchdog import Watchdog

INLINE_BELOW_US = 50_000.0  # an INFER whose model last ran faster than this may run inline
INLINE_LIMIT_S = 0.5  # an inline run taking longer is stopped and rerun on an exec thread
MAX_OUTPUT_BYTES = DEFAULT_LIMITS.max_message_bytes  # per request: what a tenant may receive
STOPPED = object()  # an inline run that was stopped: queue it for an exec thread instead


class Runner:
    """Runs exec-lane jobs; shared by every exec thread and the I/O thread's inline runs."""

    def __init__(
        self, device: DeviceTier, watchdog: Watchdog, max_run_s: float,
        engine: Engine | None = None,
    ) -> None:  # fmt: skip
        self.device = device
        self.engine = engine or OnnxEngine()
        self.watchdog = watchdog
        self.max_run_s = max_run_s  # a model run longer than this is stopped
        self._layouts: dict[str, list[TensorDesc]] = {}  # repr of descriptions -> parsed

    def can_inline(self, job: Job) -> bool:
        runnable = self.device.peek(job.action.sha256)
        return runnable is not None and runnable.live.last_exec_us <= INLINE_BELOW_US

    def infer(self, job: Job, limit_s: float = 0.0, inline: bool = False) -> Any:
        """An InferResult; STOPPED when an inline run passed `limit_s` (rerun it queued)."""
        action = job.action
        assert isinstance(action, Infer)
        timing = Timing(queue=int(((job.claimed or time.monotonic()) - job.received) * 1e6))
        runnable = self.device.checkout(action.sha256)
        if runnable is None:
            return self.failed(
                job, ActionStatus.EXEC_MODEL_MISSING, "the model is not loaded on this worker"
            )
        try:
            return self._run(job, runnable.live, timing, limit_s or self.max_run_s, inline)
        finally:
            self.device.checkin(runnable)

    def _run(self, job: Job, model: Any, timing: Timing, limit_s: float, inline: bool) -> Any:
        start = time.perf_counter()
        try:
            batch = self._decode_requests(job)
        except MTError as exc:
            return self.failed(job, ActionStatus.INPUT_INVALID, exc.message)
        decoded = time.perf_counter()
        with self.watchdog.guard(limit_s) as options:
            outcomes = self.engine.run_batch(model, batch, options)
        ran = time.perf_counter()
        if options.terminate:
            model.last_exec_us = math.inf  # slow now: never inline this model again
            if inline:
                return STOPPED
            return self.failed(
                job, ActionStatus.EXEC_STOPPED, f"the model ran longer than {limit_s:g} s; stopped"
            )
        model.last_exec_us = (ran - decoded) * 1e6
        results, frames = self._encode(model, outcomes)
        timing.input = int((decoded - start) * 1e6)
        timing.exec = int((ran - decoded) * 1e6)
        timing.output = int((time.perf_counter() - ran) * 1e6)
        timing.total = timing.queue + timing.input + timing.exec + timing.output
        result = InferResult(job.action.action, job.action.sha256, timing=timing, results=results)
        return result, frames

    def _encode(self, model: Any, outcomes: list[Any]) -> tuple[list[RequestResult], list[Any]]:
        results, frames = [], []
        for rid, outputs, error in outcomes:
            if error is not None:
                status = int(getattr(error, "status", Status.EXEC_FAILED))
                results.append(RequestResult(rid, status, str(error), []))
                continue
            size = sum(array.nbytes for array in outputs)
            if size > MAX_OUTPUT_BYTES:
                error = f"outputs of {size} bytes exceed the {MAX_OUTPUT_BYTES}-byte reply limit"
                results.append(RequestResult(rid, int(Status.TOO_LARGE), error, []))
                continue
            descs = []
            for name, array in zip(model.output_names, outputs, strict=True):
                desc, buf = encode_tensor(name, array)
                descs.append(desc)
                frames.append(buf)
            results.append(RequestResult(rid, 0, None, descs))
        return results, frames

    def _decode_requests(self, job: Job) -> list[RequestInputs]:
        frames = iter(job.frames)
        batch = []
        for rid, descs in job.action.requests:
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

    def failed(self, job: Job, status: ActionStatus, error: str) -> tuple[InferResult, list]:
        """A result failing the whole batch: every request gets the tenant status."""
        tenant = int(TENANT_STATUS[status])
        results = [RequestResult(rid, tenant, error, []) for rid, _ in job.action.requests]
        return InferResult(job.action.action, job.action.sha256, status, error,
                           results=results), []  # fmt: skip
