"""Factories for unit tests: models, requests, workers and schedulers without I/O.

Every factory builds plain records with small, predictable defaults, so a test states
only what it is about (`make_model(size=600)`, `make_requests(m, 3, deadline=5.0)`).
"""

from __future__ import annotations

import hashlib
import itertools
import math

from broker.fifo import FifoLruScheduler
from broker.registry import ModelRecord
from broker.state import Action, ActionKind, PendingRequest, WorkerState
from mtcore import actions as wire
from mtcore.protocol import TensorDesc

_rids = itertools.count(1)  # request ids stay unique across calls within a test session


def make_model(
    name: str = "m",
    sha: str | None = None,
    max_batch: int = 8,
    profile: dict[int, float] | None = None,
    size: int = 1000,
    inputs: tuple[TensorDesc, ...] | list[TensorDesc] | None = None,
    *,
    tenant: str = "t",
) -> ModelRecord:
    """A registry record; the sha256 defaults to the hash of the name (so names differ)."""
    leading = -1 if max_batch > 1 else 1
    if inputs is None:
        inputs = (TensorDesc("input", "float32", (leading, 4)),)
    return ModelRecord(
        tenant=tenant,
        name=name,
        sha256=sha or hashlib.sha256(f"{tenant}/{name}".encode()).hexdigest(),
        size=size,
        inputs=tuple(inputs),
        outputs=(TensorDesc("output", "float32", (leading, 4)),),
        max_batch=max_batch,
        profile=dict(profile or {}),
    )


def make_requests(
    model: ModelRecord,
    n: int,
    *,
    batch: int = 1,
    deadline: float = math.inf,
    arrival: float = 0.0,
    shape: tuple[int, ...] = (4,),
    dtype: str = "float32",
) -> list[PendingRequest]:
    """`n` requests for `model`, each with one input of `batch` rows of `shape`."""
    requests = []
    for _ in range(n):
        rid = next(_rids)
        desc = TensorDesc(model.inputs[0].name, dtype, (batch, *shape))
        requests.append(
            PendingRequest(
                rid=rid,
                envelope=[f"client{rid}".encode()],
                client_id=rid,
                model=model,
                inputs=[desc],
                frames=[bytes(desc.nbytes())],
                batch=batch,
                arrival=arrival,
                deadline=deadline,
            )
        )
    return requests


def make_worker(name: str = "w0", budget: int = 10_000, lanes: int = 1) -> WorkerState:
    return WorkerState(
        wid=name.encode(), name=name, kind="cpu", memory_budget=budget, last_seen=0.0, lanes=lanes
    )


def make_scheduler(max_queue: int = 1000) -> FifoLruScheduler:
    """The baseline scheduler."""
    return FifoLruScheduler(max_queue)


def make_result(
    action: Action,
    ok: bool = True,
    *,
    status: wire.ActionStatus | None = None,
    exec_us: int = 0,
    load_us: int = 0,
    tier: str = "host",
    evicted: tuple[str, ...] | list[str] = (),
) -> wire.Result:
    """The typed result a worker would send for `action` (OK, or LOAD/EXEC_FAILED)."""
    if status is None:
        failed = wire.ActionStatus.LOAD_INVALID if action.kind is ActionKind.LOAD else (
            wire.ActionStatus.EXEC_FAILED)  # fmt: skip
        status = wire.ActionStatus.OK if ok else failed
    timing = wire.Timing(exec=exec_us, load=load_us)
    common = {"action": action.id, "sha256": action.sha256, "status": status, "timing": timing,
              "evicted": list(evicted)}  # fmt: skip
    if action.kind is ActionKind.LOAD:
        return wire.LoadModelResult(**common, tier=tier if status is wire.ActionStatus.OK else "")
    if action.kind is ActionKind.INFER:
        results = [wire.RequestResult(r.rid, 0, "", []) for r in action.requests]
        return wire.InferResult(**common, results=results)
    return wire.Result(**common)
