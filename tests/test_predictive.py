"""The predictive scheduler as a unit: factories and a fake clock, no sockets."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.predictive import LOOKAHEAD_S, REPLICA_IDLE_S, PredictiveScheduler
from broker.scheduler import WorkerPlan
from broker.state import Action, ActionKind, PendingRequest, WorkerState
from mtcore.errors import DeadlineUnmeetable, Status
from mtcore.predictor import Predictor
from tests.factories import make_model, make_requests, make_result, make_worker

MS = 1e-3


def scheduler(*workers, predictor: Predictor | None = None, **kwargs) -> PredictiveScheduler:
    """Exact arithmetic: no planning headroom, no slack on predicted waits."""
    kwargs.setdefault("wait_slack", 0.0)
    s = PredictiveScheduler(1000, predictor or Predictor(), **kwargs)
    for w in workers or (make_worker(),):
        s.add_worker(w, 0.0)
    return s


def plan(s: PredictiveScheduler, worker: WorkerState) -> WorkerPlan:
    return s.plans[worker.wid]


def hold(s: PredictiveScheduler, worker: WorkerState, *models) -> WorkerState:
    """Make `worker` hold `models`, as if their LOADs had finished."""
    for m in models:
        plan(s, worker).hold(m.sha256, m.size)
        s.add_holder(m.sha256, worker.wid)
    return worker


def busy_until(s: PredictiveScheduler, worker: WorkerState, t: float) -> None:
    s._set_lanes(plan(s, worker), [t] * len(plan(s, worker).lanes))


def infers(actions: list[Action]) -> list[Action]:
    return [a for a in actions if a.kind is ActionKind.INFER]


def answered(s: PredictiveScheduler) -> dict[int, Status]:
    failed, s.failed = s.failed, []
    return {r.rid: e.status for r, e in failed}


# ---------------------------------------------------------------- admission


def test_a_request_that_cannot_make_its_deadline_is_refused_at_once() -> None:
    model = make_model(profile={1: 50_000.0})  # 50 ms a run
    w = make_worker()
    s = scheduler(w)
    hold(s, w, model)
    (tight,) = make_requests(model, 1, deadline=10 * MS)
    with pytest.raises(DeadlineUnmeetable, match="predicted to finish"):
        s.add_request(tight, now=0.0)
    (easy,) = make_requests(model, 1, deadline=1.0)
    s.add_request(easy, now=0.0)
    assert s.queued() == 1 and s.counters["rejected"] == 1


def test_admission_counts_the_queued_work_of_every_model_ahead() -> None:
    a, b = (
        make_model("a", profile={1: 10_000.0}, max_batch=1),
        make_model("b", profile={1: 10_000.0}, max_batch=1),
    )
    w = make_worker()
    s = scheduler(w)
    hold(s, w, a, b)
    for model in (a, b, a, b):  # 4 runs of 10 ms queued, all due by 50 ms
        s.add_request(make_requests(model, 1, deadline=50 * MS)[0], now=0.0)
    (fifth,) = make_requests(a, 1, deadline=50 * MS)
    s.add_request(fifth, now=0.0)  # ends at 50 ms: just in time
    (sixth,) = make_requests(b, 1, deadline=50 * MS)
    with pytest.raises(DeadlineUnmeetable, match=r"planned there ahead of it, in 50\.0 ms"):
        s.add_request(sixth, now=0.0)


def test_work_due_later_does_not_count_against_an_urgent_request() -> None:
    lax, urgent = (
        make_model("lax", profile={1: 10_000.0}, max_batch=1),
        make_model("urgent", profile={1: 1_000.0}),
    )
    w = make_worker()
    s = scheduler(w)
    hold(s, w, lax, urgent)
    for r in make_requests(lax, 20, deadline=1.0):  # 200 ms of work, due within a second
        s.add_request(r, now=0.0)
    (r,) = make_requests(urgent, 1, deadline=5 * MS)
    s.add_request(r, now=0.0)  # EDF runs it first: admitted
    assert infers(s.schedule(now=0.0))[0].requests == [r]


def test_work_is_shared_over_every_executor() -> None:
    model = make_model(profile={1: 10_000.0}, max_batch=1)
    workers = [make_worker(f"w{i}") for i in range(2)]
    s = scheduler(*workers)
    for w in workers:
        hold(s, w, model)
    for r in make_requests(model, 10, deadline=50 * MS):  # 10 runs of 10 ms, 5 on each
        s.add_request(r, now=0.0)
    assert {r.plan for q in s.queues.values() for r in q} == {b"w0", b"w1"}
    with pytest.raises(DeadlineUnmeetable):
        s.add_request(make_requests(model, 1, deadline=50 * MS)[0], now=0.0)


def test_a_model_nobody_holds_pays_its_load() -> None:
    model = make_model(profile={1: 1_000.0})
    model.measurements = {"build_us": [30_000], "prepare_us": 50_000}  # 80 ms from cold
    s = scheduler()
    s.seed(model)
    with pytest.raises(DeadlineUnmeetable, match=r"could start it in 80\.0 ms"):
        s.add_request(make_requests(model, 1, deadline=50 * MS)[0], now=0.0)
    s.add_request(make_requests(model, 1, deadline=100 * MS)[0], now=0.0)


def test_requests_without_deadlines_are_never_refused_and_go_last() -> None:
    model, urgent = make_model("slow", profile={1: 10_000.0}), make_model("u", profile={1: 1.0})
    w = make_worker()
    s = scheduler(w)
    hold(s, w, model, urgent)
    (free,) = make_requests(model, 1, deadline=math.inf, arrival=0.0)
    s.add_request(free, now=0.0)
    s.add_request(make_requests(urgent, 1, deadline=1.0, arrival=1.0)[0], now=0.0)
    assert infers(s.schedule(now=0.0))[0].sha256 == urgent.sha256


def test_the_predictor_overrides_the_upload_profile() -> None:
    model = make_model(profile={1: 1_000.0})
    predictor = Predictor()
    predictor.seed_exec(model.sha256, "cpu", {1: [80_000.0]})  # measured: 80 ms
    w = make_worker()
    s = scheduler(w, predictor=predictor)
    hold(s, w, model)
    with pytest.raises(DeadlineUnmeetable):
        s.add_request(make_requests(model, 1, deadline=50 * MS)[0], now=0.0)


# ---------------------------------------------------------------- early answers


def test_a_queued_request_is_answered_when_its_latest_start_passes() -> None:
    model = make_model(profile={1: 20_000.0})
    w = make_worker()
    s = scheduler(w)
    hold(s, w, model)
    busy_until(s, w, 10.0)  # its only worker is busy: the request waits
    (r,) = make_requests(model, 1, deadline=100 * MS)
    busy_until(s, w, 0.0)
    s.add_request(r, now=0.0)
    busy_until(s, w, 10.0)
    assert s.next_wakeup(now=0.0) == pytest.approx(80 * MS)  # its latest start
    assert s.schedule(now=50 * MS) == [] and s.queued() == 1
    s.schedule(now=81 * MS)
    assert answered(s) == {r.rid: Status.DEADLINE_EXPIRED}
    assert s.queued() == 0 and s.counters["answered_early"] == 1


def test_a_batch_that_would_end_late_on_its_worker_is_answered_early() -> None:
    model = make_model(profile={1: 30_000.0})
    w = make_worker()
    s = scheduler(w)
    hold(s, w, model)
    (r,) = make_requests(model, 1, deadline=1.0)
    s.add_request(r, now=0.0)
    busy_until(s, w, 0.99)  # its worker frees up 10 ms before the deadline
    assert s.schedule(now=0.989) == []
    assert answered(s) == {r.rid: Status.DEADLINE_EXPIRED}


def measured(run_us: float) -> tuple[PredictiveScheduler, WorkerState, object]:
    """A scheduler and its one worker holding a model whose ten runs took `run_us`."""
    model = make_model(max_batch=1)
    predictor = Predictor()
    predictor.seed_exec(model.sha256, "cpu", {1: [run_us] * 10})
    w = make_worker()
    s = scheduler(w, predictor=predictor)
    hold(s, w, model)
    return s, w, model


def test_a_slower_run_answers_at_once_the_requests_it_makes_late() -> None:
    s, _, model = measured(10_000.0)
    (running,) = make_requests(model, 1, deadline=1.0)
    s.add_request(running, now=0.0)
    (infer,) = infers(s.schedule(now=0.0))
    (waiting,) = make_requests(model, 1, deadline=40 * MS)
    s.add_request(waiting, now=0.0)  # behind it: 10 + 10 ms, in time
    s.on_result(infer, make_result(infer, exec_us=50_000), now=10 * MS)  # it took 50
    assert s.counters["replans"] == 1
    s.schedule(now=10 * MS)  # 30 ms left, 50 ms to run: answered now, not at 30 ms
    assert answered(s) == {waiting.rid: Status.DEADLINE_EXPIRED}


def test_a_drift_to_faster_runs_is_followed_at_once() -> None:
    s, _, model = measured(50_000.0)
    for now in (0.0, 0.1, 0.2):  # three runs take 10 ms instead of 50
        (r,) = make_requests(model, 1, deadline=now + 1.0)
        s.add_request(r, now=now)
        (infer,) = infers(s.schedule(now=now))
        s.on_result(infer, make_result(infer, exec_us=10_000), now + 10 * MS)
    assert s.exec_s(model, 1) == pytest.approx(10 * MS)  # not the 50 of the window's max
    s.add_request(make_requests(model, 1, deadline=0.3 + 20 * MS)[0], now=0.3)  # admitted


# ---------------------------------------------------------------- order and batches


def test_the_most_urgent_model_goes_first() -> None:
    a, b = make_model("a", profile={1: 1_000.0}), make_model("b", profile={1: 1_000.0})
    w = make_worker()
    s = scheduler(w)
    hold(s, w, a, b)
    s.add_request(make_requests(a, 1, deadline=500 * MS, arrival=0.0)[0], now=0.0)
    s.add_request(make_requests(b, 1, deadline=50 * MS, arrival=0.01)[0], now=0.0)
    assert infers(s.schedule(now=0.02))[0].sha256 == b.sha256  # later, but more urgent


def test_requests_within_a_model_queue_by_deadline() -> None:
    model = make_model(profile={1: 1_000.0}, max_batch=1)
    w = make_worker()
    s = scheduler(w)
    hold(s, w, model)
    (late,) = make_requests(model, 1, deadline=900 * MS)
    (soon,) = make_requests(model, 1, deadline=100 * MS)
    s.add_request(late, now=0.0)
    s.add_request(soon, now=0.0)
    assert infers(s.schedule(now=0.0))[0].requests == [soon]


def test_tenant_weights_break_equal_urgency() -> None:
    a = make_model("a", profile={1: 1_000.0}, tenant="light")
    b = make_model("b", profile={1: 1_000.0}, tenant="heavy")
    w = make_worker()
    s = scheduler(w, weight=lambda t: 4.0 if t == "heavy" else 1.0)
    hold(s, w, a, b)
    s.add_request(make_requests(a, 1, deadline=100 * MS)[0], now=0.0)
    s.add_request(make_requests(b, 1, deadline=100 * MS, arrival=0.01)[0], now=0.0)
    assert infers(s.schedule(now=0.0))[0].sha256 == b.sha256


def test_the_batch_is_the_largest_that_meets_its_earliest_deadline() -> None:
    model = make_model(profile={1: 10_000.0, 2: 15_000.0, 4: 40_000.0, 8: 100_000.0})
    w = make_worker()
    s = scheduler(w)
    hold(s, w, model)
    for r in make_requests(model, 8, deadline=1.0):
        s.add_request(r, now=0.0)
    (infer,) = infers(s.schedule(now=0.0))
    assert len(infer.requests) == 8  # 100 ms: fits
    assert infer.expected_duration == pytest.approx(0.1)
    assert infer.latest == pytest.approx(0.9)  # the latest it may start

    s = scheduler(w)
    hold(s, w, model)
    for r in make_requests(model, 8, deadline=1.0):
        s.add_request(r, now=0.0)
    # 60 ms left at 0.94: 4 rows (40 ms) now; the 2 that still fit behind them (15 ms,
    # ending at 55 ms) go when the executor frees; the last 2 cannot end in time
    assert [len(a.requests) for a in infers(s.schedule(now=0.94))] == [4]
    assert [len(a.requests) for a in infers(s.schedule(now=0.98))] == [2]
    assert s.queued() == 2 and not s.failed  # they may still start alone, until 0.99
    s.schedule(now=0.991)
    assert s.queued() == 0 and len(answered(s)) == 2


# ---------------------------------------------------------------- timelines and loads


def test_a_batch_waits_for_its_worker_within_the_look_ahead() -> None:
    model = make_model(profile={1: 10_000.0})
    w = make_worker()
    s = scheduler(w)
    hold(s, w, model)
    (r,) = make_requests(model, 1, deadline=1.0)
    s.add_request(r, now=0.0)
    busy_until(s, w, 100 * MS)
    assert s.schedule(now=0.0) == []  # not yet: more requests may join its batch
    assert s.next_wakeup(now=0.0) == pytest.approx(100 * MS - LOOKAHEAD_S)
    (infer,) = s.schedule(now=100 * MS - LOOKAHEAD_S)
    assert infer.requests == [r]
    assert plan(s, w).lanes == [pytest.approx(110 * MS)]


def test_the_load_goes_to_the_loader_while_the_executor_is_busy() -> None:
    running, nxt = make_model("a", profile={1: 50_000.0}), make_model("b", profile={1: 1_000.0})
    nxt.measurements = {"build_us": [20_000], "prepare_us": 0}
    w = make_worker()
    s = scheduler(w)
    s.seed(nxt)
    hold(s, w, running)
    busy_until(s, w, 50 * MS)
    (r,) = make_requests(nxt, 1, deadline=1.0)
    s.add_request(r, now=0.0)
    (load,) = s.schedule(now=0.0)  # the loader is free: the load starts now
    assert load.kind is ActionKind.LOAD and load.expected_duration == pytest.approx(20 * MS)
    assert plan(s, w).loader_free == pytest.approx(20 * MS)
    assert s.next_wakeup(now=0.0) == pytest.approx(50 * MS - LOOKAHEAD_S)
    (infer,) = s.schedule(now=50 * MS - LOOKAHEAD_S)  # the executor frees: the batch goes
    assert infer.requests == [r]
    assert plan(s, w).lanes == [pytest.approx(51 * MS)]  # after the running batch


def test_a_result_re_times_its_worker_from_the_clock() -> None:
    model = make_model(profile={1: 30_000.0})
    w = make_worker()
    s = scheduler(w)
    hold(s, w, model)
    (r,) = make_requests(model, 1, deadline=1.0)
    s.add_request(r, now=0.0)
    (infer,) = infers(s.schedule(now=0.0))
    assert plan(s, w).lanes == [pytest.approx(30 * MS)]
    s.on_result(infer, make_result(infer, exec_us=12_000), now=12 * MS)
    assert plan(s, w).lanes == [pytest.approx(12 * MS)]  # done early: free now


def test_a_hot_model_is_replicated_when_another_worker_starts_it_sooner() -> None:
    model = make_model(profile={1: 10_000.0})
    model.measurements = {"build_us": [5_000]}
    busy, idle = make_worker("w0"), make_worker("w1")
    s = scheduler(busy, idle)
    s.seed(model)
    hold(s, busy, model)
    busy_until(s, busy, 5.0)  # w0's timeline is full for five seconds
    s.add_request(make_requests(model, 1, deadline=200 * MS)[0], now=0.0)
    actions = s.schedule(now=0.0)
    assert [(a.kind, a.worker.name) for a in actions] == [
        (ActionKind.LOAD, "w1"), (ActionKind.INFER, "w1")]  # fmt: skip
    assert set(s.holders[model.sha256]) == {b"w0", b"w1"}


def test_the_holder_is_used_while_it_starts_the_batch_sooner() -> None:
    model = make_model(profile={1: 10_000.0})
    model.measurements = {"build_us": [50_000]}
    holder, other = make_worker("w0"), make_worker("w1")
    s = scheduler(holder, other)
    s.seed(model)
    hold(s, holder, model)
    busy_until(s, holder, 1 * MS)  # frees in 1 ms; a load elsewhere takes 50
    s.add_request(make_requests(model, 1, deadline=200 * MS)[0], now=0.0)
    assert [a.worker.name for a in s.schedule(now=0.0)] == ["w0"]


def test_an_idle_replica_is_released_and_the_last_one_kept() -> None:
    model = make_model(profile={1: 1_000.0})
    w0, w1 = make_worker("w0"), make_worker("w1")
    s = scheduler(w0, w1)
    hold(s, w0, model)
    hold(s, w1, model)
    plan(s, w0).last_used[model.sha256] = 1.0
    plan(s, w1).last_used[model.sha256] = 0.5
    assert s.schedule(now=1.0) == []  # both used recently
    (unload,) = s.schedule(now=0.5 + REPLICA_IDLE_S + 1.0)
    assert (unload.kind, unload.worker.name) == (ActionKind.UNLOAD, "w1")
    assert set(s.holders[model.sha256]) == {b"w0"}
    assert s.schedule(now=100.0) == []  # the last holder stays
    assert s.counters["replicas_released"] == 1


def test_eviction_spares_models_with_queued_work() -> None:
    a, b, c = (make_model(n, profile={1: 1_000.0}, size=400) for n in "abc")
    w = make_worker(budget=800)
    s = scheduler(w)
    hold(s, w, a, b)  # a is least recently used
    busy_until(s, w, 0.0)
    s.add_request(make_requests(a, 1, deadline=math.inf)[0], now=0.0)
    s.add_request(make_requests(c, 1, deadline=math.inf)[0], now=0.0)
    evicted = [x.sha256 for x in s.schedule(now=0.0) if x.kind is ActionKind.UNLOAD]
    assert evicted == [b.sha256]  # not a: it has a request waiting


# ---------------------------------------------------------------- objectives


def test_latency_objective_runs_the_shortest_job_per_waiting_request_first() -> None:
    slow, quick = make_model("slow", profile={1: 50_000.0}), make_model("q", profile={1: 1_000.0})
    w = make_worker()
    s = scheduler(w, objective="latency")
    hold(s, w, slow, quick)
    s.add_request(make_requests(slow, 1, arrival=0.0)[0], now=0.0)
    s.add_request(make_requests(quick, 1, arrival=0.01)[0], now=0.01)
    assert infers(s.schedule(now=0.01))[0].sha256 == quick.sha256

    fifo = scheduler(w, objective="deadline")  # arrival order without deadlines
    hold(fifo, w, slow, quick)
    fifo.add_request(make_requests(slow, 1, arrival=0.0)[0], now=0.0)
    fifo.add_request(make_requests(quick, 1, arrival=0.01)[0], now=0.01)
    assert infers(fifo.schedule(now=0.01))[0].sha256 == slow.sha256


def test_latency_objective_does_not_starve_a_long_job() -> None:
    slow, quick = make_model("slow", profile={1: 50_000.0}), make_model("q", profile={1: 1_000.0})
    w = make_worker()
    s = scheduler(w, objective="latency")
    hold(s, w, slow, quick)
    s.add_request(make_requests(slow, 1, arrival=0.0)[0], now=0.0)
    s.add_request(make_requests(quick, 1, arrival=1.5)[0], now=1.5)
    assert infers(s.schedule(now=1.5))[0].sha256 == slow.sha256  # waited past the guard


def test_an_unknown_objective_is_refused() -> None:
    with pytest.raises(ValueError, match="objective"):
        PredictiveScheduler(10, objective="cheapest")


# ---------------------------------------------------------------- invariants


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("add"), st.integers(0, 3), st.integers(1, 3), st.integers(5, 400)),
            st.tuples(st.just("finish"), st.integers(0, 7), st.floats(0.5, 2.0)),
            st.tuples(st.just("tick"), st.integers(0, 30)),
        ),
        max_size=60,
    ),
    budgets=st.lists(st.integers(1000, 4000), min_size=1, max_size=3),
)
def test_invariants_under_random_traffic(ops: list[tuple], budgets: list[int]) -> None:
    """Budgets and batch caps hold, every batch sent is predicted to meet the earliest
    deadline in it, and every request is dispatched, answered or queued exactly once."""
    profiles = [{1: 5_000.0, 4: 12_000.0}, {1: 20_000.0}, {1: 2_000.0, 8: 9_000.0}, {1: 1e3}]
    models = [
        make_model(f"m{i}", size=size, max_batch=cap, profile=profiles[i])
        for i, (size, cap) in enumerate([(1000, 4), (1500, 1), (800, 8), (2500, 2)])
    ]
    workers = [make_worker(f"w{i}", budget=b) for i, b in enumerate(budgets)]
    s = scheduler(*workers)
    now = 0.0
    added, refused, dispatched = set(), set(), []
    running: list[Action] = []
    for op in ops:
        if op[0] == "add":
            _, m, batch, budget_ms = op
            (r,) = make_requests(
                models[m], 1, batch=batch, arrival=now, deadline=now + budget_ms * MS
            )
            added.add(r.rid)
            try:
                s.add_request(r, now)
            except DeadlineUnmeetable:
                refused.add(r.rid)
        elif op[0] == "finish" and running:
            action = running.pop(op[1] % len(running))
            now += action.expected_duration * op[2]
            s.on_result(
                action, make_result(action, exec_us=int(action.expected_duration * 1e6)), now
            )
        else:
            now += op[1] * MS
        for action in s.schedule(now):
            if action.kind is ActionKind.INFER:
                dispatched += [r.rid for r in action.requests]
                rows = sum(r.batch for r in action.requests)
                assert len(action.requests) == 1 or rows <= action.requests[0].model.max_batch
                assert action.latest >= now - 1e-9  # it can still start in time
            if action.kind is not ActionKind.UNLOAD:
                running.append(action)
        for w in workers:
            p = plan(s, w)
            assert p.memory_used() == sum(p.loaded.values()) <= w.memory_budget
    failed = [r.rid for r, _ in s.failed]
    queued = [r.rid for q in s.queues.values() for r in q if r.queued]
    assert len(dispatched) == len(set(dispatched))
    assert sorted(dispatched + failed + queued) == sorted(added - refused)
    assert s.queued() == len(queued)
    assert s._by_lane == sorted((min(p.lanes), w) for w, p in s.plans.items())
    planned = sum(1 for q in s.queues.values() for r in q if r.queued and r.booked)
    assert sum(book.entries for book in s.books.values()) == planned
    for p in s.plans.values():  # the pinned bytes are what the pins hold
        assert p.pinned == sum(p.loaded.get(sha, 0) for sha in p.pins)


# ---------------------------------------------------------------- plans per worker


def test_each_request_is_planned_on_a_worker_and_queues_there() -> None:
    model = make_model(profile={1: 10_000.0}, max_batch=1)
    w0, w1 = make_worker("w0"), make_worker("w1")
    s = scheduler(w0, w1)
    hold(s, w0, model)
    hold(s, w1, model)
    requests = make_requests(model, 4, deadline=1.0)
    for r in requests:
        s.add_request(r, now=0.0)
    assert [r.plan for r in requests] == [b"w0", b"w1", b"w0", b"w1"]  # spread by planned work
    assert plan(s, w0).pins[model.sha256] == 2  # planned requests keep the model there
    busy_until(s, w0, 10.0)  # w0 stalls: w1 still serves what was planned on it
    (infer,) = infers(s.schedule(now=0.0))
    assert infer.worker is w1 and infer.requests == [requests[1]]


def test_a_model_planned_on_a_worker_is_not_evicted_there() -> None:
    a, b = make_model("a", profile={1: 1_000.0}, size=600), make_model("b", size=600)
    w = make_worker(budget=1000)
    s = scheduler(w)
    hold(s, w, a)
    s.add_request(make_requests(a, 1, deadline=1.0)[0], now=0.0)
    assert not plan(s, w).can_fit(b.size)  # a has a request planned: it stays


def test_a_refused_request_still_loads_its_model_for_the_next_ones() -> None:
    model = make_model(profile={1: 1_000.0})
    model.measurements = {"build_us": [80_000], "prepare_us": 0}
    w = make_worker()
    s = scheduler(w)
    s.seed(model)
    with pytest.raises(DeadlineUnmeetable):
        s.add_request(make_requests(model, 1, deadline=20 * MS)[0], now=0.0)
    (load,) = s.schedule(now=0.0)
    assert load.kind is ActionKind.LOAD and s.counters["warm_loads"] == 1
    s.on_result(load, make_result(load, load_us=80_000), now=80 * MS)
    s.add_request(make_requests(model, 1, deadline=0.1)[0], now=80 * MS)  # admitted now


def admitted_of(s: PredictiveScheduler, requests: list[PendingRequest]) -> int:
    """How many of `requests`, added at time 0, admission takes."""
    ok = 0
    for r in requests:
        try:
            s.add_request(r, now=0.0)
            ok += 1
        except DeadlineUnmeetable:
            pass
    return ok


def test_wait_slack_refuses_what_would_finish_just_in_time_after_a_long_wait() -> None:
    model = make_model(profile={1: 10_000.0}, max_batch=1)
    for slack, admitted in ((0.0, 5), (0.25, 4)):
        w = make_worker()
        s = scheduler(w, wait_slack=slack)
        hold(s, w, model)
        # the fifth waits 40 ms: 40 + 10 ends at 50, plus 10 of slack
        assert admitted_of(s, make_requests(model, 5, deadline=50 * MS)) == admitted


def test_no_slack_for_a_tenant_within_its_share_while_another_is_held() -> None:
    """Five 10 ms requests with 50 ms deadlines: slack 0.25 refuses the fifth, unless the
    fair share holds another tenant, whose queued work would give way."""
    from broker.fairshare import FairShare

    model = make_model(profile={1: 10_000.0}, max_batch=1)
    for holding, admitted in ((False, 4), (True, 5)):
        w = make_worker()
        fair = FairShare(lambda tenant: 1.0)
        s = scheduler(w, wait_slack=0.25, fair=fair)
        fair.holding = lambda now, on=holding: on  # the fair share's own test covers when
        hold(s, w, model)
        assert admitted_of(s, make_requests(model, 5, deadline=50 * MS)) == admitted


def test_next_wakeup_never_asks_for_a_busy_loop() -> None:
    model = make_model(profile={1: 10_000.0}, max_batch=1)
    w = make_worker()
    s = scheduler(w)
    hold(s, w, model)
    for r in make_requests(model, 4, deadline=1.0):
        s.add_request(r, now=0.0)
    s.schedule(now=0.0)
    s.schedule(now=0.0)  # its executor is planned busy: wake when it frees, not now
    assert s.next_wakeup(now=0.0) == pytest.approx(10 * MS - LOOKAHEAD_S)


def test_a_long_run_never_takes_the_last_free_executor() -> None:
    big = make_model("big", profile={1: 40_000.0}, max_batch=1)
    tiny = make_model("tiny", profile={1: 100.0})
    w = make_worker(lanes=2)
    s = scheduler(w)
    hold(s, w, big, tiny)
    s.add_request(make_requests(tiny, 1, deadline=10 * MS)[0], now=0.0)  # a tight deadline
    infers(s.schedule(now=0.0))
    for r in make_requests(big, 2, deadline=1.0):
        s.add_request(r, now=0.0)
    sent = infers(s.schedule(now=0.0))
    assert [a.sha256 for a in sent] == [big.sha256] and sent[0].long  # one long run only
    (urgent,) = make_requests(tiny, 1, deadline=10 * MS)
    s.add_request(urgent, now=1 * MS)
    (infer,) = infers(s.schedule(now=1 * MS))  # the free executor takes it at once
    assert infer.requests == [urgent] and not infer.long


def test_latency_objective_ends_a_pass_when_its_workers_are_busy() -> None:
    a, b = make_model("a", profile={1: 5_000.0}), make_model("b", profile={1: 1_000.0})
    for m in (a, b):
        m.measurements = {"build_us": [50_000], "prepare_us": 0}  # a load elsewhere: 50 ms
    w0, w1 = make_worker("w0"), make_worker("w1")
    s = scheduler(w0, w1, objective="latency")
    s.seed(a)
    s.seed(b)
    hold(s, w0, a, b)
    busy_until(s, w0, 10 * MS)  # the holder frees in 10 ms: better than w1 after a load
    for r in make_requests(a, 2) + make_requests(b, 2):
        s.add_request(r, now=0.0)
    assert s.schedule(now=0.0) == []  # each queue tried once, then the pass ends
    assert s.queued() == 4 and s.next_wakeup(now=0.0) == pytest.approx(10 * MS - LOOKAHEAD_S)
