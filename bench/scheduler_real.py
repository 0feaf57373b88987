"""The real half of `mtbench scheduler`: one CPU worker, zoo models, both schedulers.

100 MLPs and 100 MobileNetV2s by default (distinct weights), Zipf(1) popularity over
them in a shuffled order, a device budget holding 15% of their bytes, 200 ms deadlines,
Poisson arrivals at each load: a share of capacity, 1 / the popularity-weighted
in-process batch-1 time (one ONNX Runtime thread, as the worker runs). Each scheduler
gets its own cluster, uploads once (profiling batch sizes 1 and 4 only, to keep uploads
short), and runs every load in turn on the same arrival lists.

Each load gives the same row as the simulated half (`bench.scheduler.Outcome.row`). The
controller's CPU is the broker process's user + system time over the run (from /proc):
I/O and message handling included, so it is an upper bound on the scheduler's own.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
from pathlib import Path
from typing import Any

from bench import zoo
from bench.runner import OpenLoopStats, run_open_loop
from bench.scenarios import batch1_seconds, started, warm, zoo_models
from bench.targets import MtserveTarget, memory_mb_for
from bench.workload import TenantMix, open_loop

KINDS = ("mlp", "mobilenetv2")
DEADLINE_MS = 200.0
RESIDENT_SHARE = 0.15


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_real(
    loads: list[float], seconds: float, per_kind: int = 100, seed: int = 0
) -> dict[str, Any]:
    from bench.scheduler import Outcome, print_row

    models: dict[str, Path] = {}
    t1: dict[str, float] = {}
    for kind in KINDS:
        print(f"building {per_kind} {kind} models ...", file=sys.stderr, flush=True)
        built = zoo_models(kind, range(per_kind))
        models.update(built)
        t1[kind] = batch1_seconds(next(iter(built.values())), kind)
    names = list(models)
    random.Random(seed).shuffle(names)  # popularity rank: kinds interleaved
    weights = [1.0 / (i + 1) for i in range(len(names))]
    kind_of = {name: name.rsplit("-", 1)[0] for name in names}
    mean_s = sum(w * t1[kind_of[n]] for n, w in zip(names, weights, strict=True)) / sum(weights)
    capacity = 1.0 / mean_s
    total_bytes = sum(p.stat().st_size for p in models.values())
    memory_mb = memory_mb_for(1, int(total_bytes * RESIDENT_SHARE))
    inputs = {name: zoo.sample_inputs(kind_of[name]) for name in names}
    plans = {}
    for i, load in enumerate(loads):
        mix = TenantMix("bench", load * capacity, names, zipf_s=1.0, deadline_ms=DEADLINE_MS)
        plans[load] = open_loop([mix], seconds, seed + i)
    rows = []
    for scheduler in ("fifo", "predictive"):
        target = MtserveTarget(threads=1, memory_mb=memory_mb, scheduler=scheduler,
                               name=scheduler, profile_batches="1,4")  # fmt: skip
        with started([target], models):
            warm(target, {n: inputs[n] for n in names[: int(len(names) * RESIDENT_SHARE)]})
            pid = target.cluster.broker.pid
            for load, arrivals in plans.items():
                before = cpu_seconds(pid)
                records, _, duration = asyncio.run(run_open_loop(
                    target, arrivals, inputs, duration=seconds, drain_s=5.0,
                    stats=OpenLoopStats()))  # fmt: skip
                out = Outcome(scheduler, load, offered=len(records))
                out.cpu_s = cpu_seconds(pid) - before
                out.rejected = sum(r.status == 50 for r in records)
                out.within = sum(r.good for r in records)
                out.late = sum(r.ok and not r.good for r in records)
                out.failed = sum(not r.ok and r.status != 50 for r in records)
                out.within_prediction = target.status().get("predicted_within")
                rows.append(out.row(duration))
                print_row(rows[-1])
    return {"capacity_rps": capacity, "budget_mb": memory_mb, "t1_ms": t1, "rows": rows}
