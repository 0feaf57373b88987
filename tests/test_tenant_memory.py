"""A tenant's device-memory bound, in both schedulers (no sockets, a fake clock): its
models together never hold more than its `device_bytes` across the workers; loading one
more evicts its own idle models first, waits while they run, and a model larger than the
bound is refused at once. Other tenants' models are never evicted for it."""

from __future__ import annotations

import pytest

from broker.scheduler import QueueScheduler
from broker.scheduler import make_scheduler as scheduler_named
from broker.state import Action, ActionKind
from mtcore.errors import QuotaExceeded
from tests.factories import make_model, make_requests, make_result, make_worker

LIMIT = 2500  # the bounded tenant's device bytes: two of its 1000-byte models, not three


def setup(name: str, *budgets: int) -> QueueScheduler:
    limits = {"capped": LIMIT}
    sched = scheduler_named(name, 1000, device_limit=lambda tenant: limits.get(tenant, 0))
    for i, budget in enumerate(budgets):
        sched.add_worker(make_worker(f"w{i}", budget=budget), 0.0)
    return sched


def run(sched: QueueScheduler, model, now: float = 0.0) -> list[Action]:
    """One request for `model`, scheduled and answered: the actions it took."""
    sched.add_request(make_requests(model, 1)[0], now)
    actions = sched.schedule(now)
    for action in actions:
        if action.kind is not ActionKind.UNLOAD:
            sched.on_result(action, make_result(action), now)
    return actions


def held(sched: QueueScheduler, tenant: str) -> int:
    return sum(p.loaded[s] for p in sched.plans.values() for s, t in p.owner.items() if t == tenant)


@pytest.mark.parametrize("name", ["fifo", "predictive"])
def test_loading_past_the_bound_evicts_the_tenants_own_idle_model(name: str) -> None:
    sched = setup(name, 10_000, 10_000)
    capped = [make_model(f"c{i}", size=1000, tenant="capped", max_batch=1) for i in range(3)]
    other = make_model("o", size=1000, tenant="free", max_batch=1)
    run(sched, other)
    for i, model in enumerate(capped[:2]):
        run(sched, model, now=float(i))
    actions = run(sched, capped[2], now=5.0)
    unloads = [a.sha256 for a in actions if a.kind is ActionKind.UNLOAD]
    assert unloads == [capped[0].sha256]  # its least recently used, not the other tenant's
    assert held(sched, "capped") == 2000 <= LIMIT
    assert any(other.sha256 in p.loaded for p in sched.plans.values())


@pytest.mark.parametrize("name", ["fifo", "predictive"])
def test_the_load_waits_while_the_tenants_models_run(name: str) -> None:
    sched = setup(name, 10_000)
    a, b, c = (make_model(n, size=1000, tenant="capped", max_batch=1) for n in "abc")
    run(sched, a)
    run(sched, b)
    for model in (a, b):  # both busy now
        sched.add_request(make_requests(model, 1)[0], 1.0)
    busy = [x for x in sched.schedule(1.0) if x.kind is ActionKind.INFER]
    assert {x.sha256 for x in busy} == {a.sha256, b.sha256}
    sched.add_request(make_requests(c, 1)[0], 1.0)
    assert not [x for x in sched.schedule(1.0) if x.sha256 == c.sha256]  # no room: it waits
    assert held(sched, "capped") <= LIMIT
    sched.on_result(busy[0], make_result(busy[0]), 1.1)
    later = sched.schedule(1.1)
    assert (ActionKind.UNLOAD, busy[0].sha256) in [(x.kind, x.sha256) for x in later]
    assert (ActionKind.INFER, c.sha256) in [(x.kind, x.sha256) for x in later]
    assert held(sched, "capped") <= LIMIT


@pytest.mark.parametrize("name", ["fifo", "predictive"])
def test_a_model_larger_than_the_bound_is_refused_at_once(name: str) -> None:
    sched = setup(name, 10_000)
    huge = make_model("huge", size=LIMIT + 1, tenant="capped")
    with pytest.raises(QuotaExceeded, match="device_bytes limit is 2500"):
        sched.add_request(make_requests(huge, 1)[0], 0.0)
    assert sched.queued() == 0
    fine = make_model("fine", size=LIMIT + 1, tenant="free")  # no bound: it runs
    assert any(a.kind is ActionKind.INFER for a in run(sched, fine))


GIB = 1 << 30


@pytest.mark.parametrize("name", ["fifo", "predictive"])
def test_a_run_bound_places_models_only_on_workers_walled_within_it(name: str) -> None:
    """run_bytes: the tenant's models run only where the worker's arena wall is within
    it (a run asking more fails there), on every request; none such: refused at once."""
    limits = {"capped": 2 * GIB}
    sched = scheduler_named(name, 1000, run_limit=lambda tenant: limits.get(tenant, 0))
    walls = {"wide": 8 * GIB, "none": 0, "narrow": 1 * GIB}
    for wname, wall in walls.items():
        worker = make_worker(wname, budget=10_000)
        worker.run_memory = wall
        sched.add_worker(worker, 0.0)
    capped = make_model("c", size=1000, tenant="capped", max_batch=1)
    for i in range(6):
        for action in run(sched, capped, now=float(i)):
            if action.kind is not ActionKind.UNLOAD:
                assert action.worker.name == "narrow"
    free = make_model("f", size=1000, tenant="free", max_batch=1)
    assert any(a.kind is ActionKind.INFER for a in run(sched, free, now=9.0))
    limits["capped"] = GIB // 2  # tighter than every wall
    with pytest.raises(QuotaExceeded, match="no worker walls its runs within"):
        sched.add_request(make_requests(capped, 1)[0], 10.0)
