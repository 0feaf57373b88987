"""The CPU backend: ONNX Runtime sessions, and batches run on them.

A `LiveModel` is one runnable model (the device tier on a CPU worker). `run_batch`
stacks the requests of a batch along axis 0 when the model allows it, runs once, and
slices the outputs back per request (slices of axis 0 stay contiguous, so the frames go
out without a copy). A request that fails alone fails alone: if the stacked run raises,
each request is run by itself so only the bad one gets EXEC_FAILED.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mtcore.errors import ExecFailed, ModelInvalid
from mtcore.protocol import DTYPES
from worker.tiers import HostModel, resident_bytes, session_options, shared_arena_options

# onnxruntime's type strings -> wire dtype names
_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(uint8)": "uint8",
    "tensor(int8)": "int8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
}


@dataclass
class LiveModel:
    """A loaded ONNX Runtime session and what the worker needs to know about it."""

    sha256: str
    session: Any  # onnxruntime.InferenceSession
    nbytes: int  # bytes charged against the worker's budget
    input_names: list[str]
    output_names: list[str]
    batchable: bool  # every input has a dynamic leading dimension
    load_us: float  # how long building the session took
    last_exec_us: float = float("inf")  # the latest batch's run time (inf before the first)


def make_session(data: bytes, intra_op_threads: int = 0) -> Any:
    """A session built from bytes the usual way (full optimization): the baseline."""
    import onnxruntime as ort

    options = session_options(intra_op_threads)
    return ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])


def build_session(host: HostModel, intra_op_threads: int = 0) -> LiveModel:
    """Host -> device: a session over the host tier's pages, with nothing left to do.

    The graph was optimized when the model was prepared, so optimization is off; so is
    prepacking, which would copy every weight into a kernel-specific layout. The
    initializers are the pool's OrtValues (caller-owned: ORT does not copy them).
    """
    import onnxruntime as ort

    start = time.perf_counter()
    options = shared_arena_options(intra_op_threads)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.add_session_config_entry("session.disable_prepacking", "1")
    for name, value in zip(host.names, host.values, strict=True):
        options.add_initializer(name, value)
    try:
        session = ort.InferenceSession(
            str(host.graph_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:
        raise ModelInvalid(f"the prepared model does not build: {str(exc).strip()[:400]}") from None
    inputs = session.get_inputs()
    batchable = all(i.shape and not isinstance(i.shape[0], int) for i in inputs)
    return LiveModel(
        host.sha256,
        session,
        host.weight_bytes,
        [i.name for i in inputs],
        [o.name for o in session.get_outputs()],
        batchable,
        (time.perf_counter() - start) * 1e6,
    )


def measure_session_bytes(host: HostModel, intra_op_threads: int, guard: Any) -> int:
    """What one runnable session of this model adds to the process: built, run once.

    Measured twice, the smaller kept: the first build also pays what the process pays
    once (ORT's first session, the shared arena growing to this model's activations),
    which no later copy costs again. `guard` is the watchdog's `guard` (bound to its run
    limit): a tenant's model may run forever, and this runs it.
    """
    return min(_session_bytes_once(host, intra_op_threads, guard) for _ in range(2))


def _session_bytes_once(host: HostModel, intra_op_threads: int, guard: Any) -> int:
    before = resident_bytes()
    live = build_session(host, intra_op_threads)
    with guard() as options:
        try:
            live.session.run(live.output_names, random_feeds(live.session, 1), options)
        except Exception as exc:
            if options.terminate:
                raise ModelInvalid("the model ran past the worker's run limit; stopped") from None
            why = str(exc)[:400]
            raise ModelInvalid(f"the model fails to run on random inputs: {why}") from None
    added = resident_bytes() - before
    del live
    return max(added, 64 * 1024)  # resident-set noise can read as a shrink


@dataclass
class RequestInputs:
    """One request of a batch: its id and its input arrays in the model's order."""

    rid: int
    arrays: list[np.ndarray]

    @property
    def rows(self) -> int:
        return self.arrays[0].shape[0] if self.arrays and self.arrays[0].ndim else 1


RequestOutcome = tuple[int, list[np.ndarray] | None, Exception | None]


Run = Callable[[list[np.ndarray]], list[np.ndarray]]  # input arrays -> output arrays


def run_batch(
    model: Any, requests: list[RequestInputs], options: Any = None, run: Run | None = None
) -> list[RequestOutcome]:
    """Run a batch; one (rid, outputs, error) per request, in order. `run` runs one set
    of inputs (every engine batches alike); by default ONNX Runtime's session."""
    if run is None:
        run = functools.partial(_session_run, model, options)
    if len(requests) > 1 and model.batchable and stackable(requests):
        try:
            return _run_stacked(run, requests)
        except Exception:
            pass  # isolate the failing request below
    return [_run_one(run, r) for r in requests]


def _session_run(model: LiveModel, options: Any, arrays: list[np.ndarray]) -> list[np.ndarray]:
    feeds = dict(zip(model.input_names, arrays, strict=True))
    return model.session.run(model.output_names, feeds, options)


def stackable(requests: list[RequestInputs]) -> bool:
    first = [(a.dtype, a.shape[1:]) for a in requests[0].arrays]
    return all([(a.dtype, a.shape[1:]) for a in r.arrays] == first for r in requests[1:])


def _run_stacked(run: Run, requests: list[RequestInputs]) -> list[RequestOutcome]:
    arrays = [
        np.concatenate([r.arrays[i] for r in requests], axis=0)
        for i in range(len(requests[0].arrays))
    ]
    outputs = run(arrays)
    total = sum(r.rows for r in requests)
    if any(o.ndim == 0 or o.shape[0] != total for o in outputs):
        raise ExecFailed("outputs are not batch-major; run requests one by one")
    results, start = [], 0
    for r in requests:
        end = start + r.rows
        results.append((r.rid, [o[start:end] for o in outputs], None))
        start = end
    return results


def _run_one(run: Run, request: RequestInputs) -> RequestOutcome:
    try:
        return request.rid, run(request.arrays), None
    except Exception as exc:
        return request.rid, None, ExecFailed(f"the model failed while running: {str(exc)[:400]}")


def profile(
    model: LiveModel, batches: list[int], runs: int = 10, options: Any = None
) -> dict[int, list[float]]:
    """Every measured run, microseconds, per batch size, on random inputs.

    All samples go back, not a summary, so the controller can take the percentile it
    plans with.
    """
    result = {}
    for batch in batches if model.batchable else [1]:
        feeds = random_feeds(model.session, batch)
        model.session.run(model.output_names, feeds, options)  # warm-up: first runs allocate
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            model.session.run(model.output_names, feeds, options)
            times.append((time.perf_counter() - start) * 1e6)
        result[batch] = times
    return result


def random_feeds(session: Any, batch: int) -> dict[str, np.ndarray]:
    specs = []
    for i in session.get_inputs():
        dtype = DTYPES[_ORT_TYPES.get(i.type, "float32")]
        specs.append((dtype, [d if isinstance(d, int) else -1 for d in i.shape]))
    names = [i.name for i in session.get_inputs()]
    return dict(zip(names, random_arrays(specs, batch), strict=True))


def random_arrays(specs: list[tuple[np.dtype, Sequence[int]]], batch: int) -> list[np.ndarray]:
    """Inputs to profile with: (dtype, shape) each, -1 for a dynamic dimension; a dynamic
    first one is the batch, the others are 1."""
    rng = np.random.default_rng(0)
    arrays = []
    for dtype, dims in specs:
        shape = [d if d != -1 else 1 for d in dims]
        if shape and dims[0] == -1:
            shape[0] = batch
        if dtype.kind == "f":
            arrays.append(rng.standard_normal(shape).astype(dtype))
        else:
            arrays.append(np.zeros(shape, dtype))  # zeros are valid indices and flags
    return arrays
