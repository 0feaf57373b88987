"""Swap-in from the host tier against a fresh session build, per zoo model.

    python -m bench.swap [--builds N] [--runs N] [--rounds R]      (or `mtbench swap`)

For every zoo model, in one process, with one ONNX Runtime thread per session:

- swap-in: host tier -> runnable (`build_session` over the pool's pages) against a
  session built from the model's bytes the usual way (`make_session`), median of N each;
- execution p50 at batch 1 of the pool-backed session against the fully optimized one,
  interleaved in R rounds so drift hits both alike, ratio of the medians;
- cold -> host: optimizing once and moving the weights into pages (paid once per model).

Then, each in a fresh child process so the resident sets do not mix, the memory of 8
runnable copies of ResNet-18 (one host-tier copy of the weights, 8 sessions over it, each
run once) against 8 independent sessions, both as a multiple of one copy's weight bytes.

Prints a table and one line per goal; writes bench/results/swap.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import zoo
from bench.scenarios import RESULTS, goal, meta, print_goals

GOALS = {  # model -> swap-in speed-up it must reach (the figures)
    "resnet18": 10.0,
    "mobilenetv2": 5.0,
}
EXEC_RATIO_MAX = 1.1  # pool-backed p50 / fully optimized p50
EXEC_GOAL_MODELS = ("mobilenetv2", "resnet18", "resnet50")  # where exec time is the model's
MEMORY_RATIO_MAX = 1.3  # 8 runnable copies, in weight bytes of one copy
COPIES = 8


def _ms(seconds: list[float]) -> float:
    return statistics.median(seconds) * 1e3


def _timed(fn: Any, n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def measure_model(name: str, host: Any, builds: int, runs: int, rounds: int) -> dict[str, Any]:
    from worker.onnx_backend import build_session, make_session

    data = zoo.model_bytes(name)
    start = time.perf_counter()
    prepared = host.prepare(name, data)
    prepare_ms = (time.perf_counter() - start) * 1e3
    fresh_build = _timed(lambda: make_session(data, 1), builds)
    swap_in = _timed(lambda: build_session(prepared, 1), builds)
    fresh, pooled = make_session(data, 1), build_session(prepared, 1).session
    feeds = zoo.sample_inputs(name, 1)
    fresh_runs: list[float] = []
    pool_runs: list[float] = []
    for session in (fresh, pooled):
        session.run(None, feeds)  # warm-up: first runs allocate
    for _ in range(rounds):
        fresh_runs += _timed(lambda: fresh.run(None, feeds), runs)
        pool_runs += _timed(lambda: pooled.run(None, feeds), runs)
    fresh = pooled = None  # released before their pages go back to the pool
    host.drop(name)
    return {
        "weight_bytes": prepared.weight_bytes,
        "prepare_ms": prepare_ms,
        "fresh_build_ms": _ms(fresh_build),
        "swap_in_ms": _ms(swap_in),
        "swap_speedup": _ms(fresh_build) / _ms(swap_in),
        "fresh_exec_p50_ms": _ms(fresh_runs),
        "pool_exec_p50_ms": _ms(pool_runs),
        "exec_ratio": _ms(pool_runs) / _ms(fresh_runs),
    }


def memory_child(mode: str, name: str) -> dict[str, Any]:
    """In a fresh process: resident bytes that COPIES runnable copies of `name` add."""
    from ext import PagePool
    from worker.onnx_backend import build_session, make_session
    from worker.tiers import HostTier, resident_bytes, trim_heap

    data = zoo.model_bytes(name)
    warm = make_session(zoo.model_bytes("tiny_add"), 1)  # ORT's libraries and pools
    warm.run(None, zoo.sample_inputs("tiny_add", 1))
    feeds = zoo.sample_inputs(name, 1)
    gc.collect()
    trim_heap()
    before = resident_bytes()
    sessions, weight_bytes = [], 0
    if mode == "pool":
        host = HostTier(PagePool(1 << 30), Path(tempfile.mkdtemp(prefix="mtbench-swap-")))
        prepared = host.prepare(name, data)
        weight_bytes = prepared.weight_bytes
        sessions = [build_session(prepared, 1).session for _ in range(COPIES)]
    else:
        sessions = [make_session(data, 1) for _ in range(COPIES)]
    for session in sessions:
        session.run(None, feeds)
    gc.collect()
    trim_heap()
    added = resident_bytes() - before
    return {"mode": mode, "copies": COPIES, "added_bytes": added, "weight_bytes": weight_bytes}


def measure_memory(name: str) -> dict[str, Any]:
    out = {}
    for mode in ("pool", "fresh"):
        proc = subprocess.run(
            [sys.executable, "-m", "bench.swap", "--memory-child", mode, "--model", name],
            capture_output=True, text=True, timeout=600, check=True,
        )  # fmt: skip
        out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    weights = out["pool"]["weight_bytes"]
    return {
        "model": name,
        "copies": COPIES,
        "weight_bytes": weights,
        "pool_added_bytes": out["pool"]["added_bytes"],
        "fresh_added_bytes": out["fresh"]["added_bytes"],
        "pool_ratio": out["pool"]["added_bytes"] / weights,
        "fresh_ratio": out["fresh"]["added_bytes"] / weights,
    }


def goals(models: dict[str, Any], memory: dict[str, Any]) -> list[dict[str, Any]]:
    lines = []
    for name, bound in GOALS.items():
        speedup = models[name]["swap_speedup"]
        lines.append(goal(f"{name} swap-in speed-up over a fresh build", speedup, ">=", bound))
    for name in EXEC_GOAL_MODELS:
        ratio = models[name]["exec_ratio"]
        lines.append(goal(f"{name} exec p50, pool-backed / optimized", ratio, "<=", EXEC_RATIO_MAX))
    lines.append(goal(f"resnet18 x{COPIES} runnable, resident / one copy's weights",
                      memory["pool_ratio"], "<=", MEMORY_RATIO_MAX))  # fmt: skip
    lines.append(goal(f"resnet18 x{COPIES} independent sessions, resident / one copy's weights",
                      memory["fresh_ratio"]))  # fmt: skip
    return lines


def print_table(models: dict[str, Any], memory: dict[str, Any]) -> None:
    print(f"{'model':<13}{'weights MB':>11}{'prepare':>9}{'fresh build':>12}{'swap-in':>9}"
          f"{'speed-up':>9}{'exec fresh':>11}{'exec pool':>10}{'ratio':>7}")  # fmt: skip
    for name, m in models.items():
        print(
            f"{name:<13}{m['weight_bytes'] / 1e6:>11.1f}{m['prepare_ms']:>7.1f}ms"
            f"{m['fresh_build_ms']:>10.1f}ms{m['swap_in_ms']:>7.2f}ms{m['swap_speedup']:>8.1f}x"
            f"{m['fresh_exec_p50_ms']:>9.2f}ms{m['pool_exec_p50_ms']:>8.2f}ms{m['exec_ratio']:>6.2f}x"
        )
    print(
        f"\nmemory, {memory['copies']} runnable copies of {memory['model']} "
        f"({memory['weight_bytes'] / 1e6:.1f} MB of weights): pool-backed "
        f"{memory['pool_added_bytes'] / 1e6:.1f} MB ({memory['pool_ratio']:.2f}x), independent "
        f"{memory['fresh_added_bytes'] / 1e6:.1f} MB ({memory['fresh_ratio']:.2f}x)"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mtbench swap", description=__doc__.split("\n")[0])
    p.add_argument("--builds", type=int, default=7, help="session builds timed per kind")
    p.add_argument("--runs", type=int, default=10, help="batch-1 runs per round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds per session")
    p.add_argument("--models", default=",".join(zoo.MODELS))
    p.add_argument("--memory-child", choices=("pool", "fresh"), help=argparse.SUPPRESS)
    p.add_argument("--model", default="resnet18", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.model)))
        return 0
    from ext import PagePool
    from worker.tiers import HostTier

    host = HostTier(PagePool(1 << 30), Path(tempfile.mkdtemp(prefix="mtbench-swap-")))
    models = {}
    for name in args.models.split(","):
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        models[name] = measure_model(name, host, args.builds, args.runs, args.rounds)
    host.close()
    print("measuring memory ...", file=sys.stderr, flush=True)
    memory = measure_memory("resnet18")
    lines = goals(models, memory)
    doc = {
        "benchmark": "swap",
        "config": {"builds": args.builds, "runs": args.runs, "rounds": args.rounds} | meta(),
        "models": models,
        "memory": memory,
        "goals": lines,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "swap.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print_table(models, memory)
    print_goals(lines)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
