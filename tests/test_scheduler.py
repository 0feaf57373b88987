"""FifoLruScheduler: FIFO order, batching, load/evict decisions, pipelining, admission."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.fifo import EXPIRE_PERIOD, PIPELINE_DEPTH, FifoLruScheduler
from broker.scheduler import WorkerPlan
from broker.scheduler import make_scheduler as scheduler_named
from broker.state import Action, ActionKind, PendingRequest, WorkerState
from mtcore.errors import DeadlineUnmeetable, LoadFailed, Overloaded, Status
from tests.factories import make_model, make_requests, make_result, make_scheduler, make_worker


def add_all(sched: FifoLruScheduler, requests: list[PendingRequest], now: float = 0.0) -> None:
    for request in requests:
        sched.add_request(request, now)


def finish(action: Action, sched: FifoLruScheduler, ok: bool = True, evicted=()) -> None:
    """A worker's typed result for an action the scheduler still has in flight."""
    assert plan(sched, action.worker).inflight[action.id] is action
    sched.on_result(action, make_result(action, ok, evicted=evicted), 0.0)


def finish_all(actions: list[Action], sched: FifoLruScheduler) -> None:
    for action in actions:
        if action.id in plan(sched, action.worker).inflight:
            finish(action, sched)


def plan(sched: FifoLruScheduler, worker: WorkerState) -> WorkerPlan:
    return sched.plans[worker.wid]


def expire(sched: FifoLruScheduler, now: float) -> list[PendingRequest]:
    """Requests the scheduler answered as expired by `now` (one scan is due per period)."""
    sched._next_expiry = 0.0
    sched.schedule(now) if not sched.plans else sched._expire(now)
    failed, sched.failed = sched.failed, []
    return [r for r, e in failed if e.status is Status.DEADLINE_EXPIRED]


def kinds(actions: list[Action]) -> list[tuple[ActionKind, str]]:
    return [(a.kind, a.sha256) for a in actions]


def infers(actions: list[Action]) -> list[Action]:
    return [a for a in actions if a.kind is ActionKind.INFER]


def rids(action: Action) -> list[int]:
    return [r.rid for r in action.requests]


def setup(*workers: WorkerState, **kwargs) -> FifoLruScheduler:
    sched = make_scheduler(**kwargs)
    for worker in workers or (make_worker(),):
        sched.add_worker(worker, 0.0)
    return sched


# ---------------------------------------------------------------- factories and interface


def test_factories() -> None:
    model = make_model()
    assert model.batchable and model.max_batch == 8 and len(model.sha256) == 64
    assert make_model("other").sha256 != model.sha256
    assert not make_model(max_batch=1).batchable
    reqs = make_requests(model, 3, batch=2, deadline=5.0, arrival=1.0)
    assert [r.rid for r in reqs] == list(range(reqs[0].rid, reqs[0].rid + 3))
    assert all(r.batch == 2 and r.deadline == 5.0 and r.arrival == 1.0 for r in reqs)
    assert reqs[0].inputs[0].shape == (2, 4) and len(reqs[0].frames[0]) == 32
    worker = make_worker("w1", budget=5)
    assert worker.wid == b"w1" and worker.memory_budget == 5
    assert make_scheduler().queued() == 0


def test_make_scheduler_by_name() -> None:
    assert isinstance(scheduler_named("fifo", 10, lambda rid: True), FifoLruScheduler)
    with pytest.raises(ValueError, match="unknown scheduler"):
        scheduler_named("nope", 10, lambda rid: True)


def test_nothing_to_do() -> None:
    sched = setup()
    assert sched.schedule(0.0) == []
    assert expire(sched, 1e9) == []
    assert sched.failed == []


def test_no_worker_keeps_requests_queued() -> None:
    sched = make_scheduler()
    add_all(sched, make_requests(make_model(), 3))
    assert sched.schedule(0.0) == []
    assert sched.queued() == 3
    sched.add_worker(make_worker(), 0.0)
    assert len(infers(sched.schedule(0.0))) == 1  # batchable: all three in one batch
    assert sched.queued() == 0


# ---------------------------------------------------------------- order


def test_fifo_across_models_by_head_arrival() -> None:
    a, b, c = (make_model(n, max_batch=1) for n in "abc")
    ra = make_requests(a, 1, arrival=2.0)
    rb = make_requests(b, 1, arrival=1.0)
    rc = make_requests(c, 1, arrival=3.0)
    sched = setup(make_worker("w0"), make_worker("w1"))
    add_all(sched, ra + rc + rb)  # queue insertion order differs from arrival order
    order = [a.sha256 for a in infers(sched.schedule(0.0))]
    assert order == [b.sha256, a.sha256, c.sha256]


def test_fifo_within_a_model() -> None:
    model = make_model(max_batch=1)
    reqs = make_requests(model, 5)
    sched = setup()
    add_all(sched, reqs)
    seen: list[int] = []
    for _ in range(5):
        actions = sched.schedule(0.0)
        seen += [rid for a in infers(actions) for rid in rids(a)]
        finish_all(actions, sched)
    assert seen == [r.rid for r in reqs]


def test_older_model_served_first_when_slots_are_scarce() -> None:
    old, new = make_model("old", max_batch=1), make_model("new", max_batch=1)
    sched = setup()
    add_all(sched, make_requests(new, 2, arrival=5.0))
    add_all(sched, make_requests(old, 2, arrival=1.0))
    first = infers(sched.schedule(0.0))
    assert [a.sha256 for a in first] == [old.sha256] * PIPELINE_DEPTH
    finish_all(first, sched)
    assert {a.sha256 for a in infers(sched.schedule(0.0))} == {new.sha256}


# ---------------------------------------------------------------- batching


def test_batch_up_to_max_batch() -> None:
    model = make_model(max_batch=4)
    reqs = make_requests(model, 10)
    sched = setup()
    add_all(sched, reqs)
    batches = infers(sched.schedule(0.0))
    assert [rids(a) for a in batches] == [
        [r.rid for r in reqs[0:4]],
        [r.rid for r in reqs[4:8]],
    ]
    assert sched.queued() == 2  # the pipeline is full


def test_batch_counts_rows_not_requests() -> None:
    model = make_model(max_batch=8)
    reqs = make_requests(model, 3, batch=3)
    sched = setup()
    add_all(sched, reqs)
    batches = infers(sched.schedule(0.0))
    assert [rids(a) for a in batches] == [[reqs[0].rid, reqs[1].rid], [reqs[2].rid]]
    assert all(sum(r.batch for r in a.requests) <= 8 for a in batches)


def test_request_larger_than_cap_runs_alone() -> None:
    model = make_model(max_batch=4)
    big = make_requests(model, 1, batch=10)
    small = make_requests(model, 2)
    sched = setup()
    add_all(sched, big + small)
    batches = infers(sched.schedule(0.0))
    assert [rids(a) for a in batches] == [[big[0].rid], [r.rid for r in small]]


def test_batch_never_mixes_stack_keys() -> None:
    model = make_model(max_batch=8)
    r4a = make_requests(model, 2, shape=(4,))
    r5 = make_requests(model, 1, shape=(5,))
    r4b = make_requests(model, 1, shape=(4,))
    i64 = make_requests(model, 1, shape=(4,), dtype="int64")
    sched = setup(make_worker("w0"), make_worker("w1"), make_worker("w2"))
    add_all(sched, r4a + r5 + r4b + i64)
    batches = infers(sched.schedule(0.0))
    for action in batches:
        assert len({r.stack_key for r in action.requests}) == 1
    # FIFO is kept: a request that cannot join the head's batch ends it
    assert [rids(a) for a in batches] == [
        [r.rid for r in r4a],
        [r5[0].rid],
        [r4b[0].rid],
        [i64[0].rid],
    ]


def test_non_batchable_runs_one_request_per_action() -> None:
    model = make_model(max_batch=1)
    sched = setup(make_worker("w0"), make_worker("w1"))
    add_all(sched, make_requests(model, 4))
    batches = infers(sched.schedule(0.0))
    assert len(batches) == 4
    assert all(len(a.requests) == 1 for a in batches)


def test_infer_carries_earliest_deadline_and_dispatch_time() -> None:
    model = make_model()
    sched = setup()
    reqs = make_requests(model, 1, deadline=9.0) + make_requests(model, 1, deadline=4.0)
    add_all(sched, reqs)
    (infer,) = infers(sched.schedule(2.0))
    assert infer.latest == 4.0
    assert all(r.dispatched == 2.0 for r in reqs)
    add_all(sched, make_requests(model, 1))
    (infer,) = infers(sched.schedule(3.0))
    assert math.isinf(infer.latest)


# ---------------------------------------------------------------- load and eviction


def test_load_precedes_first_infer_and_is_not_repeated() -> None:
    model = make_model(max_batch=1)
    worker = make_worker()
    sched = setup(worker)
    add_all(sched, make_requests(model, 3))
    first = sched.schedule(0.0)
    assert kinds(first) == [
        (ActionKind.LOAD, model.sha256),
        (ActionKind.INFER, model.sha256),
        (ActionKind.INFER, model.sha256),
    ]
    assert all(a.worker is worker for a in first)
    assert (
        list(plan(sched, worker).loaded) == [model.sha256]
        and plan(sched, worker).memory_used() == model.size
    )
    finish_all(first, sched)
    assert kinds(sched.schedule(0.0)) == [(ActionKind.INFER, model.sha256)]


def test_worker_holding_the_model_is_preferred() -> None:
    model = make_model()
    w0, w1 = make_worker("w0"), make_worker("w1")
    sched = setup(w0, w1)
    add_all(sched, make_requests(model, 1))
    first = sched.schedule(0.0)
    holder = first[0].worker
    finish_all(first, sched)
    add_all(sched, make_requests(model, 1))
    (infer,) = sched.schedule(0.0)
    assert infer.kind is ActionKind.INFER and infer.worker is holder


def _run_model(sched: FifoLruScheduler, model, now: float = 0.0) -> list[Action]:
    add_all(sched, make_requests(model, 1))
    actions = sched.schedule(now)
    finish_all(actions, sched)
    return actions


def test_lru_eviction() -> None:
    a, b, c = (make_model(n, size=1000) for n in "abc")
    worker = make_worker(budget=2500)
    sched = setup(worker)
    _run_model(sched, a)
    _run_model(sched, b)
    assert kinds(_run_model(sched, a)) == [(ActionKind.INFER, a.sha256)]  # a is now recent
    actions = _run_model(sched, c)
    assert kinds(actions) == [
        (ActionKind.UNLOAD, b.sha256),
        (ActionKind.LOAD, c.sha256),
        (ActionKind.INFER, c.sha256),
    ]
    assert list(plan(sched, worker).loaded) == [a.sha256, c.sha256]
    assert plan(sched, worker).memory_used() <= worker.memory_budget


def test_eviction_frees_enough_for_a_big_model() -> None:
    small = [make_model(f"s{i}", size=1000) for i in range(3)]
    big = make_model("big", size=2500)
    worker = make_worker(budget=3000)
    sched = setup(worker)
    for model in small:
        _run_model(sched, model)
    actions = _run_model(sched, big)
    assert kinds(actions) == [
        (ActionKind.UNLOAD, small[0].sha256),
        (ActionKind.UNLOAD, small[1].sha256),
        (ActionKind.UNLOAD, small[2].sha256),
        (ActionKind.LOAD, big.sha256),
        (ActionKind.INFER, big.sha256),
    ]
    assert list(plan(sched, worker).loaded) == [big.sha256]


def test_eviction_skips_models_in_use() -> None:
    a, b, c = (make_model(n, size=1000, max_batch=1) for n in "abc")
    worker = make_worker(budget=2500)
    sched = setup(worker)
    _run_model(sched, a)
    _run_model(sched, b)  # loaded: a (least recent), b
    add_all(sched, make_requests(a, 1))
    running_a = sched.schedule(0.0)  # a is in use (and now most recent)
    assert kinds(running_a) == [(ActionKind.INFER, a.sha256)]
    add_all(sched, make_requests(b, 1))
    running_b = sched.schedule(0.0)
    finish(running_b[0], sched)  # b done; a still running; b is now the most recent
    add_all(sched, make_requests(c, 1))
    actions = sched.schedule(0.0)
    assert kinds(actions)[0] == (ActionKind.UNLOAD, b.sha256)
    assert a.sha256 in plan(sched, worker).loaded and c.sha256 in plan(sched, worker).loaded
    assert plan(sched, worker).memory_used() <= worker.memory_budget


def test_worker_reported_eviction_forces_reload() -> None:
    model = make_model()
    worker = make_worker()
    sched = setup(worker)
    add_all(sched, make_requests(model, 1))
    load, infer = sched.schedule(0.0)
    finish(load, sched)
    finish(infer, sched, evicted=[model.sha256])  # the worker dropped it under pressure
    assert model.sha256 not in plan(sched, worker).loaded
    assert [a.kind for a in _run_model(sched, model)] == [ActionKind.LOAD, ActionKind.INFER]


def test_failed_load_forgets_the_model() -> None:
    model = make_model()
    worker = make_worker()
    sched = setup(worker)
    add_all(sched, make_requests(model, 1))
    load, infer = sched.schedule(0.0)
    finish(load, sched, ok=False)
    finish(infer, sched, ok=False)
    assert model.sha256 not in plan(sched, worker).loaded and plan(sched, worker).memory_used() == 0
    assert [a.kind for a in _run_model(sched, model)] == [ActionKind.LOAD, ActionKind.INFER]


def test_model_bigger_than_every_budget_fails_with_load_failed() -> None:
    model = make_model(size=20_000, max_batch=1)
    big_ok = make_model("fits", size=100)
    reqs = make_requests(model, 2)
    sched = setup(make_worker("w0", budget=10_000), make_worker("w1", budget=15_000))
    add_all(sched, reqs)
    add_all(sched, make_requests(big_ok, 1, arrival=1.0))
    actions = sched.schedule(0.0)
    assert kinds(actions) == [(ActionKind.LOAD, big_ok.sha256), (ActionKind.INFER, big_ok.sha256)]
    assert [r for r, _ in sched.failed] == reqs
    for _, exc in sched.failed:
        assert isinstance(exc, LoadFailed) and exc.status == Status.LOAD_FAILED
        assert "20000 bytes" in exc.message
    assert sched.queued() == 0
    assert not sched.has_work(model.sha256)


def test_model_placed_on_a_worker_whose_budget_fits() -> None:
    """A small worker must not doom a model that a bigger worker can hold."""
    model = make_model(size=1000)
    small, big = make_worker("small", budget=500), make_worker("big", budget=5000)
    sched = setup(small, big)  # both idle and empty: `small` wins the emptiest-worker tie
    reqs = make_requests(model, 1)
    add_all(sched, reqs)
    actions = sched.schedule(0.0)
    assert sched.failed == []
    assert kinds(actions) == [(ActionKind.LOAD, model.sha256), (ActionKind.INFER, model.sha256)]
    assert all(a.worker is big for a in actions)


def test_model_waits_while_models_in_use_block_its_load() -> None:
    """A model that fits the budget waits for running work to end; it is not failed."""
    a, b = make_model("a", size=1000, max_batch=1), make_model("b", size=1000, max_batch=1)
    worker = make_worker(budget=1500)
    sched = setup(worker)
    add_all(sched, make_requests(a, 1))
    load_a, infer_a = sched.schedule(0.0)
    finish(load_a, sched)  # a is loaded and its INFER is running
    reqs_b = make_requests(b, 1)
    add_all(sched, reqs_b)
    assert infers(sched.schedule(0.0)) == []
    assert sched.failed == []  # no LoadFailed: b fits once a is idle
    assert sched.has_work(b.sha256)
    finish(infer_a, sched)
    actions = sched.schedule(0.0)
    assert kinds(actions) == [
        (ActionKind.UNLOAD, a.sha256),
        (ActionKind.LOAD, b.sha256),
        (ActionKind.INFER, b.sha256),
    ]
    assert actions[-1].requests == reqs_b


# ---------------------------------------------------------------- pipelining


def test_pipeline_depth_per_worker() -> None:
    model = make_model(max_batch=1)
    worker = make_worker()
    sched = setup(worker)
    add_all(sched, make_requests(model, 5))
    first = sched.schedule(0.0)
    assert len(infers(first)) == PIPELINE_DEPTH
    assert plan(sched, worker).busy_infers() == PIPELINE_DEPTH
    assert sched.schedule(0.0) == []
    finish(first[0], sched)  # the LOAD result does not free an INFER slot
    assert first[0].kind is ActionKind.LOAD
    assert sched.schedule(0.0) == []
    finish(infers(first)[0], sched)
    assert len(infers(sched.schedule(0.0))) == 1
    assert plan(sched, worker).busy_infers() == PIPELINE_DEPTH
    assert sched.queued() == 5 - PIPELINE_DEPTH - 1


def test_pipeline_depth_spreads_over_workers() -> None:
    model = make_model(max_batch=1)
    w0, w1 = make_worker("w0"), make_worker("w1")
    sched = setup(w0, w1)
    add_all(sched, make_requests(model, 10))
    actions = sched.schedule(0.0)
    assert len(infers(actions)) == 2 * PIPELINE_DEPTH
    assert plan(sched, w0).busy_infers() == plan(sched, w1).busy_infers() == PIPELINE_DEPTH
    assert sched.queued() == 10 - 2 * PIPELINE_DEPTH


# ---------------------------------------------------------------- admission


def test_deadline_unmeetable_on_add() -> None:
    model = make_model(profile={1: 50_000.0})  # 50 ms per request
    sched = setup()
    (late,) = make_requests(model, 1, deadline=10.0 + 0.010)
    with pytest.raises(DeadlineUnmeetable) as info:
        sched.add_request(late, 10.0)
    assert info.value.status == Status.DEADLINE_UNMEETABLE
    assert isinstance(info.value, TimeoutError)
    assert sched.queued() == 0 and not sched.has_work(model.sha256)
    (ok,) = make_requests(model, 1, deadline=10.0 + 0.100)
    sched.add_request(ok, 10.0)
    assert sched.queued() == 1


def test_deadline_check_uses_the_request_rows() -> None:
    model = make_model(profile={1: 5_000.0, 8: 40_000.0})  # 5 ms for 1 row, 40 ms for 8
    sched = setup()
    (small,) = make_requests(model, 1, batch=1, deadline=0.020)
    sched.add_request(small, 0.0)
    (big,) = make_requests(model, 1, batch=8, deadline=0.020)
    with pytest.raises(DeadlineUnmeetable):
        sched.add_request(big, 0.0)
    assert sched.queued() == 1


def test_no_profile_no_deadline_check() -> None:
    sched = setup()
    (req,) = make_requests(make_model(), 1, deadline=10.000001)
    sched.add_request(req, 10.0)
    assert sched.queued() == 1


def test_overloaded_past_max_queue() -> None:
    model = make_model(max_batch=1)
    sched = setup(max_queue=3)
    add_all(sched, make_requests(model, 3))
    with pytest.raises(Overloaded) as info:
        sched.add_request(make_requests(model, 1)[0], 0.0)
    assert info.value.status == Status.OVERLOADED
    assert sched.queued() == 3
    sched.schedule(0.0)  # two leave the queue for the worker
    add_all(sched, make_requests(model, 2))
    assert sched.queued() == 3


# ---------------------------------------------------------------- expiry and dead requests


def test_expire_returns_requests_past_their_deadline() -> None:
    model = make_model()
    sched = setup()
    early = make_requests(model, 2, deadline=1.0)
    later = make_requests(model, 1, deadline=5.0)
    never = make_requests(model, 1)
    add_all(sched, early + later + never)
    assert expire(sched, 0.5) == []
    assert expire(sched, 2.0) == early
    assert sched.queued() == 2
    assert expire(sched, 6.0) == later
    (infer,) = infers(sched.schedule(6.0))
    assert infer.requests == never


def test_cancelled_requests_are_dropped_silently() -> None:
    model = make_model()
    sched = setup()
    reqs = make_requests(model, 4, deadline=1.0)
    add_all(sched, reqs)
    sched.cancel(reqs[0])
    sched.cancel(reqs[2])
    sched.cancel(reqs[2])  # twice is once
    assert sched.queued() == 2
    assert expire(sched, 2.0) == [reqs[1], reqs[3]]  # the cancelled ones are not answered
    assert sched.queued() == 0
    assert expire(sched, 3.0) == [] and sched.schedule(3.0) == []


def test_cancelled_requests_are_not_dispatched() -> None:
    model = make_model()
    other = make_model("other", max_batch=1)
    sched = setup()
    reqs = make_requests(model, 4)
    (late,) = make_requests(other, 1, arrival=1.0)
    add_all(sched, [*reqs, late])
    sched.cancel(reqs[0])  # a cancelled head and a cancelled follower
    sched.cancel(reqs[2])
    batches = infers(sched.schedule(0.0))
    assert [rids(a) for a in batches] == [[reqs[1].rid, reqs[3].rid], [late.rid]]
    assert sched.queued() == 0


def test_all_cancelled_queue_schedules_nothing() -> None:
    sched = setup()
    model = make_model()
    reqs = make_requests(model, 3)
    add_all(sched, reqs)
    for request in reqs:
        sched.cancel(request)
    assert sched.schedule(0.0) == []
    assert sched.queued() == 0 and not sched.has_work(model.sha256)


def test_expiry_is_a_periodic_scan_the_wakeup_announces() -> None:
    model = make_model()
    sched = setup(make_worker(budget=10))  # the model cannot load: requests stay queued
    assert sched.next_wakeup(0.0) == math.inf  # nothing can expire
    add_all(sched, make_requests(model, 1, deadline=0.01))
    sched.schedule(0.0)
    assert sched.next_wakeup(0.0) == pytest.approx(EXPIRE_PERIOD)


# ---------------------------------------------------------------- workers and models


def test_a_lost_workers_requests_are_retried_once() -> None:
    model = make_model(max_batch=2)
    worker = make_worker()
    sched = setup(worker)
    reqs = make_requests(model, 5)
    add_all(sched, reqs)
    actions = sched.schedule(0.0)
    lost = sched.remove_worker(worker, 0.0)
    assert {a.id for a in lost} == {a.id for a in actions if a.kind is not ActionKind.UNLOAD}
    assert sched.queued() == 5 and sched.failed == []  # 4 retried, ahead of the 5th
    assert all(r.retries == 1 for r in reqs[:4]) and reqs[4].retries == 0
    assert sched.schedule(0.0) == []  # no worker left
    replacement = make_worker("w1")
    sched.add_worker(replacement, 0.0)
    actions = sched.schedule(0.0)
    assert [a.kind for a in actions][:2] == [ActionKind.LOAD, ActionKind.INFER]
    assert rids(infers(actions)[0]) == [reqs[0].rid, reqs[1].rid]
    sched.remove_worker(replacement, 0.0)  # a second loss: those requests fail
    failed = {r.rid: e.status for r, e in sched.failed}
    assert failed == {r.rid: Status.WORKER_LOST for r in reqs[:4]}


def test_an_answered_request_is_not_retried() -> None:
    model = make_model()
    worker = make_worker()
    sched = setup(worker)
    (request,) = make_requests(model, 1)
    add_all(sched, [request])
    sched.schedule(0.0)
    request.answered = True  # e.g. the broker gave up on it
    sched.remove_worker(worker, 0.0)
    assert sched.queued() == 0 and sched.failed == []


def test_remove_worker_with_nothing_running() -> None:
    worker = make_worker()
    sched = setup(worker)
    assert sched.remove_worker(worker, 0.0) == []
    add_all(sched, make_requests(make_model(), 1))
    assert sched.schedule(0.0) == []


def test_a_model_missing_on_its_worker_is_reloaded_and_its_requests_retried() -> None:
    from mtcore.actions import ActionStatus

    model = make_model()
    worker = make_worker()
    sched = setup(worker)
    reqs = make_requests(model, 2)
    add_all(sched, reqs)
    load, infer = sched.schedule(0.0)
    assert sched.on_result(load, make_result(load), 0.0)
    missing = make_result(infer, status=ActionStatus.EXEC_MODEL_MISSING)
    assert sched.on_result(infer, missing, 0.0) is False  # the scheduler took them back
    assert model.sha256 not in plan(sched, worker).loaded and sched.queued() == 2
    assert [a.kind for a in sched.schedule(0.0)] == [ActionKind.LOAD, ActionKind.INFER]


def test_an_unanswered_action_gives_its_requests_another_go() -> None:
    model = make_model()
    worker = make_worker()
    sched = setup(worker)
    add_all(sched, make_requests(model, 1))
    load, infer = sched.schedule(0.0)
    assert sched.on_result(load, None, 0.0) is False
    assert sched.on_result(infer, None, 0.0) is False
    assert model.sha256 not in plan(sched, worker).loaded and sched.queued() == 1


def test_profile_goes_to_the_least_busy_worker() -> None:
    busy, idle = make_worker("busy"), make_worker("idle")
    sched = setup(busy, idle)
    assert make_scheduler().place_profile("ab" * 32, None) is None  # no worker
    add_all(sched, make_requests(make_model(), 1))
    sched.schedule(0.0)
    (holder,) = [w for w in (busy, idle) if plan(sched, w).inflight]
    action = sched.place_profile("ab" * 32, "ctx")
    assert action.kind is ActionKind.PROFILE and action.worker is not holder
    assert action.id in plan(sched, action.worker).inflight


def test_forget_model_unloads_it_everywhere() -> None:
    model = make_model()
    w0, w1 = make_worker("w0"), make_worker("w1")
    sched = setup(w0, w1)
    add_all(sched, make_requests(model, 1))
    sched.schedule(0.0)
    unloads = sched.forget_model(model.sha256)
    assert {a.worker.name for a in unloads} == {"w0", "w1"}
    assert all(a.kind is ActionKind.UNLOAD and a.context == "forget" for a in unloads)
    assert not any(model.sha256 in p.loaded for p in sched.plans.values())


def test_drop_model() -> None:
    a, b = make_model("a"), make_model("b")
    sched = make_scheduler()
    ra, rb = make_requests(a, 3), make_requests(b, 2)
    add_all(sched, ra + rb)
    assert sched.drop_model(a.sha256) == ra
    assert sched.queued() == 2
    assert not sched.has_work(a.sha256) and sched.has_work(b.sha256)
    assert sched.drop_model(a.sha256) == []
    assert sched.queued() == 2


def test_has_work() -> None:
    model = make_model()
    sched = setup()
    assert not sched.has_work(model.sha256)
    add_all(sched, make_requests(model, 1))
    assert sched.has_work(model.sha256)  # queued
    load, infer = sched.schedule(0.0)
    assert sched.queued() == 0 and sched.has_work(model.sha256)  # running
    finish(load, sched)
    assert sched.has_work(model.sha256)
    finish(infer, sched)
    assert not sched.has_work(model.sha256)


# ---------------------------------------------------------------- invariants


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("add"), st.integers(0, 3), st.integers(1, 3), st.integers(4, 5)),
            st.tuples(st.just("finish"), st.integers(0, 7)),
            st.tuples(st.just("schedule")),
        ),
        max_size=60,
    ),
    budgets=st.lists(st.integers(1000, 4000), min_size=1, max_size=3),
)
def test_invariants_under_random_traffic(ops: list[tuple], budgets: list[int]) -> None:
    """Budgets, pipeline depth, batch caps and stack keys hold; no request is lost or duplicated."""
    models = [
        make_model(f"m{i}", size=size, max_batch=cap)
        for i, (size, cap) in enumerate([(1000, 4), (1500, 1), (800, 8), (2500, 2)])
    ]
    workers = [make_worker(f"w{i}", budget=b) for i, b in enumerate(budgets)]
    sched = setup(*workers)
    added: set[int] = set()
    dispatched: list[int] = []
    running: list[Action] = []
    for op in ops:
        if op[0] == "add":
            _, m, batch, last_dim = op
            reqs = make_requests(models[m], 1, batch=batch, shape=(last_dim,))
            add_all(sched, reqs)
            added.update(r.rid for r in reqs)
        elif op[0] == "finish" and running:
            finish(running.pop(op[1] % len(running)), sched)
        else:
            for action in sched.schedule(0.0):
                if action.kind is ActionKind.INFER:
                    dispatched += rids(action)
                    reqs = action.requests
                    assert len({r.stack_key for r in reqs}) == 1
                    assert len(reqs) == 1 or sum(r.batch for r in reqs) <= reqs[0].model.max_batch
                if action.id in plan(sched, action.worker).inflight:
                    running.append(action)
        for w in workers:
            assert plan(sched, w).memory_used() <= w.memory_budget
            assert plan(sched, w).busy_infers() <= PIPELINE_DEPTH
    failed = [r.rid for r, _ in sched.failed]
    queued = [r.rid for q in sched.queues.values() for r in q if r.queued]
    assert len(dispatched) == len(set(dispatched))
    assert sorted(dispatched + failed + queued) == sorted(added)
    assert sched.queued() == len(queued)
