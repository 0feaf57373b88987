"""ActionTable: the C core (ext._actiontable) and its pure-Python twin, held to one spec.

Every test runs against both implementations, imported directly; the C one is skipped
only when it is not built. A differential test drives both through the same random
operations, and stress tests run one producer (the test's thread) against four consumer
threads until every item has been put, claimed, finished and reaped exactly once.
"""

from __future__ import annotations

import gc
import importlib.util
import math
import pickle
import random
import sys
import threading
import time
from collections.abc import Callable
from types import ModuleType

import numpy as np
import pytest

from ext import _actiontable_py

INF = math.inf
C_BUILT = importlib.util.find_spec("ext._actiontable") is not None
NOT_BUILT = "ext._actiontable is not built: python setup.py build_ext --inplace"


def _c_module() -> ModuleType:
    if not C_BUILT:
        pytest.skip(NOT_BUILT)
    from ext import _actiontable

    return _actiontable


@pytest.fixture(params=["c", "py"], scope="module")
def impl(request: pytest.FixtureRequest) -> ModuleType:
    """Each implementation's module; a broken C build fails here rather than skipping."""
    return _actiontable_py if request.param == "py" else _c_module()


@pytest.fixture
def table(impl: ModuleType):
    t = impl.ActionTable(8)
    yield t
    t.close()


class Payload:
    """A distinct value whose identity the tests follow."""

    def __init__(self, name: str = "") -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Payload({self.name!r})"


def fill(table, *entries: tuple[str, int, float, float]) -> dict[str, int]:
    """put() each (name, lane, earliest, latest); {name: slot}."""
    return {name: table.put(name, lane, e, la) for name, lane, e, la in entries}


# -- module surface ---------------------------------------------------------------------


def test_constants_and_exception(impl: ModuleType) -> None:
    assert (impl.FREE, impl.QUEUED, impl.RUNNING, impl.DONE) == (0, 1, 2, 3)
    assert issubclass(impl.TableFull, MemoryError)
    assert impl.TableFull.__name__ == "TableFull"
    assert impl.TableFull is _actiontable_py.TableFull  # one class: catch it either way


def test_capacity_is_read_only(table) -> None:
    assert table.capacity == 8
    with pytest.raises(AttributeError):
        table.capacity = 9


def test_not_picklable(table) -> None:
    with pytest.raises(TypeError):
        pickle.dumps(table)


@pytest.mark.parametrize("bad", [0, -1, 2**24 + 1, 2**70])
def test_capacity_out_of_range(impl: ModuleType, bad: int) -> None:
    with pytest.raises(ValueError, match="capacity must be in"):
        impl.ActionTable(bad)


@pytest.mark.parametrize("bad", ["8", 8.0, None])
def test_capacity_not_an_integer(impl: ModuleType, bad: object) -> None:
    with pytest.raises(TypeError):
        impl.ActionTable(bad)


def test_capacity_one_and_keyword(impl: ModuleType) -> None:
    t = impl.ActionTable(capacity=np.int64(1))
    assert t.capacity == 1
    assert t.put("v", 0, 0.0, INF) == 0
    with pytest.raises(impl.TableFull):
        t.put("w", 0, 0.0, INF)


# -- put and claim ----------------------------------------------------------------------


def test_put_publishes_queued_slots_in_order(table, impl: ModuleType) -> None:
    assert table.counts() == (8, 0, 0, 0)
    assert [table.put(i, 0, 0.0, INF) for i in range(3)] == [0, 1, 2]
    assert [table.state(i) for i in range(4)] == [impl.QUEUED] * 3 + [impl.FREE]
    assert table.counts() == (5, 3, 0, 0)


def test_put_continues_after_the_last_slot_and_wraps(impl: ModuleType) -> None:
    t = impl.ActionTable(4)
    assert [t.put(i, 0, 0.0, INF) for i in range(3)] == [0, 1, 2]
    slot, _ = t.claim(0, 0.0)
    assert slot == 0
    t.finish(slot)
    assert t.reap() == [0]
    assert t.put("a", 0, 0.0, INF) == 3  # slot 0 is free, but put goes on from slot 3
    assert t.put("b", 0, 0.0, INF) == 0  # then wraps
    with pytest.raises(impl.TableFull):
        t.put("c", 0, 0.0, INF)


def test_claim_takes_the_smallest_latest_among_the_eligible(table) -> None:
    slots = fill(
        table,
        ("late", 0, 0.0, 9.0),
        ("soon", 0, 0.0, 2.0),
        ("future", 0, 5.0, 1.0),  # smallest latest, but not eligible before 5.0
        ("open", 0, 0.0, INF),
        ("sooner", 0, 1.0, 1.5),  # eligible at exactly now == earliest
    )
    got = [table.claim(0, 1.0) for _ in range(4)]
    assert got == [(slots[n], n) for n in ("sooner", "soon", "late", "open")]
    assert table.claim(0, 1.0) is None
    assert table.claim(0, 4.999) is None
    assert table.claim(0, 5.0) == (slots["future"], "future")  # even though latest < now
    assert table.claim(0, 100.0) is None


def test_claim_breaks_ties_by_lowest_slot(table) -> None:
    for i in range(6):
        table.put(i, 0, 0.0, 3.0 if i % 2 else INF)
    assert [table.claim(0, 0.0) for _ in range(6)] == [(i, i) for i in (1, 3, 5, 0, 2, 4)]


def test_claim_handles_infinite_times(table) -> None:
    fill(table, ("never", 0, INF, INF), ("minus", 0, -INF, -INF), ("any", 0, -INF, INF))
    assert table.claim(0, -1e308) == (1, "minus")
    assert table.claim(0, 1e308) == (2, "any")
    assert table.claim(0, 1e308) is None
    assert table.claim(0, INF) == (0, "never")


def test_lanes_are_separate(table, impl: ModuleType) -> None:
    slots = fill(table, ("load", 0, 0.0, 5.0), ("exec", 1, 0.0, 1.0), ("top", 63, 0.0, 1.0))
    assert table.claim(1, 1.0) == (slots["exec"], "exec")
    assert table.claim(1, 1.0) is None
    assert table.claim(2, 1.0) is None
    assert table.expire(0, 100.0) == [(slots["load"], "load")]
    assert table.next_earliest(1) == INF
    assert table.next_earliest(63) == 0.0
    assert table.claim(63, 1.0) == (slots["top"], "top")
    assert table.counts() == (5, 0, 3, 0)


def test_next_earliest(table) -> None:
    assert table.next_earliest(0) == INF
    slots = fill(table, ("a", 0, 7.0, INF), ("b", 0, 3.0, INF), ("c", 1, 1.0, INF))
    assert table.next_earliest(0) == 3.0
    assert type(table.next_earliest(0)) is float
    assert table.claim(0, 3.0) == (slots["b"], "b")
    assert table.next_earliest(0) == 7.0  # a RUNNING slot no longer counts
    assert table.next_earliest(1) == 1.0


# -- expire -----------------------------------------------------------------------------


def test_expire_takes_queued_slots_past_their_latest(table, impl: ModuleType) -> None:
    slots = fill(
        table,
        ("a", 0, 0.0, 2.0),
        ("b", 0, 0.0, 1.0),
        ("at", 0, 0.0, 3.0),  # latest == now: not expired
        ("other", 1, 0.0, 1.0),
        ("future", 0, 9.0, 1.0),  # expires even though it was never eligible
        ("claimed", 0, 0.0, 0.5),
    )
    assert table.claim(0, 0.0) == (slots["claimed"], "claimed")
    got = table.expire(0, 3.0)
    assert type(got) is list
    assert all(type(item) is tuple for item in got)
    assert got == [(slots[n], n) for n in ("a", "b", "future")]  # in slot order
    assert all(table.state(s) == impl.RUNNING for s, _ in got)
    assert table.expire(0, 3.0) == []
    assert table.claim(0, 3.0) == (slots["at"], "at")
    for s, _ in got:
        table.finish(s)
    assert table.reap() == ["a", "b", "future"]
    assert table.expire(0, INF) == []
    assert table.expire(1, INF) == [(slots["other"], "other")]


def test_expire_never_takes_an_infinite_latest(table) -> None:
    table.put("open", 0, 0.0, INF)
    assert table.expire(0, 1e308) == []
    assert table.expire(0, INF) == []


# -- finish, reap, TableFull ------------------------------------------------------------


def test_finish_needs_a_running_slot(table, impl: ModuleType) -> None:
    with pytest.raises(ValueError, match="slot 0 is FREE, not RUNNING"):
        table.finish(0)
    table.put("v", 0, 0.0, INF)
    with pytest.raises(ValueError, match="slot 0 is QUEUED, not RUNNING"):
        table.finish(0)
    table.claim(0, 0.0)
    table.finish(0)
    assert table.state(0) == impl.DONE
    with pytest.raises(ValueError, match="slot 0 is DONE, not RUNNING"):
        table.finish(0)
    assert table.counts() == (7, 0, 0, 1)


@pytest.mark.parametrize("bad", [-1, 8, 2**70])
def test_slot_out_of_range(table, bad: int) -> None:
    with pytest.raises(IndexError, match="out of range"):
        table.finish(bad)
    with pytest.raises(IndexError, match="out of range"):
        table.state(bad)


def test_slot_index_types(table, impl: ModuleType) -> None:
    table.put("v", 0, 0.0, INF)
    table.claim(0, 0.0)
    assert table.state(np.int32(0)) == impl.RUNNING
    table.finish(np.uint8(0))
    assert table.state(True) == impl.FREE  # slot 1
    with pytest.raises(TypeError):
        table.state(0.0)
    with pytest.raises(TypeError):
        table.finish("0")


def test_reap_returns_done_values_in_slot_order_and_frees(table, impl: ModuleType) -> None:
    assert table.reap() == []
    for i in range(5):
        table.put(f"v{i}", 0, 0.0, float(5 - i))  # claimed in reverse slot order
    claimed = [table.claim(0, 0.0)[0] for _ in range(4)]
    assert claimed == [4, 3, 2, 1]
    for s in claimed[:3]:
        table.finish(s)
    assert table.counts() == (3, 1, 1, 3)
    assert table.reap() == ["v2", "v3", "v4"]
    assert [table.state(i) for i in range(5)] == [impl.QUEUED, impl.RUNNING] + [impl.FREE] * 3
    assert table.reap() == []
    assert table.counts() == (6, 1, 1, 0)


def test_table_full(impl: ModuleType) -> None:
    t = impl.ActionTable(3)
    for i in range(3):
        t.put(i, 0, 0.0, INF)
    t.claim(0, 0.0)
    t.claim(0, 0.0)
    t.finish(0)
    with pytest.raises(impl.TableFull) as caught:
        t.put("x", 0, 0.0, INF)
    assert isinstance(caught.value, MemoryError)
    assert str(caught.value) == (
        "all 3 slots are in use (1 queued, 1 running, 1 done): reap() frees the done ones"
    )
    assert t.counts() == (0, 1, 1, 1)  # nothing changed
    assert t.reap() == [0]
    assert t.put("x", 0, 0.0, INF) == 0
    with pytest.raises(impl.TableFull):
        t.put("y", 0, 0.0, INF)


# -- argument checks ----------------------------------------------------------------------


@pytest.mark.parametrize("lane", [-1, 64, 2**70])
def test_lane_out_of_range(table, lane: int) -> None:
    calls = [
        lambda: table.put("v", lane, 0.0, INF),
        lambda: table.claim(lane, 0.0),
        lambda: table.expire(lane, 0.0),
        lambda: table.next_earliest(lane),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"lane must be in \[0, 63\]"):
            call()
    assert table.counts() == (8, 0, 0, 0)


@pytest.mark.parametrize("lane", ["0", 0.0, None])
def test_lane_not_an_integer(table, lane: object) -> None:
    with pytest.raises(TypeError):
        table.put("v", lane, 0.0, INF)
    with pytest.raises(TypeError):
        table.claim(lane, 0.0)
    assert table.counts() == (8, 0, 0, 0)


def test_integer_like_lanes_and_real_times(table) -> None:
    assert table.put("v", np.int64(3), np.float32(1.5), 2) == 0
    assert table.put("w", True, 0, np.float64(2.5)) == 1
    assert table.next_earliest(np.uint8(3)) == 1.5
    assert table.claim(3, 2) == (0, "v")
    assert table.claim(True, np.float32(0.0)) == (1, "w")


@pytest.mark.parametrize("bad", ["1.0", None, b"1", [1.0], 1j])
def test_non_numeric_times(table, bad: object) -> None:
    for call in (
        lambda: table.put("v", 0, bad, INF),
        lambda: table.put("v", 0, 0.0, bad),
        lambda: table.claim(0, bad),
        lambda: table.expire(0, bad),
    ):
        with pytest.raises(TypeError):
            call()
    assert table.counts() == (8, 0, 0, 0)


def test_nan_times(table) -> None:
    for name, call in (
        ("earliest", lambda: table.put("v", 0, math.nan, INF)),
        ("latest", lambda: table.put("v", 0, 0.0, math.nan)),
        ("now", lambda: table.claim(0, math.nan)),
        ("now", lambda: table.expire(0, math.nan)),
    ):
        with pytest.raises(ValueError, match=f"{name} must not be NaN"):
            call()
    assert table.counts() == (8, 0, 0, 0)


class SneakyFloat:
    """A time whose conversion first runs `action`."""

    def __init__(self, value: float, action: Callable[[], object]) -> None:
        self.value = value
        self.action = action

    def __float__(self) -> float:
        self.action()
        return self.value


def test_conversion_that_closes_the_table(table) -> None:
    with pytest.raises(ValueError, match="table is closed"):
        table.put("v", 0, SneakyFloat(0.0, table.close), INF)


def test_conversion_that_puts(table) -> None:
    slot = table.put("outer", 0, SneakyFloat(0.0, lambda: table.put("inner", 0, 0.0, 1.0)), 2.0)
    assert slot == 1  # the inner put ran first and took slot 0
    assert table.claim(0, 0.0) == (0, "inner")
    assert table.claim(0, 0.0) == (1, "outer")


# -- close and references -----------------------------------------------------------------

CLOSED_CALLS: dict[str, Callable] = {
    "put": lambda t: t.put("v", 0, 0.0, INF),
    "claim": lambda t: t.claim(0, 0.0),
    "expire": lambda t: t.expire(0, 0.0),
    "next_earliest": lambda t: t.next_earliest(0),
    "finish": lambda t: t.finish(0),
    "reap": lambda t: t.reap(),
    "state": lambda t: t.state(0),
    "counts": lambda t: t.counts(),
}


@pytest.mark.parametrize("call", CLOSED_CALLS.values(), ids=CLOSED_CALLS.keys())
def test_closed_table_refuses(table, call: Callable) -> None:
    table.put("v", 0, 0.0, INF)
    table.claim(0, 0.0)
    table.close()
    with pytest.raises(ValueError, match="table is closed"):
        call(table)


def test_close_is_idempotent(table) -> None:
    table.put("v", 0, 0.0, INF)
    table.close()
    table.close()
    assert table.capacity == 8


def test_value_finalizer_during_close_sees_a_closed_table(impl: ModuleType) -> None:
    t = impl.ActionTable(4)
    seen: list[str] = []

    class CallsBack:
        def __del__(self) -> None:
            try:
                t.counts()
            except ValueError as e:
                seen.append(str(e))
            else:
                seen.append("open")

    t.put(CallsBack(), 0, 0.0, INF)
    t.put(CallsBack(), 1, 0.0, INF)
    t.claim(1, 0.0)
    t.close()
    assert seen == ["table is closed", "table is closed"]


def test_one_reference_per_slot(impl: ModuleType) -> None:
    value = Payload()
    base = sys.getrefcount(value)
    t = impl.ActionTable(4)
    slot = t.put(value, 0, 0.0, 1.0)
    assert sys.getrefcount(value) == base + 1
    got = t.claim(0, 0.0)
    assert got == (slot, value)
    assert sys.getrefcount(value) == base + 2  # the table's and the tuple's
    del got
    assert sys.getrefcount(value) == base + 1
    t.finish(slot)
    assert sys.getrefcount(value) == base + 1
    reaped = t.reap()
    assert reaped == [value]
    assert sys.getrefcount(value) == base + 1  # moved from the table to the list
    del reaped
    assert sys.getrefcount(value) == base

    t.put(value, 0, 0.0, 1.0)
    t.put(value, 0, 0.0, 1.0)
    assert sys.getrefcount(value) == base + 2
    expired = t.expire(0, 2.0)
    assert sys.getrefcount(value) == base + 4
    for s in [s for s, _ in expired]:
        t.finish(s)
    del expired
    assert t.reap() == [value, value]
    assert sys.getrefcount(value) == base

    for i in range(4):  # every state, then close
        t.put(value, 0, 0.0, float(i))
    t.claim(0, 0.0)
    t.finish(t.claim(0, 0.0)[0])
    t.expire(0, 2.5)
    assert t.counts() == (0, 1, 2, 1)
    assert sys.getrefcount(value) == base + 4
    t.close()
    assert sys.getrefcount(value) == base

    t = impl.ActionTable(4)
    t.put(value, 0, 0.0, INF)
    t.put(value, 0, 0.0, INF)
    t.claim(0, 0.0)
    del t  # deallocation releases too
    gc.collect()
    assert sys.getrefcount(value) == base


def test_no_leak_over_many_cycles(impl: ModuleType) -> None:
    value = Payload()
    base = sys.getrefcount(value)
    t = impl.ActionTable(16)
    for i in range(2000):
        t.put(value, i % 3, 0.0, float(i % 7))
        if i % 5 == 0:
            for s, _ in t.expire(i % 3, 3.0):
                t.finish(s)
            s = _ = None
        got = t.claim(i % 3, 0.0)
        if got is not None:
            t.finish(got[0])
        del got
        if t.counts()[0] < 4:
            t.reap()
    t.close()
    assert sys.getrefcount(value) == base


# -- fast paths: the counters and the bitmap that bound the scans ---------------------------


def lanes(**queued: int) -> tuple[int, ...]:
    """_counters()'s per-lane QUEUED tuple: lanes=lane_n counts, the rest 0."""
    out = [0] * 64
    for name, n in queued.items():
        out[int(name[1:])] = n
    return tuple(out)


def test_counters_follow_every_transition(table) -> None:
    """_counters() is (slots not FREE, DONE, QUEUED per lane), whatever moves a slot."""
    assert table._counters() == (0, 0, lanes())
    table.put("a", 0, 0.0, 1.0)
    table.put("b", 0, 0.0, 2.0)
    table.put("c", 1, 0.0, INF)
    assert table._counters() == (3, 0, lanes(l0=2, l1=1))
    assert table.claim(0, 0.0) == (0, "a")
    assert table._counters() == (3, 0, lanes(l0=1, l1=1))
    assert table.claim(0, 0.0) == (1, "b")
    assert table.claim(0, 0.0) is None  # a lane with nothing QUEUED: nothing changes
    assert table._counters() == (3, 0, lanes(l1=1))
    table.finish(0)
    with pytest.raises(ValueError, match="not RUNNING"):
        table.finish(0)  # a failed finish leaves the DONE count alone
    with pytest.raises(ValueError, match="not RUNNING"):
        table.finish(2)  # QUEUED
    assert table._counters() == (3, 1, lanes(l1=1))
    assert table.reap() == ["a"]
    assert table._counters() == (2, 0, lanes(l1=1))
    table.put("d", 1, 0.0, 0.5)
    assert table.expire(1, 1.0) == [(3, "d")]
    assert table._counters() == (3, 0, lanes(l1=1))
    table.finish(1)
    table.finish(3)
    assert table.reap() == ["b", "d"]
    assert table._counters() == (1, 0, lanes(l1=1))
    assert table.counts() == (7, 1, 0, 0)


def test_empty_lanes_answer_at_once(table) -> None:
    """No QUEUED slot in the lane: claim None, expire [], next_earliest inf; reap [] with
    nothing DONE. Slots of other lanes and states do not change that."""
    table.put("other", 1, 0.0, 0.0)
    table.put("running", 0, 0.0, 0.0)
    assert table.claim(0, 0.0) == (1, "running")
    got = (table.claim(0, 5.0), table.expire(0, 5.0), table.next_earliest(0), table.reap())
    assert got == (None, [], INF, [])
    assert type(got[2]) is float
    assert table.next_earliest(1) == 0.0
    assert table.counts() == (6, 1, 1, 0)


def test_put_into_an_emptied_lane_is_seen(table) -> None:
    """The QUEUED counter goes back up: a lane emptied by claim or expire fills again."""
    for _ in range(3):
        slot = table.put("v", 0, 0.0, 1.0)
        assert table.claim(0, 0.0) == (slot, "v")
        assert table.claim(0, 0.0) is None
        table.finish(slot)
        slot = table.put("w", 0, 0.0, 1.0)
        assert table.expire(0, 2.0) == [(slot, "w")]
        assert table.expire(0, 2.0) == []
        table.finish(slot)
        assert table.reap() == ["v", "w"]
        assert table.reap() == []


def test_scans_find_slots_anywhere_after_wrapping(impl: ModuleType) -> None:
    """put's cursor sweeps the table and wraps; the scans still see every slot in use,
    across bitmap words (200 slots: 4 words, the last one partial)."""
    t = impl.ActionTable(200)
    old = t.put("old", 0, 0.0, INF)  # slot 0 stays QUEUED all along
    for i in range(1, 198):  # walk the cursor to slot 198: one slot at a time in use
        assert t.put(i, 1, 0.0, 1.0) == i
        assert t.claim(1, 0.0) == (i, i)
        t.finish(i)
        assert t.reap() == [i]
    slots = [t.put(name, 0, 0.0, INF) for name in ("x198", "x199", "x1", "x2", "x3")]
    assert slots == [198, 199, 1, 2, 3]  # wrapped past the busy slot 0
    assert t.next_earliest(0) == 0.0
    assert t.counts() == (194, 6, 0, 0)
    # claim's ties go to the lowest slot, wherever the cursor is
    assert [t.claim(0, 0.0)[0] for _ in range(6)] == [old, 1, 2, 3, 198, 199]
    assert t.claim(0, 0.0) is None
    for s in (199, 0, 3, 198):
        t.finish(s)
    assert t.reap() == ["old", "x3", "x198", "x199"]  # slot order
    assert t._counters() == (2, 0, lanes())
    t.close()


def test_scans_over_dense_and_sparse_bitmap_words(impl: ModuleType) -> None:
    """C reads a mostly used bitmap word's span slot by slot, FREE holes included, and
    picks a sparse word's bits out one by one: either way the same slots, in order."""
    t = impl.ActionTable(192)
    dense = set(range(63)) - {5, 6, 40}  # bitmap word 0: 60 slots of its span 0..62
    sparse = {64, 127, 128, 129, 130, 131, 191}  # words 1 and 2: a few slots each
    keep = dense | sparse
    for i in range(192):
        latest = 1000.0 - i if i in keep else 0.0  # the kept: claimed highest slot first
        t.put(i, i % 2, 50.0 if i == 127 else 0.0, latest)
    for lane in (0, 1):  # free the others: expire over full words, more than a chunk
        gone = t.expire(lane, 1.0)
        assert gone == [(i, i) for i in range(lane, 192, 2) if i not in keep]
        for s, _ in gone:
            t.finish(s)
    assert t.reap() == sorted(set(range(192)) - keep)
    assert t.counts() == (192 - len(keep), len(keep), 0, 0)
    assert (t.next_earliest(0), t.next_earliest(1)) == (0.0, 0.0)
    odd = sorted((i for i in keep if i % 2 and i != 127), reverse=True)
    assert [t.claim(1, 1.0) for _ in odd] == [(i, i) for i in odd]
    assert t.claim(1, 1.0) is None
    assert t.next_earliest(1) == 50.0
    assert t.claim(1, 50.0) == (127, 127)
    assert t.claim(0, 1.0) == (130, 130)
    even = sorted(i for i in keep if i % 2 == 0 and i != 130)
    assert t.expire(0, 2000.0) == [(i, i) for i in even]
    for i in (0, 62, 64, 128, 191):  # some of each word DONE, the rest RUNNING
        t.finish(i)
    assert t.counts() == (192 - len(keep), 0, len(keep) - 5, 5)
    assert t.reap() == [0, 62, 64, 128, 191]
    assert t._counters() == (len(keep) - 5, 0, lanes())
    t.close()


def test_big_table_with_summary_words(impl: ModuleType) -> None:
    """5000 slots: 79 bitmap words, 2 summary words; slots in use around 4095/4096."""
    t = impl.ActionTable(5000)
    for i in range(4094):  # the cursor to slot 4094
        t.put(i, 0, 0.0, INF)
        t.finish(t.claim(0, 0.0)[0])
    t.reap()
    assert t.counts() == (5000, 0, 0, 0)
    got = [t.put(f"v{i}", i % 2, float(i), 10.0 - i) for i in range(4)]
    assert got == [4094, 4095, 4096, 4097]
    assert (t.next_earliest(0), t.next_earliest(1)) == (0.0, 1.0)
    assert t.claim(1, 5.0) == (4097, "v3")  # the smallest latest
    assert t.expire(0, 9.5) == [(4096, "v2")]  # latest 8.0 < 9.5 < 10.0
    assert t.claim(0, 5.0) == (4094, "v0")
    assert t.claim(1, 5.0) == (4095, "v1")
    for s in (4097, 4094, 4096, 4095):
        t.finish(s)
    assert t.reap() == ["v0", "v1", "v2", "v3"]
    assert t.counts() == (5000, 0, 0, 0)
    assert t._counters() == (0, 0, lanes())
    t.close()


def test_expire_takes_more_than_a_chunk(impl: ModuleType) -> None:
    """expire gathers its slots 64 at a time in C: 150 of them come back whole, in order."""
    t = impl.ActionTable(300)
    expired = []
    for i in range(240):
        lane = 0 if i % 8 else 1
        slot = t.put(i, lane, 0.0, 0.5 if i % 5 else INF)  # every 5th never expires
        if lane == 0 and i % 5:
            expired.append((slot, i))
    assert len(expired) > 128
    got = t.expire(0, 1.0)
    assert got == expired
    assert t.expire(0, 1.0) == []
    assert t.counts() == (60, 240 - len(expired), len(expired), 0)
    for s, _ in got:
        t.finish(s)
    assert t.reap() == [i for _, i in expired]
    assert t._counters() == (240 - len(expired), 0, lanes(l0=210 - len(expired), l1=30))
    t.close()


def test_reap_frees_every_done_slot(impl: ModuleType) -> None:
    """reap stops once the DONE count is spent, never before the last DONE slot."""
    t = impl.ActionTable(130)
    for i in range(130):
        t.put(i, 0, 0.0, INF)
    done = [0, 63, 64, 65, 127, 128, 129]
    taken = [t.claim(0, 0.0)[0] for _ in range(130)]
    assert taken == list(range(130))
    for s in reversed(done):
        t.finish(s)
    assert t.reap() == done
    assert t.counts() == (len(done), 0, 130 - len(done), 0)
    assert t.reap() == []
    t.close()


def test_scans_release_the_gil_or_not_alike() -> None:
    """C: a scan of few slots keeps the GIL, a long one releases it; the same answers."""
    c = _c_module()
    if not hasattr(c.ActionTable, "_release_gil_above"):
        pytest.skip("ext._actiontable is the twin here (MTSERVE_PUREPYTHON=1)")
    results = []
    for above in (0, 64, 10**6):
        t = c.ActionTable(300)
        t._release_gil_above(above)
        for i in range(100):
            t.put(i, i % 2, float(i % 3), float(i % 7))
        claimed = [t.claim(1, 1.0) for _ in range(5)]
        results.append((t.next_earliest(0), claimed, t.expire(0, 4.5), t.counts()))
        t.close()
    assert results[0] == results[1] == results[2]


# -- differential: the same random operations on both implementations --------------------


def _run_ops(
    table_cls: type, seed: int, steps: int, capacities: tuple[int, int] = (1, 12)
) -> list[object]:
    """Apply a seeded random sequence of operations; every result or error, in order.

    Puts outnumber the other operations on big tables, so that they fill up. Every step
    also logs `_counters()` and checks it against counts(): the fast paths' bookkeeping.
    """
    rng = random.Random(seed)
    t = table_cls(rng.randint(*capacities))
    if seed % 2 and hasattr(t, "_release_gil_above"):
        t._release_gil_above(0)  # C: every scan without the GIL (the same results)
    ops = ["put", "put", "claim", "claim", "expire", "next", "finish", "reap"]
    if capacities[1] > 12:
        ops += ["put"] * 4
    log: list[object] = []
    times = [-INF, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0, INF]
    for step in range(steps):
        op = rng.choice(ops)
        lane = rng.choice([0, 0, 1, 2])
        try:
            if op == "put":
                a, b = rng.choice(times), rng.choice(times)
                log.append(t.put(f"v{step}", lane, a, b))
            elif op == "claim":
                log.append(t.claim(lane, rng.choice(times)))
            elif op == "expire":
                log.append(t.expire(lane, rng.choice(times)))
            elif op == "next":
                log.append(t.next_earliest(lane))
            elif op == "finish":
                log.append(t.finish(rng.randrange(t.capacity)))
            else:
                log.append(t.reap())
        except (ValueError, IndexError, MemoryError) as e:
            log.append((type(e).__name__, str(e)))
        counts = t.counts()
        counters = t._counters()
        assert counters[0] == t.capacity - counts[0]  # slots in use
        assert counters[1] == counts[3]  # DONE
        assert sum(counters[2]) == counts[1]  # QUEUED, over the lanes
        assert min(counters[2]) >= 0
        log.append(counts)
        log.append(counters)
    t.close()
    return log


@pytest.mark.parametrize("seed", range(40))
def test_both_implementations_agree(seed: int) -> None:
    c = _c_module()
    assert _run_ops(c.ActionTable, seed, 300) == _run_ops(_actiontable_py.ActionTable, seed, 300)


@pytest.mark.parametrize("seed", range(8))
def test_both_implementations_agree_on_big_tables(seed: int) -> None:
    """Several bitmap words, more than 64 slots in use (scans without the GIL), wraps."""
    c = _c_module()
    got = _run_ops(c.ActionTable, seed, 1500, (60, 300))
    assert got == _run_ops(_actiontable_py.ActionTable, seed, 1500, (60, 300))


# -- stress: one producer, four consumers -------------------------------------------------

WALL_LIMIT_S = 300.0  # fail, never hang: every loop below also stops here
CONSUMERS = 4


def _latest(item: int) -> float:
    """Every 8th item is already past its window (now is 1.0): claim or expire may take it."""
    return 0.0 if item % 8 == 0 else float(item % 5) + 2.0


def stress(
    table_cls: type, full: type, items: int, capacity: int = 32, nogil: bool = False
) -> dict[str, int]:
    """Run the stress pattern; assert its invariants and return its counters.

    nogil (C only): every scan releases the GIL, however few slots are in use, so that the
    consumers' scans and CASes really overlap (by default a scan of at most 64 slots keeps
    the GIL, and then no other Python thread runs during it).
    """
    table = table_cls(capacity)
    if nogil and hasattr(table, "_release_gil_above"):  # not when the "C" one is the twin
        table._release_gil_above(0)
    deadline = time.monotonic() + WALL_LIMIT_S
    stop = threading.Event()
    seen = [bytearray(items) for _ in range(CONSUMERS)]  # claims of each item, per consumer
    wrong_lane = [0] * CONSUMERS
    expired = [0] * CONSUMERS
    errors: list[BaseException] = []
    max_rounds = 50 * items + 1_000_000

    def consume(k: int) -> None:
        lane, mine = k % 2, seen[k]
        claim, finish, expire = table.claim, table.finish, table.expire
        try:
            for rounds in range(max_rounds):
                if stop.is_set():
                    return
                if rounds % 1024 == 0 and time.monotonic() > deadline:
                    raise TimeoutError(f"consumer {k} still running after {WALL_LIMIT_S} s")
                if k < 2 and rounds % 4 == 0:
                    for slot, item in expire(lane, 1.0):
                        mine[item] += 1
                        expired[k] += 1
                        wrong_lane[k] += item % 2 != lane
                        finish(slot)
                got = claim(lane, 1.0)
                if got is None:
                    time.sleep(0)  # nothing queued for this lane: let the producer run
                    continue
                slot, item = got
                mine[item] += 1
                wrong_lane[k] += item % 2 != lane
                finish(slot)
            raise RuntimeError(f"consumer {k} did not stop within {max_rounds} rounds")
        except BaseException as e:  # handed to the main thread, which re-raises it
            errors.append(e)
            stop.set()

    threads = [
        threading.Thread(target=consume, args=(k,), name=f"consumer-{k}", daemon=True)
        for k in range(CONSUMERS)
    ]
    for th in threads:
        th.start()
    reaped = bytearray(items)
    put_next = n_reaped = 0
    try:
        for _ in range(max_rounds):
            if n_reaped == items or errors:
                break
            assert time.monotonic() < deadline, f"producer: {n_reaped} of {items} reaped"
            while put_next < items:
                try:
                    table.put(put_next, put_next % 2, 0.0, _latest(put_next))
                except full:
                    break
                put_next += 1
            done = table.reap()
            for item in done:
                reaped[item] += 1
            n_reaped += len(done)
            if not done:
                time.sleep(0)  # let the consumers run
        final_counts = table.counts()
        final_counters = table._counters()
    finally:
        stop.set()
        for th in threads:
            th.join(timeout=30)
    assert not any(th.is_alive() for th in threads), "a consumer did not stop"
    if errors:
        raise errors[0]
    claims = sum(np.frombuffer(s, dtype=np.uint8).astype(np.int64) for s in seen)
    assert n_reaped == items
    assert reaped.count(1) == items, "an item was reaped twice or never"
    assert int((claims == 0).sum()) == 0, "an item was never claimed"
    assert int((claims > 1).sum()) == 0, "an item was claimed twice"
    assert wrong_lane == [0] * CONSUMERS
    assert final_counts == (capacity, 0, 0, 0)
    assert final_counters == (0, 0, (0,) * 64), "the fast paths' counters drifted"
    table.close()
    return {"items": items, "ops": 4 * items, "expired": sum(expired)}


STRESS_CASES = [
    pytest.param("c", 50_000, 32, id="c-50k"),
    pytest.param("c-nogil", 50_000, 32, id="c-nogil-50k"),
    pytest.param("c", 50_000, 256, id="c-50k-256slots"),  # > 64 in use: scans without GIL
    pytest.param("py", 50_000, 32, id="py-50k"),
    pytest.param("c", 2_500_000, 32, marks=pytest.mark.slow, id="c-10Mops"),
    pytest.param("c-nogil", 2_500_000, 32, marks=pytest.mark.slow, id="c-nogil-10Mops"),
    pytest.param("py", 2_500_000, 32, marks=pytest.mark.slow, id="py-10Mops"),
]


@pytest.mark.timeout(WALL_LIMIT_S + 60)
@pytest.mark.parametrize(("which", "items", "capacity"), STRESS_CASES)
def test_stress_one_producer_four_consumers(which: str, items: int, capacity: int) -> None:
    """put + claim + finish + reap is 4 operations per item: 2.5 M items are 10 M ops."""
    mod = _actiontable_py if which == "py" else _c_module()
    result = stress(mod.ActionTable, mod.TableFull, items, capacity, nogil=which == "c-nogil")
    assert result["ops"] == 4 * items


@pytest.mark.timeout(WALL_LIMIT_S + 60)
@pytest.mark.parametrize("which", ["c", "c-nogil", "py"])
def test_stress_tiny_table(which: str) -> None:
    """Two slots: every slot is recycled constantly, so stale scans meet reused slots."""
    mod = _actiontable_py if which == "py" else _c_module()
    stress(mod.ActionTable, mod.TableFull, 20_000, capacity=2, nogil=which == "c-nogil")
