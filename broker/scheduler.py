"""Schedulers: turn queued requests into timed actions for workers.

The broker keeps worker membership and a map of the actions it sent; a `Scheduler` owns
everything else: the queues, per worker what it holds, runs and when it will be free
(`WorkerPlan`), retries, profiling placement and the predictor it learns into. It does no
I/O. The broker calls it at these points and sends the actions it returns:

- `add_request(request, now)`: queue a request, or raise (Overloaded,
  DeadlineUnmeetable) to answer it at once;
- `cancel(request)`: the broker answered a queued request another way;
- `add_worker(worker, now)`, `remove_worker(worker, now)`: membership; a lost worker's
  requests are retried once or failed;
- `on_result(action, result, now)`: a typed result (None: the worker never answered);
  True when the result answers the action's requests, False when the scheduler took
  them back (retried or failed);
- `schedule(now)`: the actions to send now, in order per worker; requests it gives up on
  go to `failed` for the broker to answer;
- `next_wakeup(now)`: when `schedule` has work even if no message arrives (a queued
  request about to expire, an action due), so the loop neither polls nor spins;
- `place_profile`, `drop_model`, `forget_model`, `has_work`, `seed`: model lifecycle.

`QueueScheduler` holds the mechanics both policies share; `broker.fifo.FifoLruScheduler`
is the baseline and `broker.predictive.PredictiveScheduler` plans with predicted
durations.
"""

from __future__ import annotations

import heapq
import itertools
import math
from abc import ABC, abstractmethod
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from broker.fairshare import FairShare
from broker.registry import ModelRecord
from broker.state import Action, ActionKind, PendingRequest, WorkerState
from mtcore import actions as wire
from mtcore.errors import (
    LoadFailed,
    MTError,
    Overloaded,
    QuotaExceeded,
    WorkerLost,
)
from mtcore.predictor import PLANNING_HEADROOM, Predictor


@dataclass(eq=False)
class WorkerPlan:
    """The scheduler's view of one worker: what it holds, runs and when it will be free."""

    worker: WorkerState
    loaded: OrderedDict[str, int] = field(default_factory=OrderedDict)  # sha -> bytes, LRU first
    inflight: dict[int, Action] = field(default_factory=dict)  # id -> action sent, unanswered
    lanes: list[float] = field(default_factory=list)  # predicted free time of each executor
    loader_free: float = 0.0  # predicted time its loader finishes the loads sent
    ready: dict[str, float] = field(default_factory=dict)  # sha -> predicted end of its LOAD
    owner: dict[str, str] = field(default_factory=dict)  # sha -> tenant its bytes count for
    last_used: dict[str, float] = field(default_factory=dict)  # sha -> last INFER placed
    running: dict[int, Action] = field(default_factory=dict)  # the INFERs of `inflight`
    loading: dict[int, Action] = field(default_factory=dict)  # the LOADs of `inflight`
    pins: Counter[str] = field(default_factory=Counter)  # sha -> actions in flight or planned
    pinned: int = 0  # bytes of the loaded models in `pins`: they cannot be evicted

    used: int = 0  # bytes of `loaded`

    def memory_used(self) -> int:
        return self.used

    def hold(self, sha: str, size: int) -> None:
        delta = size - self.loaded.get(sha, 0)
        self.used += delta
        if sha in self.pins:
            self.pinned += delta
        self.loaded[sha] = size

    def drop(self, sha: str) -> None:
        self.owner.pop(sha, None)
        size = self.loaded.pop(sha, 0)
        self.used -= size
        if sha in self.pins:
            self.pinned -= size

    def pin(self, sha: str) -> None:
        """One more action or planned request needs the model here: it stays."""
        if not self.pins[sha]:
            self.pinned += self.loaded.get(sha, 0)
        self.pins[sha] += 1

    def unpin(self, sha: str) -> None:
        self.pins[sha] -= 1
        if self.pins[sha] <= 0:
            del self.pins[sha]
            self.pinned -= self.loaded.get(sha, 0)

    def busy_infers(self) -> int:
        return len(self.running)

    def track(self, action: Action) -> None:
        self.inflight[action.id] = action
        if action.kind is ActionKind.INFER:
            self.running[action.id] = action
        elif action.kind is ActionKind.LOAD:
            self.loading[action.id] = action
        self.pin(action.sha256)

    def untrack(self, action: Action) -> bool:
        """Forget an answered action; False when it was not in flight here."""
        if self.inflight.pop(action.id, None) is None:
            return False
        self.running.pop(action.id, None)
        self.loading.pop(action.id, None)
        self.unpin(action.sha256)
        return True

    def can_fit(self, size: int) -> bool:
        """Whether evicting every model it need not keep would make room for `size`."""
        return self.worker.memory_budget - self.pinned >= size

    def models_in_use(self) -> set[str]:
        """Models it must keep: running there, or with requests planned there."""
        return set(self.pins)


class Scheduler(ABC):
    """What the broker calls; see the module docstring for the contract."""

    failed: list[tuple[PendingRequest, MTError]]  # given up on, for the broker to answer
    predictor: Predictor
    counters: Counter[str]

    @abstractmethod
    def add_request(self, request: PendingRequest, now: float) -> None: ...

    @abstractmethod
    def cancel(self, request: PendingRequest) -> None: ...

    @abstractmethod
    def add_worker(self, worker: WorkerState, now: float) -> None: ...

    @abstractmethod
    def remove_worker(self, worker: WorkerState, now: float) -> list[Action]:
        """Forget a worker; return the actions it had not answered (requests handled)."""

    @abstractmethod
    def on_result(self, action: Action, result: wire.Result | None, now: float) -> bool: ...

    @abstractmethod
    def schedule(self, now: float) -> list[Action]: ...

    @abstractmethod
    def next_wakeup(self, now: float) -> float: ...

    @abstractmethod
    def place_profile(
        self, sha256: str, context: Any, worker: WorkerState | None = None
    ) -> Action | None:
        """A PROFILE action on `worker`, else the least busy one (None: no worker)."""

    @abstractmethod
    def drop_model(self, sha256: str) -> list[PendingRequest]:
        """Remove and return the queued requests of a model that is going away."""

    @abstractmethod
    def forget_model(self, sha256: str) -> list[Action]:
        """UNLOADs that drop a deleted model from every worker, both tiers."""

    @abstractmethod
    def has_work(self, sha256: str) -> bool:
        """True while requests of that model are queued or running."""

    @abstractmethod
    def seed(self, record: ModelRecord) -> None:
        """A model was published (or found at start): start its predictions."""

    @abstractmethod
    def queued(self) -> int: ...

    @abstractmethod
    def describe(self, worker: WorkerState) -> dict[str, Any]:
        """Counts for STATUS (never model names: tenants must not see others' models)."""


class QueueScheduler(Scheduler):
    """Per-model queues, worker plans, results, retries and placement mechanics."""

    def __init__(
        self,
        max_queue: int,
        predictor: Predictor | None = None,
        fair: FairShare | None = None,
        device_limit: Callable[[str], int] | None = None,
        run_limit: Callable[[str], int] | None = None,
    ) -> None:
        self.max_queue = max_queue  # total queued requests before OVERLOADED
        # tenant -> activation bytes one run of its models may take (0: no bound): they
        # run only on workers whose arena wall (`--run-memory-mb`) is within it
        self.run_limit = run_limit or (lambda tenant: 0)
        # tenant -> bytes its models may hold in device tiers, all workers together (0: no
        # bound); the owner of a shared model pays for it, whoever runs it.
        self.device_limit = device_limit or (lambda tenant: 0)
        # Executor time by tenant weight under overload; off (measuring only) unless given.
        self.fair = fair or FairShare(lambda tenant: 1.0, enabled=False)
        self.predictor = predictor or Predictor(headroom=PLANNING_HEADROOM)
        self.queues: dict[str, deque[PendingRequest]] = {}  # key -> queued (may hold dead ones)
        self._keys: dict[str, set[str]] = {}  # sha -> keys of its queues
        self._key_sha: dict[str, str] = {}  # key -> sha
        self.plans: dict[bytes, WorkerPlan] = {}  # wid -> plan
        self.failed = []
        self.counters = Counter()  # loads, evictions, retries, loads_from_<tier>, ...
        self._queued = 0  # live requests across the queues
        self._order: list[tuple[Any, ...]] = []  # heap of (key, seq, sha, rid): queue heads
        self._seq = itertools.count()  # heap tie-breaker

    # -- policy hooks ----------------------------------------------------------------

    def admit(self, request: PendingRequest, now: float) -> None:
        """Raise DeadlineUnmeetable to refuse a request at once; accept by default."""

    def share_horizon(self, request: PendingRequest, now: float) -> float:
        """Seconds ahead in which the tenant's queued work must fit its share."""
        return request.deadline - now if request.deadline != math.inf else FAIR_HORIZON_S

    def share_cost(self, request: PendingRequest) -> float:
        """Predicted executor seconds of a request, run alone, for the fair share."""
        us = request.model.predicted_us(request.batch)
        return us / 1e6 if us else 0.0

    def enqueue(self, queue: deque[PendingRequest], request: PendingRequest) -> None:
        """Where a new request joins its model's queue: at the back (FIFO)."""
        queue.append(request)

    def queue_key(self, request: PendingRequest) -> str:
        """Which queue a request joins: one per model."""
        return request.model.sha256

    def head_key(self, head: PendingRequest) -> Any:
        """The order in which queue heads are served: by arrival (FIFO)."""
        return head.arrival

    def on_enqueued(self, request: PendingRequest, now: float) -> None:
        """A request joined a queue (the predictive scheduler indexes it)."""

    def on_unqueued(self, request: PendingRequest) -> None:
        """A request left its queue: taken, expired, cancelled or dropped."""

    def after_result(self, plan: WorkerPlan, action: Action, now: float, replan: bool) -> None:
        """A worker answered (its plan is up to date); `replan`: the model's prediction
        rose or drifted."""

    # -- requests --------------------------------------------------------------------

    def add_request(self, request: PendingRequest, now: float) -> None:
        if self._queued >= self.max_queue:
            raise Overloaded(f"{self._queued} requests queued; retry later")
        self._check_run_limit(request.model)
        limit = self.device_limit(request.model.tenant)
        if limit and request.model.size > limit:
            raise QuotaExceeded(
                f"model '{request.model.name}' needs {request.model.size} bytes of device "
                f"memory; its owner's device_bytes limit is {limit}"
            )
        if not request.retries:  # a retry was admitted once: its tenant is not charged twice
            cost = self.share_cost(request)
            self.fair.check(request.who, cost, self.share_horizon(request, now), now)
            request.share_cost = cost
        self.admit(request, now)
        self.fair.book(request.who, request.share_cost)
        key = request.key = self.queue_key(request)
        queue = self.queues.get(key)
        if queue is None:
            queue = self.queues[key] = deque()
            sha = request.model.sha256
            self._keys.setdefault(sha, set()).add(key)
            self._key_sha[key] = sha
        if request.retries:
            queue.appendleft(request)  # a retry is older than what queued behind it
        else:
            self.enqueue(queue, request)
        request.queued = True
        self._queued += 1
        self.on_enqueued(request, now)
        if queue[0] is request:
            self._push_head(key, request)

    def cancel(self, request: PendingRequest) -> None:
        if request.queued:
            self._drop(request)

    def _drop(self, request: PendingRequest) -> None:
        """Take a request out of its queue from anywhere in it, keeping its head indexed."""
        queue = self.queues.get(request.key)
        was_head = bool(queue) and queue[0] is request
        self._unqueue(request)
        if was_head:
            self._push_head(request.key)

    def _unqueue(self, request: PendingRequest) -> None:
        request.queued = False
        self._queued -= 1
        self.fair.unbook(request.who, request.share_cost)
        self.on_unqueued(request)

    def _head(self, key: str) -> PendingRequest | None:
        """The first live request of a queue (dead entries are dropped here)."""
        queue = self.queues.get(key)
        while queue and not queue[0].queued:
            queue.popleft()
        if not queue:
            self._remove_queue(key)
            return None
        return queue[0]

    def _remove_queue(self, key: str) -> list[PendingRequest]:
        """Drop a queue; its live requests."""
        queue = self.queues.pop(key, None)
        sha = self._key_sha.pop(key, None)
        if sha is not None:
            keys = self._keys[sha]
            keys.discard(key)
            if not keys:
                del self._keys[sha]
        return [r for r in queue or () if r.queued]

    def _push_head(self, key: str, head: PendingRequest | None = None) -> None:
        """Index a queue's (new) head; entries for former heads are dropped when popped."""
        head = head or self._head(key)
        if head is not None:
            heapq.heappush(self._order, (self.head_key(head), next(self._seq), key, head.rid))

    def _pop_head(self) -> tuple[tuple[Any, ...], str, PendingRequest] | None:
        """The first live queue head in `head_key` order (stale entries are dropped)."""
        while self._order:
            entry = heapq.heappop(self._order)
            head = self._head(entry[2])
            if head is not None and head.rid == entry[3]:
                return entry, entry[2], head
        return None

    def _fail(self, request: PendingRequest, error: MTError) -> None:
        if request.queued:
            self._drop(request)
        self.failed.append((request, error))

    def queued(self) -> int:
        return self._queued

    def drop_model(self, sha256: str) -> list[PendingRequest]:
        dropped = [r for key in list(self._keys.get(sha256, ())) for r in self._remove_queue(key)]
        for request in dropped:
            self._unqueue(request)
        return dropped

    def has_work(self, sha256: str) -> bool:
        if any(self._head(key) is not None for key in list(self._keys.get(sha256, ()))):
            return True
        return any(sha256 in p.models_in_use() for p in self.plans.values())

    def _retry_all(self, requests: list[PendingRequest], now: float, why: str) -> None:
        """Retry requests in the order they were dispatched (each goes to its queue's front,
        so the last goes first)."""
        for request in reversed(requests):
            self._retry(request, now, why)

    def _retry(self, request: PendingRequest, now: float, why: str) -> None:
        """Queue a request taken back from a worker once (if its deadline allows), else
        answer WORKER_LOST."""
        if request.answered:
            return
        if request.retries >= 1 or request.deadline <= now:
            self.failed.append((request, WorkerLost(f"{why} while running this request")))
            return
        request.retries += 1
        self.counters["retries"] += 1
        try:
            self.add_request(request, now)
        except MTError as exc:
            self.failed.append((request, exc))

    # -- workers and models ----------------------------------------------------------

    def add_worker(self, worker: WorkerState, now: float) -> None:
        lanes = [now] * max(1, worker.lanes)
        self.plans[worker.wid] = WorkerPlan(worker, lanes=lanes, loader_free=now)
        self.fair.capacity = self.executors()

    def executors(self) -> int:
        """Exec executors over all workers: executor-seconds per second of capacity."""
        return sum(len(p.lanes) for p in self.plans.values())

    def remove_worker(self, worker: WorkerState, now: float) -> list[Action]:
        plan = self.plans.pop(worker.wid, None)
        self.fair.capacity = self.executors()
        if plan is None:
            return []
        lost = list(plan.inflight.values())
        self._retry_all(
            [r for a in lost for r in a.requests], now, f"worker {worker.name} was lost"
        )
        return lost

    def place_profile(
        self, sha256: str, context: Any, worker: WorkerState | None = None
    ) -> Action | None:
        if worker is not None:
            plan = self.plans.get(worker.wid)
        else:
            plan = min(self.plans.values(), key=lambda p: len(p.inflight), default=None)
        if plan is None:
            return None
        action = Action(ActionKind.PROFILE, plan.worker, sha256, context=context)
        plan.track(action)
        return action

    def forget_model(self, sha256: str) -> list[Action]:
        self.predictor.forget(sha256)
        actions = []
        for plan in self.plans.values():
            self._unload(plan, sha256)
            actions.append(Action(ActionKind.UNLOAD, plan.worker, sha256, context="forget"))
        return actions

    def drop_host_copy(self, worker: WorkerState, sha256: str) -> Action | None:
        """An UNLOAD that frees a model's host-tier pages on a worker (a tenant is over its
        host bound); None while the worker holds it runnable or has work planned for it."""
        plan = self.plans.get(worker.wid)
        if plan is None or sha256 in plan.loaded or sha256 in plan.pins:
            return None
        self.counters["host_evictions"] += 1
        return Action(ActionKind.UNLOAD, worker, sha256, context="forget")

    def seed(self, record: ModelRecord) -> None:
        """Start the predictor's windows from the upload profile: every run per batch
        size, every host -> device build, and cold -> host preparation plus a build."""
        m = record.measurements
        kind = str(m.get("kind", "cpu"))
        samples = m.get("samples") or {}
        self.predictor.seed_exec(record.sha256, kind, {int(b): t for b, t in samples.items()})
        builds = m.get("build_us") or []
        builds = [float(b) for b in (builds if isinstance(builds, list) else [builds])]
        if builds:
            self.predictor.seed_load(record.sha256, kind, "host", builds)
            prepare = float(m.get("prepare_us") or 0.0)
            cold = [prepare + b for b in builds]
            self.predictor.seed_load(record.sha256, kind, "cold", cold)

    def describe(self, worker: WorkerState) -> dict[str, Any]:
        plan = self.plans.get(worker.wid)
        if plan is None:
            return {}
        return {
            "memory_used": plan.memory_used(),
            "models_live": len(plan.loaded),
            "inflight_actions": len(plan.inflight),
        }

    # -- results ---------------------------------------------------------------------

    def on_result(self, action: Action, result: wire.Result | None, now: float) -> bool:
        plan = self.plans.get(action.worker.wid)
        if plan is not None:
            plan.untrack(action)
        if result is None:  # never answered: the worker may have lost it with the model
            if plan is not None and action.kind is ActionKind.LOAD:
                self._unload(plan, action.sha256)
            self._retry_all(action.requests, now, f"worker {action.worker.name} never answered")
            if plan is not None:
                self.after_result(plan, action, now, False)
            return False
        replan = self.learn(action, result)
        answers = True
        if plan is not None:
            for sha in result.evicted:
                self._unload(plan, sha)
            if action.kind is ActionKind.LOAD and not result.ok:
                self._unload(plan, action.sha256)
            elif result.status is wire.ActionStatus.EXEC_MODEL_MISSING:
                # The worker dropped the model (its own budget, a failed load): forget it
                # there and give its requests another go rather than failing them.
                self._unload(plan, action.sha256)
            elif action.kind is ActionKind.INFER and action.sha256 in plan.loaded:
                plan.loaded.move_to_end(action.sha256)
            if action.kind is ActionKind.LOAD:
                plan.ready.pop(action.sha256, None)
            self.after_result(plan, action, now, replan)
        if result.status is wire.ActionStatus.EXEC_MODEL_MISSING:
            why = f"worker {action.worker.name} no longer held the model"
            self._retry_all(action.requests, now, why)
            answers = False
        if isinstance(result, wire.LoadModelResult) and result.ok:
            self.counters[f"loads_from_{result.tier or 'unknown'}"] += 1
        return answers

    def learn(self, action: Action, result: wire.Result) -> bool:
        """Feed a measured duration to the predictor. True when plans made with the old
        prediction may no longer hold: the run took longer than predicted, or the
        predictor detected a drift (and dropped its older samples)."""
        kind = action.worker.kind
        sha = action.sha256
        if isinstance(result, wire.InferResult) and result.ok and action.requests:
            rows = sum(r.batch for r in action.requests)
            before = self.predictor.exec_us(sha, kind, rows)
            measured = result.timing.exec
            drift = self.predictor.observe_exec(sha, kind, rows, measured)
            return drift or (before is not None and measured > before)
        if isinstance(result, wire.LoadModelResult) and result.ok and result.tier != "device":
            return self.predictor.observe_load(sha, kind, result.tier, action.size,
                                               result.timing.load)  # fmt: skip
        return False

    # -- placement -------------------------------------------------------------------

    def _unload(self, plan: WorkerPlan, sha: str) -> None:
        """Forget that a worker holds a model (evicted, failed, or told to drop it)."""
        plan.drop(sha)
        plan.ready.pop(sha, None)
        plan.last_used.pop(sha, None)

    def fits(self, plan: WorkerPlan, model: ModelRecord) -> bool:
        """Whether the worker could load the model now, making room by evicting: room on
        the worker, room in its owner's device bound, a wall within its run bound."""
        return (
            plan.can_fit(model.size)  # the cheapest test and the one that fails most
            and self.walled(plan, model)
            and self._tenant_victims(model) is not None
        )

    def walled(self, plan: WorkerPlan, model: ModelRecord) -> bool:
        """Whether the worker may run the model: its owner's `run_bytes` (if any) is at
        least the worker's arena wall, so a run asking more fails there (EXEC_FAILED)."""
        limit = self.run_limit(model.tenant)
        wall = plan.worker.run_memory
        return not limit or 0 < wall <= limit

    def _check_run_limit(self, model: ModelRecord) -> None:
        limit = self.run_limit(model.tenant)
        if limit and self.plans and not any(self.walled(p, model) for p in self.plans.values()):
            raise QuotaExceeded(
                f"model '{model.name}' may take {limit} bytes per run (its owner's run_bytes"
                "); no worker walls its runs within that (`mtserve worker --run-memory-mb`)"
            )

    def _tenant_victims(self, model: ModelRecord) -> list[tuple[WorkerPlan, str]] | None:
        """The owner's idle loaded models (least recently used first, any worker) to
        evict so that loading `model` keeps the owner within its device bound; None when
        evicting all of them would not be enough (the load waits for its runs to end)."""
        limit = self.device_limit(model.tenant)
        if not limit:
            return []
        held, idle = 0, []
        for plan in self.plans.values():
            for sha, tenant in plan.owner.items():
                if tenant == model.tenant:
                    held += plan.loaded[sha]
                    if sha not in plan.pins and sha != model.sha256:
                        idle.append((plan.last_used.get(sha, 0.0), plan, sha))
        victims = []
        for _, plan, sha in sorted(idle, key=lambda v: v[0]):
            if held + model.size <= limit:
                break
            victims.append((plan, sha))
            held -= plan.loaded[sha]
        return victims if held + model.size <= limit else None

    def _evictions(self, plan: WorkerPlan, need: int) -> list[str] | None:
        """Least-recently-used models with no work on this worker that free `need` bytes;
        models with queued requests go last. None when even that is not enough."""
        free = plan.worker.memory_budget - plan.memory_used()
        if free >= need:
            return []
        if not plan.can_fit(need):
            return None
        in_use = plan.models_in_use()
        idle = [s for s in plan.loaded if s not in in_use]
        idle.sort(key=lambda s: s in self._keys)  # stable: LRU order within each group
        victims = []
        for sha in idle:
            victims.append(sha)
            free += plan.loaded[sha]
            if free >= need:
                return victims
        return None

    def _place(
        self,
        plan: WorkerPlan,
        model: ModelRecord,
        batch: list[PendingRequest],
        now: float,
        run: float,
        latest: float,
    ) -> list[Action]:
        """UNLOADs and a LOAD if the model is not on the worker, then the INFER, predicted
        to take `run` seconds and to start by `latest` (the policy decides both)."""
        sha = model.sha256
        actions = [] if sha in plan.loaded else self._load(plan, model, now)
        plan.loaded.move_to_end(sha)
        plan.last_used[sha] = now
        for request in batch:
            request.dispatched = now
        infer = Action(
            ActionKind.INFER, plan.worker, sha, batch, expected_duration=run, latest=latest
        )
        plan.track(infer)
        actions.append(infer)
        return actions

    def _load(self, plan: WorkerPlan, model: ModelRecord, now: float) -> list[Action]:
        """The UNLOADs that make room for a model on a worker, then its LOAD."""
        actions: list[Action] = []
        for holder, victim in self._tenant_victims(model) or ():
            self._unload(holder, victim)
            actions.append(Action(ActionKind.UNLOAD, holder.worker, victim))
            self.counters["tenant_evictions"] += 1
        for victim in self._evictions(plan, model.size) or ():
            self._unload(plan, victim)
            actions.append(Action(ActionKind.UNLOAD, plan.worker, victim))
            self.counters["evictions"] += 1
        plan.hold(model.sha256, model.size)
        plan.owner[model.sha256] = model.tenant
        load = Action(ActionKind.LOAD, plan.worker, model.sha256, size=model.size)
        plan.track(load)
        actions.append(load)
        self.counters["loads"] += 1
        return actions

    def _too_large(self, model: ModelRecord) -> LoadFailed | None:
        """The error for a model no worker could ever hold (None when one could)."""
        if not self.plans:
            return None
        largest = max(p.worker.memory_budget for p in self.plans.values())
        if largest >= model.size:
            return None
        return LoadFailed(
            f"model '{model.name}' ({model.size} bytes) is larger than every worker's "
            f"memory budget (largest {largest})"
        )


SCHEDULERS = ("predictive", "fifo")
FAIR_HORIZON_S = 1.0  # the fair share's horizon for a request without a deadline
OBJECTIVES = ("deadline", "latency")


def make_scheduler(
    name: str,
    max_queue: int,
    predictor: Predictor | None = None,
    objective: str = "deadline",
    weight: Callable[[str], float] | None = None,
    isolation: bool = False,
    device_limit: Callable[[str], int] | None = None,
    run_limit: Callable[[str], int] | None = None,
) -> Scheduler:
    """A scheduler by name. `weight`: tenant -> share weight; `isolation`: hold a tenant
    over its weighted share of executor time under overload (broker/fairshare.py)."""
    weight = weight or (lambda tenant: 1.0)
    fair = FairShare(weight, enabled=isolation)
    if name == "fifo":
        from broker.fifo import FifoLruScheduler

        return FifoLruScheduler(max_queue, predictor, fair, device_limit, run_limit)
    if name == "predictive":
        from broker.predictive import PredictiveScheduler

        return PredictiveScheduler(max_queue, predictor, objective=objective, weight=weight,
                                   fair=fair, device_limit=device_limit,
                                   run_limit=run_limit)  # fmt: skip
    raise ValueError(f"unknown scheduler {name!r}; available: {', '.join(SCHEDULERS)}")
