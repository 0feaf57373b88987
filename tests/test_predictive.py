"""The predictive scheduler as a unit: factories and a fake clock, no sockets."""

from __future__ import annotations

import math

import pytest

from broker.predictive import PredictiveScheduler
from broker.state import ActionKind
from mtcore.errors import DeadlineUnmeetable
from mtcore.predictor import Predictor
from tests.factories import make_model, make_requests, make_worker

MS = 1e-3


def scheduler(*workers, predictor: Predictor | None = None, weight=None) -> PredictiveScheduler:
    s = PredictiveScheduler(1000, lambda rid: True, predictor or Predictor(),
                            **({"weight": weight} if weight else {}))  # fmt: skip
    for w in workers or (make_worker(),):
        s.add_worker(w)
    return s


def loaded(worker, *models):
    for m in models:
        worker.loaded[m.sha256] = m.size
    return worker


def infers(actions):
    return [a for a in actions if a.kind is ActionKind.INFER]


def test_a_request_that_cannot_make_its_deadline_is_refused_at_once() -> None:
    model = make_model(profile={1: 50_000.0})  # 50 ms a run
    s = scheduler(loaded(make_worker(), model))
    (tight,) = make_requests(model, 1, deadline=10 * MS)
    with pytest.raises(DeadlineUnmeetable, match="predicted to finish"):
        s.add_request(tight, now=0.0)
    (easy,) = make_requests(model, 1, deadline=1.0)
    s.add_request(easy, now=0.0)
    assert s.queued() == 1 and s.rejected == 1


def test_admission_counts_the_requests_queued_ahead() -> None:
    model = make_model(profile={1: 10_000.0}, max_batch=1)  # 10 ms each, no batching
    s = scheduler(loaded(make_worker(), model))
    requests = make_requests(model, 6, deadline=50 * MS)
    for r in requests[:5]:  # the fifth finishes at 50 ms: just in time
        s.add_request(r, now=0.0)
    with pytest.raises(DeadlineUnmeetable, match="5 row"):
        s.add_request(requests[5], now=0.0)
    (urgent,) = make_requests(model, 1, deadline=20 * MS)  # earlier deadline: goes ahead
    s.add_request(urgent, now=0.0)
    assert s.queues[model.sha256][0] is urgent


def test_a_queued_request_that_can_no_longer_finish_is_answered_early() -> None:
    model = make_model(profile={1: 20_000.0})
    s = scheduler(loaded(make_worker(), model))
    (r,) = make_requests(model, 1, deadline=100 * MS)
    s.add_request(r, now=0.0)
    assert s.expire(now=50 * MS) == []  # 50 ms left, 20 ms to run: still possible
    assert s.expire(now=85 * MS) == [r]  # 15 ms left: it would finish late; answer now
    assert s.queued() == 0 and s.answered_early == 1


def test_the_most_urgent_model_goes_first() -> None:
    a, b = make_model("a", profile={1: 1_000.0}), make_model("b", profile={1: 1_000.0})
    worker = loaded(make_worker(), a, b)
    s = scheduler(worker)
    s.add_request(make_requests(a, 1, deadline=500 * MS, arrival=0.0)[0], now=0.0)
    s.add_request(make_requests(b, 1, deadline=50 * MS, arrival=0.01)[0], now=0.0)
    first = infers(s.schedule(now=0.02))[0]
    assert first.sha256 == b.sha256  # later arrival, earlier deadline


def test_requests_within_a_model_queue_by_deadline() -> None:
    model = make_model(profile={1: 1_000.0}, max_batch=1)
    s = scheduler(loaded(make_worker(), model))
    late, soon = (
        make_requests(model, 1, deadline=900 * MS)[0],
        make_requests(model, 1, deadline=100 * MS)[0],
    )
    s.add_request(late, now=0.0)
    s.add_request(soon, now=0.0)
    assert infers(s.schedule(now=0.0))[0].requests == [soon]


def test_the_batch_is_the_largest_that_meets_its_earliest_deadline() -> None:
    model = make_model(profile={1: 10_000.0, 2: 15_000.0, 4: 40_000.0, 8: 100_000.0})
    s = scheduler(loaded(make_worker(), model))
    for r in make_requests(model, 8, deadline=1.0):
        s.add_request(r, now=0.0)
    assert [len(a.requests) for a in infers(s.schedule(now=0.0))] == [8]  # 100 ms: fits

    s = scheduler(loaded(make_worker(), model))
    for r in make_requests(model, 8, deadline=1.0):
        s.add_request(r, now=0.0)
    # 60 ms left: 4 rows (40 ms), then behind them only 2 more fit (15 ms, ending at 55)
    assert [len(a.requests) for a in infers(s.schedule(now=0.94))] == [4, 2]
    assert s.queued() == 2 and not s.failed


def test_a_batch_that_would_end_late_on_its_worker_is_answered_early() -> None:
    model = make_model(profile={1: 30_000.0})
    worker = loaded(make_worker(), model)
    s = scheduler(worker)
    (r,) = make_requests(model, 1, deadline=1.0)
    s.add_request(r, now=0.0)
    s.busy_until[worker.wid] = 0.99  # its worker frees up 10 ms before the deadline
    assert s.schedule(now=0.5) == []
    ((failed, error),) = s.failed
    assert failed is r and error.status == 51 and "answered early" in error.message


def test_a_hot_model_is_replicated_when_its_holder_cannot_start_in_time() -> None:
    model = make_model(profile={1: 10_000.0})
    busy, idle = loaded(make_worker("w0"), model), make_worker("w1")
    s = scheduler(busy, idle)
    s.busy_until[busy.wid] = 5.0  # w0's timeline is full for five seconds
    (r,) = make_requests(model, 1, deadline=200 * MS)
    s.add_request(r, now=0.0)
    actions = s.schedule(now=0.0)
    assert [(a.kind, a.worker.name) for a in actions] == [
        (ActionKind.LOAD, "w1"), (ActionKind.INFER, "w1")]  # fmt: skip


def test_the_holder_is_used_while_it_can_start_in_time() -> None:
    model = make_model(profile={1: 10_000.0})
    holder, other = loaded(make_worker("w0"), model), make_worker("w1")
    s = scheduler(holder, other)
    s.busy_until[holder.wid] = 50 * MS
    (r,) = make_requests(model, 1, deadline=200 * MS)
    s.add_request(r, now=0.0)
    assert [a.worker.name for a in s.schedule(now=0.0)] == ["w0"]  # no load needed


def test_the_timeline_advances_with_dispatch_and_catches_up_on_results() -> None:
    model = make_model(profile={1: 30_000.0})
    worker = loaded(make_worker(), model)
    s = scheduler(worker)
    (r,) = make_requests(model, 1, deadline=1.0)
    s.add_request(r, now=0.0)
    (infer,) = infers(s.schedule(now=0.0))
    assert s.busy_until[worker.wid] == pytest.approx(30 * MS)
    del worker.inflight[infer.id]
    s.on_result(infer, True, now=12 * MS, evicted=[])
    assert s.busy_until[worker.wid] == pytest.approx(12 * MS)  # done early: free now


def test_tenant_weights_break_equal_urgency() -> None:
    a = make_model("a", profile={1: 1_000.0}, tenant="light")
    b = make_model("b", profile={1: 1_000.0}, tenant="heavy")
    s = scheduler(loaded(make_worker(), a, b), weight=lambda t: 4.0 if t == "heavy" else 1.0)
    s.add_request(make_requests(a, 1, deadline=100 * MS)[0], now=0.0)
    s.add_request(make_requests(b, 1, deadline=100 * MS, arrival=0.01)[0], now=0.0)
    assert infers(s.schedule(now=0.0))[0].sha256 == b.sha256


def test_the_predictor_overrides_the_upload_profile() -> None:
    model = make_model(profile={1: 1_000.0})
    predictor = Predictor()
    predictor.seed_exec(model.sha256, "cpu", {1: [80_000.0]})  # measured: 80 ms
    s = scheduler(loaded(make_worker(), model), predictor=predictor)
    (r,) = make_requests(model, 1, deadline=50 * MS)
    with pytest.raises(DeadlineUnmeetable):
        s.add_request(r, now=0.0)


def test_requests_without_deadlines_are_never_refused_and_go_last() -> None:
    model, urgent = make_model("slow", profile={1: 10_000.0}), make_model("u", profile={1: 1.0})
    s = scheduler(loaded(make_worker(), model, urgent))
    (free,) = make_requests(model, 1, deadline=math.inf, arrival=0.0)
    s.add_request(free, now=0.0)
    s.add_request(make_requests(urgent, 1, deadline=1.0, arrival=1.0)[0], now=0.0)
    assert infers(s.schedule(now=0.0))[0].sha256 == urgent.sha256
