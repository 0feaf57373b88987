"""The TensorRT engine. NEVER RUN: written to TensorRT 10's Python API, but no machine
this project has reached could install TensorRT (its PyPI package fetches the real
libraries from NVIDIA's index, which these machines cannot reach), so not one line of
this module has executed. `choose_engine` takes it only where `import tensorrt`
succeeds and a GPU is visible; its tests (tests/test_tensorrt.py) run only there.

What it does, by the tiers:
- cold -> host (`prepare`): TensorRT's ONNX parser builds a network, one optimization
  profile covers every batch size the controller may ask for (1 .. MAX_BATCH, tuned
  for OPT_BATCH), and the serialized engine is kept in the host tier's pinned pages.
- host -> device (`build`): the engine is deserialized through an `IGpuAllocator`
  backed by the device pool, so its weights take pool pages, and its execution context
  is created without device memory: every context runs in one shared workspace, sized
  to the largest engine's need (runs on one exec stream never overlap).
- runs: inputs up on the inputs stream, `execute_async_v3` on the exec stream, outputs
  down on the outputs stream, ordered by events as in the torch engine.
- unload (`release`): context and engine deleted, so the allocator frees their pages.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ext import PagePool
from mtcore.errors import ExecFailed, ModelInvalid, PoolExhausted
from worker.onnx_backend import RequestInputs, RequestOutcome, random_arrays, run_batch
from worker.tiers import HostModel, HostTier

MIB = 1 << 20
MAX_BATCH = 32  # the optimization profile's largest batch: the broker's largest
OPT_BATCH = 8
WORKSPACE_BYTES = 1 << 30  # builder workspace limit for tactic selection


@dataclass(frozen=True)
class TrtPlan:
    """What the host tier keeps besides the serialized engine's bytes."""

    inputs: list[tuple[str, np.dtype, tuple[int, ...]]]  # -1: the dynamic batch dimension
    output_names: list[str]
    batchable: bool


@dataclass(eq=False)
class TrtLive:
    sha256: str
    engine: Any
    context: Any
    plan: TrtPlan
    nbytes: int
    load_us: float
    last_exec_us: float = float("inf")
    pages: list[Any] = field(default_factory=list)

    @property
    def output_names(self) -> list[str]:
        return self.plan.output_names

    @property
    def batchable(self) -> bool:
        return self.plan.batchable


def _pool_allocator(pool: Any) -> Any:
    """An IGpuAllocator whose memory is pages of the device pool.

    Synchronous: the async pair runs the same code (the bindings' docs ask for all five
    methods). Pointers travel as ints; 0 is nullptr: for a request of 0 bytes, for a
    full pool (TensorRT then reports the failure), and for reallocate (unsupported).
    """
    import tensorrt as trt

    class PoolAllocator(trt.IGpuAllocator):
        def __init__(self) -> None:
            trt.IGpuAllocator.__init__(self)
            self.held: dict[int, Any] = {}
            self.refused = 0  # requests the full pool refused: build says PoolExhausted

        def allocate(self, size: int, alignment: int, flags: int) -> int:
            if size == 0:
                return 0
            try:
                allocation = pool.alloc(size, contiguous=True)  # pages: cudaMalloc-aligned
            except PoolExhausted:
                self.refused += 1
                return 0
            pointer = allocation.page_ptr(0)
            self.held[pointer] = allocation
            return pointer

        def reallocate(self, address: int, alignment: int, new_size: int) -> int:
            return 0

        def deallocate(self, memory: int) -> bool:
            allocation = self.held.pop(int(memory), None)
            if allocation is not None:
                allocation.free()
            return True

        def allocate_async(self, size: int, alignment: int, *flags_and_stream: int) -> int:
            return self.allocate(size, alignment, 0)  # bindings differ on the order

        def deallocate_async(self, memory: int, stream: int) -> bool:
            return self.deallocate(memory)

    return PoolAllocator()


class TensorRTEngine:
    """The worker engine over TensorRT (never run; see the module docstring)."""

    name = "tensorrt"

    def __init__(self, device_bytes: int = 0, page_size: int = MIB) -> None:
        import cupy
        import tensorrt as trt

        from worker.gpu.pools import DevicePool
        from worker.gpu.streams import GpuStreams

        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.pool = DevicePool(device_bytes, page_size)
        self.streams = GpuStreams()
        self.runtime = trt.Runtime(self.logger)
        self.allocator = _pool_allocator(self.pool)
        self.runtime.gpu_allocator = self.allocator
        self.workspace: Any = None  # cupy array: every context's device memory
        self.pinned: Any = None
        gpu = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
        self.kind = f"cuda-tensorrt{trt.__version__}:{gpu}"

    def host_pool(self, capacity: int, page_size: int) -> PagePool:
        from worker.gpu.pools import PinnedPool

        self.pinned = PinnedPool(capacity, page_size)
        return self.pinned.pool

    def close(self) -> None:
        self.streams.sync()
        self.workspace = None
        self.pool.close()
        if self.pinned is not None:
            self.pinned.unpin()

    def prepare(self, tier: HostTier, sha: str, data: bytes) -> HostModel:
        start = time.perf_counter()
        serialized, plan = self._build_serialized(data)
        return tier.adopt(sha, plan, [np.frombuffer(serialized, np.uint8)], start)

    def _build_serialized(self, data: bytes) -> tuple[bytes, TrtPlan]:
        trt = self.trt
        builder = trt.Builder(self.logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse(data):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ModelInvalid(f"TensorRT cannot parse the model: {errors[:400]}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
        config.clear_flag(trt.BuilderFlag.TF32)  # on by default: fp32 means fp32, as for torch
        profile = builder.create_optimization_profile()
        inputs = []
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            shape = tuple(tensor.shape)
            inputs.append((tensor.name, np.dtype(trt.nptype(tensor.dtype)), shape))
            if shape and shape[0] == -1:
                rest = shape[1:]
                profile.set_shape(tensor.name, (1, *rest), (OPT_BATCH, *rest), (MAX_BATCH, *rest))
        config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise ModelInvalid("TensorRT could not build an engine for the model")
        outputs = [network.get_output(i).name for i in range(network.num_outputs)]
        batchable = all(shape and shape[0] == -1 for _, _, shape in inputs)
        return bytes(serialized), TrtPlan(inputs, outputs, batchable)

    def session_bytes(self, host: HostModel, guard: Any) -> int:
        live = self.build(host)
        try:
            return live.nbytes
        finally:
            self.release(live)

    def build(self, host: HostModel) -> TrtLive:
        import cupy

        start = time.perf_counter()
        before, refused = self.pool.bytes_reserved, self.allocator.refused
        engine = self.runtime.deserialize_cuda_engine(host.arrays[0].tobytes())
        if engine is None and self.allocator.refused > refused:
            raise PoolExhausted("the device pool has no room for the TensorRT engine")
        if engine is None:
            raise ModelInvalid("TensorRT could not deserialize the engine")
        need = engine.device_memory_size_v2
        if self.workspace is None or self.workspace.nbytes < need:
            self.streams.sync()
            self.workspace = cupy.empty(need, cupy.uint8)  # shared: one run at a time
        strategy = self.trt.ExecutionContextAllocationStrategy.USER_MANAGED
        context = engine.create_execution_context(strategy)
        if context is None:
            raise ModelInvalid("TensorRT could not create an execution context")
        nbytes = self.pool.bytes_reserved - before
        elapsed = (time.perf_counter() - start) * 1e6
        return TrtLive(host.sha256, engine, context, host.plan, nbytes, elapsed)

    def release(self, live: TrtLive) -> None:
        self.streams.exec.synchronize()
        live.context = None
        live.engine = None  # the allocator's deallocate frees the pages

    def fresh_build(self, data: bytes) -> None:
        self._build_serialized(data)

    def run_batch(
        self, live: TrtLive, requests: list[RequestInputs], options: Any
    ) -> list[RequestOutcome]:
        """Batched as every engine's (`onnx_backend.run_batch`): the optimization profile
        covers batch 1 .. MAX_BATCH, the broker's largest."""
        return run_batch(live, requests, run=functools.partial(self._run, live))

    def _run(self, live: TrtLive, arrays: list[np.ndarray]) -> list[np.ndarray]:
        import cupy

        context, streams = live.context, self.streams
        with streams.inputs:
            device_inputs = [cupy.asarray(a) for a in arrays]
        streams.order(streams.exec, streams.inputs)
        for (name, _, _), x in zip(live.plan.inputs, device_inputs, strict=True):
            context.set_input_shape(name, x.shape)
            context.set_tensor_address(name, x.data.ptr)
        outputs = []
        for name in live.plan.output_names:
            shape = tuple(context.get_tensor_shape(name))
            dtype = np.dtype(self.trt.nptype(live.engine.get_tensor_dtype(name)))
            with streams.exec:
                outputs.append(cupy.empty(shape, dtype))
            context.set_tensor_address(name, outputs[-1].data.ptr)
        # Set per run: a larger engine's build replaces the workspace under older contexts.
        context.set_device_memory(self.workspace.data.ptr, self.workspace.nbytes)
        if not context.execute_async_v3(streams.exec.ptr):
            raise ExecFailed("TensorRT failed to run the model")
        streams.order(streams.outputs, streams.exec)
        with streams.outputs:
            host = [cupy.asnumpy(y, stream=streams.outputs) for y in outputs]
        streams.outputs.synchronize()
        return host

    def profile(
        self, live: TrtLive, batches: list[int], runs: int, options: Any
    ) -> dict[int, list[float]]:
        result = {}
        for batch in batches if live.batchable else [1]:
            arrays = random_arrays([(d, s) for _, d, s in live.plan.inputs], batch)
            self._run(live, arrays)
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                self._run(live, arrays)
                times.append((time.perf_counter() - start) * 1e6)
            result[batch] = times
        return result
