"""The loader's tasks: LOAD (cold -> host -> device), UNLOAD, and PROFILE.

The loader thread is the only writer of the host tier and the only one that adds or
drops device-tier sessions; exec threads only check sessions out and back in. A LOAD
or PROFILE whose model is in neither tier and came without bytes returns `NEED_BYTES`:
the I/O thread fetches them from the broker and queues the job again.
"""

from __future__ import annotations

import time
from typing import Any

from mtcore.actions import (
    ActionStatus,
    LoadModel,
    LoadModelResult,
    ProfileModel,
    ProfileModelResult,
    Result,
    TierReport,
    Timing,
    UnloadModel,
)
from mtcore.errors import ModelInvalid, MTError, PoolExhausted
from worker.engines import Engine, OnnxEngine
from worker.executor import Job
from worker.tiers import DeviceTier, HostModel, HostTier, Runnable
from worker.watchdog import Watchdog

NEED_BYTES = object()  # returned when the model's bytes must be fetched first
BUILD_SAMPLES = 5  # host -> device builds measured when profiling


def load_status(exc: MTError) -> ActionStatus:
    """The stage status of a failed LOAD."""
    if isinstance(exc, PoolExhausted):
        return ActionStatus.LOAD_POOL_EXHAUSTED
    if isinstance(exc, ModelInvalid):
        return ActionStatus.LOAD_INVALID
    return ActionStatus.LOAD_NO_ROOM


class Loader:
    """Runs loader-lane jobs against the two tiers."""

    def __init__(
        self, host: HostTier, device: DeviceTier, threads: int, watchdog: Watchdog,
        max_run_s: float, engine: Engine | None = None,
    ) -> None:  # fmt: skip
        self.host = host
        self.device = device
        self.engine = engine or OnnxEngine(threads)  # threads: ONNX Runtime's, per session
        self.watchdog = watchdog
        self.max_run_s = max_run_s  # a profiling run longer than this is stopped

    def tiers(self) -> TierReport:
        host, device = self.host.describe(), self.device.describe()
        return TierReport(
            host["models"], host["used"], host["free"],
            device["models"], device["used"], device["free"],
        )  # fmt: skip

    def has(self, sha: str) -> bool:
        """Whether a LOAD of this model can run without fetching bytes."""
        return sha in self.device.models or sha in self.host.models

    # -- LOAD -------------------------------------------------------------------

    def load(self, job: Job) -> Result | object:
        action = job.action
        assert isinstance(action, LoadModel)
        start = time.perf_counter()
        if self.device.peek(action.sha256) is not None:
            return self._loaded(job, start, "device", [])
        try:
            host, tier = self._host_model(job)
            if host is None:
                return NEED_BYTES
            evicted = self._make_runnable(host)
        except MTError as exc:
            status = ActionStatus.LOAD_FETCH_FAILED if exc is job.error else load_status(exc)
            return self._failed(job, LoadModelResult, status, exc.message)
        return self._loaded(job, start, tier, evicted)

    def _host_model(self, job: Job) -> tuple[HostModel | None, str]:
        sha = job.action.sha256
        host = self.host.get(sha)
        if host is not None:
            return host, "host"
        if job.error is not None:
            raise job.error
        if job.data is None:
            return None, "cold"
        host = self.engine.prepare(self.host, sha, job.data)
        try:
            host.session_bytes = self.engine.session_bytes(host, self._guard)
        except BaseException:
            self.host.drop(sha)  # it does not run: no pages kept for it
            raise
        job.data = None  # the bytes live in the pool now
        return host, "cold"

    def _guard(self) -> Any:
        return self.watchdog.guard(self.max_run_s)

    def _make_runnable(self, host: HostModel) -> list[str]:
        evicted = self.device.make_room(host.session_bytes)  # before a GPU copy takes pages
        live = self.engine.build(host)
        runnable = Runnable(
            host, live, host.session_bytes, release=lambda: self.engine.release(live)
        )
        try:
            return evicted + self.device.add(runnable)
        except BaseException:
            self.engine.release(live)
            raise

    def _loaded(self, job: Job, start: float, tier: str, evicted: list[str]) -> Result:
        timing = Timing(
            queue=int((job.claimed - job.received) * 1e6),
            load=int((time.perf_counter() - start) * 1e6),
        )
        timing.total = timing.queue + timing.load
        return LoadModelResult(
            job.action.action, job.action.sha256, timing=timing, tiers=self.tiers(),
            evicted=evicted, tier=tier,
        )  # fmt: skip

    def _failed(self, job: Job, cls: type[Result], status: ActionStatus, error: str) -> Result:
        return cls(job.action.action, job.action.sha256, status, error, tiers=self.tiers())

    # -- UNLOAD -----------------------------------------------------------------

    def unload(self, job: Job) -> None:
        action = job.action
        assert isinstance(action, UnloadModel)
        if action.all:
            self.device.clear()
        elif action.forget:
            self.forget(action.sha256)
        else:
            self.device.drop(action.sha256)

    def forget(self, sha: str) -> None:
        """Drop a model from both tiers (it was deleted): its pages go back to the pool."""
        self.device.drop(sha)
        self.host.drop(sha)

    # -- PROFILE ----------------------------------------------------------------

    def profile(self, job: Job) -> Result | object:
        action = job.action
        assert isinstance(action, ProfileModel)
        data = job.data  # kept for the fresh-build comparison; _host_model lets go of it
        try:
            host, _ = self._host_model(job)
            if host is None:
                return NEED_BYTES
            return self._measure(job, host, data)
        except MTError as exc:
            status = ActionStatus.LOAD_FETCH_FAILED if exc is job.error else load_status(exc)
            return self._failed(job, ProfileModelResult, status, exc.message)
        except Exception as exc:
            error = f"the model loads but fails to run on random inputs: {str(exc)[:400]}"
            return self._failed(job, ProfileModelResult, ActionStatus.LOAD_INVALID, error)

    def _measure(self, job: Job, host: HostModel, data: bytes | None) -> Result:
        action = job.action
        builds = []
        live = None
        for _ in range(BUILD_SAMPLES):
            if live is not None:
                self.engine.release(live)
            start = time.perf_counter()
            live = self.engine.build(host)
            builds.append((time.perf_counter() - start) * 1e6)
        start = time.perf_counter()
        if data is not None:  # only when the bytes are here: no fetch for a comparison
            self.engine.fresh_build(data)
        fresh_us = (time.perf_counter() - start) * 1e6 if data is not None else 0.0
        with self.watchdog.guard(self.max_run_s) as options:
            try:
                runs = self.engine.profile(live, action.batches, action.samples, options)
            except Exception:
                if not options.terminate:
                    raise
            finally:
                self.engine.release(live)
        if options.terminate:
            raise ModelInvalid(f"profiling ran longer than {self.max_run_s:g} s; stopped")
        return ProfileModelResult(
            action.action, action.sha256, tiers=self.tiers(),
            profile=runs, prepare_us=host.prepare_us, build_us=builds, fresh_us=fresh_us,
            weight_bytes=host.weight_bytes, session_bytes=host.session_bytes,
        )  # fmt: skip
