"""Schedulers: turn queued requests into timed actions for workers.

`Scheduler` is the interface the broker calls; its call points are `add_request`,
`add_worker`, `on_result`, `schedule`, `expire`, `on_worker_lost` and `drop_model`.
`FifoLruScheduler` is the baseline: per-model FIFO queues, models loaded on demand,
evicted least-recently-used when a worker's budget is full, batches up to the model's
cap. `broker.predictive.PredictiveScheduler` is the second implementation.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable

from broker.state import Action, ActionKind, PendingRequest, WorkerState
from mtcore.errors import DeadlineUnmeetable, LoadFailed, Overloaded
from mtcore.predictor import Predictor

PIPELINE_DEPTH = 2  # INFER actions in flight per worker: one running, one ready behind it


class Scheduler(ABC):
    """What the broker needs from a scheduler. No I/O; the broker sends the actions."""

    @abstractmethod
    def add_request(self, request: PendingRequest, now: float) -> None:
        """Queue a request, or raise DeadlineUnmeetable/Overloaded to reject it at once."""

    @abstractmethod
    def add_worker(self, worker: WorkerState) -> None: ...

    @abstractmethod
    def on_result(self, action: Action, ok: bool, now: float, evicted: list[str]) -> None:
        """An action finished on its worker (the broker removed it from `inflight`)."""

    @abstractmethod
    def schedule(self, now: float) -> list[Action]:
        """Actions to send now, in order per worker. Failed requests go to `failed`."""

    @abstractmethod
    def expire(self, now: float) -> list[PendingRequest]:
        """Remove and return queued requests whose deadline can no longer be met."""

    @abstractmethod
    def on_worker_lost(self, worker: WorkerState) -> list[PendingRequest]:
        """Forget a worker; return the requests it was running (to retry or fail)."""

    @abstractmethod
    def drop_model(self, sha256: str) -> list[PendingRequest]:
        """Remove and return the queued requests of a model that is going away."""

    @abstractmethod
    def queued(self) -> int: ...

    @abstractmethod
    def has_work(self, sha256: str) -> bool:
        """True while requests of that model are queued or running."""

    failed: list[tuple[PendingRequest, Exception]]  # requests `schedule` gave up on


class FifoLruScheduler(Scheduler):
    """Baseline: FIFO per model, oldest head first, LRU eviction, greedy batching."""

    def __init__(self, max_queue: int, alive: Callable[[int], bool]) -> None:
        self.max_queue = max_queue  # total queued requests before OVERLOADED
        self.alive = alive  # is a request still waiting for its answer?
        self.queues: dict[str, deque[PendingRequest]] = {}  # sha -> FIFO of requests
        self.workers: dict[bytes, WorkerState] = {}  # wid -> worker
        self.failed = []
        self.with_deadlines: set[str] = set()  # queues that may hold a finite deadline
        self._queued = 0

    # -- requests --------------------------------------------------------------

    def add_request(self, request: PendingRequest, now: float) -> None:
        if self._queued >= self.max_queue:
            raise Overloaded(f"{self._queued} requests queued; retry later")
        if request.deadline != math.inf:
            self.admit(request, now)
        queue = self.queues.setdefault(request.model.sha256, deque())
        if request.retries:
            queue.appendleft(request)  # a retry is older than what queued behind it
        else:
            self.enqueue(queue, request)
        self._queued += 1
        if request.deadline != math.inf:
            self.with_deadlines.add(request.model.sha256)

    def admit(self, request: PendingRequest, now: float) -> None:
        """Raise DeadlineUnmeetable if the request's own run already misses its deadline."""
        exec_us = request.model.predicted_us(request.batch)
        if exec_us and now + exec_us / 1e6 > request.deadline:
            budget_ms = (request.deadline - now) * 1e3
            raise DeadlineUnmeetable(
                f"model '{request.model.name}' takes about {exec_us / 1e3:.1f} ms for "
                f"{request.batch} row(s); the deadline leaves {budget_ms:.1f} ms"
            )

    def enqueue(self, queue: deque[PendingRequest], request: PendingRequest) -> None:
        """Where a new request joins its model's queue: at the back (FIFO)."""
        queue.append(request)

    def queued(self) -> int:
        return self._queued

    def has_work(self, sha256: str) -> bool:
        if self.queues.get(sha256):
            return True
        return any(sha256 in w.models_in_use() for w in self.workers.values())

    def expire(self, now: float) -> list[PendingRequest]:
        expired = []
        for sha, queue in self.queues.items():
            if sha not in self.with_deadlines:
                continue  # nothing in it can expire; answered ones are skipped at take time
            keep = deque()
            for request in queue:
                if not self.alive(request.rid):
                    self._queued -= 1
                elif self.cannot_finish(request, now):
                    expired.append(request)
                    self._queued -= 1
                else:
                    keep.append(request)
            queue.clear()
            queue.extend(keep)
        self._drop_empty_queues()
        return expired

    def cannot_finish(self, request: PendingRequest, now: float) -> bool:
        """Whether a queued request can no longer be answered in time: its deadline passed."""
        return request.deadline < now

    def drop_model(self, sha256: str) -> list[PendingRequest]:
        dropped = list(self.queues.pop(sha256, ()))
        self._queued -= len(dropped)
        return dropped

    # -- workers ---------------------------------------------------------------

    def add_worker(self, worker: WorkerState) -> None:
        self.workers[worker.wid] = worker

    def on_worker_lost(self, worker: WorkerState) -> list[PendingRequest]:
        self.workers.pop(worker.wid, None)
        return [r for a in worker.inflight.values() for r in a.requests]

    def on_result(self, action: Action, ok: bool, now: float, evicted: list[str]) -> None:
        worker = action.worker
        for sha in evicted:
            worker.loaded.pop(sha, None)
        if action.kind is ActionKind.LOAD and not ok:
            worker.loaded.pop(action.sha256, None)
        elif action.kind is ActionKind.INFER and action.sha256 in worker.loaded:
            worker.loaded.move_to_end(action.sha256)

    # -- scheduling ------------------------------------------------------------

    def schedule(self, now: float) -> list[Action]:
        actions: list[Action] = []
        waiting: set[str] = set()  # models that no worker can take this turn
        while self._has_free_worker():
            sha = self._oldest_queue(skip=waiting)
            if sha is None:
                break
            model = self.queues[sha][0].model
            if self.workers and not any(
                w.memory_budget >= model.size for w in self.workers.values()
            ):
                self._fail_queue(sha, LoadFailed(
                    f"model '{model.name}' ({model.size} bytes) is larger than every worker's "
                    f"memory budget (largest {max(w.memory_budget for w in self.workers.values())})"
                ))  # fmt: skip
                continue
            worker = self._pick_worker(sha, model.size)
            if worker is None:
                waiting.add(sha)
                continue
            batch = self._take_batch(self.queues[sha], now)
            if batch:
                actions.extend(self._place(worker, sha, batch))
            self._drop_empty_queues()
        return actions

    def _has_free_worker(self) -> bool:
        return any(w.busy_infers() < PIPELINE_DEPTH for w in self.workers.values())

    def _fail_queue(self, sha: str, error: Exception) -> None:
        for request in self.drop_model(sha):
            self.failed.append((request, error))

    def _oldest_queue(self, skip: set[str]) -> str | None:
        """Model whose head request arrived first, among those with live requests."""
        best, best_arrival = None, math.inf
        for sha, queue in self.queues.items():
            if sha in skip:
                continue
            while queue and not self.alive(queue[0].rid):
                queue.popleft()
                self._queued -= 1
            if queue and queue[0].arrival < best_arrival:
                best, best_arrival = sha, queue[0].arrival
        return best

    def _pick_worker(self, sha: str, size: int) -> WorkerState | None:
        """A worker with a free slot: one holding the model, else the emptiest it fits on now."""
        free = [w for w in self.workers.values() if w.busy_infers() < PIPELINE_DEPTH]
        holding = [w for w in free if sha in w.loaded]
        if holding:
            return min(holding, key=lambda w: w.busy_infers())
        fits = [w for w in free if self._evictions(w, size) is not None]
        return min(fits, key=lambda w: (w.busy_infers(), w.memory_used()), default=None)

    def _take_batch(self, queue: deque[PendingRequest], now: float) -> list[PendingRequest]:
        """Head request plus followers that stack with it, up to the model's batch cap."""
        head = queue.popleft()
        self._queued -= 1
        batch, rows = [head], head.batch
        cap = head.model.max_batch
        key = head.stack_key
        while queue and head.model.batchable:
            nxt = queue[0]
            if not self.alive(nxt.rid):
                queue.popleft()
                self._queued -= 1
                continue
            # Same bytes uploaded by two tenants share a queue but never a batch: each
            # tenant's batch cap holds, and no tenant's rows meet another's.
            if nxt.model is not head.model or nxt.stack_key != key or rows + nxt.batch > cap:
                break
            batch.append(queue.popleft())
            self._queued -= 1
            rows += nxt.batch
        for request in batch:
            request.dispatched = now
        return batch

    def _place(self, worker: WorkerState, sha: str, batch: list[PendingRequest]) -> list[Action]:
        """UNLOADs and a LOAD if the model is not on the worker, then the INFER."""
        actions: list[Action] = []
        model = batch[0].model
        if sha not in worker.loaded:
            for victim in self._evictions(worker, model.size) or ():
                worker.loaded.pop(victim)
                actions.append(Action(ActionKind.UNLOAD, worker, victim))
            worker.loaded[sha] = model.size
            load = Action(ActionKind.LOAD, worker, sha)
            worker.inflight[load.id] = load
            actions.append(load)
        worker.loaded.move_to_end(sha)
        latest = min(r.deadline for r in batch)
        infer = Action(ActionKind.INFER, worker, sha, batch, latest=latest)
        worker.inflight[infer.id] = infer
        actions.append(infer)
        return actions

    def _evictions(self, worker: WorkerState, need: int) -> list[str] | None:
        """Least-recently-used models with no work on this worker that free `need` bytes."""
        free = worker.memory_budget - worker.memory_used()
        if free >= need:
            return []
        in_use = worker.models_in_use()
        victims = []
        for sha, size in worker.loaded.items():
            if sha in in_use:
                continue
            victims.append(sha)
            free += size
            if free >= need:
                return victims
        return None

    def _drop_empty_queues(self) -> None:
        for sha in [s for s, q in self.queues.items() if not q]:
            del self.queues[sha]
            self.with_deadlines.discard(sha)


SCHEDULERS = ("fifo", "predictive")


def make_scheduler(
    name: str, max_queue: int, alive: Callable[[int], bool], predictor: Predictor | None = None
) -> Scheduler:
    if name == "fifo":
        return FifoLruScheduler(max_queue, alive)
    if name == "predictive":
        from broker.predictive import PredictiveScheduler

        return PredictiveScheduler(max_queue, alive, predictor or Predictor())
    raise ValueError(f"unknown scheduler {name!r}; available: {', '.join(SCHEDULERS)}")
