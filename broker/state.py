"""What the controller knows: requests waiting, workers, and the actions sent to them.

Plain records shared by the broker and the schedulers. The broker owns the sockets;
schedulers read and update these records and return actions, never touching I/O.
"""

from __future__ import annotations

import itertools
import math
import secrets
from collections import OrderedDict
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
    expected_duration: float = 0.0  # seconds, from the predictor (0 when unknown)
    latest: float = math.inf  # monotonic time by which it must start (inf: no limit)
    sent: float = 0.0  # monotonic, set at dispatch
    id: int = field(default_factory=lambda: next(_action_ids))
    context: Any = None  # caller's data (the upload a PROFILE belongs to)


@dataclass(eq=False)
class WorkerState:
    """The controller's view of one connected worker."""

    wid: bytes  # ROUTER routing id
    name: str
    kind: str  # "cpu" (ONNX Runtime) or "gpu" (TensorRT)
    memory_budget: int  # bytes of live models it may hold
    last_seen: float  # monotonic time of its last message
    loaded: OrderedDict[str, int] = field(default_factory=OrderedDict)  # sha -> bytes, LRU first
    inflight: dict[int, Action] = field(default_factory=dict)  # id -> action awaiting result
    last_sent: float = 0.0  # monotonic time of our last message to it
    incarnation: str = ""  # the worker process's token, the same across its reconnects
    tiers: TierReport | None = None  # its tiers as of its latest result or heartbeat
    restarts: int = 0  # executor threads it found dead and replaced

    def memory_used(self) -> int:
        return sum(self.loaded.values())

    def busy_infers(self) -> int:
        return sum(a.kind is ActionKind.INFER for a in self.inflight.values())

    def models_in_use(self) -> set[str]:
        return {a.sha256 for a in self.inflight.values()}

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "memory_budget": self.memory_budget,
            "memory_used": self.memory_used(),
            "models_live": len(self.loaded),  # counts only: tenants must not see others' models
            "inflight_actions": len(self.inflight),
            "host_models": len(self.tiers.host_models) if self.tiers else 0,
            "host_free": self.tiers.host_free if self.tiers else 0,
            "executor_restarts": self.restarts,
        }
