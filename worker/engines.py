"""Engines: what runs a model on this worker, and how the worker picks one.

The loader and runner do the same things whatever runs the model: prepare it into the
host tier once (cold -> host), build a runnable copy over those pages (host -> device),
measure what a copy costs, run batches, profile. An `Engine` is that seam. Three exist:

- `onnxruntime` (`OnnxEngine`, here): ONNX Runtime on the CPU; every machine has it.
- `torch` (`worker.gpu.torch_backend.TorchEngine`): the ONNX graph lowered to PyTorch
  operators; on a GPU its weights are copied from pinned host pages into a device pool
  on a dedicated stream and it runs on an execution stream. It also runs on the CPU,
  which is how it is tested on machines without a GPU.
- `tensorrt` (`worker.gpu.tensorrt_backend`): written to TensorRT's API, never run: no
  machine this project has reached could install TensorRT.

`choose_engine("auto")` takes the best the machine has: TensorRT on a GPU, then the
torch engine on a GPU, then ONNX Runtime on the CPU (the torch engine on the CPU is
slower than ONNX Runtime there, so auto never picks it). The worker reports the chosen
engine's `kind` at registration, and the controller predicts per kind.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Any, Protocol

from ext import PagePool
from mtcore.config import ENGINES
from worker.onnx_backend import (
    LiveModel,
    RequestInputs,
    RequestOutcome,
    build_session,
    make_session,
    measure_session_bytes,
    profile,
    run_batch,
)
from worker.tiers import HostModel, HostTier

log = logging.getLogger("mtserve.worker")


class Engine(Protocol):
    """What the loader and runner ask of whatever runs the models."""

    name: str  # "onnxruntime", "torch", "tensorrt"
    kind: str  # reported to the broker: predictions are kept per kind

    def host_pool(self, capacity: int, page_size: int) -> PagePool:
        """The host tier's page pool (pinned for a GPU engine: copies from it are DMA)."""

    def close(self) -> None:
        """Free the engine's own resources (device pool, streams, pinned registration);
        after every runnable copy is released, before the host pool is closed."""

    def prepare(self, tier: HostTier, sha: str, data: bytes) -> HostModel:
        """Cold -> host: the model's weights into the tier's pages, once."""

    def session_bytes(self, host: HostModel, guard: Any) -> int:
        """What one runnable copy charges the device budget (built and run once)."""

    def build(self, host: HostModel) -> Any:
        """Host -> device: a runnable copy over the host model's pages."""

    def release(self, live: Any) -> None:
        """The runnable copy left the device tier and no run holds it: free what it owns."""

    def fresh_build(self, data: bytes) -> None:
        """Build the model the usual way, from its bytes: the baseline a profile reports."""

    def run_batch(
        self, live: Any, requests: list[RequestInputs], options: Any
    ) -> list[RequestOutcome]: ...

    def profile(
        self, live: Any, batches: list[int], runs: int, options: Any
    ) -> dict[int, list[float]]: ...


@dataclass
class OnnxEngine:
    """ONNX Runtime on the CPU: sessions over the host pool's pages (worker.tiers)."""

    threads: int = 0  # intra-op threads per session; 0 lets ORT choose
    name: str = "onnxruntime"
    kind: str = "cpu"

    def host_pool(self, capacity: int, page_size: int) -> PagePool:
        return PagePool(capacity, page_size)

    def close(self) -> None:
        pass

    def prepare(self, tier: HostTier, sha: str, data: bytes) -> HostModel:
        return tier.prepare(sha, data)

    def session_bytes(self, host: HostModel, guard: Any) -> int:
        return measure_session_bytes(host, self.threads, guard)

    def build(self, host: HostModel) -> LiveModel:
        return build_session(host, self.threads)

    def release(self, live: Any) -> None:
        pass  # the session is garbage once unreferenced; its weights stay in the host tier

    def fresh_build(self, data: bytes) -> None:
        make_session(data, self.threads)

    def run_batch(
        self, live: LiveModel, requests: list[RequestInputs], options: Any
    ) -> list[RequestOutcome]:
        return run_batch(live, requests, options)

    def profile(
        self, live: LiveModel, batches: list[int], runs: int, options: Any
    ) -> dict[int, list[float]]:
        return profile(live, batches, runs, options)


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def available() -> dict[str, str]:
    """Each engine -> "" if this machine can run it, else why not."""
    from worker.gpu import gpu_status

    visible, gpu_why = gpu_status()
    no_gpu = "" if visible else gpu_why
    return {
        "onnxruntime": "" if _importable("onnxruntime") else "onnxruntime is not installed",
        "torch": "" if _importable("torch") else "torch is not installed",
        "tensorrt": ("tensorrt is not installed" if not _importable("tensorrt") else no_gpu),
    }


def choose_engine(wanted: str = "auto", threads: int = 0, **gpu: Any) -> Engine:
    """The engine to run models with; ValueError naming why when `wanted` cannot run.

    `gpu` passes the device pool's size and page to a GPU engine (`device_bytes`,
    `page_size`); a GPU engine on a machine without a visible GPU is refused, except
    `torch`, which then runs on the CPU.
    """
    if wanted not in ENGINES:
        raise ValueError(f"unknown engine {wanted!r}; choose from {', '.join(ENGINES)}")
    why = available()
    if wanted == "auto":
        from worker.gpu import gpu_status

        order = ["tensorrt", "torch"] if gpu_status()[0] else []
        wanted = next((name for name in order if not why[name]), "onnxruntime")
    if why[wanted]:
        raise ValueError(f"the {wanted} engine cannot run here: {why[wanted]}")
    if wanted == "onnxruntime":
        return OnnxEngine(threads)
    if wanted == "torch":
        from worker.gpu.torch_backend import TorchEngine

        return TorchEngine.on_best_device(threads=threads, **gpu)
    from worker.gpu.tensorrt_backend import TensorRTEngine  # pragma: no cover (never run)

    return TensorRTEngine(**gpu)
