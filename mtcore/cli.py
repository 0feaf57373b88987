"""`mtserve`: run the service (`up`, `broker`, `worker`) and talk to it (`upload`, `infer`, ...)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mtcore.client import Client
from mtcore.errors import MTError
from mtcore.keys import KeyFileError
from mtcore.tenant_cli import add_tenant_parser

MIB = 1024 * 1024


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        return args.run(args) or 0
    except MTError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (TimeoutError, OSError, KeyFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mtserve", description=__doc__)
    p.add_argument("--log-level", default="info")
    sub = p.add_subparsers(required=True, metavar="command")

    up = sub.add_parser("up", help="start a broker and N workers on loopback; Ctrl-C stops them")
    up.add_argument("--state-dir", default="state")
    up.add_argument("--workers", type=int, default=1)
    up.add_argument("--port", type=int, default=5555, help="frontend port; backend is port+1")
    up.add_argument(
        "--memory-mb", type=int, default=1024, help="device tier per worker: runnable sessions"
    )
    up.add_argument(
        "--host-memory-mb", type=int, default=4096, help="host tier per worker: weights in pages"
    )
    add_engine_argument(up)
    add_scheduler_arguments(up)
    add_insecure_argument(up)
    up.set_defaults(run=cmd_up)

    b = sub.add_parser("broker", help="run the broker (frontend + controller + backend)")
    b.add_argument("--state-dir", default="state")
    b.add_argument("--frontend", default="tcp://127.0.0.1:5555")
    b.add_argument("--backend", default="tcp://127.0.0.1:5556")
    b.add_argument("--max-batch", type=int, default=8)
    b.add_argument("--max-frame-mb", type=int, default=64, help="largest tenant payload frame")
    b.add_argument("--heartbeat-liveness", type=float, default=5.0)
    b.add_argument(
        "--action-timeout", type=float, default=300.0, help="give up on an unanswered action"
    )
    b.add_argument("--max-pending-mb", type=int, default=2048, help="input bytes held, all tenants")
    b.add_argument("--profile-batches", default="1,2,4,8,16,32")
    add_scheduler_arguments(b)
    add_insecure_argument(b)
    add_tenancy_arguments(b)
    b.add_argument(
        "--spin-us",
        type=int,
        default=0,
        help="busy-poll this long after each message: lower latency, more CPU",
    )
    b.set_defaults(run=cmd_broker)

    w = sub.add_parser("worker", help="run one worker")
    w.add_argument("--backend", default="tcp://127.0.0.1:5556")
    w.add_argument("--name", default="")
    w.add_argument("--key-file", default="", help="this worker's secret key (CURVE)")
    w.add_argument("--memory-mb", type=int, default=1024, help="device tier: runnable sessions")
    w.add_argument(
        "--host-memory-mb", type=int, default=4096, help="host tier: the page pool for weights"
    )
    w.add_argument("--page-kb", type=int, default=1024, help="the host pool's page size")
    w.add_argument(
        "--run-memory-mb", type=int, default=4096,
        help="activation memory one process may hold while running models; a run asking more "
        "fails with EXEC_FAILED (0: no wall)",
    )  # fmt: skip
    add_engine_argument(w)
    w.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads")
    w.add_argument("--exec-threads", type=int, default=1, help="exec executors (batches at once)")
    w.add_argument(
        "--simulate",
        type=int,
        default=0,
        metavar="N",
        help="run N simulated workers (times from profiles, no models) instead of one real one",
    )
    w.add_argument("--sim-min-exec-us", type=float, default=500.0)
    w.add_argument("--sim-max-exec-us", type=float, default=20_000.0)
    w.add_argument("--sim-noise", type=float, default=0.05, help="lognormal sigma per run")
    w.add_argument("--max-run-s", type=float, default=60.0, help="stop a model run after this")
    w.add_argument(
        "--spin-us",
        type=int,
        default=0,
        help="busy-poll this long after each message: lower latency, more CPU",
    )
    w.set_defaults(run=cmd_worker)

    for name, fn, text in (
        ("upload", cmd_upload, "upload an ONNX model"),
        ("infer", cmd_infer, "run a model once on random or .npy inputs"),
        ("status", cmd_status, "print the broker's status"),
        ("list", cmd_list, "list your models"),
        ("delete", cmd_delete, "delete a model"),
        ("share", cmd_share, "let other tenants run one of your models, read-only"),
    ):
        c = sub.add_parser(name, help=text)
        c.add_argument(
            "--address", default=None, help="the broker (default: the key file's, or port 5555)"
        )
        c.add_argument(
            "--key-file",
            default=os.environ.get("MTSERVE_KEY_FILE") or _default_key(),
            help="your secret key file (default: $MTSERVE_KEY_FILE, else "
            "state/keys/default.key_secret if it exists)",
        )
        c.add_argument("--tenant", default=None, help="insecure brokers only: the tenant name")
        c.add_argument("--timeout", type=float, default=60.0, help="seconds to wait per reply")
        c.set_defaults(run=fn)
        if name in ("upload", "infer", "delete", "share"):
            c.add_argument("model", help="model name (owner/name: one shared with you)")
        if name == "share":
            c.add_argument("--grant", action="append", default=[], metavar="TENANT")
            c.add_argument("--revoke", action="append", default=[], metavar="TENANT")
        if name == "upload":
            c.add_argument("file", type=Path)
            c.add_argument("--replace", action="store_true")
            c.add_argument("--max-batch", type=int, default=None)
        if name == "infer":
            c.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy")
            c.add_argument("--batch", type=int, default=1, help="rows of random input")
            c.add_argument("--deadline-ms", type=float, default=None)
    add_tenant_parser(sub)
    return p


def _default_key() -> str | None:
    """The key `mtserve up` writes for its default tenant, when run from the same place."""
    path = Path("state") / "keys" / "default.key_secret"
    return str(path) if path.exists() else None


def add_tenancy_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-isolation",
        action="store_true",
        help="do not hold a tenant over its weighted share of executor time (a baseline)",
    )
    parser.add_argument(
        "--tenant-limit",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a default limit for every tenant (models, stored_bytes, uploads, upload_bytes,"
        " rate, burst, in_flight, reply_bytes); `mtserve tenant set` overrides one tenant's",
    )


def tenant_limits(items: list[str]):
    from broker.quotas import TenantLimits

    pairs = dict(item.partition("=")[::2] for item in items)
    return TenantLimits().with_overrides({k: float(v) for k, v in pairs.items()})


def add_insecure_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="no CURVE: any peer may connect and name any tenant in its header, any process"
        " may register as a worker. Tests and loopback demos only",
    )


def add_scheduler_arguments(parser: argparse.ArgumentParser) -> None:
    from broker.scheduler import OBJECTIVES, SCHEDULERS

    parser.add_argument(
        "--scheduler",
        choices=SCHEDULERS,
        default="predictive",
        help="predictive: plans with predicted durations (default); fifo: the baseline",
    )
    parser.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default="deadline",
        help="predictive: most requests within deadline (default), or the lowest mean"
        " latency across requests without a deadline",
    )


def add_engine_argument(p: argparse.ArgumentParser) -> None:
    from mtcore.config import ENGINES

    p.add_argument(
        "--engine", choices=ENGINES, default="auto",
        help="what runs models: auto takes TensorRT, then the torch engine on a GPU, else"
        " ONNX Runtime on the CPU; torch also runs on the CPU when asked for",
    )  # fmt: skip


def cmd_up(args: argparse.Namespace) -> int:
    from mtcore.cluster import LocalCluster

    cluster = LocalCluster(
        args.state_dir,
        workers=args.workers,
        port=args.port,
        memory_mb=args.memory_mb,
        host_memory_mb=args.host_memory_mb,
        broker_args=["--scheduler", args.scheduler, "--objective", args.objective],
        worker_args=["--engine", args.engine],
        secure=not args.insecure,
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with cluster:
        print(f"mtserve up: {args.workers} worker(s); tenants connect to {cluster.address}")
        if cluster.secure:
            key = cluster.add_principal("default")
            print(f"tenant 'default': key file {key} (CURVE; mode 0600). Try:")
            print(f"  mtserve list --key-file {key}")
            print("  mtserve tenant add NAME --state-dir", args.state_dir, " # more tenants")
        else:
            print("INSECURE: no authentication; the `tenant` header field names the tenant")
        print(f"state in {Path(args.state_dir).resolve()}; logs in {cluster.log_dir}; Ctrl-C stops")
        sys.stdout.flush()
        try:
            while True:
                time.sleep(1)
                cluster._check_alive()
        except KeyboardInterrupt:
            print("stopping")
    return 0


def run_simulated(args: argparse.Namespace) -> int:
    from worker.simulated import SimConfig, SimulatedWorkers

    sim = SimulatedWorkers(
        SimConfig(
            backend=args.backend,
            count=args.simulate,
            name=args.name or f"sim{os.getpid()}",
            memory_budget=args.memory_mb * MIB,
            exec_threads=args.exec_threads,
            noise=args.sim_noise,
            min_exec_us=args.sim_min_exec_us,
            max_exec_us=args.sim_max_exec_us,
            key_file=args.key_file,
        )
    )
    signal.signal(signal.SIGTERM, lambda *_: setattr(sim, "stopping", True))
    signal.signal(signal.SIGINT, lambda *_: setattr(sim, "stopping", True))
    try:
        sim.run()
    finally:
        sim.close()
    return 0


def cmd_broker(args: argparse.Namespace) -> int:
    from broker.broker import Broker
    from mtcore.cluster import ENDPOINTS_FILE
    from mtcore.config import BrokerConfig
    from mtcore.protocol import Limits

    config = BrokerConfig(
        frontend=args.frontend,
        backend=args.backend,
        state_dir=Path(args.state_dir),
        max_batch=args.max_batch,
        max_pending_bytes=args.max_pending_mb * MIB,
        heartbeat_liveness=args.heartbeat_liveness,
        action_timeout=args.action_timeout,
        scheduler=args.scheduler,
        objective=args.objective,
        limits=Limits(max_frame_bytes=args.max_frame_mb * MIB),
        profile_batches=tuple(int(b) for b in args.profile_batches.split(",")),
        spin_us=args.spin_us,
        insecure=args.insecure,
        isolation=not args.no_isolation,
        tenant_limits=tenant_limits(args.tenant_limit),
    )
    broker = Broker(config)
    broker.install_signal_handlers()
    endpoints = {
        "frontend": broker.frontend.getsockopt_string(32),  # ZMQ_LAST_ENDPOINT
        "backend": broker.backend.getsockopt_string(32),
    }
    tmp = config.state_dir / (ENDPOINTS_FILE + ".tmp")
    tmp.write_text(json.dumps(endpoints))
    tmp.replace(config.state_dir / ENDPOINTS_FILE)
    profile_to = os.environ.get("MTSERVE_PROFILE")  # developer aid: cProfile the loop
    if profile_to:
        import cProfile

        cProfile.runctx("broker.mediate()", globals(), {"broker": broker}, profile_to)
    else:
        broker.mediate()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from mtcore.config import WorkerConfig
    from worker.worker import Worker

    if args.simulate:
        return run_simulated(args)

    config = WorkerConfig(
        backend=args.backend,
        name=args.name,
        memory_budget=args.memory_mb * MIB,
        host_budget=args.host_memory_mb * MIB,
        run_memory=args.run_memory_mb * MIB,
        page_size=args.page_kb * 1024,
        intra_op_threads=args.threads,
        exec_threads=args.exec_threads,
        max_run_seconds=args.max_run_s,
        spin_us=args.spin_us,
        key_file=args.key_file,
        engine=args.engine,
    )
    try:
        worker = Worker(config)
    except ValueError as exc:  # an engine this machine cannot run
        print(f"mtserve worker: {exc}", file=sys.stderr)
        return 2
    worker.install_signal_handlers()
    # Defense in depth: an empty working directory, so no relative path inside a model
    # (the checks refuse external data anyway) can reach the broker's state.
    profile_to = os.environ.get("MTSERVE_PROFILE")  # developer aid: cProfile the I/O thread
    if profile_to:
        profile_to = os.path.abspath(f"{profile_to}.{args.name or os.getpid()}")
    with tempfile.TemporaryDirectory(prefix="mtserve-worker-") as empty:
        os.chdir(empty)
        if profile_to:
            import cProfile

            cProfile.runctx("worker.run()", globals(), {"worker": worker}, profile_to)
        else:
            worker.run()
    return 0


def cmd_upload(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.upload_model(
            args.model, args.file, replace=args.replace, max_batch=args.max_batch
        )
    print(json.dumps(info, indent=2))
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.model_info(args.model)
        inputs = {k: np.load(v) for k, v in (s.split("=", 1) for s in args.input)}
        rng = np.random.default_rng(0)
        for name, dtype, shape in info["inputs"]:
            if name not in inputs:
                dims = [
                    args.batch if d == -1 and i == 0 else max(d, 1) for i, d in enumerate(shape)
                ]
                inputs[name] = rng.standard_normal(dims).astype(dtype)
        result = client.infer(args.model, inputs, deadline_ms=args.deadline_ms)
    for name, array in result.outputs.items():
        print(
            f"{name}: {array.dtype}{list(array.shape)} mean={array.mean():.6g} "
            f"first={array.ravel()[:4].tolist()}"
        )
    print("timing (us):", json.dumps(result.timing))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        print(json.dumps(client.status(), indent=2))
    return 0


def _client(args: argparse.Namespace) -> Client:
    """The client a tenant command connects with: its address, key file or tenant."""
    return Client(args.address, tenant=args.tenant, key_file=args.key_file, timeout=args.timeout)


def cmd_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        for m in client.list_models():
            print(
                f"{m['name']:24} {m['size']:>12} bytes  max_batch={m['max_batch']}  "
                f"{m['sha256'][:12]}  profile={m['profile']}"
            )
        for m in client.shared_models():
            print(f"{m['name']:24} {m['size']:>12} bytes  shared with you by {m['owner']}")
    return 0


def cmd_share(args: argparse.Namespace) -> int:
    with _client(args) as client:
        shared = client.share_model(args.model, grant=args.grant, revoke=args.revoke)
    print(f"'{args.model}' is shared with: {', '.join(shared) or 'nobody'}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.delete_model(args.model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
