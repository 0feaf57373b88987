"""The figures of docs/BENCHMARKS.md: one function per goal, every target in the same run.

Each scenario starts mtserve and its baselines on this machine, drives them with the
same requests, and returns a `bench.report` results document (also written to
`<out>/<scenario>.json` with PNG plots beside it, and printed as a table). Latency
scenarios interleave the targets in rounds, so a noisy neighbour on these two shared
cores hits every target alike, and report medians. Every process a scenario starts is
stopped (by PID, in the targets' `stop`) before it returns, also on errors.

| scenario        | question                                                   | goal        |
|-----------------|------------------------------------------------------------|-------------|
| tiny-latency    | tiny model one request at a time: mtserve p50 / bare ZMQ   | <= 1.3x     |
| pipelined       | tiny model, many in flight: mtserve requests/s             | >= 20,000   |
| resnet18        | ResNet-18 batch 1: mtserve p50 / in-process ONNX Runtime   | <= 1.05x    |
| zipf50          | 50 models, Zipf(1), 8 resident, 100 ms deadlines, Poisson  | goodput     |
| overload        | zipf50 at 150% of capacity, FIFO and predictive schedulers | goodput     |
| mixed           | demo's 4 models, own deadlines, 75% load, both schedulers  | >= 99% each |
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench import demo, report, zoo
from bench.report import RequestRecord
from bench.runner import (
    OpenLoopStats,
    pipelined_throughput,
    run_open_loop,
    sequential_inprocess,
)
from bench.targets import (
    InProcessTarget,
    Inputs,
    MtserveTarget,
    RayTarget,
    Target,
    ZmqTarget,
    memory_mb_for,
    ray_available,
)
from bench.workload import Arrival, TenantMix, open_loop

RESULTS = Path(__file__).parent / "results"
ZOO_CACHE = Path(tempfile.gettempdir()) / "mtbench-zoo"
CPUS = os.cpu_count() or 1
SCENARIOS = ("tiny-latency", "pipelined", "resnet18", "zipf50", "overload", "mixed")
# mixed: each model's deadline; the models and their shares of requests are the demo's.
MIXED_DEADLINES_MS = {"tiny_add": 10.0, "mlp": 10.0, "mobilenetv2": 100.0, "resnet18": 200.0}


# ---------------------------------------------------------------------------- helpers


def zoo_models(kind: str, seeds: Sequence[int], names: Sequence[str] | None = None) -> dict:
    """{name: path} of zoo models with distinct weights (one seed each), cached on disk."""
    names = list(names) if names is not None else [f"{kind}-{s:02d}" for s in seeds]
    return {
        name: zoo.save(kind, ZOO_CACHE / f"seed{seed}", seed=seed)
        for name, seed in zip(names, seeds, strict=True)
    }


@contextlib.contextmanager
def started(
    targets: Sequence[Target], models: dict[str, Path], tenants: Sequence[str] = ("bench",)
) -> Iterator[Sequence[Target]]:
    """Start targets in order; stop every one that started, whatever happens."""
    live: list[Target] = []
    try:
        for target in targets:
            print(f"starting {target.name} ...", file=sys.stderr, flush=True)
            target.start(models, tenants)
            live.append(target)
        yield live
    finally:
        for target in reversed(live):
            target.stop()
        for target in targets:
            if target not in live:
                target.stop()  # a failed start cleaned up already; stop is idempotent


@dataclass
class Measured:
    """One target's records across rounds, laid end to end in time."""

    records: list[RequestRecord]
    seconds: float = 0.0

    def add(self, run: dict[str, Any]) -> None:
        for r in run["records"]:
            r.t_send += self.seconds
        self.records += run["records"]
        self.seconds += run["seconds"]


def one_at_a_time(target: Target, model: str, inputs: Inputs, n: int) -> dict[str, Any]:
    """n sequential requests on the fastest path the target has (raw DEALER or direct call)."""
    if target.address is not None:
        return pipelined_throughput(target.address, model, inputs, n=n, window=1)
    assert isinstance(target, InProcessTarget)
    return sequential_inprocess(lambda x: target.run(model, x), inputs, n, model)


def interleaved(
    targets: Sequence[Target], model: str, inputs: Inputs, n: int, rounds: int, warmup: int
) -> dict[str, Measured]:
    """`rounds` slices per target, rotating the order each round, after a warm-up each."""
    for target in targets:
        one_at_a_time(target, model, inputs, warmup)
    out = {t.name: Measured([]) for t in targets}
    per = max(1, n // rounds)
    for r in range(rounds):
        for target in [*targets[r % len(targets) :], *targets[: r % len(targets)]]:
            out[target.name].add(one_at_a_time(target, model, inputs, per))
    return out


def goal(
    metric: str,
    value: float | None,
    op: str | None = None,
    bound: float | None = None,
    unit: str = "",
) -> dict[str, Any]:
    """A goal line for the config: the measured value, the bound and whether it holds.

    Without a bound the figure is only reported (the issue sets no number for it).
    """
    met = None
    if value is not None and op is not None and bound is not None:
        met = value <= bound if op == "<=" else value >= bound
    text = f"{op} {bound:g}{unit}" if op is not None and bound is not None else "report"
    return {"metric": metric, "value": value, "goal": text, "met": met, "unit": unit}


def goals(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The config's goal lines (keys `goal`, `goal_*`), in the order the scenario set them."""
    return [g for key, g in doc["config"].items() if key.startswith("goal") and g]


def print_goals(goals: Sequence[dict[str, Any]]) -> None:
    """One line per goal: `goal: NAME = VALUE (goal OP TARGET): met|NOT met`."""
    for g in goals:
        value = fmt_value(g["value"], g.get("unit", ""))
        verdict = {True: "met", False: "NOT met"}.get(g["met"], "reported")
        print(f"goal: {g['metric']} = {value} (goal {g['goal']}): {verdict}")


def p50(doc_targets: dict[str, Any], name: str) -> float | None:
    return doc_targets[name]["summary"]["latency_ms"]["p50"]


def finish(doc: dict[str, Any], scenario: str, out_dir: Path) -> dict[str, Any]:
    """Write JSON and plots, print the table and the goal, return the document."""
    out_dir = Path(out_dir)
    path = report.write_json(doc, out_dir / f"{scenario}.json")
    report.plot(doc, out_dir, prefix=f"{scenario}_")
    print()
    report.print_table(doc)
    print_goals(goals(doc))
    print(f"wrote {path} and {scenario}_*.png")
    return doc


def fmt_value(v: float | None, unit: str = "") -> str:
    """Rates as whole numbers, ratios and fractions with three digits, percentages with one."""
    if v is None:
        return "-"
    if unit:
        return f"{v:.1f}{unit}"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def meta() -> dict[str, Any]:
    import onnxruntime as ort

    return {"onnxruntime": ort.__version__}


# ---------------------------------------------------------------------------- scenarios


def tiny_latency(
    n: int = 2000, rounds: int = 4, warmup: int = 200, out_dir: Path = RESULTS, spin_us: int = 1000
) -> dict[str, Any]:
    """Goal 1: tiny model, one request at a time; mtserve p50 within 1.3x of the bare server.

    Both servers are driven by the same raw DEALER client with one request in flight,
    so the ratio is server-side cost; in-process ONNX Runtime is shown for scale.
    mtserve runs twice: as deployed by default, and with broker and worker busy-polling
    `spin_us` after each message (`--spin-us`), which trades idle CPU for wake-ups.
    """
    models = zoo_models("tiny_add", [0], ["tiny_add"])
    inputs = zoo.sample_inputs("tiny_add")
    targets = [
        MtserveTarget(threads=1),
        MtserveTarget(threads=1, name="mtserve-spin", spin_us=spin_us),
        ZmqTarget(threads=1),
        InProcessTarget(threads=1),
    ]
    with started(targets, models) as live:
        measured = interleaved(live, "tiny_add", inputs, n, rounds, warmup)
    results = {k: report.target_result(m.records, m.seconds) for k, m in measured.items()}
    ratio = _ratio(p50(results, "mtserve"), p50(results, "zmq"))
    spin_ratio = _ratio(p50(results, "mtserve-spin"), p50(results, "zmq"))
    config = {
        "model": "tiny_add",
        "n": n,
        "rounds": rounds,
        "client": "raw DEALER, one request in flight",
        "mtserve_spin_us": spin_us,
        "goal": goal("p50 mtserve / zmq", ratio, "<=", 1.3),
        "goal_spin": goal(f"p50 mtserve --spin-us {spin_us} / zmq", spin_ratio, "<=", 1.3),
    }
    doc = report.build_results("tiny-latency", config, results, meta())
    return finish(doc, "tiny-latency", out_dir)


def pipelined(
    n: int = 30000,
    windows: Sequence[int] = (256, 2048),
    max_batch: int = 64,
    out_dir: Path = RESULTS,
) -> dict[str, Any]:
    """Goal 2: tiny model, `window` requests in flight; mtserve >= 20,000 requests/s.

    Each window is tried on each target in turn (so noise hits both) and the best run per
    target is reported; all runs are kept in the config.
    """
    models = zoo_models("tiny_add", [0], ["tiny_add"])
    inputs = zoo.sample_inputs("tiny_add")
    targets = [MtserveTarget(threads=1, max_batch=max_batch), ZmqTarget(threads=1)]
    best: dict[str, dict[str, Any]] = {}
    runs: dict[str, dict[str, float]] = {t.name: {} for t in targets}
    with started(targets, models) as live:
        for window in windows:
            for target in live:
                pipelined_throughput(target.address, "tiny_add", inputs, n=n // 10, window=window)
                run = pipelined_throughput(target.address, "tiny_add", inputs, n=n, window=window)
                runs[target.name][str(window)] = run["rps"]
                print(f"  {target.name} window {window}: {run['rps']:.0f} req/s", file=sys.stderr)
                if target.name not in best or run["rps"] > best[target.name]["rps"]:
                    best[target.name] = run
        c_rps = c_client_rps(live, n, windows)
    results = {k: report.target_result(r["records"], r["seconds"]) for k, r in best.items()}
    rps = max(results["mtserve"]["summary"]["throughput_rps"], *c_rps.get("mtserve", {}).values())
    config = {
        "c_client_rps_by_window": c_rps,
        "model": "tiny_add",
        "n": n,
        "windows": list(windows),
        "best_window": {k: r["window"] for k, r in best.items()},
        "rps_by_window": runs,
        "mtserve_max_batch": max_batch,
        "goal": goal("mtserve requests/s", rps, ">=", 20000),
    }
    doc = report.build_results("pipelined", config, results, meta())
    return finish(doc, "pipelined", out_dir)


def c_client_rps(targets: Sequence[Any], n: int, windows: Sequence[int]) -> dict[str, dict]:
    """Requests/s with the C client's pipelined load mode, which costs a few microseconds
    per request where the Python client costs tens: it shows the server's own ceiling.
    Empty when the client cannot be built here (`make cclient` needs cc and libzmq)."""
    binary = Path(__file__).resolve().parent.parent / "build" / "mtclient"
    if not binary.exists():
        built = subprocess.run(["make", "-s", "cclient"], cwd=binary.parent.parent,
                               capture_output=True, text=True, timeout=300)  # fmt: skip
        if built.returncode != 0 or not binary.exists():
            print(f"  C client unavailable: {built.stderr.strip()[-200:]}", file=sys.stderr)
            return {}
    out: dict[str, dict] = {}
    for window in windows:
        for target in targets:
            args = [str(binary), target.address, "--tenant", "bench", "load", "tiny_add", "1,4",
                    str(n), str(window), "--input", "input"]  # fmt: skip
            done = subprocess.run(args, capture_output=True, text=True, timeout=600)
            if done.returncode != 0:
                print(f"  C client on {target.name}: {done.stderr.strip()[-200:]}", file=sys.stderr)
                continue
            rps = json.loads(done.stdout)["rps"]
            out.setdefault(target.name, {})[str(window)] = round(rps)
            print(f"  {target.name} window {window} (C client): {rps:.0f} req/s", file=sys.stderr)
    return out


def resnet18_latency(
    n: int = 150, rounds: int = 3, warmup: int = 10, out_dir: Path = RESULTS
) -> dict[str, Any]:
    """Goal 3: ResNet-18 batch 1 one at a time; mtserve p50 within 1.05x of in-process.

    Every target gets all cores for ONNX Runtime, as a single-tenant deployment would.
    """
    models = zoo_models("resnet18", [0], ["resnet18"])
    inputs = zoo.sample_inputs("resnet18")
    targets = [
        MtserveTarget(threads=CPUS, max_batch=1),
        ZmqTarget(threads=CPUS),
        InProcessTarget(threads=CPUS),
    ]
    with started(targets, models) as live:
        measured = interleaved(live, "resnet18", inputs, n, rounds, warmup)
    results = {k: report.target_result(m.records, m.seconds) for k, m in measured.items()}
    ratio = _ratio(p50(results, "mtserve"), p50(results, "inprocess"))
    config = {
        "model": "resnet18",
        "n": n,
        "rounds": rounds,
        "threads": CPUS,
        "goal": goal("p50 mtserve / inprocess", ratio, "<=", 1.05),
    }
    doc = report.build_results("resnet18", config, results, meta())
    return finish(doc, "resnet18", out_dir)


def batch1_seconds(path: Path, kind: str, runs: int = 30, threads: int = 1) -> float:
    """Median in-process batch-1 time: one model's capacity is its inverse."""
    target = InProcessTarget(threads=threads)
    target.start({"m": path})
    try:
        x = zoo.sample_inputs(kind)
        for _ in range(5):
            target.run("m", x)
        times = []
        for _ in range(runs):
            began = time.perf_counter()
            target.run("m", x)
            times.append(time.perf_counter() - began)
    finally:
        target.stop()
    return statistics.median(times)


def zipf50_targets(
    size: int, resident: int, ray: bool, schedulers: Sequence[str] = ("predictive",)
) -> list[Target]:
    """mtserve with room for `resident` models; the bare server with all; Ray if asked.

    One ONNX Runtime thread per session everywhere: with two shared cores, a two-thread
    session's spinning pool collapses (3-5x slower here) as soon as the load generator or
    a neighbour wants a core, which would measure the noise, not the serving.
    """
    memory_mb = memory_mb_for(resident, size)
    targets: list[Target] = [
        MtserveTarget(threads=1, memory_mb=memory_mb, scheduler=name,
                      name="mtserve" if name == "predictive" else f"mtserve-{name}")
        for name in schedulers
    ]  # fmt: skip
    targets.append(ZmqTarget(threads=1))
    if ray:
        ok, why = ray_available()
        if ok:
            # Two replicas of 4 models each: the same 8 resident models as mtserve's budget.
            targets.append(RayTarget(models_per_replica=4, replicas=2, threads=1))
        else:
            print(f"Ray Serve skipped: {why}", file=sys.stderr)
    return targets


def zipf50(
    duration: float = 60.0,
    n_models: int = 50,
    resident: int = 8,
    deadline_ms: float = 100.0,
    load: float = 0.5,
    kind: str = "mobilenetv2",
    ray: bool = False,
    seed: int = 0,
    drain_s: float = 10.0,
    out_dir: Path = RESULTS,
    schedulers: Sequence[str] = ("predictive",),
    scenario: str = "zipf50",
) -> dict[str, Any]:
    """Goal 4: many models, few resident, deadlines: goodput and attainment beside baselines.

    The rate is `load` times one model's measured capacity (1 / in-process batch-1 time),
    so the offered work fits the machine and what is tested is the model cache. Targets
    run one after another on the identical arrival list, each warmed with one request to
    each of the `resident` most popular models.
    """
    print(f"building {n_models} {kind} models ...", file=sys.stderr, flush=True)
    models = zoo_models(kind, range(n_models))
    names = list(models)
    size = models[names[0]].stat().st_size
    t1 = batch1_seconds(models[names[0]], kind)
    rate = load / t1
    mix = TenantMix("bench", rate, names, zipf_s=1.0, deadline_ms=deadline_ms)
    arrivals = open_loop([mix], duration, seed)
    inputs_by_model = dict.fromkeys(names, zoo.sample_inputs(kind))
    results, records_by_target, lateness = run_each(
        zipf50_targets(size, resident, ray, schedulers), models, arrivals, inputs_by_model,
        names[:resident], duration, drain_s,
    )  # fmt: skip
    config = {
        "model": kind,
        "n_models": n_models,
        "model_bytes": size,
        "resident": resident,
        "deadline_ms": deadline_ms,
        "process": "poisson",
        "zipf_s": 1.0,
        "batch1_ms": t1 * 1e3,
        "rate_rps": rate,
        "duration_s": duration,
        "requests": len(arrivals),
        "send_late_ms": lateness,
        "threads": 1,
        "ray": "2 replicas x 4 models, 1 thread each" if "ray" in results else "not run",
    }
    good = {name: r["summary"]["goodput_rps"] for name, r in results.items()}
    if scenario == "overload":
        config.update(overload_goals(good, records_by_target, rate / load))
    else:
        ratio = good["mtserve"] / good["zmq"] if good.get("zmq") else None
        config["goal"] = goal("mtserve goodput / all-resident bare server's", ratio, ">=", 0.95)
    doc = report.build_results(scenario, config, results, meta())
    return finish(doc, scenario, out_dir)


def overload(**kwargs: Any) -> dict[str, Any]:
    """zipf50's 50 models at 150% of capacity, both schedulers beside the bare server."""
    kwargs.setdefault("load", 1.5)
    return zipf50(schedulers=("predictive", "fifo"), scenario="overload", **kwargs)


def overload_goals(
    good: dict[str, float], records: dict[str, list[RequestRecord]], capacity: float
) -> dict[str, Any]:
    """The predictive scheduler against capacity and the bare server; rejection speed."""
    mine = good.get("mtserve", 0.0)
    rejections = [r.latency_ms for r in records.get("mtserve", ())
                  if r.status == 50 and r.latency_ms is not None]  # fmt: skip
    p99 = statistics.quantiles(rejections, n=100)[98] if len(rejections) > 1 else None
    return {
        "goal": goal("predictive goodput / capacity", mine / capacity, ">=", 0.9),
        "goal_vs_bare": goal(
            "predictive goodput / all-resident bare server's",
            _ratio(mine, good.get("zmq")),
            ">=",
            2.0,
        ),
        "goal_rejection": goal("predictive rejection p99 ms", p99, "<=", 5.0),
    }


def run_each(
    targets: Sequence[Target],
    models: dict[str, Path],
    arrivals: Sequence[Arrival],
    inputs_by_model: dict[str, Inputs],
    warm_models: Sequence[str],
    duration: float,
    drain_s: float,
) -> tuple[dict[str, Any], dict[str, list[RequestRecord]], dict[str, Any]]:
    """Each target in turn, alone, on the identical arrival list, after one unmeasured
    request to each of `warm_models`: results, records and send lateness by target name."""
    results: dict[str, Any] = {}
    records_by_target: dict[str, list[RequestRecord]] = {}
    lateness: dict[str, Any] = {}
    for target in targets:
        with started([target], models):
            warm(target, {m: inputs_by_model[m] for m in warm_models})
            stats = OpenLoopStats()
            records, samples, dur = asyncio.run(
                run_open_loop(
                    target, arrivals, inputs_by_model, duration=duration, drain_s=drain_s,
                    stats=stats,
                )
            )  # fmt: skip
        results[target.name] = report.target_result(records, dur, samples)
        records_by_target[target.name] = records
        lateness[target.name] = stats.summary()
    return results, records_by_target, lateness


def mixed(
    duration: float = 60.0,
    load: float = 0.75,
    seed: int = 0,
    drain_s: float = 10.0,
    out_dir: Path = RESULTS,
) -> dict[str, Any]:
    """The demo's four models, each with its own deadline, on one worker at `load` of its
    capacity; FIFO and predictive schedulers on the same requests, attainment per model.

    Capacity is 1 / the mean in-process batch-1 time over the demo's request shares
    (one thread, as in zipf50), so the rate keeps one worker busy but not overloaded.
    """
    shares = demo.MIX
    models = {kind: zoo_models(kind, [0], [kind])[kind] for kind in shares}
    t1 = {kind: batch1_seconds(models[kind], kind) for kind in shares}
    capacity = 1.0 / sum(share * t1[kind] for kind, share in shares.items())
    mix = TenantMix("bench", load * capacity, list(shares), shares=list(shares.values()))
    arrivals = [replace(a, deadline_ms=MIXED_DEADLINES_MS[a.model])
                for a in open_loop([mix], duration, seed)]  # fmt: skip
    inputs_by_model = {kind: zoo.sample_inputs(kind) for kind in shares}
    schedulers = ("fifo", "predictive")
    # Two executors of one thread each: a short run need not wait for a long one to end
    # (the predictive scheduler keeps one free of long runs; FIFO fills both).
    targets = [MtserveTarget(threads=1, exec_threads=2, scheduler=s, name=s) for s in schedulers]
    whole, records, lateness = run_each(
        targets, models, arrivals, inputs_by_model, list(shares), duration, drain_s
    )
    # The whole run per scheduler, then each model under each. No target is named mtserve,
    # so there are no ratios: the FIFO rows and goal lines are the baseline.
    results = dict(whole)
    config: dict[str, Any] = {
        "shares": shares,
        "deadline_ms": MIXED_DEADLINES_MS,
        "batch1_ms": {kind: t * 1e3 for kind, t in t1.items()},
        "capacity_rps": capacity,
        "load": load,
        "rate_rps": load * capacity,
        "process": "poisson",
        "duration_s": duration,
        "requests": len(arrivals),
        "send_late_ms": lateness,
        "threads": 1,
    }
    for kind in shares:
        for s in schedulers:
            mine = [r for r in records[s] if r.model == kind]
            results[f"{kind}/{s}"] = report.target_result(mine, whole[s]["summary"]["duration_s"])
        for s, bound in (("predictive", 99.0), ("fifo", None)):
            att = results[f"{kind}/{s}"]["summary"]["deadline_attainment"]
            config[f"goal_{kind}_{s}"] = goal(
                f"mixed attainment {kind} ({s})", None if att is None else 100 * att,
                ">=" if bound else None, bound, "%",
            )  # fmt: skip
    doc = report.build_results("mixed", config, results, meta())
    return finish(doc, "mixed", out_dir)


def warm(target: Target, inputs_by_model: dict[str, Inputs]) -> None:
    """One unmeasured request per model, so a run does not start with every cache cold."""

    async def go() -> None:
        for model, inputs in inputs_by_model.items():
            await target.infer(model, inputs, None)

    asyncio.run(go())


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


# ---------------------------------------------------------------------------- dispatch


def quick_args(name: str) -> dict[str, Any]:
    """Small counts for smoke tests: every code path, seconds not minutes."""
    return {
        "tiny-latency": {"n": 200, "rounds": 2, "warmup": 20},
        "pipelined": {"n": 2000, "windows": (16, 128)},
        "resnet18": {"n": 6, "rounds": 2, "warmup": 2},
        "zipf50": {"duration": 4.0, "n_models": 6, "resident": 2, "drain_s": 3.0},
        "overload": {"duration": 4.0, "n_models": 6, "resident": 2, "drain_s": 3.0},
        "mixed": {"duration": 8.0, "drain_s": 3.0},
    }[name]


RUNNERS: dict[str, Callable[..., dict[str, Any]]] = {
    "tiny-latency": tiny_latency,
    "pipelined": pipelined,
    "resnet18": resnet18_latency,
    "zipf50": zipf50,
    "overload": overload,
    "mixed": mixed,
}


def run_scenario(
    name: str, *, quick: bool = False, ray: bool = False, out_dir: Path = RESULTS
) -> dict[str, Any]:
    kwargs = quick_args(name) if quick else {}
    if name in ("zipf50", "overload"):
        kwargs["ray"] = ray
    print(f"== {name}{' (quick)' if quick else ''}", flush=True)
    return RUNNERS[name](out_dir=out_dir, **kwargs)


def summary_lines(docs: dict[str, dict[str, Any]]) -> list[str]:
    """One line per goal of each scenario, for the end of `mtbench compare all`."""
    lines = []
    for name, doc in docs.items():
        for g in goals(doc):
            value = fmt_value(g["value"], g.get("unit", ""))
            verdict = {True: "met", False: "NOT met", None: "-"}[g["met"]]
            lines.append(f"{name:13s} {g['metric']:32s} {value:>9s}  {g['goal']}  {verdict}")
    return lines
