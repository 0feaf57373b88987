"""End-to-end latency of one request at a time: mtserve beside in-process ONNX Runtime.

Both are measured in the same run on the same inputs: the in-process session is the
floor (no sockets, no scheduling), so the ratio is mtserve's whole overhead. The
cluster has one worker given every core, as the in-process session has.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from bench import zoo
from mtcore.client import Client
from mtcore.cluster import LocalCluster

RESULTS = Path(__file__).parent / "results"
PLAN = {"tiny_add": 2000, "resnet18": 150}  # model -> requests measured (after warm-up)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def timed(fn: Callable[[], Any], n: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1e6)
    return out


def measure(models: dict[str, int], rounds: int = 3) -> list[dict[str, Any]]:
    """Alternate baseline and mtserve in `rounds` slices so drift hits both alike."""
    rows = []
    with (
        tempfile.TemporaryDirectory() as state,
        LocalCluster(
            state,
            workers=1,
            threads=os.cpu_count() or 1,
            broker_args=["--profile-batches", "1"],
            secure=False,  # like the in-process baseline: plain sockets
        ) as cluster,
        Client(cluster.address, tenant="bench") as client,
    ):
        for name, n in models.items():
            client.upload_model(name, zoo.model_bytes(name), max_batch=1)
            inputs = zoo.sample_inputs(name, 1)
            session = ort.InferenceSession(
                zoo.model_bytes(name), providers=["CPUExecutionProvider"]
            )
            base, ours = [], []
            per = max(1, n // rounds)
            for _ in range(rounds):
                base += timed(lambda s=session, x=inputs: s.run(None, x), per, warmup=10)
                ours += timed(lambda m=name, x=inputs: client.infer(m, x), per, warmup=10)
            rows.append(row(name, ours, base))
    return rows


def row(name: str, ours: list[float], base: list[float]) -> dict[str, Any]:
    p50, b50 = statistics.median(ours), statistics.median(base)
    return {
        "model": name,
        "requests": len(ours),
        "mtserve_p50_us": round(p50, 1),
        "mtserve_p99_us": round(percentile(ours, 99), 1),
        "inprocess_p50_us": round(b50, 1),
        "inprocess_p99_us": round(percentile(base, 99), 1),
        "ratio_p50": round(p50 / b50, 3),
        "overhead_p50_us": round(p50 - b50, 1),
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    print(
        f"{'model':<10} {'n':>5} {'mtserve p50':>12} {'p99':>9} {'in-proc p50':>12} {'p99':>9} "
        f"{'ratio':>6} {'overhead':>9}"
    )
    for r in rows:
        print(
            f"{r['model']:<10} {r['requests']:>5} {r['mtserve_p50_us']:>10.0f}us "
            f"{r['mtserve_p99_us']:>7.0f}us {r['inprocess_p50_us']:>10.0f}us "
            f"{r['inprocess_p99_us']:>7.0f}us {r['ratio_p50']:>6.2f} "
            f"{r['overhead_p50_us']:>7.0f}us"
        )


def main(argv: list[str] | None = None) -> int:
    rows = measure(PLAN)
    print_table(rows)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "latency.json"
    meta = {"cpus": os.cpu_count(), "onnxruntime": ort.__version__, "unix_time": time.time()}
    out.write_text(json.dumps({"benchmark": "latency", "meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0
