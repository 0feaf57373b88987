"""The peer a user would pick: Ray Serve with model multiplexing, over ONNX Runtime.

One Serve deployment holds every model; each replica keeps at most
`models_per_replica` ONNX Runtime sessions resident (`@serve.multiplexed`, LRU), and a
request names its model with `multiplexed_model_id`, so Serve routes it to a replica that
already has the model when it can. The benchmark drives it through a `DeploymentHandle`
from its own process (no HTTP), which is the fastest path Ray Serve offers and keeps the
comparison about serving, not about an HTTP stack.

Ray is an optional dependency (`pip install 'ray[serve]'`) and is imported only when a
target starts; `available()` says whether it can be used. Ray runs locally only:
`ray.init(address="local")` on 127.0.0.1, no dashboard, no HTTP proxy, no usage stats.

Ray Serve has no deadlines: with `deadline_ms` the client stops waiting once it passes
and cancels the request (status -1, no latency), the way a Ray user would time out.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from mtcore.errors import Status

INSTALL_HINT = "ray[serve] is not installed: pip install 'ray[serve]'"
TIMEOUT_STATUS = -1  # no answer in time (bench.report files it under -1 as well)
APP_NAME = "mtbench-onnx"


def available() -> tuple[bool, str]:
    """(True, version) when Ray Serve can be imported, else (False, what to do about it)."""
    try:
        with warnings.catch_warnings():  # ray's pydantic models warn on import
            warnings.simplefilter("ignore", DeprecationWarning)
            import ray
            from ray import serve  # noqa: F401
    except ImportError:
        return False, INSTALL_HINT
    except Exception as exc:  # installed but broken (a missing system library, ...)
        return False, f"ray[serve] is installed but cannot be imported: {exc}"
    return True, f"ray {ray.__version__}"


def _deployment(models_per_replica: int, replicas: int, threads: int) -> Any:
    """The multiplexed deployment class; defined here so that Ray is imported lazily.

    Everything the replica needs is inside this closure, so Ray ships the class by value
    and replicas do not have to import this package.
    """
    from ray import serve

    @serve.deployment(
        name="onnx_multiplexed",
        num_replicas=replicas,
        ray_actor_options={"num_cpus": threads},
        max_ongoing_requests=64,
    )
    class OnnxMultiplexed:
        def __init__(self, paths: dict[str, str], intra_op_threads: int) -> None:
            self.paths = paths
            self.threads = intra_op_threads

        @serve.multiplexed(max_num_models_per_replica=models_per_replica)
        async def get_model(self, model_id: str) -> Any:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
            options.log_severity_level = 3
            return ort.InferenceSession(
                self.paths[model_id], sess_options=options, providers=["CPUExecutionProvider"]
            )

        async def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            session = await self.get_model(serve.get_multiplexed_model_id())
            names = [o.name for o in session.get_outputs()]
            return dict(zip(names, session.run(names, inputs), strict=True))

    return OnnxMultiplexed


class RayServeTarget:
    """A local Ray instance with one multiplexed Serve deployment; `infer` goes by handle."""

    def __init__(self, *, timeout: float = 60.0, temp_dir: str | Path | None = None) -> None:
        self.timeout = timeout  # seconds to wait for a request that has no deadline
        self.temp_dir = str(temp_dir) if temp_dir else None  # Ray's session files (/tmp/ray)
        self.models: dict[str, Path] = {}
        self.handle: Any = None
        self.start_s: float | None = None  # how long start() took
        self._started_ray = False

    def start(
        self,
        models: dict[str, Path],
        models_per_replica: int = 4,
        replicas: int = 1,
        threads: int = 1,
        *,
        num_cpus: int | None = None,
    ) -> RayServeTarget:
        ok, why = available()
        if not ok:
            raise RuntimeError(why)
        import ray
        from ray import serve

        began = time.perf_counter()
        self.models = {name: Path(path).resolve() for name, path in models.items()}
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no phoning home
        try:
            if not ray.is_initialized():
                ray.init(
                    address="local",
                    num_cpus=num_cpus or max(2, replicas * threads),
                    include_dashboard=False,
                    log_to_driver=False,
                    logging_level=logging.WARNING,
                    _node_ip_address="127.0.0.1",
                    _temp_dir=self.temp_dir,
                )
                self._started_ray = True
            serve.start(proxy_location="Disabled", logging_config={"log_level": "WARNING"})
            app = _deployment(models_per_replica, replicas, threads).bind(
                {name: str(path) for name, path in self.models.items()}, threads
            )
            self.handle = serve.run(app, name=APP_NAME, route_prefix=None)
        except BaseException as exc:
            self.stop()
            raise RuntimeError(f"Ray Serve did not start: {type(exc).__name__}: {exc}") from exc
        self.start_s = time.perf_counter() - began
        return self

    async def infer(
        self, model: str, inputs: dict[str, np.ndarray], deadline_ms: float | None = None
    ) -> tuple[int, float | None]:
        """(status, latency in ms): 0 and the latency, 30 for an unknown model, 61 when
        the replica failed, -1 (no latency) when no answer came within the deadline."""
        result = await self.infer_outputs(model, inputs, deadline_ms)
        return result[0], result[1]

    async def infer_outputs(
        self, model: str, inputs: dict[str, np.ndarray], deadline_ms: float | None = None
    ) -> tuple[int, float | None, dict[str, np.ndarray] | None]:
        """`infer`, plus the outputs (None unless the status is 0)."""
        if self.handle is None:
            raise RuntimeError("RayServeTarget is not started")
        if model not in self.models:
            return int(Status.MODEL_NOT_FOUND), 0.0, None
        wait = deadline_ms / 1000.0 if deadline_ms is not None else self.timeout
        start = time.perf_counter()
        response = self.handle.options(multiplexed_model_id=model).remote(inputs)
        try:
            outputs = await asyncio.wait_for(_await(response), wait)
        except asyncio.TimeoutError:
            response.cancel()
            return TIMEOUT_STATUS, None, None
        except Exception:
            return int(Status.EXEC_FAILED), (time.perf_counter() - start) * 1e3, None
        return 0, (time.perf_counter() - start) * 1e3, outputs

    def stop(self) -> None:
        """Delete the application and shut Serve and (if this target started it) Ray down."""
        try:
            import ray
            from ray import serve
        except Exception:
            return
        self.handle = None
        if ray.is_initialized():
            try:
                serve.shutdown()
            finally:
                if self._started_ray:
                    ray.shutdown()
                    self._started_ray = False

    def __enter__(self) -> RayServeTarget:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def _await(response: Any) -> Any:
    return await response
