"""`mtbench`: benchmarks of mtserve, each beside its baselines in the same run.

    mtbench run [--target mtserve|zmq|inprocess|ray] [workload flags]   one target, one workload
    mtbench compare tiny-latency|pipelined|resnet18|zipf50|overload|mixed|all [--quick] [--ray]
    mtbench latency      one request at a time: mtserve vs in-process ONNX Runtime
    mtbench ccore        each C core module vs its pure-Python twin, on its own path
    mtbench swap         host-tier swap-in vs a fresh session build, per zoo model
    mtbench scheduler    both schedulers: 64 simulated workers, and one real CPU worker
    mtbench isolation    tenant B bursts to 5x capacity; tenant A keeps its deadlines
    mtbench curve        what CURVE costs: plain and secure brokers side by side
    mtbench gpu          the GPU worker: pool copies, swap-in, exec, overlap (needs a GPU)

Ray binds some servers on 0.0.0.0, so with Ray (`--target ray`, `compare --ray`) this
command re-executes itself in a private network namespace that has only loopback
(`unshare --net`, which needs root or user namespaces); if that is impossible, it says
why and runs without Ray.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

NETNS_ENV = "MTBENCH_NETNS"  # set in the re-executed child: already inside the namespace
DEFAULT_RUN_OUT = Path(__file__).parent / "results" / "run"


# ---------------------------------------------------------------------------- arguments


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def _add_run(sub: Any) -> None:
    from bench.workload import PROCESSES

    r = sub.add_parser("run", help="drive one target with one workload; table, JSON, plots")
    r.add_argument("--target", choices=("mtserve", "zmq", "inprocess", "ray"), default="mtserve")
    r.add_argument(
        "--model-kind", default="mlp", help="zoo model (tiny_add, mlp, mobilenetv2, ...)"
    )
    r.add_argument("--models", type=_positive(int), default=4, help="distinct models (zoo seeds)")
    r.add_argument("--rate", type=_positive(float), default=100.0, help="requests/s, all tenants")
    r.add_argument("--duration", type=_positive(float), default=None, help="seconds (default 10)")
    r.add_argument("--process", choices=PROCESSES, default="poisson")
    r.add_argument("--cv", type=_positive(float), default=1.0, help="gap CV for --process gamma")
    r.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of model popularity")
    r.add_argument("--deadline-ms", type=_positive(float), default=None)
    r.add_argument("--tenants", type=_positive(int), default=1, help="tenants splitting the rate")
    src = r.add_mutually_exclusive_group()
    src.add_argument("--trace", type=Path, help="replay a CSV trace (t,tenant,model,deadline_ms)")
    src.add_argument("--azure", action="store_true", help="synthetic Azure-Functions-like trace")
    src.add_argument("--closed", type=_positive(int), metavar="N", help="closed loop, N clients")
    r.add_argument("--max-requests", type=_positive(int), default=1_000_000, help="closed loop cap")
    r.add_argument("--memory-models", type=_positive(int), help="worker budget = M x model size")
    r.add_argument("--workers", type=_positive(int), default=1)
    r.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: default)")
    r.add_argument("--max-batch", type=_positive(int), default=8)
    r.add_argument("--replicas", type=_positive(int), default=1, help="Ray Serve replicas")
    r.add_argument("--drain", type=float, default=30.0, help="seconds to wait after the plan")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", type=Path, default=DEFAULT_RUN_OUT, help="directory for JSON, PNGs")
    r.add_argument("--quick", action="store_true", help="shrink to a seconds-long smoke test")
    r.add_argument("--no-progress", action="store_true")


def _add_compare(sub: Any) -> None:
    from bench.scenarios import RESULTS, SCENARIOS

    c = sub.add_parser("compare", help="a docs/BENCHMARKS.md figure: mtserve beside baselines")
    c.add_argument("scenario", choices=(*SCENARIOS, "all"))
    c.add_argument("--quick", action="store_true", help="small counts: a smoke test")
    c.add_argument("--ray", action="store_true", help="add Ray Serve (in a private netns)")
    c.add_argument("--out", type=Path, default=RESULTS, help="directory for JSON and PNGs")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mtbench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    _add_run(sub)
    _add_compare(sub)
    sub.add_parser("latency", help="one request at a time: mtserve vs in-process ONNX Runtime")
    sub.add_parser("ccore", help="each C core module vs its pure-Python twin", add_help=False)
    sub.add_parser("swap", help="host-tier swap-in vs a fresh session build", add_help=False)
    sub.add_parser("scheduler", help="both schedulers, simulated and real", add_help=False)
    sub.add_parser(
        "isolation", help="one tenant bursts, another keeps its deadlines", add_help=False
    )
    sub.add_parser("curve", help="what CURVE costs: plain and secure brokers", add_help=False)
    sub.add_parser("gpu", help="the GPU worker's figures (needs a GPU)", add_help=False)
    return p


# ---------------------------------------------------------------------------- network namespace


def netns_problem() -> str | None:
    """Why a private network namespace cannot be made here, or None if it can."""
    try:
        probe = subprocess.run(
            ["unshare", "--net", "--", "ip", "link", "set", "lo", "up"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{type(exc).__name__}: {exc}"
    if probe.returncode != 0:
        return (probe.stderr or probe.stdout).strip() or f"exit status {probe.returncode}"
    return None


def reexec_in_netns(argv: list[str]) -> int:
    """Run `mtbench argv` again inside `unshare --net` with loopback up; wait, stop by PID."""
    script = 'ip link set lo up && exec "$@"'
    cmd = ["unshare", "--net", "--", "sh", "-c", script, "sh"]
    cmd += [sys.executable, "-m", "bench.cli", *argv]
    env = {**os.environ, NETNS_ENV: "1"}
    print("re-executing in a private network namespace (loopback only) for Ray", flush=True)
    proc = subprocess.Popen(cmd, env=env)
    try:
        return proc.wait()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def ray_isolation(argv: list[str]) -> int | None:
    """Re-exec for Ray and return its exit status; None to go on here (already in, or cannot)."""
    if os.environ.get(NETNS_ENV) == "1":
        return None
    problem = netns_problem()
    if problem is not None:
        print(f"Ray skipped: cannot make a private network namespace: {problem}", flush=True)
        return None
    return reexec_in_netns(argv)


def _in_netns() -> bool:
    return os.environ.get(NETNS_ENV) == "1"


# ---------------------------------------------------------------------------- compare


def cmd_compare(args: argparse.Namespace, argv: list[str]) -> int:
    from bench import scenarios

    ray = args.ray
    if ray and not _in_netns():
        status = ray_isolation(argv)
        if status is not None:
            return status
        ray = False  # the namespace could not be made: Ray stays off this machine's network
    names = scenarios.SCENARIOS if args.scenario == "all" else (args.scenario,)
    docs = {}
    for name in names:
        docs[name] = scenarios.run_scenario(name, quick=args.quick, ray=ray, out_dir=args.out)
        print(flush=True)
    if len(docs) > 1:
        print("goals:")
        for line in scenarios.summary_lines(docs):
            print(f"  {line}")
    return 0


# ---------------------------------------------------------------------------- run


def _quick(args: argparse.Namespace) -> None:
    """Seconds, not minutes: every code path of `run` on a small workload."""
    args.duration = min(args.duration or 2.0, 2.0)
    args.models = min(args.models, 3)
    args.rate = min(args.rate, 50.0)
    args.drain = min(args.drain, 5.0)
    if args.closed:
        args.max_requests = min(args.max_requests, 200)


def _model_names(args: argparse.Namespace, trace: list | None) -> list[str]:
    """Model names: the trace's (most requested first), else KIND or KIND-00, KIND-01, ..."""
    if trace is not None:
        from collections import Counter

        return [m for m, _ in Counter(a.model for a in trace).most_common()]
    if args.models == 1:
        return [args.model_kind]
    return [f"{args.model_kind}-{i:02d}" for i in range(args.models)]


def _plan(args: argparse.Namespace, names: list[str], trace: list | None) -> list | None:
    """The open-loop arrivals (None for a closed loop)."""
    from bench.workload import TenantMix, azure_like_trace, open_loop

    if trace is not None:
        return trace
    if args.closed:
        return None
    if args.azure:
        return azure_like_trace(
            len(names), args.duration, args.rate, args.seed, models=names,
            deadline_ms=args.deadline_ms, tenant="bench",
        )  # fmt: skip
    mixes = []
    for k in range(args.tenants):
        shift = k * len(names) // args.tenants  # each tenant has its own most popular model
        mixes.append(
            TenantMix(
                f"tenant{k}" if args.tenants > 1 else "bench",
                args.rate / args.tenants,
                names[shift:] + names[:shift],
                zipf_s=args.zipf,
                deadline_ms=args.deadline_ms,
                process=args.process,
                cv=args.cv,
            )
        )
    return open_loop(mixes, args.duration, args.seed)


def _target(args: argparse.Namespace, model_size: int) -> Any:
    from bench import targets

    if args.target == "mtserve":
        memory = 1024
        if args.memory_models:
            memory = targets.memory_mb_for(args.memory_models, model_size)
        return targets.MtserveTarget(
            workers=args.workers, memory_mb=memory, max_batch=args.max_batch, threads=args.threads
        )
    if args.target == "zmq":
        return targets.ZmqTarget(threads=args.threads or 1)
    if args.target == "inprocess":
        return targets.InProcessTarget(threads=args.threads)
    return targets.RayTarget(
        models_per_replica=args.memory_models or 4,
        replicas=args.replicas,
        threads=args.threads or 1,
    )


def _drive(args: argparse.Namespace, target: Any, names: list[str], arrivals: list | None) -> Any:
    from bench import zoo
    from bench.runner import OpenLoopStats, run_closed_loop, run_open_loop

    inputs = dict.fromkeys(names, zoo.sample_inputs(args.model_kind))
    progress = not args.no_progress
    if arrivals is None:
        coro = run_closed_loop(
            target, names, inputs, clients=args.closed, duration=args.duration,
            max_requests=args.max_requests, zipf_s=args.zipf, deadline_ms=args.deadline_ms,
            seed=args.seed, progress=progress,
        )  # fmt: skip
        return (*asyncio.run(coro), None)
    stats = OpenLoopStats()
    coro = run_open_loop(
        target, arrivals, inputs, duration=args.duration, progress=progress, drain_s=args.drain,
        stats=stats,
    )  # fmt: skip
    return (*asyncio.run(coro), stats.summary())


def cmd_run(args: argparse.Namespace, argv: list[str]) -> int:
    from bench import report
    from bench.scenarios import meta, started, zoo_models
    from bench.workload import read_trace

    if args.target == "ray" and not _in_netns():
        status = ray_isolation(argv)
        return 2 if status is None else status  # no namespace: Ray is skipped, nothing to run
    if args.quick:
        _quick(args)
    given_duration = args.duration  # a trace runs to its last arrival unless told otherwise
    if args.duration is None:
        args.duration = 10.0
    trace = read_trace(args.trace) if args.trace else None
    names = _model_names(args, trace)
    models = zoo_models(args.model_kind, range(len(names)), names)
    arrivals = _plan(args, names, trace)
    tenants = sorted({a.tenant for a in arrivals}) if arrivals else ["bench"]
    target = _target(args, models[names[0]].stat().st_size)
    if args.trace is not None:
        args.duration = given_duration
    with started([target], models, tenants):
        records, samples, duration, late = _drive(args, target, names, arrivals)
    config = {**_run_config(args, names, tenants, arrivals), "duration_s": duration}
    run_meta = {**meta(), "send_late_ms": late}
    doc = report.build_results("run", config, {target.name: report.target_result(
        records, duration, samples)}, run_meta)  # fmt: skip
    path = report.write_json(doc, args.out / "run.json")
    report.plot(doc, args.out)
    report.print_table(doc)
    print(f"wrote {path} and 3 plots in {args.out}")
    return 0


def _run_config(
    args: argparse.Namespace, names: list[str], tenants: list[str], arrivals: list | None
) -> dict[str, Any]:
    loop = "closed" if arrivals is None else "open"
    source = "trace" if args.trace else "azure" if args.azure else args.process
    return {
        "target": args.target,
        "model_kind": args.model_kind,
        "models": names,
        "loop": loop,
        "clients": args.closed,
        "source": source,
        "trace": str(args.trace) if args.trace else None,
        "rate_rps": args.rate,
        "cv": args.cv,
        "zipf_s": args.zipf,
        "deadline_ms": args.deadline_ms,
        "tenants": tenants,
        "requests_planned": len(arrivals) if arrivals is not None else None,
        "memory_models": args.memory_models,
        "workers": args.workers,
        "threads": args.threads,
        "max_batch": args.max_batch,
        "seed": args.seed,
        "unix_time": time.time(),
    }


# ---------------------------------------------------------------------------- main


OWN_FLAGS = ("ccore", "swap", "scheduler", "isolation", "curve", "gpu")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in OWN_FLAGS:  # own flags: --help
        module = importlib.import_module(f"bench.{argv[0]}")
        return module.main(argv[1:])
    args = parser().parse_args(argv)
    if args.command == "run":
        return cmd_run(args, argv)
    if args.command == "compare":
        return cmd_compare(args, argv)
    if args.command == "latency":
        from bench import latency

        return latency.main()
    return 2


if __name__ == "__main__":
    sys.exit(main())
