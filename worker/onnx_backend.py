"""The CPU backend: ONNX Runtime sessions, and batches run on them.

A `LiveModel` is one runnable model (the device tier on a CPU worker). `run_batch`
stacks the requests of a batch along axis 0 when the model allows it, runs once, and
slices the outputs back per request (slices of axis 0 stay contiguous, so the frames go
out without a copy). A request that fails alone fails alone: if the stacked run raises,
each request is run by itself so only the bad one gets EXEC_FAILED.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from mtcore.errors import ExecFailed, ModelInvalid
from mtcore.protocol import DTYPES

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
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])


def load_model(sha256: str, data: bytes, intra_op_threads: int = 0) -> LiveModel:
    """Build a session from model bytes; ModelInvalid if ONNX Runtime refuses them."""
    start = time.perf_counter()
    try:
        session = make_session(data, intra_op_threads)
    except Exception as exc:
        raise ModelInvalid(
            f"ONNX Runtime cannot load the model: {str(exc).strip()[:400]}"
        ) from None
    inputs = session.get_inputs()
    batchable = all(i.shape and not isinstance(i.shape[0], int) for i in inputs)
    return LiveModel(
        sha256,
        session,
        len(data),
        [i.name for i in inputs],
        [o.name for o in session.get_outputs()],
        batchable,
        (time.perf_counter() - start) * 1e6,
    )


@dataclass
class RequestInputs:
    """One request of a batch: its id and its input arrays in the model's order."""

    rid: int
    arrays: list[np.ndarray]

    @property
    def rows(self) -> int:
        return self.arrays[0].shape[0] if self.arrays and self.arrays[0].ndim else 1


RequestOutcome = tuple[int, list[np.ndarray] | None, Exception | None]


def run_batch(
    model: LiveModel, requests: list[RequestInputs], options: Any = None
) -> list[RequestOutcome]:
    """Run a batch; one (rid, outputs, error) per request, in order."""
    if len(requests) > 1 and model.batchable and _stackable(requests):
        try:
            return _run_stacked(model, requests, options)
        except Exception:
            pass  # isolate the failing request below
    return [_run_one(model, r, options) for r in requests]


def _stackable(requests: list[RequestInputs]) -> bool:
    first = [(a.dtype, a.shape[1:]) for a in requests[0].arrays]
    return all([(a.dtype, a.shape[1:]) for a in r.arrays] == first for r in requests[1:])


def _run_stacked(
    model: LiveModel, requests: list[RequestInputs], options: Any
) -> list[RequestOutcome]:
    feeds = {
        name: np.concatenate([r.arrays[i] for r in requests], axis=0)
        for i, name in enumerate(model.input_names)
    }
    outputs = model.session.run(model.output_names, feeds, options)
    total = sum(r.rows for r in requests)
    if any(o.ndim == 0 or o.shape[0] != total for o in outputs):
        raise ExecFailed("outputs are not batch-major; run requests one by one")
    results, start = [], 0
    for r in requests:
        end = start + r.rows
        results.append((r.rid, [o[start:end] for o in outputs], None))
        start = end
    return results


def _run_one(model: LiveModel, request: RequestInputs, options: Any) -> RequestOutcome:
    feeds = dict(zip(model.input_names, request.arrays, strict=True))
    try:
        return request.rid, model.session.run(model.output_names, feeds, options), None
    except Exception as exc:
        return request.rid, None, ExecFailed(f"the model failed while running: {str(exc)[:400]}")


def profile(
    model: LiveModel, batches: list[int], runs: int = 3, options: Any = None
) -> dict[int, float]:
    """Median execution microseconds per batch size, on random inputs."""
    result = {}
    for batch in batches if model.batchable else [1]:
        feeds = random_feeds(model.session, batch)
        model.session.run(model.output_names, feeds, options)  # warm-up: first runs allocate
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            model.session.run(model.output_names, feeds, options)
            times.append((time.perf_counter() - start) * 1e6)
        result[batch] = statistics.median(times)
    return result


def random_feeds(session: Any, batch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for i in session.get_inputs():
        dtype = DTYPES[_ORT_TYPES.get(i.type, "float32")]
        shape = [d if isinstance(d, int) else 1 for d in i.shape]
        if shape and not isinstance(i.shape[0], int):
            shape[0] = batch
        if dtype.kind == "f":
            feeds[i.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[i.name] = np.zeros(shape, dtype)  # zeros are valid indices and flags
    return feeds
