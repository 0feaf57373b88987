"""Configuration of the broker and the workers: every limit and budget in one place.

Defaults suit the local cluster (`mtserve up`) on loopback; an operator overrides them
with CLI options. Sizes are bytes, times are seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from broker.quotas import TenantLimits
from mtcore.protocol import Limits

MIB = 1024 * 1024
GIB = 1024 * MIB


ENGINES = ("auto", "onnxruntime", "torch", "tensorrt")  # what a worker may run models with


@dataclass
class BrokerConfig:
    """The broker process: its sockets, its state on disk and its limits."""

    frontend: str = "tcp://127.0.0.1:5555"  # tenants connect here (ROUTER)
    backend: str = "tcp://127.0.0.1:5556"  # workers connect here (ROUTER)
    state_dir: Path = Path("state")  # registry.sqlite, models/, uploads/
    limits: Limits = field(default_factory=Limits)
    max_model_bytes: int = 2 * GIB  # largest model an upload may declare
    upload_timeout: float = 300.0  # an uncommitted upload is discarded after this idle time
    max_batch: int = 8  # default batch cap for models that allow batching
    max_queue: int = 10_000  # queued requests before new ones get OVERLOADED
    max_pending_bytes: int = 2 * GIB  # input bytes held for unanswered requests: then OVERLOADED
    heartbeat_interval: float = 1.0  # broker -> worker heartbeat when idle
    heartbeat_liveness: float = 5.0  # a worker silent this long is lost
    answer_grace: float = 2.0  # no result this long past its deadline: DEADLINE_EXPIRED
    action_timeout: float = 300.0  # an action a worker never answers is given up after this
    max_request_time: float = 600.0  # the same for a request without a deadline
    scheduler: str = "predictive"  # scheduler implementation (broker.scheduler.make_scheduler)
    objective: str = "deadline"  # predictive: most requests within deadline, or "latency"
    profile_batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32)  # measured at upload, <= max_batch
    spin_us: int = 0  # busy-poll this long after each message before sleeping (latency vs CPU)
    # No CURVE: any peer may connect, the header's `tenant` names the tenant and any
    # process may register as a worker. Only for tests and demos on loopback, by choice.
    insecure: bool = False
    # Under overload, hold the tenant over its weighted share of executor time
    # (broker/fairshare.py). Off: tenants compete request by request (a baseline).
    isolation: bool = True
    tenant_limits: TenantLimits = field(default_factory=TenantLimits)  # defaults per tenant

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir)


@dataclass
class WorkerConfig:
    """One worker process: where its broker is and how much it may hold."""

    backend: str = "tcp://127.0.0.1:5556"  # the broker's backend address
    name: str = ""  # defaults to worker-<pid>
    memory_budget: int = 2 * GIB  # device tier: measured bytes of runnable sessions
    host_budget: int = 4 * GIB  # host tier: the page pool holding prepared weights
    run_memory: int = 4 * GIB  # wall of the activation arena: a run asking more fails; 0: none
    page_size: int = 1 * MIB  # the host pool's page; larger tensors take contiguous runs
    intra_op_threads: int = 0  # ONNX Runtime threads per session; 0 lets ORT choose
    exec_threads: int = 1  # exec executors; each runs one batch at a time
    table_slots: int = 256  # request-table slots: actions queued or running at once
    fetch_timeout: float = 10.0  # a FETCH_MODEL unanswered this long is sent again
    fetch_attempts: int = 3  # then the actions waiting for the bytes fail
    heartbeat_interval: float = 1.0  # worker -> broker heartbeat when idle
    heartbeat_liveness: float = 5.0  # broker silent this long: reconnect
    engine: str = "auto"  # what runs models: auto, onnxruntime, torch, tensorrt (worker.engines)
    kind: str = ""  # reported to the broker (predictions are per kind); "": the engine's
    key_file: str = ""  # CURVE: this worker's secret key file (mtcore/keys.py); "": plain
    max_run_seconds: float = 60.0  # a model run (or profile) longer than this is stopped
    spin_us: int = 0  # busy-poll this long after each message before sleeping (latency vs CPU)
