"""The torch engine: ONNX graphs lowered to PyTorch (worker.gpu.torch_engine), as a
worker engine (worker.engines).

On a GPU the tiers are real hardware. The host tier's pool is pinned (`PinnedPool`), so
a swap-in is one DMA per run of adjacent pages: host pages are copied page for page into
a device pool (`DevicePool`) on the weights stream, and the model's weight tensors are
DLPack views of those device pages; nothing is allocated per weight. The loader waits
for the copy (its LOAD result reports the copy time, which the controller learns), and
the first run of the model still orders itself after the copy's event. A batch's inputs
go up on the inputs stream, run on the exec stream, and come back on the outputs
stream, each ordered after the one before by events, so a copy for one model proceeds
while another runs.

On the CPU the same engine binds its weights to the host pages themselves (as ONNX
Runtime does there): that is how it is tested on machines without a GPU. It is slower
than ONNX Runtime on the CPU, so a worker takes it there only when told to.

A model the lowering refuses (an operator it does not know) is not lost: it is prepared,
built and run by ONNX Runtime on the CPU instead (`fallback`), on the same worker, and
its predictions stay its own (they are kept per model).

A torch run cannot be interrupted as ONNX Runtime's can: the watchdog's flag is read
after the run, which is then reported as stopped. The lowered operators have no loops,
so a run's time is bounded by its input shapes.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ext import PagePool
from mtcore.errors import ExecFailed, ModelInvalid
from worker.engines import OnnxEngine
from worker.gpu import gpu_status
from worker.gpu.torch_engine import TorchModel, TorchPlan, plan_model
from worker.onnx_backend import RequestInputs, RequestOutcome, random_arrays, run_batch
from worker.tiers import HostModel, HostTier, resident_bytes

MIB = 1 << 20
log = logging.getLogger("mtserve.worker")


@dataclass(eq=False)
class TorchLive:
    """A runnable copy: the bound model and the device pages its weights live in."""

    sha256: str
    model: TorchModel
    nbytes: int  # bytes charged against the device budget
    plan: TorchPlan
    load_us: float
    device_pages: list[Any] = field(default_factory=list)  # DeviceAllocations (GPU only)
    ready: Any = None  # the weight copy's event, waited on by the first run (GPU only)
    last_exec_us: float = float("inf")

    @property
    def output_names(self) -> list[str]:
        return self.plan.output_names

    @property
    def batchable(self) -> bool:
        return self.plan.batchable


class TorchEngine:
    """The worker engine over `TorchModel`, on the CPU or on one CUDA device."""

    name = "torch"

    def __init__(
        self, cuda: bool = False, device_bytes: int = 0, page_size: int = MIB, threads: int = 0
    ) -> None:
        import torch

        self.fallback = OnnxEngine(threads)  # for the models the lowering refuses
        self.cuda = cuda
        self.device = torch.device("cuda", 0) if cuda else torch.device("cpu")
        self.kind = f"cuda-torch:{torch.cuda.get_device_name(0)}" if cuda else "cpu-torch"
        self.pinned: Any = None  # PinnedPool, once host_pool made it
        self.pool: Any = None  # DevicePool
        self.streams: Any = None  # GpuStreams
        if cuda:
            # fp32 means fp32: TF32 convolutions (cuDNN's default) and matmuls would leave
            # outputs 1e-3 from ONNX Runtime's. Process-wide; the worker runs one engine.
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
            from worker.gpu.pools import DevicePool
            from worker.gpu.streams import GpuStreams

            self.pool = DevicePool(device_bytes, page_size)
            self.streams = GpuStreams()
            self._torch_streams = {
                name: torch.cuda.ExternalStream(getattr(self.streams, name).ptr)
                for name in ("inputs", "exec", "outputs")
            }

    @classmethod
    def on_best_device(
        cls, device_bytes: int = 0, page_size: int = MIB, threads: int = 0
    ) -> TorchEngine:
        """On the GPU when one is visible, else on the CPU."""
        return cls(gpu_status()[0], device_bytes, page_size, threads)

    # -- tiers ---------------------------------------------------------------------------

    def host_pool(self, capacity: int, page_size: int) -> PagePool:
        if not self.cuda:
            return PagePool(capacity, page_size)
        from worker.gpu.pools import PinnedPool

        self.pinned = PinnedPool(capacity, page_size)
        return self.pinned.pool

    def close(self) -> None:
        if self.streams is not None:
            self.streams.sync()
        if self.pool is not None:
            self.pool.close()
        if self.pinned is not None:
            self.pinned.unpin()

    def prepare(self, tier: HostTier, sha: str, data: bytes) -> HostModel:
        start = time.perf_counter()
        try:
            plan, weights = plan_model(data)
        except ModelInvalid as exc:
            log.info("model %s: %s; ONNX Runtime runs it", sha[:12], exc.message)
            return self.fallback.prepare(tier, sha, data)
        return tier.adopt(sha, plan, weights, start)

    def session_bytes(self, host: HostModel, guard: Any) -> int:
        """On a GPU: the device pages the weights take (activations come from torch's
        caching allocator, outside the pool). On the CPU: measured, as for ORT."""
        if host.plan is None:
            return self.fallback.session_bytes(host, guard)
        if self.cuda:
            return sum(len(a.pages) for a in host.allocations) * self.pool.page_size
        return min(self._measured_bytes(host, guard) for _ in range(2))

    def _measured_bytes(self, host: HostModel, guard: Any) -> int:
        before = resident_bytes()
        live = self.build(host)
        with guard() as options:
            self._run(live, random_inputs(live.plan, 1))
        if options.terminate:
            raise ModelInvalid("the model ran past the worker's run limit; stopped")
        added = resident_bytes() - before
        self.release(live)
        return max(added, 64 * 1024)

    def build(self, host: HostModel) -> Any:
        """Host -> device: bind the plan to weights viewing the pages (copied page for page
        into the device pool on a GPU, waited for: the LOAD reports the copy)."""
        import torch

        if host.plan is None:
            return self.fallback.build(host)
        start = time.perf_counter()
        if not self.cuda:
            tensors = [torch.from_numpy(a) for a in host.arrays]
            model = TorchModel(host.plan, tensors)
            return TorchLive(host.sha256, model, host.weight_bytes, host.plan, _us(start))
        pages, ready = self._copy_in(host)
        try:
            tensors = [
                torch.from_dlpack(pages[p.allocation].array(p.page, p.offset, a.dtype, a.shape))
                for p, a in zip(host.places, host.arrays, strict=True)
            ]
            model = TorchModel(host.plan, tensors)
        except BaseException:
            for allocation in pages:
                allocation.free()
            raise
        nbytes = sum(len(a.pages) for a in pages) * self.pool.page_size
        return TorchLive(host.sha256, model, nbytes, host.plan, _us(start), pages, ready)

    def _copy_in(self, host: HostModel) -> tuple[list[Any], Any]:
        from worker.gpu.pools import copy_pages

        pages = []
        runs = _runs(host, self.pool.page_size)
        try:
            for i, allocation in enumerate(host.allocations):
                pages.append(self.pool.alloc(allocation.nbytes, contiguous=i in runs))
                copy_pages(self.pinned, pages[-1], allocation, self.streams.weights)
        except BaseException:  # PoolExhausted, or a copy refused: no page may stay held
            for allocation in pages:
                allocation.free()
            raise
        ready = self.streams.weights.record()
        ready.synchronize()
        return pages, ready

    def release(self, live: Any) -> None:
        if isinstance(live, TorchLive) and live.device_pages:
            self.streams.exec.synchronize()  # no queued run may still read the pages
            for allocation in live.device_pages:
                allocation.free()
            live.device_pages.clear()

    def fresh_build(self, data: bytes) -> None:
        import torch

        try:
            plan, weights = plan_model(data)
        except ModelInvalid:
            return self.fallback.fresh_build(data)
        TorchModel(plan, [torch.tensor(w, device=self.device) for w in weights])

    # -- runs ----------------------------------------------------------------------------

    def run_batch(
        self, live: Any, requests: list[RequestInputs], options: Any
    ) -> list[RequestOutcome]:
        """Batched as ONNX Runtime's are (`onnx_backend.run_batch`), run by torch."""
        if not isinstance(live, TorchLive):
            return self.fallback.run_batch(live, requests, options)
        return run_batch(live, requests, run=functools.partial(self._run, live))

    def _run(self, live: TorchLive, arrays: list[np.ndarray]) -> list[np.ndarray]:
        _check_inputs(live.plan, arrays)
        if not self.cuda:
            return [o.numpy() for o in live.model.run([_tensor(a) for a in arrays])]
        return self._run_cuda(live, arrays)

    def _run_cuda(self, live: TorchLive, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """Inputs up, run, outputs down: three streams, each after the one before."""
        import torch

        inputs, exec_, outputs = (self._torch_streams[n] for n in ("inputs", "exec", "outputs"))
        with torch.cuda.stream(inputs):
            xs = [_tensor(a).pin_memory().to(self.device, non_blocking=True) for a in arrays]
        exec_.wait_stream(inputs)
        if live.ready is not None:  # the same CUDA stream as `exec_`, through CuPy
            self.streams.exec.wait_event(live.ready)
            live.ready = None
        with torch.cuda.stream(exec_):
            for x in xs:
                x.record_stream(exec_)
            ys = live.model.run(xs)
        outputs.wait_stream(exec_)
        with torch.cuda.stream(outputs):
            host = [torch.empty(y.shape, dtype=y.dtype, pin_memory=True) for y in ys]
            for h, y in zip(host, ys, strict=True):
                y.record_stream(outputs)
                h.copy_(y, non_blocking=True)
        outputs.synchronize()
        return [h.numpy() for h in host]

    def profile(
        self, live: Any, batches: list[int], runs: int, options: Any
    ) -> dict[int, list[float]]:
        """Every measured run, microseconds, per batch size, on random inputs (inputs up,
        run and outputs down included on a GPU: what a batch costs the exec lane)."""
        if not isinstance(live, TorchLive):
            return self.fallback.profile(live, batches, runs, options)
        result = {}
        for batch in batches if live.batchable else [1]:
            arrays = random_inputs(live.plan, batch)
            self._run(live, arrays)  # warm-up: the first runs allocate and pick kernels
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                self._run(live, arrays)
                times.append(_us(start))
            result[batch] = times
        return result


def _runs(host: HostModel, page_size: int) -> set[int]:
    """The host allocations holding a tensor longer than a page: only those need
    adjacent device pages (a shared allocation's pages may lie anywhere)."""
    pairs = zip(host.places, host.arrays, strict=True)
    return {place.allocation for place, array in pairs if array.nbytes > page_size}


def _us(start: float) -> float:
    return (time.perf_counter() - start) * 1e6


def _tensor(array: np.ndarray) -> Any:
    """A torch tensor over the array (copied only when numpy holds it read-only)."""
    import torch

    if not array.flags.writeable or not array.flags.c_contiguous:
        array = np.array(array, order="C")
    return torch.from_numpy(array)


def _check_inputs(plan: TorchPlan, arrays: list[np.ndarray]) -> None:
    if len(arrays) != len(plan.inputs):
        raise ExecFailed(f"the model takes {len(plan.inputs)} inputs; got {len(arrays)}")
    for spec, array in zip(plan.inputs, arrays, strict=True):
        if array.dtype != spec.dtype:
            raise ExecFailed(f"input {spec.name!r} must be {spec.dtype}, not {array.dtype}")
        if array.ndim != len(spec.shape) or any(
            want not in (-1, got) for want, got in zip(spec.shape, array.shape, strict=True)
        ):
            raise ExecFailed(f"input {spec.name!r} must have shape {spec.shape}, not {array.shape}")


def random_inputs(plan: TorchPlan, batch: int) -> list[np.ndarray]:
    return random_arrays([(spec.dtype, spec.shape) for spec in plan.inputs], batch)
