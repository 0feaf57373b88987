"""Tenant limits, the token bucket and fair shares, with a fake clock (no sockets)."""

from __future__ import annotations

import math

import pytest

from broker.fairshare import MARGIN, FairShare
from broker.quotas import TenantBook, TenantLimits, TokenBucket
from mtcore.errors import (
    BadArgument,
    DeadlineUnmeetable,
    Overloaded,
    QuotaExceeded,
    RateLimited,
)


def test_overrides_are_checked_and_typed() -> None:
    limits = TenantLimits().with_overrides({"in_flight": 5.0, "rate": 10})
    assert limits.in_flight == 5 and isinstance(limits.in_flight, int)
    assert limits.rate == 10.0 and isinstance(limits.rate, float)
    for bad in ({"nope": 1}, {"weight": 2}, {"models": -1}, {"models": True}, {"rate": "x"}):
        with pytest.raises(BadArgument):
            TenantLimits().with_overrides(bad)


def test_the_bucket_allows_its_burst_then_its_rate() -> None:
    bucket = TokenBucket(rate=10.0, burst=3.0, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.wait() == pytest.approx(0.1)
    assert not bucket.take(0.05) and bucket.take(0.1)
    assert bucket.take(10.0) and bucket.take(10.0) and bucket.take(10.0)
    assert not bucket.take(10.0)  # never more than the burst saved


def test_rate_in_flight_and_reply_bytes_each_refuse_with_their_status() -> None:
    book = TenantBook("t", TenantLimits(rate=2.0, burst=2.0))
    book.admit_infer(0.0, 10)
    book.admit_infer(0.0, 10)
    with pytest.raises(RateLimited) as refused:
        book.admit_infer(0.0, 10)
    assert refused.value.status == 23 and book.in_flight == 2  # the refusal holds nothing

    book = TenantBook("t", TenantLimits(in_flight=1))
    book.admit_infer(0.0, 0)
    with pytest.raises(QuotaExceeded):
        book.admit_infer(0.0, 0)
    book.answered(0)
    book.admit_infer(0.0, 0)  # an answer frees its place

    book = TenantBook("t", TenantLimits(reply_bytes=100))
    book.admit_infer(0.0, 60)
    with pytest.raises(QuotaExceeded, match="read your replies"):
        book.admit_infer(0.0, 60)  # predicted outputs in flight count
    book.answered(60)
    book.backlog_bytes = 90  # answers held because the tenant does not read them
    with pytest.raises(QuotaExceeded):
        book.admit_infer(0.0, 20)
    book.admit_infer(0.0, 10)


def test_upload_limits() -> None:
    book = TenantBook("t", TenantLimits(models=2, stored_bytes=100, uploads=1, upload_bytes=50))
    book.check_upload(models=1, stored=10, open_uploads=0, open_bytes=0, size=40, replacing=False)
    cases = [
        dict(models=2, stored=10, open_uploads=0, open_bytes=0, size=1, replacing=False),
        dict(models=1, stored=90, open_uploads=0, open_bytes=0, size=20, replacing=False),
        dict(models=1, stored=10, open_uploads=1, open_bytes=0, size=1, replacing=False),
        dict(models=1, stored=10, open_uploads=0, open_bytes=40, size=20, replacing=False),
    ]
    for case in cases:
        with pytest.raises(QuotaExceeded):
            book.check_upload(**case)
    book.check_upload(models=2, stored=10, open_uploads=0, open_bytes=0, size=1, replacing=True)


def share(weights: dict[str, float] | None = None, capacity: float = 1.0) -> FairShare:
    fair = FairShare(lambda t: (weights or {}).get(t, 1.0))
    fair.capacity = capacity
    return fair


def offer(fair: FairShare, tenant: str, rate: float, seconds: float, start: float) -> float:
    """Offer `rate` executor-seconds per second as 1 ms requests; returns the end time."""
    now, step = start, 0.001 / rate
    while now < start + seconds:
        fair.offer(tenant, 0.001, now)
        now += step
    return now


def test_nobody_is_held_while_the_demands_fit() -> None:
    fair = share()
    now = offer(fair, "a", 0.4, 5.0, 0.0)
    offer(fair, "b", 0.4, 5.0, 0.0)
    assert math.isinf(fair.share("a", now)) and math.isinf(fair.share("b", now))
    fair.book("b", 10.0)
    fair.check("b", 0.001, 0.1, now)  # queued work does not matter when nobody is short


def test_the_tenant_over_its_share_is_held_and_the_other_keeps_room() -> None:
    fair = share()
    offer(fair, "a", 0.3, 5.0, 0.0)
    now = offer(fair, "b", 5.0, 5.0, 0.0)
    assert math.isinf(fair.share("a", now))  # within its share: never held
    b_share = fair.share("b", now)
    assert b_share == pytest.approx(1 - MARGIN * fair.demand("a", now))  # what a leaves
    fair.book("b", b_share * 0.1)  # b's queued work fills its share of a 100 ms horizon
    with pytest.raises(Overloaded, match="over its share"):
        fair.check("b", 0.001, 0.1, now)
    fair.book("a", 1.0)
    fair.check("a", 0.001, 0.1, now)  # a is not held, whatever it has queued
    assert fair.throttled == 1


def test_holding_says_whether_anyone_is_held() -> None:
    fair = share()
    now = offer(fair, "a", 0.3, 5.0, 0.0)
    assert not fair.holding(now)
    now = offer(fair, "b", 5.0, 5.0, now)
    offer(fair, "a", 0.3, 5.0, now - 5.0)
    assert fair.holding(now) and fair.held("b", now) and not fair.held("a", now)


def test_weights_divide_what_is_left() -> None:
    fair = share({"b": 3.0, "c": 1.0})
    offer(fair, "b", 5.0, 5.0, 0.0)
    now = offer(fair, "c", 5.0, 5.0, 0.0)
    assert fair.share("b", now) == pytest.approx(3 * fair.share("c", now))
    assert fair.share("b", now) + fair.share("c", now) == pytest.approx(1.0)


def test_a_burst_counts_at_its_full_rate_from_its_start() -> None:
    fair = share()
    offer(fair, "a", 0.3, 5.0, 0.0)
    now = offer(fair, "b", 3.0, 0.05, 5.0)  # 50 ms into b's burst
    assert fair.demand("b", now) == pytest.approx(3.0, rel=0.1)
    assert fair.share("b", now) < 1.0  # held already


def test_an_idle_tenant_stops_counting() -> None:
    fair = share()
    offer(fair, "a", 0.9, 5.0, 0.0)
    offer(fair, "b", 5.0, 5.0, 0.0)
    later = 60.0  # a stopped long ago: b alone is never held
    assert math.isinf(fair.share("b", later))


def test_disabled_it_only_measures() -> None:
    fair = FairShare(lambda t: 1.0, enabled=False)
    fair.capacity = 1.0
    offer(fair, "a", 0.9, 5.0, 0.0)
    now = offer(fair, "b", 5.0, 5.0, 0.0)
    fair.book("b", 100.0)
    fair.check("b", 0.001, 0.1, now)
    assert fair.demand("b", now) > 4.0


@pytest.mark.parametrize("name", ["predictive", "fifo"])
def test_both_schedulers_hold_the_tenant_over_its_share(name: str) -> None:
    """Two tenants on one worker (1 ms runs, answered as planned): b floods at 3x the
    executor, a asks for a third of it. Under isolation b's excess is refused OVERLOADED
    at once, and a is never refused."""
    from broker.scheduler import make_scheduler
    from broker.state import ActionKind
    from tests.factories import make_model, make_requests, make_result, make_worker

    sched = make_scheduler(name, 100_000, isolation=True)
    sched.add_worker(make_worker(lanes=1, budget=1 << 30), 0.0)
    models = {t: make_model(t, tenant=t, profile={1: 1000.0}, max_batch=1) for t in "ab"}
    refused = {"a": 0, "b": 0}
    running: list[tuple[float, object]] = []  # (when its result comes, action)
    for step in range(3000):  # 3 s of 1 ms steps
        now = step * 0.001
        for due, action in [r for r in running if r[0] <= now]:
            running.remove((due, action))
            sched.on_result(action, make_result(action, exec_us=1000), now)
        arrivals = ["b", "b", "b"] + (["a"] if step % 3 == 0 else [])
        for tenant in arrivals:
            request = make_requests(models[tenant], 1, arrival=now, deadline=now + 0.1)[0]
            request.tenant = tenant
            try:
                sched.add_request(request, now)
            except Overloaded:
                refused[tenant] += 1
            except DeadlineUnmeetable:
                refused[tenant] += tenant == "a"  # a must not lose a single one either way
        for action in sched.schedule(now):
            took = 0.001 * len(action.requests) if action.kind is ActionKind.INFER else 0.0
            running.append((now + took, action))
        sched.failed.clear()
    assert refused["a"] == 0
    assert refused["b"] > 3000  # most of b's 9000: it had at most two thirds of 3 s
    assert sched.fair.throttled == refused["b"]


def test_the_meter_adds_usage_to_the_registry_and_splits_shared_blobs(tmp_path) -> None:
    import sqlite3

    from broker.metering import Meter, read_usage

    db = sqlite3.connect(tmp_path / "r.sqlite", isolation_level=None)
    meter = Meter(db)
    meter.answered("a", exec_ms=2.0, bytes_in=100, bytes_out=40)
    meter.shared(["a", "b"], load_ms=10.0, fetched=1000)
    assert not meter.due(0.0)  # the first call starts the memory clock
    assert meter.due(1.5)
    meter.sample(1.5, [("device", ["a", "b"], 1000), ("host", ["b"], 10)])
    meter.flush(1.5)  # not due (every 5 s): nothing written yet
    assert read_usage(db) == []
    meter.flush(6.0)
    meter.answered("a", exec_ms=1.0, bytes_in=1, bytes_out=1)
    meter.flush(7.0)  # not due: stays in memory
    assert {u.tenant: u.requests for u in read_usage(db)} == {"a": 1, "b": 0}
    meter.flush(7.0, force=True)
    usage = {u.tenant: u for u in read_usage(db)}
    assert usage["a"].requests == 2 and usage["a"].exec_ms == 3.0
    assert usage["a"].load_ms == usage["b"].load_ms == 5.0
    assert usage["a"].bytes_fetched == usage["b"].bytes_fetched == 500
    assert usage["a"].device_byte_seconds == pytest.approx(750.0)  # 1000 B x 1.5 s / 2
    assert usage["b"].host_byte_seconds == pytest.approx(15.0)
