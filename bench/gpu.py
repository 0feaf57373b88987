"""The GPU worker's figures (issue 10), on a machine with a CUDA device.

    python -m bench.gpu [--out DIR] [--quick]        (or `mtbench gpu`; bench/gpu_check.sh
                                                      runs it on the lent GPU machine)

In one process, with the torch engine on the GPU (worker.gpu.torch_backend):

- weight copy bandwidth, host -> device, through the pools (`copy_pages` from the pinned
  host pool into the device pool, on the weights stream) against a plain CuPy copy of
  the same bytes from one pinned buffer into one device buffer; median of N;
- ResNet-50 swap-in from the pinned host tier (`TorchEngine.build`: the copy and the
  binding of its weights), against its weight bytes over the measured pool bandwidth;
- ResNet-50 execution at batch 1 and 8, p50 and p99 (inputs up and outputs down
  included: what a batch costs the exec lane);
- overlap: one model's weights copying while another runs, against the two one after
  the other (the runs sized to take about as long as the copy);
- outputs against ONNX Runtime on the CPU, per zoo model (relative error, fp32);
- end to end: a batch-1 ResNet-50 request through a real broker and worker process
  (`--engine torch`), p50, against the engine's own run in this process.

Prints a table and one line per goal; writes gpu.json under --out. Without a visible
GPU it writes the probe alone and says why.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench import zoo
from bench.scenarios import RESULTS, goal, meta, print_goals

MIB = 1 << 20
PAGE = 2 * MIB  # device and host pool page: ResNet-50's largest tensors take runs of them
COPY_BYTES = 256 * MIB  # the bandwidth test's bytes
BANDWIDTH_MIN = 0.9  # pool copy / plain pinned copy
SWAP_MAX = 1.5  # swap-in / (weight bytes / pool bandwidth)
OVERLAP_MAX = 0.7  # overlapped / serial
REL_ERROR_MAX = 1e-4


def probe() -> dict[str, Any]:
    """What the machine has: GPU, driver, CuPy, PyTorch, TensorRT, ORT's providers."""
    from worker.engines import available
    from worker.gpu import gpu_status

    found: dict[str, Any] = {"gpu": gpu_status()[1], "gpu_visible": gpu_status()[0]}
    for name in ("cupy", "torch", "tensorrt", "onnxruntime", "onnx", "zmq", "numpy"):
        try:
            found[name] = __import__(name).__version__
        except Exception as exc:  # absent or broken: say which
            found[name] = f"absent ({type(exc).__name__})"
    try:
        import onnxruntime

        found["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except Exception:
        pass
    try:
        import torch

        found["torch_cuda"] = torch.version.cuda
        found["torch_sees_gpu"] = torch.cuda.is_available()
    except Exception:
        pass
    found["engines"] = {k: v or "available" for k, v in available().items()}
    return found


def _median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1e3


def _pct_ms(times: list[float], q: float) -> float:
    return float(np.percentile(np.array(times) * 1e3, q))


def copy_bandwidth(repeats: int) -> dict[str, Any]:
    """Pinned host pages -> device pages through the pools, and a plain copy."""
    import cupy

    from worker.gpu.pools import DevicePool, PinnedPool, copy_pages
    from worker.gpu.streams import GpuStreams

    streams = GpuStreams()
    pinned = PinnedPool(COPY_BYTES + 4 * PAGE, PAGE)
    device = DevicePool(COPY_BYTES + 4 * PAGE, PAGE)
    try:
        src = pinned.pool.alloc(COPY_BYTES, contiguous=False)
        np.frombuffer(src.page(0), np.uint8)[:] = 7  # touched: no first-touch cost in the copy
        dst = device.alloc(COPY_BYTES, contiguous=False)
        pool_times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            copy_pages(pinned, dst, src, streams.weights)
            streams.weights.synchronize()
            pool_times.append(time.perf_counter() - start)
        plain_host = cupy.cuda.alloc_pinned_memory(COPY_BYTES)
        plain_device = cupy.empty(COPY_BYTES, cupy.uint8)
        plain_times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            cupy.cuda.runtime.memcpyAsync(
                plain_device.data.ptr, plain_host.ptr, COPY_BYTES,
                cupy.cuda.runtime.memcpyHostToDevice, streams.weights.ptr,
            )  # fmt: skip
            streams.weights.synchronize()
            plain_times.append(time.perf_counter() - start)
        dst.free()
        src.free()
        del plain_host, plain_device
    finally:
        streams.sync()
        device.close()
        pinned.close()
        # CuPy keeps what it frees: give the plain copy's 2 x 256 MiB back before the next figure
        cupy.get_default_memory_pool().free_all_blocks()
        cupy.get_default_pinned_memory_pool().free_all_blocks()
    pool_s, plain_s = statistics.median(pool_times[1:]), statistics.median(plain_times[1:])
    return {
        "bytes": COPY_BYTES,
        "pool_gbps": COPY_BYTES / pool_s / 1e9,
        "plain_gbps": COPY_BYTES / plain_s / 1e9,
        "ratio": plain_s / pool_s,
        "pool_ms": pool_s * 1e3,
        "plain_ms": plain_s * 1e3,
    }


class Engine:
    """The torch engine on the GPU with a host tier, as a worker holds them."""

    def __init__(self, host_bytes: int, device_bytes: int) -> None:
        from worker.gpu.torch_backend import TorchEngine
        from worker.tiers import HostTier

        self.engine = TorchEngine(cuda=True, device_bytes=device_bytes, page_size=PAGE)
        self.dir = Path(tempfile.mkdtemp(prefix="mtbench-gpu-"))
        self.host = HostTier(self.engine.host_pool(host_bytes, PAGE), self.dir)

    def prepared(self, name: str, seed: int = 0) -> Any:
        return self.engine.prepare(
            self.host, f"{name}-{seed}".ljust(64, "0"), zoo.model_bytes(name, seed=seed)
        )

    def close(self) -> None:
        self.host.close()
        self.engine.close()
        self.host.pool.close()


def swap_in(
    engine: Engine, host: Any, bandwidth_gbps: float | None, repeats: int
) -> dict[str, Any]:
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        live = engine.engine.build(host)
        times.append(time.perf_counter() - start)
        engine.engine.release(live)
    swap_s = statistics.median(times[1:])
    if bandwidth_gbps is None:  # the bandwidth figure failed: the swap-in alone
        return {"weight_bytes": host.weight_bytes, "swap_ms": swap_s * 1e3, "ideal_ms": None,
                "ratio": None}  # fmt: skip
    ideal_s = host.weight_bytes / (bandwidth_gbps * 1e9)
    return {
        "weight_bytes": host.weight_bytes,
        "swap_ms": swap_s * 1e3,
        "ideal_ms": ideal_s * 1e3,
        "ratio": swap_s / ideal_s,
    }


def exec_times(engine: Engine, live: Any, runs: int) -> dict[str, Any]:
    from worker.gpu.torch_backend import random_inputs

    result = {}
    for batch in (1, 8):
        arrays = random_inputs(live.plan, batch)
        for _ in range(5):
            engine.engine._run(live, arrays)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            engine.engine._run(live, arrays)
            times.append(time.perf_counter() - start)
        result[f"batch{batch}"] = {"p50_ms": _median_ms(times), "p99_ms": _pct_ms(times, 99)}
    return result


def overlap(engine: Engine, copying: Any, running: Any, repeats: int) -> dict[str, Any]:
    """`copying`'s weights go up on the weights stream while `running` runs on the exec
    stream, against the copy and then the runs. Inputs already on the device: the runs
    are the model's, not the input copies'."""
    import torch

    from worker.gpu.pools import copy_pages

    e = engine.engine
    exec_stream = e._torch_streams["exec"]
    with torch.cuda.stream(exec_stream):  # made where it is read: the exec stream does not
        x = torch.randn(8, 3, 224, 224, device=e.device)  # wait for the default one

    def copy_async() -> list[Any]:
        pages = []
        for allocation in copying.allocations:
            pages.append(e.pool.alloc(allocation.nbytes, contiguous=allocation.contiguous))
            copy_pages(e.pinned, pages[-1], allocation, e.streams.weights)
        return pages

    def runs_async(n: int) -> None:
        with torch.cuda.stream(exec_stream):
            for _ in range(n):
                running.model.run([x])

    def timed(fn: Any) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        pages = fn()
        e.streams.weights.synchronize()
        exec_stream.synchronize()
        elapsed = time.perf_counter() - start
        for allocation in pages or []:
            allocation.free()
        return elapsed

    runs_async(3)
    copy_s = statistics.median(timed(copy_async) for _ in range(3))
    run_s = statistics.median(timed(lambda: runs_async(1)) for _ in range(5))
    n = max(1, round(copy_s / run_s))

    def serial() -> list[Any]:
        pages = copy_async()
        e.streams.weights.synchronize()
        runs_async(n)
        return pages

    def together() -> list[Any]:
        pages = copy_async()
        runs_async(n)
        return pages

    serial_s, together_s = [], []
    for _ in range(repeats):  # interleaved, so drift hits both alike
        serial_s.append(timed(serial))
        together_s.append(timed(together))
    s, t = statistics.median(serial_s), statistics.median(together_s)
    return {"copy_ms": copy_s * 1e3, "run_ms": run_s * 1e3, "runs": n,
            "serial_ms": s * 1e3, "overlapped_ms": t * 1e3, "ratio": t / s}  # fmt: skip


def accuracy(engine: Engine, names: list[str]) -> dict[str, Any]:
    """Max relative error of the GPU engine's outputs against ONNX Runtime on the CPU (the
    error's text instead, for a model that failed)."""
    import onnxruntime as ort

    errors: dict[str, Any] = {}
    for name in names:
        try:  # one model failing costs its line, not the others'
            host = engine.prepared(name)
            live = engine.engine.build(host)
            try:
                x = zoo.sample_inputs(name, 4, seed=11)["input"]
                got = engine.engine._run(live, [x])[0]
            finally:
                engine.engine.release(live)
            session = ort.InferenceSession(
                zoo.model_bytes(name), providers=["CPUExecutionProvider"]
            )
            want = session.run(None, {"input": x})[0]
            errors[name] = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-6))
        except Exception as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
    return errors


def end_to_end(engine: Engine, live: Any, requests: int) -> dict[str, Any]:
    """Batch-1 ResNet-50 requests through a broker and a torch worker, one at a time,
    against the engine's own run in this process on the same input."""
    from mtcore.cluster import LocalCluster

    x = zoo.sample_inputs("resnet50", 1, seed=5)
    inproc = []
    for _ in range(requests):
        start = time.perf_counter()
        engine.engine._run(live, [x["input"]])
        inproc.append(time.perf_counter() - start)
    state = Path(tempfile.mkdtemp(prefix="mtbench-gpu-e2e-"))
    cluster = LocalCluster(state, workers=1, memory_mb=4096, host_memory_mb=4096, secure=False,
                           worker_args=["--engine", "torch"],
                           broker_args=["--profile-batches", "1,8"]).start()  # fmt: skip
    try:
        with cluster.client("gpu-bench", timeout=120) as client:
            client.upload_model("resnet50", zoo.model_bytes("resnet50"))
            for _ in range(5):
                client.infer("resnet50", x)
            served = []
            for _ in range(requests):
                start = time.perf_counter()
                client.infer("resnet50", x)
                served.append(time.perf_counter() - start)
            kind = client.status()["workers"][0]["kind"]
    finally:
        cluster.stop()
    return {"kind": kind, "served_p50_ms": _median_ms(served), "inproc_p50_ms": _median_ms(inproc),
            "overhead_ms": _median_ms(served) - _median_ms(inproc)}  # fmt: skip


def goals(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The goal lines; a figure that failed reads "-" (its error is in doc[key + "_error"])."""
    ratio = lambda key: doc.get(key, {}).get("ratio")  # noqa: E731
    errors = doc.get("accuracy") or {}
    # a model that failed (its error text in place of a number) is not within the bound
    worst = max((e if isinstance(e, float) else math.inf for e in errors.values()), default=None)
    return [
        goal("pool copy bandwidth / plain pinned copy", ratio("copy"), ">=", BANDWIDTH_MIN),
        goal("resnet50 swap-in / (bytes / bandwidth)", ratio("swap"), "<=", SWAP_MAX),
        goal("overlapped copy+exec / serial", ratio("overlap"), "<=", OVERLAP_MAX),
        goal("max relative error vs ONNX Runtime on the CPU (fp32)", worst, "<=", REL_ERROR_MAX),
    ]


def _f(value: Any, width: int, spec: str) -> str:
    return f"{value:>{width}{spec}}" if isinstance(value, float | int) else f"{'-':>{width}}"


def print_table(doc: dict[str, Any]) -> None:
    print(f"GPU: {doc['probe']['gpu']}")
    print(f"{'figure':<44}{'ours':>12}{'baseline':>12}{'ratio':>8}")
    if "copy" in doc:
        c = doc["copy"]
        print(f"{'H2D weight copy, GB/s (pools | plain pinned)':<44}{c['pool_gbps']:>12.2f}"
              f"{c['plain_gbps']:>12.2f}{c['ratio']:>8.3f}")  # fmt: skip
    if "swap" in doc:
        s = doc["swap"]
        print(f"{'resnet50 swap-in, ms (build | bytes/bw)':<44}{s['swap_ms']:>12.2f}"
              f"{_f(s['ideal_ms'], 12, '.2f')}{_f(s['ratio'], 8, '.3f')}")  # fmt: skip
    for batch, t in doc.get("exec", {}).items():
        print(f"{'resnet50 exec ' + batch + ', ms (p50 | p99)':<44}{t['p50_ms']:>12.2f}"
              f"{t['p99_ms']:>12.2f}")  # fmt: skip
    if "overlap" in doc:
        o = doc["overlap"]
        print(f"{'copy while running, ms (overlapped | serial)':<44}{o['overlapped_ms']:>12.2f}"
              f"{o['serial_ms']:>12.2f}{o['ratio']:>8.3f}")  # fmt: skip
    if "e2e" in doc:
        e = doc["e2e"]
        print(f"{'resnet50 b1 request p50, ms (served | engine)':<44}{e['served_p50_ms']:>12.2f}"
              f"{e['inproc_p50_ms']:>12.2f}")  # fmt: skip
    for name, err in doc.get("accuracy", {}).items():
        print(f"{'rel. error vs ORT CPU, ' + name:<44}{_f(err, 12, '.2e')}"
              + ("" if isinstance(err, float) else f"  {err}"))  # fmt: skip
    for key, error in doc.items():
        if key.endswith("_error"):
            print(f"FAILED {key.removesuffix('_error')}: {error}")


def _attempt(doc: dict[str, Any], key: str, fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args), or None with doc[key + "_error"] saying why: one step failing costs its
    figures, not the others' (a sticky CUDA error fails the rest, each with its reason)."""
    print(f"measuring {key} ...", file=sys.stderr, flush=True)
    try:
        return fn(*args)
    except Exception as exc:
        doc[f"{key}_error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
        return None


def run(
    quick: bool, skip_e2e: bool, save: Callable[[dict[str, Any]], None] = lambda doc: None
) -> dict[str, Any]:
    """The figures; `save(doc)` after each, so a run cut short keeps what it measured."""
    repeats = 5 if quick else 15
    doc: dict[str, Any] = {"benchmark": "gpu", "config": meta() | {"quick": quick}}
    doc["probe"] = probe()
    print(json.dumps(doc["probe"], indent=1), file=sys.stderr, flush=True)
    if not doc["probe"]["gpu_visible"]:
        return doc

    def figure(key: str, fn: Callable[..., Any], *args: Any) -> None:
        result = _attempt(doc, key, fn, *args)
        if result is not None:
            doc[key] = result
        save(doc)

    figure("copy", copy_bandwidth, repeats)
    engine = _attempt(doc, "engine", Engine, 2 << 30, 4 << 30)
    if engine is not None:
        try:
            a = _attempt(doc, "prepare_a", engine.prepared, "resnet50", 0)
            b = _attempt(doc, "prepare_b", engine.prepared, "resnet50", 1)
            if a is not None:
                bandwidth = doc.get("copy", {}).get("pool_gbps")
                figure("swap", swap_in, engine, a, bandwidth, repeats)
            live_b = _attempt(doc, "build", engine.engine.build, b) if b is not None else None
            if live_b is not None:
                figure("exec", exec_times, engine, live_b, 30 if quick else 100)
                if a is not None:
                    figure("overlap", overlap, engine, a, live_b, repeats)
            figure("accuracy", accuracy, engine, ["tiny_add", "mlp", "mobilenetv2", "resnet18",
                                                  "resnet50"])  # fmt: skip
            if live_b is not None:
                if not skip_e2e:
                    figure("e2e", end_to_end, engine, live_b, 20 if quick else 50)
                _attempt(doc, "release", engine.engine.release, live_b)
        finally:
            _attempt(doc, "close", engine.close)
    doc["goals"] = goals(doc)
    return doc


def _write(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, default=str))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mtbench gpu", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or RESULTS))
    p.add_argument("--quick", action="store_true", help="fewer repeats")
    p.add_argument("--no-e2e", action="store_true", help="skip the broker + worker figure")
    args = p.parse_args(argv)
    path = args.out / "gpu.json"
    doc = run(args.quick, args.no_e2e, save=lambda partial: _write(path, partial))
    _write(path, doc)
    if "goals" not in doc:
        print(f"no GPU is visible ({doc['probe']['gpu']}); wrote the probe to {path}")
        return 2
    print()
    print_table(doc)
    print_goals(doc["goals"])
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
