"""The predictive scheduler: plans every worker's next moves from predicted durations.

DNN execution and model loading take predictable times (`mtcore.predictor`), so the
controller keeps, per worker, when each executor and its loader will be free, and
decides with those timelines instead of reacting (Clockwork's controller does the same
with its worker trackers):

- admission: a request's predicted completion is the later of the soonest a worker could
  start it (a load first where none holds its model) and the moment the cluster reaches
  it in earliest-deadline order: the work already running plus the queued work of every
  model that must start before it (`WorkLedger`), shared over all executors. A request
  predicted to finish late is refused at once (DEADLINE_UNMEETABLE) with the numbers;
- early answers: a queued request whose latest start (deadline minus its predicted run)
  passes is answered at once (DEADLINE_EXPIRED), never run late;
- order: the next queue served is the one whose head has the earliest latest start,
  stretched by its tenant's weight (a heavier tenant's requests look more urgent: the
  hook fair share uses); requests without a deadline follow, in arrival order, or by
  least predicted run per waiting request under the `latency` objective (which
  minimises mean latency across the queue: shortest weighted job first, with an age
  guard so nothing starves);
- look-ahead: a batch is sent when its worker's executor or loader frees within
  LOOKAHEAD_S, so the next batch is already there when the current one ends, and is
  formed as late as that allows (more requests can join it);
- batch: the largest stackable batch whose predicted completion meets the earliest
  deadline in it;
- placement: the worker where the batch starts soonest, a load included where the model
  is not resident (ties go to a holder); so a model is replicated exactly when its
  holders cannot serve it as soon as another worker can. Loads go to the loader ahead of
  the exec that needs them, and a replica that has not run for REPLICA_IDLE_S is
  released while another worker still holds the model;
- executors: on a worker with several, a run that is long against the tightest deadline
  in use never takes the last free one (nor waits queued on the worker for it), so a
  request with a tight deadline never waits behind a long batch;
- eviction: least recently used first, models with queued work last, never one running;
- reaction: every result re-times its worker's timeline from the clock and what is still
  in flight (so a worker that ran late, or answered TOO_LATE, is planned from when it
  really frees); a run slower than predicted, or a drift the predictor detects,
  re-checks that model's queue and answers at once what can no longer end in time.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
from collections.abc import Callable
from typing import Any

from broker.fairshare import FairShare
from broker.ledger import WorkLedger
from broker.registry import ModelRecord
from broker.scheduler import OBJECTIVES, QueueScheduler, WorkerPlan
from broker.state import Action, ActionKind, PendingRequest, WorkerState
from broker.timelines import first_lane, replan_lanes, replan_loader, water_level
from mtcore.errors import DeadlineExpired, DeadlineUnmeetable
from mtcore.predictor import Predictor

LOOKAHEAD_S = 0.002  # send a batch when its worker frees within this
MAX_INFERS_PER_LANE = 2  # INFERs in flight per executor (guards runs predicted as free)
REPLICA_IDLE_S = 2.0  # a replica unused this long is released while another one remains
RELEASE_PERIOD = 0.25  # seconds between passes over the replicas
STARVATION_S = 1.0  # latency objective: a request waiting this long goes first
HOLDERS = 2  # holders of a model (those free first) considered per decision
CANDIDATES = 2  # other workers (those free first) considered per decision
# Admission adds this share of a request's predicted wait to its predicted finish: the
# wait is an estimate over work not yet placed (how it will batch, where it will run),
# and its error grows with it. Not while the fair share holds another tenant (`_slack`).
WAIT_SLACK = 0.5
LONG_SHARE = 0.25  # a run longer than this share of the tightest deadline budget is long
TIGHT_WINDOW_S = 10.0  # how long the tightest deadline budget seen is remembered
HELD_WEIGHT = 0.1  # a tenant held to its fair share: its order keys weigh this much
UNKNOWN_EXEC_S = 0.0  # a model never profiled nor run: admitted (its first runs teach us)


def _free_time(entry: tuple[float, bytes]) -> float:
    return entry[0]


class PredictiveScheduler(QueueScheduler):
    """Deadline-aware admission, order, batching, placement and loads from predictions."""

    def __init__(
        self,
        max_queue: int,
        predictor: Predictor | None = None,
        *,
        objective: str = "deadline",
        weight: Callable[[str], float] = lambda tenant: 1.0,
        lookahead_s: float = LOOKAHEAD_S,
        replica_idle_s: float = REPLICA_IDLE_S,
        wait_slack: float = WAIT_SLACK,
        fair: FairShare | None = None,
        device_limit: Callable[[str], int] | None = None,
        run_limit: Callable[[str], int] | None = None,
    ) -> None:
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; available: {OBJECTIVES}")
        super().__init__(max_queue, predictor, fair, device_limit, run_limit)
        self.objective = objective
        self.weight = weight  # tenant -> share weight (fair share comes with tenants)
        self.lookahead_s = lookahead_s
        self.replica_idle_s = replica_idle_s
        self.wait_slack = wait_slack
        self.books: dict[bytes, WorkLedger] = {}  # wid -> queued work planned there
        # sha -> workers holding it (or loading it), in the order they got it: a dict, so
        # that ties between workers break the same way on every run
        self.holders: dict[str, dict[bytes, None]] = {}
        self.rows: dict[str, int] = {}  # queue key -> live queued rows
        self._expiries: list[tuple[float, int, PendingRequest]] = []  # heap by latest start
        self._recheck: set[str] = set()  # models whose predictions drifted
        self._due = math.inf  # earliest time a deferred batch becomes due
        self._next_release = 0.0
        self._kinds: list[str] = []  # worker kinds present
        self._tags: dict[bytes, str] = {}  # wid -> its queue-key suffix
        self._load_memo: dict[tuple[str, str, str], float] = {}  # (sha, kind, tier) -> s
        self._bandwidth_seen = 0  # the predictor's bandwidth generation the memo holds
        # sha -> (the predictor's generation of it, runs): memoized exec predictions
        self._exec_memo: dict[str, tuple[int, dict[tuple[int, str | None], float]]] = {}
        self._replicas: dict[str, None] = {}  # models with more than one holder, in order
        # sha -> (model, worker, may evict): the loads admission planned
        self._warm: dict[str, tuple[ModelRecord, WorkerPlan, bool]] = {}
        self._tight_budget = math.inf  # the tightest deadline budget seen lately (seconds)
        self._tight_until = 0.0  # when that observation lapses
        self._waiting: dict[bytes, list[Any]] = {}  # wid -> head entries waiting for it
        self._by_free: list[tuple[float, bytes]] = []  # (free estimate, wid), sorted
        self._free_key: dict[bytes, tuple[float, bytes]] = {}  # wid -> its _by_free entry
        self._stale: dict[bytes, WorkerPlan] = {}  # workers whose _by_free entry moved
        self._by_lane: list[tuple[float, bytes]] = []  # (first free executor, wid), sorted
        self._lane_key: dict[bytes, tuple[float, bytes]] = {}  # wid -> its _by_lane entry

    # -- predictions ---------------------------------------------------------------

    def exec_s(self, model: ModelRecord, rows: int, kind: str | None = None) -> float:
        """Predicted seconds to run `rows` rows (on `kind`, else the fastest kind known),
        memoized until the predictor learns something new of the model."""
        entry = self._exec_memo.get(model.sha256)
        if entry is None:
            entry = self._exec_memo[model.sha256] = (
                self.predictor.exec_generation(model.sha256),
                {},
            )
        memo = entry[1]
        value = memo.get((rows, kind))
        if value is None:
            value = memo[(rows, kind)] = self._predict_exec(model, rows, kind)
        return value

    def _predict_exec(self, model: ModelRecord, rows: int, kind: str | None) -> float:
        best = None
        for k in (kind,) if kind else self._kinds:
            us = self.predictor.exec_us(model.sha256, k, rows)
            if us is not None and (best is None or us < best):
                best = us
        if best is None:
            profiled = model.predicted_us(rows)
            return profiled / 1e6 if profiled else UNKNOWN_EXEC_S
        return best / 1e6

    def load_s(self, plan: WorkerPlan, model: ModelRecord) -> float:
        """Predicted seconds until the model is runnable on this worker (0 if resident)."""
        sha = model.sha256
        if sha in plan.loaded:
            return 0.0
        tier = "host" if sha in plan.worker.host_models else "cold"
        key = (sha, plan.worker.kind, tier)
        value = self._load_memo.get(key)
        if value is None:
            us = self.predictor.load_us(sha, plan.worker.kind, tier, model.size)
            value = self._load_memo[key] = (us or 0.0) / 1e6
        return value

    def share_cost(self, request: PendingRequest) -> float:
        """The median run on the fastest kind: executor time as it is really spent, in
        the unit of the fair share's capacity (executors), not the planning margin."""
        model, best = request.model, None
        for kind in self._kinds:
            us = self.predictor.typical_exec_us(model.sha256, kind, request.batch)
            if us is not None and (best is None or us < best):
                best = us
        if best is None:
            return self.exec_s(model, request.batch)
        return best / 1e6

    def share_horizon(self, request: PendingRequest, now: float) -> float:
        """Admission charges a wait with `wait_slack` on top: work queued ahead must fit
        the budget over (1 + slack), so the share of a horizon is of that part."""
        return super().share_horizon(request, now) / (1.0 + self.wait_slack)

    def is_long(self, model: ModelRecord) -> bool:
        """Whether the model's runs are long against the tightest deadline budget seen in
        the last TIGHT_WINDOW_S: such runs never take a worker's last free executor, so a
        request with a tight deadline never waits behind one (where there are two)."""
        return self.exec_s(model, 1) > LONG_SHARE * self._tight_budget

    def _note_budget(self, request: PendingRequest, now: float) -> None:
        budget = request.deadline - request.arrival
        if budget <= self._tight_budget or now >= self._tight_until:
            self._tight_budget, self._tight_until = budget, now + TIGHT_WINDOW_S

    def _start(self, plan: WorkerPlan, model: ModelRecord, now: float) -> tuple[float, float]:
        """(when a batch of the model could start on this worker, when its first action
        there would start): the executor's free time, after a load where needed."""
        lanes = plan.lanes
        if len(lanes) == 1:
            lane = max(now, lanes[0])
        else:
            lane = max(now, lanes[first_lane(lanes, self.is_long(model))])
        sha = model.sha256
        if sha in plan.loaded:
            return max(lane, plan.ready.get(sha, now)), lane
        loader = max(now, plan.loader_free)
        return max(lane, loader + self.load_s(plan, model)), min(lane, loader)

    # -- admission -------------------------------------------------------------------

    def _key(self, request: PendingRequest) -> float:
        """Order key: the deadline, brought closer for a heavier tenant (arrival plus its
        budget over the tenant's weight). Ordering by deadline rather than latest start
        means a request admitted later never overtakes one admitted with the same budget,
        so a promise made at admission is not broken by the next admission. A tenant the
        fair share holds (over its share under overload) weighs HELD_WEIGHT as much: the
        other tenants' requests are planned ahead of its queued ones, so what it was
        admitted takes the room they leave, not the room they need."""
        w = max(self.weight(request.who), 1e-9)
        if self.fair.held(request.who, request.arrival):
            w *= HELD_WEIGHT
        return request.arrival + (request.deadline - request.arrival) / w

    def admit(self, request: PendingRequest, now: float) -> None:
        """Plan the request on the worker where it would finish first, or refuse it."""
        model = request.model
        run = self.exec_s(model, request.batch)
        request.latest_start = request.deadline - run
        request.order_key = self._key(request)
        if request.deadline != math.inf:
            self._note_budget(request, now)
        if request.deadline == math.inf or not self.plans:
            return  # nothing to plan against: the queue holds it until a worker joins
        best = self.predicted_start(request, now)
        if best is None:
            return  # no worker can hold it now; dispatch answers if none ever can
        start, plan, soonest = best
        done = start + run + self._slack(request, now) * (start - now)
        sha = model.sha256
        refused = done > request.deadline
        if sha not in plan.loaded and not (refused and sha in self._warm):
            # Load it now: this request needs it. For a refused one too (a load too slow
            # for one deadline is no reason never to load the model), but only into free
            # room: evicting a model in use for one that was just refused thrashes.
            self._warm[sha] = (model, plan, not refused)
        if refused:
            self.counters["rejected"] += 1
            raise DeadlineUnmeetable(
                f"model '{model.name}' is predicted to finish in {(done - now) * 1e3:.1f} ms"
                f" (a worker could start it in {(soonest - now) * 1e3:.1f} ms; with the"
                f" queued work planned there ahead of it, in {(start - now) * 1e3:.1f} ms;"
                f" its run takes {run * 1e3:.1f} ms); the deadline leaves"
                f" {(request.deadline - now) * 1e3:.1f} ms"
            )
        request.plan = plan.worker.wid
        request.cost = self._marginal_cost(model, request.batch, self.queue_key(request))

    def _slack(self, request: PendingRequest, now: float) -> float:
        """`wait_slack`, or none for a tenant within its share while the fair share holds
        another: the held tenant's queued work is ordered behind this request, so if the
        wait was predicted short it is that work that gives way, not this request. Its
        steady load then plans against the work queued ahead, not a margin over it that
        an overload it did not cause makes large enough to refuse it."""
        if self.fair.holding(now) and not self.fair.held(request.who, now):
            return 0.0
        return self.wait_slack

    def _marginal_cost(self, model: ModelRecord, rows: int, key: str) -> float:
        """Seconds a request adds to the queued runs of its queue: what its rows add to
        the last batch it would join there, or a run of its own."""
        cap = max(1, model.max_batch)
        partial = self.rows.get(key, 0) % cap
        if partial and partial + rows <= cap:
            return max(0.0, self.exec_s(model, partial + rows) - self.exec_s(model, partial))
        return self.exec_s(model, rows)

    def predicted_start(
        self, request: PendingRequest, now: float
    ) -> tuple[float, WorkerPlan, float] | None:
        """(predicted start, worker, soonest start anywhere) on the worker where the
        request would start first: among the model's holders and the workers that free
        first, the later of when it could start there (a load first where needed) and
        when that worker's executors have run the queued work planned there that must
        start before it (water-filling over its lanes)."""
        key = request.order_key
        best_start, best_plan = math.inf, None
        soonest = math.inf
        books = self.books
        for plan, start, _, _ in self._candidates(request.model, now, dispatch=False):
            if start < soonest:
                soonest = start
            if start >= best_start:
                continue  # planned work only delays it further: no better than the best
            book = books[plan.worker.wid]
            if book.total:
                ahead = book.before(key)
                lanes = plan.lanes
                if len(lanes) == 1:
                    level = max(now, lanes[0]) + ahead
                elif self.is_long(request.model):
                    level = water_level(sorted(lanes[1:]), ahead, now)
                else:
                    level = water_level(sorted(lanes), ahead, now)
                if level > start:
                    start = level
            if start < best_start:
                best_start, best_plan = start, plan
        return None if best_plan is None else (best_start, best_plan, soonest)

    def _candidates(
        self, model: ModelRecord, now: float, dispatch: bool = True
    ) -> list[tuple[WorkerPlan, float, float, bool]]:
        """(worker, batch start, first action's start, holds it) for the HOLDERS holders
        of the model and the CANDIDATES other workers that could take new work first
        (and make room for it). For a dispatch, only workers with an INFER slot free."""
        sha = model.sha256
        out = []
        holders = self.holders.get(sha, ())
        few = len(holders) <= HOLDERS
        if few:
            for wid in holders:
                plan = self.plans[wid]
                if self.walled(plan, model) and not (dispatch and self._full(plan, model)):
                    out.append((plan, *self._start(plan, model, now), True))
        found = held = 0
        size, plans = model.size, self.plans
        self._reindex_stale()
        for _, wid in self._by_free:  # the workers that can take new work first
            if found >= CANDIDATES and (few or held >= HOLDERS):
                break
            plan = plans[wid]
            if wid in holders:
                if few or held >= HOLDERS or (dispatch and self._full(plan, model)):
                    continue
                if self.walled(plan, model):
                    out.append((plan, *self._start(plan, model, now), True))
                    held += 1
            elif (
                found < CANDIDATES
                and plan.can_fit(size)  # most fail here: memory pinned by queued work
                and not (dispatch and self._full(plan, model))
                and self.fits(plan, model)
            ):
                out.append((plan, *self._start(plan, model, now), False))
                found += 1
        return out

    def _set_lanes(self, plan: WorkerPlan, lanes: list[float]) -> None:
        """Change a worker's predicted executor free times (and both indexes)."""
        wid = plan.worker.wid
        old = self._lane_key.pop(wid, None)
        if old is not None:
            i = bisect.bisect_left(self._by_lane, old)
            if i < len(self._by_lane) and self._by_lane[i] == old:
                del self._by_lane[i]
        plan.lanes = lanes
        if lanes and wid in self.plans:
            key = (min(lanes), wid)
            bisect.insort(self._by_lane, key)
            self._lane_key[wid] = key
        self._reindex(plan)

    def _reindex(self, plan: WorkerPlan) -> None:
        """The worker's place in `_by_free` changed; it is re-sorted when next read (a
        batch taken or a request booked moves the same worker many times in a row)."""
        self._stale[plan.worker.wid] = plan

    def _reindex_stale(self) -> None:
        for plan in self._stale.values():
            self._reindex_now(plan)
        self._stale.clear()

    def _reindex_now(self, plan: WorkerPlan) -> None:
        """Keep `_by_free` sorted by when each worker could take new work: its first
        free executor plus the queued work planned on it, spread over its executors."""
        wid = plan.worker.wid
        old = self._free_key.pop(wid, None)
        if old is not None:
            i = bisect.bisect_left(self._by_free, old)
            if i < len(self._by_free) and self._by_free[i] == old:
                del self._by_free[i]
        if wid in self.plans and plan.lanes:
            key = (min(plan.lanes) + self.books[wid].total / len(plan.lanes), wid)
            bisect.insort(self._by_free, key)
            self._free_key[wid] = key

    # -- queues ----------------------------------------------------------------------

    def enqueue(self, queue: Any, request: PendingRequest) -> None:
        """By deadline, after the earlier and equal ones (nearly always an append)."""
        index = len(queue)
        while index > 0 and queue[index - 1].deadline > request.deadline:
            index -= 1
        queue.insert(index, request)

    def on_enqueued(self, request: PendingRequest, now: float) -> None:
        sha = request.model.sha256
        self.rows[request.key] = self.rows.get(request.key, 0) + request.batch
        if request.deadline == math.inf:
            return
        book = self.books.get(request.plan)
        if book is not None:
            plan = self.plans[request.plan]
            plan.pin(sha)
            book.add(request.order_key, request.rid, request.cost)
            request.booked = True
            self._reindex(plan)
        heapq.heappush(self._expiries, (request.latest_start, next(self._seq), request))

    def on_unqueued(self, request: PendingRequest) -> None:
        sha = request.model.sha256
        self.rows[request.key] = self.rows.get(request.key, 0) - request.batch
        if self.rows[request.key] <= 0:
            del self.rows[request.key]
        book = self.books.get(request.plan)
        if book is not None:
            plan = self.plans[request.plan]
            plan.unpin(sha)
            if request.booked:
                book.remove(request.order_key, request.rid, request.cost)
                self._reindex(plan)
        request.booked = False

    def queue_key(self, request: PendingRequest) -> str:
        """One queue per model and planned worker: each worker runs what was planned on
        it, and a busy one holds up only its own."""
        if not request.plan:
            return request.model.sha256
        return request.model.sha256 + self._tags[request.plan]

    def head_key(self, head: PendingRequest) -> Any:
        """Heads with a deadline by weighted latest start, then the rest by arrival."""
        if head.deadline != math.inf:
            return (0, head.order_key)
        return (1, head.arrival)

    # -- schedule ---------------------------------------------------------------------

    def next_wakeup(self, now: float) -> float:
        while self._expiries and not self._expiries[0][2].queued:
            heapq.heappop(self._expiries)
        expiry = self._expiries[0][0] if self._expiries else math.inf
        release = self._next_release if self._replicas else math.inf
        return min(self._due, expiry, release)

    def schedule(self, now: float) -> list[Action]:
        self._expire(now)
        for sha in self._recheck:
            self._recheck_queue(sha, now)
        self._recheck.clear()
        actions: list[Action] = []
        if now >= self._next_release:
            actions.extend(self._release_replicas(now))
            self._next_release = now + RELEASE_PERIOD
        if self._warm:
            actions.extend(self._warm_up(now))
        self._unpark(now)
        tried: set[str] = set()  # queues the latency objective already tried this pass
        while self._any_free(now):
            popped = self._next_head(now, tried)
            if popped is None:
                break
            entry, sha, head = popped
            tried.add(sha)
            placed = self._dispatch(sha, head, now)
            if isinstance(placed, WorkerPlan):  # its worker is busy beyond the look-ahead
                heapq.heappush(self._waiting.setdefault(placed.worker.wid, []), entry)
                continue
            actions.extend(placed)
            self._push_head(sha)
        self._wake_for_waiting(now)
        return actions

    def _wake_for_waiting(self, now: float) -> None:
        """Work waits for workers: wake when the first of them comes within the look-ahead
        (one within it already but full of INFERs wakes us with its result). `_by_lane`
        is sorted by first free executor, so the first waited-on entry past the horizon
        is the earliest."""
        horizon = now + self.lookahead_s
        by_lane = self._by_lane
        if self._order and by_lane and by_lane[0][0] > horizon:
            self._due = min(self._due, by_lane[0][0] - self.lookahead_s)
            return  # nothing frees sooner than the first lane of all
        if not self._waiting:
            return
        first = bisect.bisect_right(by_lane, horizon, key=_free_time)
        for free, wid in itertools.islice(by_lane, first, None):
            if wid in self._waiting:
                self._due = min(self._due, free - self.lookahead_s)
                return

    def _unpark(self, now: float) -> None:
        """The most urgent live head waiting for each worker that frees within the
        look-ahead goes back in line (the others would only wait again behind it); the
        next such time is when to wake up."""
        horizon = now + self.lookahead_s
        self._due = math.inf
        if not self._waiting:
            return
        for free, wid in self._by_lane:
            if free > horizon:
                if self._waiting:
                    self._due = free - self.lookahead_s
                break
            waiting = self._waiting.get(wid)
            while waiting:
                entry = heapq.heappop(waiting)
                head = self._head(entry[2])
                if head is not None and head.rid == entry[3]:
                    heapq.heappush(self._order, entry)
                    break
            if not waiting:
                self._waiting.pop(wid, None)

    def _any_free(self, now: float) -> bool:
        """Some worker's executor frees within the look-ahead (else the next one that
        does is when to wake up)."""
        horizon = now + self.lookahead_s
        for free, wid in self._by_lane:
            if free > horizon:
                return False
            plan = self.plans[wid]
            if len(plan.running) < MAX_INFERS_PER_LANE * len(plan.lanes):
                return True
        return False

    def _next_head(
        self, now: float, tried: set[str]
    ) -> tuple[tuple[Any, ...], str, PendingRequest] | None:
        popped = self._pop_head()
        if popped is None or self.objective != "latency" or popped[0][0][0] == 0:
            return popped
        # Latency objective: among requests without a deadline, the shortest predicted
        # run per waiting request goes first (the oldest, once one has starved); each
        # queue once per pass, so a pass whose workers are all busy ends.
        heapq.heappush(self._order, popped[0])
        sha = self._shortest_per_request(now, tried)
        head = self._head(sha) if sha else None
        if head is None:
            return None
        return ((1, head.arrival), next(self._seq), sha, head.rid), sha, head

    def _shortest_per_request(self, now: float, skip: set[str]) -> str | None:
        best, best_key = None, (math.inf, math.inf)
        for sha in list(self.queues):
            if sha in skip:
                continue
            head = self._head(sha)
            if head is None or head.deadline != math.inf:
                continue
            if now - head.arrival > STARVATION_S:
                key = (-math.inf, head.arrival)
            else:
                cap = max(1, head.model.max_batch)
                rows = min(self.rows.get(head.key, head.batch), cap)
                waiting = max(1, rows // max(1, head.batch))
                w = max(self.weight(head.who), 1e-9)
                key = (self.exec_s(head.model, rows) / (waiting * w), head.arrival)
            if key < best_key:
                best, best_key = sha, key
        return best

    def _dispatch(self, sha: str, head: PendingRequest, now: float) -> list[Action] | WorkerPlan:
        """Place the next batch of a model: [] when its head was answered instead; when
        its worker is busy beyond the look-ahead, that worker (to wait for)."""
        model = head.model
        choice = self._planned(head, now) or self._choose(model, now)
        if choice is None:
            too_large = self._too_large(model)
            if too_large is not None:
                for request in self.drop_model(model.sha256):
                    self.failed.append((request, too_large))
                return []
            # no worker can make room now (all of it runs): wait for the first to free
            return self.plans[self._by_lane[0][1]]
        plan, start, first = choice
        if first > now + self.lookahead_s or self._full(plan, model):
            return plan  # busy: wait for it rather than settle for a worse one
        batch = self._take_batch(sha, head, plan, start, now)
        if not batch:
            return []
        return self._place_batch(plan, model, batch, start, now)

    def _choose(self, model: ModelRecord, now: float) -> tuple[WorkerPlan, float, float] | None:
        """(worker, predicted batch start, start of its first action) where the batch
        starts soonest; holders win ties; None when no worker can take it."""
        best = min(self._candidates(model, now, dispatch=False),
                   key=lambda c: (c[1], not c[3], c[2]), default=None)  # fmt: skip
        return None if best is None else (best[0], best[1], best[2])

    def _planned(self, head: PendingRequest, now: float) -> tuple[WorkerPlan, float, float] | None:
        """The worker admission planned the head on, while it can still take the model:
        the promise made to the requests planned behind it elsewhere holds only if each
        worker runs the work planned on it."""
        plan = self.plans.get(head.plan)
        if plan is None:
            return None
        if head.model.sha256 in plan.loaded:
            if not self.walled(plan, head.model):
                return None
        elif not self.fits(plan, head.model):
            return None
        return (plan, *self._start(plan, head.model, now))

    def _full(self, plan: WorkerPlan, model: ModelRecord | None = None) -> bool:
        """No INFER slot free; for a long run on a worker with several executors, as many
        long runs in flight as executors but one (no long run is queued on the worker,
        where an idle executor kept for short runs would take it)."""
        if len(plan.running) >= MAX_INFERS_PER_LANE * len(plan.lanes):
            return True
        if model is None or len(plan.lanes) < 2 or not self.is_long(model):
            return False
        return sum(a.long for a in plan.running.values()) >= len(plan.lanes) - 1

    def _take_batch(
        self, sha: str, head: PendingRequest, plan: WorkerPlan, start: float, now: float
    ) -> list[PendingRequest]:
        """The largest stackable batch whose predicted end on `plan` meets the earliest
        deadline in it. A head that would finish late even alone is answered now."""
        model = head.model
        kind = plan.worker.kind
        if start + self.exec_s(model, head.batch, kind) > head.deadline:
            late_ms = (start + self.exec_s(model, head.batch, kind) - head.deadline) * 1e3
            self.counters["answered_early"] += 1
            self._fail(head, DeadlineExpired(
                f"answered early: the soonest it could finish is {late_ms:.1f} ms after its"
                " deadline"))  # fmt: skip
            return []
        queue = self.queues[sha]
        most = min(model.max_batch, self.rows.get(sha, head.batch))  # rows queued here
        cap = self._rows_by(model, head.batch, most, start, head.deadline, kind)
        batch: list[PendingRequest] = []
        rows = 0
        key = head.stack_key
        while queue:
            nxt = queue[0]
            if not nxt.queued:
                queue.popleft()
                continue
            if batch and (nxt.model is not model or nxt.stack_key != key):
                break
            if batch and (rows + nxt.batch > cap or nxt.deadline < head.deadline):
                break  # (an earlier deadline behind the head: a retry; it goes next)
            queue.popleft()
            self._unqueue(nxt)
            batch.append(nxt)
            rows += nxt.batch
        self._head(sha)
        return batch

    def _rows_by(self, model: ModelRecord, least: int, most: int, start: float,
                 deadline: float, kind: str) -> int:  # fmt: skip
        """The most rows (at least `least`, at most `most`) whose run, started at
        `start`, is predicted to end by `deadline`: a binary search, runs growing with
        rows."""
        if not model.batchable:
            return least
        lo, hi = least, max(least, most)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if start + self.exec_s(model, mid, kind) <= deadline:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _place_batch(
        self,
        plan: WorkerPlan,
        model: ModelRecord,
        batch: list[PendingRequest],
        start: float,
        now: float,
    ) -> list[Action]:
        rows = sum(r.batch for r in batch)
        run = self.exec_s(model, rows, plan.worker.kind)
        latest = min(r.deadline for r in batch) - run  # the latest it may start
        actions = self._place(plan, model, batch, now, run, latest)
        infer = actions[-1]
        infer.start = start
        infer.long = self.is_long(model)
        lanes = list(plan.lanes)
        lanes[first_lane(lanes, infer.long)] = start + run
        self._set_lanes(plan, lanes)
        return actions

    def _load(self, plan: WorkerPlan, model: ModelRecord, now: float) -> list[Action]:
        """A load planned on the worker's loader, after the loads already sent there."""
        load_s = self.load_s(plan, model)
        actions = super()._load(plan, model, now)  # its UNLOADs forgot their holders
        actions[-1].expected_duration = load_s
        actions[-1].start = max(now, plan.loader_free)
        plan.loader_free = actions[-1].start + load_s
        plan.ready[model.sha256] = plan.loader_free
        self.add_holder(model.sha256, plan.worker.wid)
        return actions

    def add_holder(self, sha: str, wid: bytes) -> None:
        """The worker holds (or is loading) the model."""
        holders = self.holders.setdefault(sha, {})
        holders[wid] = None
        if len(holders) > 1:
            self._replicas[sha] = None

    def _warm_up(self, now: float) -> list[Action]:
        """Start the loads admission planned (the model is not on the worker a request
        was planned on) without waiting for an executor to free: the load overlaps the
        runs ahead of it. A refused request's plan is loaded too: a load too slow for one
        deadline is no reason never to load the model."""
        actions: list[Action] = []
        for sha, (model, plan, may_evict) in list(self._warm.items()):
            del self._warm[sha]
            live = self.plans.get(plan.worker.wid) is plan
            room = plan.worker.memory_budget - plan.used >= model.size
            if live and sha not in plan.loaded and self.fits(plan, model) and (may_evict or room):
                actions.extend(self._load(plan, model, now))
                self.counters["warm_loads"] += 1
        return actions

    # -- expiry and re-checks -----------------------------------------------------------

    def _expire(self, now: float) -> None:
        """Answer every queued request whose latest start has passed."""
        heap = self._expiries
        while heap and heap[0][0] < now:
            _, _, request = heapq.heappop(heap)
            if not request.queued:
                continue
            self.counters["answered_early"] += 1
            waited_ms = (now - request.arrival) * 1e3
            self._fail(request, DeadlineExpired(
                f"answered early after {waited_ms:.1f} ms queued: its run can no longer end by"
                " its deadline"))  # fmt: skip

    def _recheck_queue(self, sha: str, now: float) -> None:
        """After a drift: answer the queued requests the new prediction makes late."""
        queued = [r for key in list(self._keys.get(sha, ())) for r in self.queues.get(key, ())]
        for request in queued:
            late = now + self.exec_s(request.model, request.batch) > request.deadline
            if request.queued and late:
                self.counters["answered_early"] += 1
                self._fail(request, DeadlineExpired(
                    "answered early: the model now runs slower than when it was admitted"
                    " and can no longer end by its deadline"))  # fmt: skip

    # -- replicas ------------------------------------------------------------------------

    def _release_replicas(self, now: float) -> list[Action]:
        """UNLOAD replicas idle for replica_idle_s while another worker holds the model."""
        actions = []
        for sha in list(self._replicas):
            wids = self.holders[sha]
            plans = [self.plans[w] for w in wids if w in self.plans]
            plans.sort(key=lambda p: p.last_used.get(sha, 0.0), reverse=True)
            for plan in plans[1:]:
                idle = now - plan.last_used.get(sha, 0.0) > self.replica_idle_s
                if idle and sha not in plan.pins:
                    self._unload(plan, sha)
                    actions.append(Action(ActionKind.UNLOAD, plan.worker, sha))
                    self.counters["replicas_released"] += 1
        return actions

    def _forget_holder(self, sha: str, wid: bytes) -> None:
        wids = self.holders.get(sha)
        if wids is not None:
            wids.pop(wid, None)
            if len(wids) < 2:
                self._replicas.pop(sha, None)
            if not wids:
                del self.holders[sha]

    def _unload(self, plan: WorkerPlan, sha: str) -> None:
        super()._unload(plan, sha)
        self._forget_holder(sha, plan.worker.wid)

    # -- results and workers ---------------------------------------------------------------

    def after_result(self, plan: WorkerPlan, action: Action, now: float, replan: bool) -> None:
        """Re-time the worker from the clock and what it still has in flight; re-check
        the model's queue when its prediction rose or drifted."""
        if action.kind is ActionKind.INFER:
            entry = self._exec_memo.get(action.sha256)  # its window has a new sample
            if entry and entry[0] != self.predictor.exec_generation(action.sha256):
                del self._exec_memo[action.sha256]
        elif action.kind is ActionKind.LOAD:
            self._forget_load_memo(action.sha256, action.worker.kind)
        if replan:
            self.counters["replans"] += 1
            self._recheck.add(action.sha256)
        self._retime(plan, now, action)

    def _forget_load_memo(self, sha: str, kind: str) -> None:
        """A load of the model was measured: its own predictions change, and those of
        every model predicted from bandwidth when the bandwidth estimate moved."""
        generation = self.predictor.bandwidth_generation
        if generation != self._bandwidth_seen:
            self._bandwidth_seen = generation
            self._load_memo.clear()
            return
        for tier in ("host", "cold"):
            self._load_memo.pop((sha, kind, tier), None)

    def _retime(self, plan: WorkerPlan, now: float, done: Action | None = None) -> None:
        """Re-plan a worker from the clock and what it has in flight (`broker.timelines`).
        The loader is re-planned only when a load ended (or none is known to have):
        INFERs do not move it."""
        if done is None or done.kind is not ActionKind.INFER:
            freed = done is not None and done.kind is ActionKind.LOAD
            plan.loader_free, plan.ready = replan_loader(plan, now, freed)
        self._set_lanes(plan, replan_lanes(plan, now, done))

    def seed(self, record: ModelRecord) -> None:
        super().seed(record)
        self._exec_memo.pop(record.sha256, None)
        self._load_memo.clear()

    def forget_model(self, sha256: str) -> list[Action]:
        self._exec_memo.pop(sha256, None)
        return super().forget_model(sha256)

    def add_worker(self, worker: WorkerState, now: float) -> None:
        super().add_worker(worker, now)
        self.books[worker.wid] = WorkLedger()
        self._tags[worker.wid] = "@" + worker.wid.hex()
        plan = self.plans[worker.wid]
        lanes, plan.lanes = plan.lanes, []
        self._set_lanes(plan, lanes)
        self._kinds = sorted({p.worker.kind for p in self.plans.values()})

    def remove_worker(self, worker: WorkerState, now: float) -> list[Action]:
        plan = self.plans.get(worker.wid)
        for sha in list(plan.loaded) if plan else ():
            self._forget_holder(sha, worker.wid)
        self.books.pop(worker.wid, None)
        for entry in self._waiting.pop(worker.wid, []):  # they choose another worker now
            heapq.heappush(self._order, entry)
        lost = super().remove_worker(worker, now)
        if plan is not None:
            self._set_lanes(plan, [])  # drops its index entries
        self._kinds = sorted({p.worker.kind for p in self.plans.values()})
        return lost
