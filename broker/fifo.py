"""The baseline scheduler: FIFO per model, oldest head first, LRU eviction, greedy batches.

What the predictive scheduler is measured against (`mtbench scheduler`, `mtbench compare
overload`): it admits everything whose own run fits its deadline, serves the model whose
head request arrived first on a worker with a free pipeline slot (PIPELINE_DEPTH INFERs
in flight per worker), loads on demand and evicts the least recently used model with no
work, and answers queued requests whose deadline passed on a periodic scan.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable
from typing import Any

from broker.fairshare import FairShare
from broker.registry import ModelRecord
from broker.scheduler import QueueScheduler, WorkerPlan
from broker.state import Action, PendingRequest
from mtcore.errors import DeadlineExpired, DeadlineUnmeetable
from mtcore.predictor import Predictor

PIPELINE_DEPTH = 2  # INFER actions in flight per worker: one running, one ready behind
EXPIRE_PERIOD = 0.05  # seconds between scans for queued requests past their deadline


class FifoLruScheduler(QueueScheduler):
    """Baseline: FIFO per model, oldest head first, LRU eviction, greedy batching."""

    def __init__(
        self,
        max_queue: int,
        predictor: Predictor | None = None,
        fair: FairShare | None = None,
        device_limit: Callable[[str], int] | None = None,
        run_limit: Callable[[str], int] | None = None,
    ) -> None:
        super().__init__(max_queue, predictor, fair, device_limit, run_limit)
        self.with_deadlines: set[str] = set()  # queues that may hold a finite deadline
        self._next_expiry = 0.0  # when the next scan for expired requests is due

    def admit(self, request: PendingRequest, now: float) -> None:
        """Refuse only a request whose own run, alone, already misses its deadline."""
        if request.deadline == math.inf:
            return
        self.with_deadlines.add(request.model.sha256)
        exec_us = request.model.predicted_us(request.batch)
        if exec_us and now + exec_us / 1e6 > request.deadline:
            budget_ms = (request.deadline - now) * 1e3
            raise DeadlineUnmeetable(
                f"model '{request.model.name}' takes about {exec_us / 1e3:.1f} ms for "
                f"{request.batch} row(s); the deadline leaves {budget_ms:.1f} ms"
            )

    def next_wakeup(self, now: float) -> float:
        return self._next_expiry if self.with_deadlines else math.inf

    def schedule(self, now: float) -> list[Action]:
        if now >= self._next_expiry:
            self._expire(now)
            self._next_expiry = now + EXPIRE_PERIOD
        actions: list[Action] = []
        waiting: list[tuple[Any, ...]] = []  # heads no worker can take this turn
        while self._has_free_worker():
            popped = self._pop_head()
            if popped is None:
                break
            entry, sha, head = popped
            model = head.model
            too_large = self._too_large(model)
            if too_large is not None:
                for request in self.drop_model(sha):
                    self.failed.append((request, too_large))
                continue
            plan = self._pick_worker(model)
            if plan is None:
                waiting.append(entry)
                continue
            batch = self._take_batch(sha)
            us = self.predictor.exec_us(sha, plan.worker.kind, sum(r.batch for r in batch))
            latest = min(r.deadline for r in batch)
            actions.extend(self._place(plan, model, batch, now, (us or 0.0) / 1e6, latest))
            self._push_head(sha)
        for entry in waiting:
            heapq.heappush(self._order, entry)
        return actions

    def _expire(self, now: float) -> None:
        for sha in list(self.with_deadlines):
            queue = self.queues.get(sha)
            if queue is None:
                self.with_deadlines.discard(sha)
                continue
            head = queue[0]
            keep: deque[PendingRequest] = deque()
            for request in queue:
                if not request.queued:
                    continue
                if request.deadline < now:
                    waited_ms = (now - request.arrival) * 1e3
                    self._unqueue(request)  # the queue is rebuilt, and its head indexed, below
                    self.failed.append((request, DeadlineExpired(
                        f"deadline passed after {waited_ms:.1f} ms queued")))  # fmt: skip
                else:
                    keep.append(request)
            if keep:
                self.queues[sha] = keep
                if keep[0] is not head:
                    self._push_head(sha)
            else:
                self._remove_queue(sha)
                self.with_deadlines.discard(sha)

    def _has_free_worker(self) -> bool:
        return any(len(p.running) < PIPELINE_DEPTH for p in self.plans.values())

    def _pick_worker(self, model: ModelRecord) -> WorkerPlan | None:
        """A worker with a free slot: one holding the model, else the emptiest it fits on now."""
        free = [p for p in self.plans.values() if p.busy_infers() < PIPELINE_DEPTH]
        holding = [p for p in free if model.sha256 in p.loaded and self.walled(p, model)]
        if holding:
            return min(holding, key=lambda p: p.busy_infers())
        fits = [p for p in free if self.fits(p, model)]
        return min(fits, key=lambda p: (p.busy_infers(), p.memory_used()), default=None)

    def _take_batch(self, sha: str) -> list[PendingRequest]:
        """Head request plus followers that stack with it, up to the model's batch cap."""
        queue = self.queues[sha]
        head = queue.popleft()
        self._unqueue(head)
        batch, rows = [head], head.batch
        cap = head.model.max_batch
        key = head.stack_key
        while queue and head.model.batchable:
            nxt = queue[0]
            if not nxt.queued:
                queue.popleft()
                continue
            # Same bytes uploaded by two tenants share a queue but never a batch: each
            # tenant's batch cap holds, and no tenant's rows meet another's.
            if nxt.model is not head.model or nxt.stack_key != key or rows + nxt.batch > cap:
                break
            batch.append(queue.popleft())
            self._unqueue(nxt)
            rows += nxt.batch
        self._head(sha)
        return batch
