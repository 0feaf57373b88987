"""The records the broker and the scheduler pass each other: requests, actions, workers.

Each field has one writer. The broker creates a `PendingRequest` at the frontend and a
`WorkerState` when a worker registers, and keeps them up to date from the wire (last
seen, tiers); the scheduler creates every `Action` and keeps, in its own records
(`broker.scheduler.WorkerPlan`), what each worker holds, runs and will be free: the
broker never reads or writes those.
"""

from __future__ import annotations

import itertools
import math
import secrets
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from broker.registry import ModelRecord
from mtcore.actions import TierReport
from mtcore.protocol import TensorDesc

# Ids start at a random point in each broker process, so a late result meant for a
# previous broker (a worker still finishing its queue after a restart) cannot match.
_action_ids = itertools.count(secrets.randbits(40) << 16)


@dataclass(eq=False)
class PendingRequest:
    """One tenant INFER from arrival to answer."""

    rid: int  # broker-internal id, key of the broker's request table
    envelope: list[Any]  # ROUTER routing frames of the tenant connection
    client_id: int  # the tenant's `id`, echoed in the reply
    model: ModelRecord
    inputs: list[TensorDesc]
    frames: list[Any]  # input tensor frames, forwarded zero-copy
    batch: int  # rows along the batch axis (1 for a model that cannot batch)
    arrival: float  # monotonic seconds
    deadline: float = math.inf  # monotonic seconds; inf when the tenant gave none
    dispatched: float = 0.0  # when it left its queue for a worker
    retries: int = 0  # times re-queued after a lost worker
    nbytes: int = 0  # input payload bytes held until answered
    wire_inputs: list[Any] = field(default_factory=list)  # `inputs` as sent to workers
    answered: bool = False  # its one answer was sent (the broker sets it; nothing reruns it)
    tenant: str = ""  # who asked (the model's owner, or a tenant it is shared with)
    book: Any = None  # that tenant's TenantBook (broker/quotas.py), charged until answered
    reply_bytes: int = 0  # predicted output bytes, charged to the book while in flight
    share_cost: float = 0.0  # predicted executor seconds booked in the fair share
    # Scheduler-owned from here on.
    queued: bool = False  # in a scheduler queue (cleared when taken, expired or cancelled)
    key: str = ""  # which queue: its model's (FIFO), its model's on its planned worker
    latest_start: float = math.inf  # deadline minus its predicted run: start by then
    cost: float = 0.0  # seconds of exec it adds to its planned worker's ledger
    plan: bytes = b""  # the worker admission planned it on (b"": none)
    order_key: float = math.inf  # when earliest-deadline-first order reaches it
    booked: bool = False  # its cost is in its planned worker's ledger

    @property
    def who(self) -> str:
        return self.tenant or self.model.tenant

    @property
    def stack_key(self) -> tuple[Any, ...]:
        """Requests with equal keys can be stacked into one batch."""
        return tuple((d.dtype, d.shape[1:]) for d in self.inputs)


class ActionKind(Enum):
    LOAD = "load"
    UNLOAD = "unload"
    INFER = "infer"
    PROFILE = "profile"


@dataclass(eq=False)
class Action:
    """A timed action for one worker; its result comes back under the same id."""

    kind: ActionKind
    worker: WorkerState
    sha256: str
    requests: list[PendingRequest] = field(default_factory=list)  # INFER only
    size: int = 0  # the model's bytes (LOAD, for the predictor's bandwidth)
    expected_duration: float = 0.0  # seconds, from the predictor (0 when unknown)
    start: float = 0.0  # monotonic time the scheduler planned it to start (0: unplanned)
    long: bool = False  # a long run: it never takes a worker's last free executor
    latest: float = math.inf  # monotonic time by which it must start (inf: no limit)
    sent: float = 0.0  # monotonic, set at dispatch
    id: int = field(default_factory=lambda: next(_action_ids))
    context: Any = None  # caller's data (the upload a PROFILE belongs to)


@dataclass(eq=False)
class WorkerState:
    """The broker's record of one connected worker: membership and what it reports."""

    wid: bytes  # ROUTER routing id
    name: str
    kind: str  # "cpu" (ONNX Runtime) or "gpu" (TensorRT)
    memory_budget: int  # bytes of live models it may hold
    last_seen: float  # monotonic time of its last message
    lanes: int = 1  # exec executors: batches it runs at once
    last_sent: float = 0.0  # monotonic time of our last message to it
    incarnation: str = ""  # the worker process's token, the same across its reconnects
    key_owner: str = ""  # secure broker: the worker principal whose key it connected with
    tiers: TierReport | None = None  # its tiers as of its latest result or heartbeat
    host_models: frozenset[str] = frozenset()  # `tiers.host_models`, as a set
    restarts: int = 0  # executor threads it found dead and replaced
    run_memory: int = 0  # its activation arena's wall, bytes (0: none, or not reported)

    def report(self, tiers: TierReport) -> None:
        """A tier report arrived (with a result or a heartbeat)."""
        self.tiers = tiers
        self.host_models = frozenset(tiers.host_models)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "memory_budget": self.memory_budget,
            "exec_lanes": self.lanes,
            "host_models": len(self.tiers.host_models) if self.tiers else 0,
            "host_free": self.tiers.host_free if self.tiers else 0,
            "executor_restarts": self.restarts,
        }
