"""The predictive scheduler: plans with predicted durations instead of reacting.

It keeps the FIFO/LRU scheduler's mechanics (per-model queues, loads on demand, LRU
eviction of models with no work, at most PIPELINE_DEPTH INFERs in flight per worker)
and changes the decisions, each with a predicted duration from `mtcore.predictor`:

- admission: a request whose predicted completion (the earliest a worker can start it,
  a load first if no worker holds the model, the queued requests of its model ahead of
  it, its own run) is after its deadline is refused at once (DEADLINE_UNMEETABLE), with
  the numbers; nothing is spent on it;
- early answers: a queued request that can no longer finish in time even if it started
  now is answered at once (DEADLINE_EXPIRED), never run late;
- order: each model's queue is kept by deadline; the next model served is the one whose
  head has the least slack (deadline minus predicted run), divided by its tenant's
  weight (the hook fair share will use; 1.0 for everyone today); requests without a
  deadline are served in arrival order after those with one;
- batch: the largest batch whose predicted completion still meets the earliest deadline
  in it (so batching never makes the most urgent request late);
- placement: a worker holding the model whose timeline frees first; else, when none
  holding it can start in time, another worker (a load, then the run): a hot model is
  replicated exactly when one worker cannot meet its demand.

Each worker's timeline is the predicted end of its queued INFERs (`busy_until`), set
on dispatch and corrected on every result, as Clockwork's worker tracker does.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable

from broker.scheduler import PIPELINE_DEPTH, FifoLruScheduler
from broker.state import Action, PendingRequest, WorkerState
from mtcore.errors import DeadlineExpired, DeadlineUnmeetable
from mtcore.predictor import Predictor

UNKNOWN_EXEC_US = 0.0  # a model with no profile: admitted (its first runs teach the predictor)


class PredictiveScheduler(FifoLruScheduler):
    """Deadline-aware admission, ordering, batching and placement from predictions."""

    def __init__(
        self,
        max_queue: int,
        alive: Callable[[int], bool],
        predictor: Predictor,
        weight: Callable[[str], float] = lambda tenant: 1.0,
    ) -> None:
        super().__init__(max_queue, alive)
        self.predictor = predictor
        self.weight = weight  # tenant -> share weight (fair share comes with tenants)
        self.busy_until: dict[bytes, float] = {}  # wid -> predicted end of its INFERs
        self.rejected = 0  # refused at admission
        self.answered_early = 0  # dropped from a queue before they could run late

    # -- predictions ------------------------------------------------------------

    def exec_s(
        self, request: PendingRequest, rows: int, worker: WorkerState | None = None
    ) -> float:
        """Predicted seconds to run `rows` rows of the request's model (on `worker`'s kind)."""
        kinds = [worker.kind] if worker else sorted({w.kind for w in self.workers.values()})
        estimates = [self.predictor.exec_us(request.model.sha256, k, rows) for k in kinds]
        known = [e for e in estimates if e is not None]
        if not known:
            profiled = request.model.predicted_us(rows)
            return (profiled or UNKNOWN_EXEC_US) / 1e6
        return min(known) / 1e6

    def load_s(self, sha: str, worker: WorkerState, size: int) -> float:
        if sha in worker.loaded:
            return 0.0
        tier = "host" if worker.tiers and sha in worker.tiers.host_models else "cold"
        us = self.predictor.load_us(sha, worker.kind, tier, size)
        return (us or 0.0) / 1e6

    def free_at(self, worker: WorkerState, now: float) -> float:
        return max(now, self.busy_until.get(worker.wid, now))

    def earliest_start(self, request: PendingRequest, now: float) -> float:
        """The earliest a worker could start this model's next batch (load included)."""
        model = request.model
        starts = [
            self.free_at(w, now) + self.load_s(model.sha256, w, model.size)
            for w in self.workers.values()
            if w.memory_budget >= model.size
        ]
        return min(starts, default=math.inf)

    # -- requests ------------------------------------------------------------------

    def enqueue(self, queue: deque[PendingRequest], request: PendingRequest) -> None:
        """By deadline: after the earlier and equal ones (queues are nearly always in
        order already, so this is nearly always an append)."""
        index = len(queue)
        while index > 0 and queue[index - 1].deadline > request.deadline:
            index -= 1
        queue.insert(index, request)

    def admit(self, request: PendingRequest, now: float) -> None:
        """Refuse what is predicted to finish late: the earliest start, the requests of
        its model queued ahead, its own run (as few full batches as they fill)."""
        if not self.workers:
            return  # no timeline to predict on: the queue holds it until a worker joins
        model = request.model
        queue = self.queues.get(model.sha256, ())
        ahead = sum(r.batch for r in queue if r.deadline <= request.deadline)
        cap = max(1, model.max_batch)
        rows = ahead + request.batch
        batches = math.ceil(rows / cap)
        run = self.exec_s(request, min(rows, cap)) * batches
        done = self.earliest_start(request, now) + run
        if done > request.deadline:
            self.rejected += 1
            raise DeadlineUnmeetable(
                f"model '{model.name}' is predicted to finish in {(done - now) * 1e3:.1f} ms"
                f" ({ahead} row(s) of it queued ahead, {run * 1e3:.1f} ms of runs); the"
                f" deadline leaves {(request.deadline - now) * 1e3:.1f} ms"
            )

    def cannot_finish(self, request: PendingRequest, now: float) -> bool:
        """Even started now, it would finish after its deadline: answer it early."""
        if now + self.exec_s(request, request.batch) <= request.deadline:
            return False
        self.answered_early += 1
        return True

    # -- dispatch --------------------------------------------------------------------

    def _oldest_queue(self, skip: set[str]) -> str | None:
        """The model whose head request has the least weighted slack (EDF); arrival
        order among requests without a deadline, after every one with a deadline."""
        best, best_key = None, (math.inf, math.inf)
        now = self._now
        for sha, queue in self.queues.items():
            if sha in skip:
                continue
            while queue and not self.alive(queue[0].rid):
                queue.popleft()
                self._queued -= 1
            if not queue:
                continue
            head = queue[0]
            if head.deadline == math.inf:
                key = (math.inf, head.arrival)
            else:
                slack = head.deadline - now - self.exec_s(head, head.batch)
                key = (slack / max(self.weight(head.model.tenant), 1e-9), head.arrival)
            if key < best_key:
                best, best_key = sha, key
        return best

    def schedule(self, now: float) -> list[Action]:
        self._now = now
        return super().schedule(now)

    def _pick_worker(self, sha: str, size: int) -> WorkerState | None:
        """A holder that can start in time, else the worker that can start it soonest."""
        self._picked = self._choose_worker(sha, size)
        return self._picked

    def _choose_worker(self, sha: str, size: int) -> WorkerState | None:
        head = self.queues[sha][0]
        free = [w for w in self.workers.values() if w.busy_infers() < PIPELINE_DEPTH]
        now = self._now
        holding = sorted((w for w in free if sha in w.loaded), key=lambda w: self.free_at(w, now))
        run = self.exec_s(head, head.batch)
        if holding and self.free_at(holding[0], now) + run <= head.deadline:
            return holding[0]
        fits = [w for w in free if self._evictions(w, size) is not None]
        if not fits:
            return holding[0] if holding else None
        return min(fits, key=lambda w: self.free_at(w, now) + self.load_s(sha, w, size))

    def _take_batch(self, queue: deque[PendingRequest], now: float) -> list[PendingRequest]:
        """The largest stackable batch whose predicted completion on the picked worker
        meets its earliest deadline (the head's: the queue is ordered by deadline). A
        head that would finish late even alone is answered now instead (an empty batch).
        """
        batch = super()._take_batch(queue, now)
        head, worker = batch[0], self._picked
        start = self.free_at(worker, now) + self.load_s(head.model.sha256, worker, head.model.size)
        while len(batch) > 1:
            rows = sum(r.batch for r in batch)
            if start + self.exec_s(head, rows, worker) <= head.deadline:
                break
            back = batch.pop()
            back.dispatched = 0.0
            queue.appendleft(back)
            self._queued += 1
        if start + self.exec_s(head, head.batch, worker) > head.deadline:
            late = (start + self.exec_s(head, head.batch, worker) - head.deadline) * 1e3
            self.failed.append((head, DeadlineExpired(
                f"answered early: the soonest it could finish is {late:.1f} ms after its"
                " deadline")))  # fmt: skip
            self.answered_early += 1
            return []
        return batch

    def _place(self, worker: WorkerState, sha: str, batch: list[PendingRequest]) -> list[Action]:
        actions = super()._place(worker, sha, batch)
        now = self._now
        start = self.free_at(worker, now) + self.load_s(sha, worker, batch[0].model.size)
        rows = sum(r.batch for r in batch)
        self.busy_until[worker.wid] = start + self.exec_s(batch[0], rows, worker)
        return actions

    # -- results and workers ------------------------------------------------------------

    def on_result(self, action: Action, ok: bool, now: float, evicted: list[str]) -> None:
        super().on_result(action, ok, now, evicted)
        worker = action.worker
        if not worker.busy_infers():
            self.busy_until[worker.wid] = now  # its timeline caught up with the clock
        else:
            self.busy_until[worker.wid] = min(self.busy_until.get(worker.wid, now),
                                              now + self._remaining(worker, now))  # fmt: skip

    def _remaining(self, worker: WorkerState, now: float) -> float:
        """Predicted seconds of the INFERs still in flight on a worker."""
        total = 0.0
        for action in worker.inflight.values():
            if action.requests:
                rows = sum(r.batch for r in action.requests)
                total += self.exec_s(action.requests[0], rows, worker)
        return total

    def on_worker_lost(self, worker: WorkerState) -> list[PendingRequest]:
        self.busy_until.pop(worker.wid, None)
        return super().on_worker_lost(worker)

    _now: float = 0.0  # the time of the current schedule() pass
    _picked: WorkerState | None = None  # the worker _pick_worker chose for this batch
