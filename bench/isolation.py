"""`mtbench isolation`: one tenant's burst must not cost another tenant its deadlines.

Tenant A sends a steady Poisson load at `a_load` (50%) of one worker's capacity, every
request with a 100 ms deadline; tenant B bursts to `b_load` (5x) capacity for `burst`
seconds in the middle of the run, with the same deadline. Both authenticate with CURVE
keys (a secure cluster, as deployed). The same arrivals run twice on fresh clusters:
with performance isolation (the default: B is held to its weighted share of executor
time, broker/fairshare.py) and with `--no-isolation`, the baseline, where tenants compete
request by request. The model is compute-bound with a small input (`convnet`: 12 KB in,
~14 ms of convolutions here), so a burst costs executor time, not bytes to encrypt and
copy. Capacity is measured on the deployed service itself before the first run: the
throughput of one tenant keeping a few requests in flight (one ONNX Runtime thread,
`max_batch` 1, so capacity means one thing on both runs); the in-process batch-1 rate is
reported beside it.

Goals (the tenants issue): A's deadline attainment during B's burst >= 99% with
isolation; B's excess rejected at once (p99 latency of a rejection <= 5 ms), not queued.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from bench import report
from bench.report import RequestRecord
from bench.runner import OpenLoopStats, pipelined_throughput, run_open_loop
from bench.scenarios import RESULTS, finish, goal, meta, started, warm
from bench.targets import InProcessTarget, MtserveTarget
from bench.workload import Arrival, TenantMix, open_loop

REFUSED = (50, 52)  # DEADLINE_UNMEETABLE, OVERLOADED: answered at once


def plan(rate: float, args: argparse.Namespace) -> list[Arrival]:
    """A's steady arrivals over the whole run, B's only inside the burst window."""
    a = TenantMix("tenant-a", args.a_load * rate, ["m"], deadline_ms=args.deadline_ms)
    b = TenantMix("tenant-b", args.b_load * rate, ["m"], deadline_ms=args.deadline_ms)
    steady = open_loop([a], args.duration, args.seed)
    burst = open_loop([b], args.burst, args.seed + 1)
    return sorted(
        [*steady, *(Arrival(x.t + args.burst_at, x.tenant, x.model, x.deadline_ms)
                    for x in burst)],
        key=lambda x: x.t,
    )  # fmt: skip


def window_figures(records: list[RequestRecord], start: float, end: float) -> dict[str, Any]:
    """A's attainment, B's goodput and rejections, for arrivals inside [start, end)."""
    inside = [r for r in records if start <= r.t_send < end]
    a = [r for r in inside if r.tenant == "tenant-a"]
    b = [r for r in inside if r.tenant == "tenant-b"]

    rejections = [r.latency_ms for r in b if r.status in REFUSED and r.latency_ms is not None]
    return {
        "a_statuses": dict(Counter(str(r.effective_status) for r in a)),
        "b_statuses": dict(Counter(str(r.effective_status) for r in b)),
        "a_requests": len(a),
        "a_attainment": sum(r.good for r in a) / len(a) if a else None,
        "b_requests": len(b),
        "b_within_deadline": sum(r.good for r in b),
        "b_rejected": len(rejections),
        "b_rejection_p99_ms": statistics.quantiles(rejections, n=100)[98]
        if len(rejections) > 1
        else None,
        "b_queued_then_late": sum(
            1 for r in b if r.status not in (0, *REFUSED) or (r.status == 0 and not r.good)
        ),
    }


def convnet(layers: int = 6, channels: int = 128, seed: int = 0) -> bytes:
    """x[N, 3, 32, 32] -> `layers` 3x3 convolutions with ReLU -> mean over space [N, C]."""
    rng = np.random.default_rng(seed)
    nodes, weights, x, cin = [], [], "x", 3
    for i in range(layers):
        w = rng.standard_normal((channels, cin, 3, 3)) * (2 / (cin * 9)) ** 0.5
        weights.append(numpy_helper.from_array(w.astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        x, cin = f"r{i}", channels
    nodes.append(helper.make_node("ReduceMean", [x], ["y"], axes=[2, 3], keepdims=0))
    graph = helper.make_graph(
        nodes,
        "convnet",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", channels])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model.SerializeToString()


def inprocess_ms(path: Path, inputs: dict[str, np.ndarray], runs: int = 30) -> float:
    target = InProcessTarget(threads=1)
    target.start({"m": path})
    try:
        for _ in range(5):
            target.run("m", inputs)
        began = time.perf_counter()
        for _ in range(runs):
            target.run("m", inputs)
        return (time.perf_counter() - began) / runs * 1e3
    finally:
        target.stop()


def capacity_rps(target: MtserveTarget) -> float:
    """What the deployed service sustains for one tenant with a few requests in flight."""
    key = target._clients.key_files["tenant-a"]
    inputs = {"x": np.ones((1, 3, 32, 32), np.float32)}
    done = pipelined_throughput(target.address, "m", inputs, n=300, window=4, tenant=None,
                                key_file=key)  # fmt: skip
    return done["rps"]


def run(args: argparse.Namespace) -> dict[str, Any]:
    path = Path(tempfile.mkdtemp(prefix="mtbench-isolation-")) / "convnet.onnx"
    path.write_bytes(convnet())
    inputs = {"m": {"x": np.ones((1, 3, 32, 32), np.float32)}}
    t1_ms = inprocess_ms(path, inputs["m"])
    rate, arrivals = 0.0, []
    results: dict[str, Any] = {}
    windows: dict[str, Any] = {}
    tenants = ("tenant-a", "tenant-b")
    for name, extra in (("isolated", []), ("shared", ["--no-isolation"])):
        target = MtserveTarget(threads=1, max_batch=1, name=name, secure=True, broker_args=extra)
        with started([target], {"m": path}, tenants):
            warm(target, inputs)
            if not arrivals:  # the same arrivals for both runs, from the first's capacity
                rate = capacity_rps(target)
                arrivals = plan(rate, args)
            records, samples, duration = asyncio.run(
                run_open_loop(target, arrivals, inputs, duration=args.duration,
                              drain_s=10.0, stats=OpenLoopStats())
            )  # fmt: skip
        results[name] = report.target_result(records, duration, samples)
        windows[name] = window_figures(records, args.burst_at, args.burst_at + args.burst)
    on, off = windows["isolated"], windows["shared"]
    config = {
        "model": "convnet (6 x 3x3 conv, 128 channels, 32x32 input)",
        "inprocess_batch1_ms": t1_ms,
        "inprocess_rps": 1e3 / t1_ms,
        "capacity_rps": rate,
        "a_rate_rps": args.a_load * rate,
        "b_rate_rps": args.b_load * rate,
        "deadline_ms": args.deadline_ms,
        "duration_s": args.duration,
        "burst_s": [args.burst_at, args.burst_at + args.burst],
        "secure": True,
        "windows": windows,
        "goal": goal("A's attainment during B's burst, isolated", on["a_attainment"], ">=", 0.99),
        "goal_rejection": goal(
            "B's rejection p99 ms, isolated", on["b_rejection_p99_ms"], "<=", 5.0
        ),
        "goal_baseline": goal(
            "A's attainment during B's burst, no isolation (baseline)", off["a_attainment"]
        ),
    }
    print_windows(windows)
    doc = report.build_results("isolation", config, results, meta())
    return finish(doc, "isolation", Path(args.out))


def print_windows(windows: dict[str, Any]) -> None:
    print(f"\n{'during the burst':<12} {'A reqs':>7} {'A attain':>9} {'B reqs':>7} "
          f"{'B in time':>9} {'B refused':>9} {'refusal p99':>11} {'B late':>7}")  # fmt: skip
    for name, w in windows.items():
        attain = f"{w['a_attainment'] * 100:.2f}%" if w["a_attainment"] is not None else "-"
        p99 = w["b_rejection_p99_ms"]
        print(f"{name:<12} {w['a_requests']:>7} {attain:>9} {w['b_requests']:>7} "
              f"{w['b_within_deadline']:>9} {w['b_rejected']:>9} "
              f"{(f'{p99:.2f} ms' if p99 is not None else '-'):>11} "
              f"{w['b_queued_then_late']:>7}")  # fmt: skip
        print(f"{'':<12} statuses: A {w['a_statuses']}  B {w['b_statuses']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mtbench isolation", description=__doc__.split("\n\n")[0])
    p.add_argument("--a-load", type=float, default=0.5, help="tenant A, share of capacity")
    p.add_argument("--b-load", type=float, default=5.0, help="tenant B's burst, x capacity")
    p.add_argument("--deadline-ms", type=float, default=100.0)
    p.add_argument("--duration", type=float, default=40.0, help="seconds of A's load")
    p.add_argument("--burst-at", type=float, default=5.0, help="B's burst starts then")
    p.add_argument("--burst", type=float, default=30.0, help="seconds of B's burst")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.burst_at + args.burst > args.duration:
        p.error("the burst must end within --duration")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
