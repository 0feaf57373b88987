"""The worker's GPU side: memory pools, CUDA streams and the GPU engines.

- `pools`: `PinnedPool`, the host tier's page pool registered as pinned memory, so that a
  swap-in is one DMA per run of adjacent pages; `DevicePool`, one device allocation split
  into pages with the same accounting as the host pool (`ext.PagePool(backed=False)`);
  `copy_pages`, host pages to device pages, page i to page i, so every tensor keeps its
  (page, offset) place.
- `streams`: `GpuStreams`, the four streams a worker orders its work on (weights, inputs,
  exec, outputs) and the events between them.
- `torch_engine` and `torch_backend`: ONNX graphs lowered to PyTorch, run over the
  device pool's pages; a TensorRT backend is to come.

CuPy is optional: every module here imports without it, and imports it only when a GPU
is used, so a CPU-only worker never needs it. `gpu_status()` says whether one can be.
"""

from __future__ import annotations

import functools
from types import ModuleType

from mtcore.errors import LoadFailed


class GpuUnavailable(LoadFailed, RuntimeError):
    """The worker was asked for GPU memory or streams where no GPU can be used: to a
    tenant, a load that failed (as PoolExhausted is); to an operator, the reason why."""


@functools.cache
def gpu_status() -> tuple[bool, str]:
    """(True, "NVIDIA H200, CUDA runtime 13000, driver 13000") when CuPy imports and sees
    device 0, else (False, the reason). Never raises; asked once per process (cached),
    since a device does not come and go while a worker runs."""
    try:
        import cupy
    except ModuleNotFoundError as exc:
        if exc.name == "cupy":
            return False, "cupy is not installed"
        return False, f"cupy cannot be imported: {exc}"
    except Exception as exc:  # a CuPy built for another CUDA, missing libraries...
        return False, f"cupy cannot be imported: {exc}"
    try:
        runtime = cupy.cuda.runtime
        count = runtime.getDeviceCount()
        if count < 1:
            return False, "no CUDA device is visible: the device count is 0"
        name = runtime.getDeviceProperties(0)["name"]
        if isinstance(name, bytes):
            name = name.decode(errors="replace")
        return True, (
            f"{name}, CUDA runtime {runtime.runtimeGetVersion()},"
            f" driver {runtime.driverGetVersion()}"
        )
    except Exception as exc:  # CUDARuntimeError: no driver, no device, driver too old
        return False, f"no CUDA device is visible: {exc}"


def require_gpu(what: str) -> ModuleType:
    """The cupy module, or GpuUnavailable saying why `what` cannot be made here."""
    visible, reason = gpu_status()
    if not visible:
        raise GpuUnavailable(f"{what} needs a CUDA device: {reason}")
    import cupy

    return cupy
