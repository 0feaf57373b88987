"""RequestTable: the C core (ext._reqtable) and its pure-Python twin, held to one spec.

Every test runs against both implementations; the C one is skipped only when it is not
built. A Hypothesis state machine checks each against a plain dict model, and subprocess
tests check which implementation `ext` picks.
"""

from __future__ import annotations

import importlib.util
import math
import pickle
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from ext import _reqtable_py

ROOT = Path(__file__).resolve().parents[1]
U64_MAX = 2**64 - 1
INF = math.inf
C_BUILT = importlib.util.find_spec("ext._reqtable") is not None


@pytest.fixture(params=["c", "py"], scope="module")
def table_cls(request: pytest.FixtureRequest) -> type:
    """Each implementation's class; a broken C build fails here rather than skipping."""
    if request.param == "py":
        return _reqtable_py.RequestTable
    if not C_BUILT:
        pytest.skip("ext._reqtable is not built: python setup.py build_ext --inplace")
    from ext import _reqtable

    return _reqtable.RequestTable


@pytest.fixture
def table(table_cls: type):
    t = table_cls()
    yield t
    t.close()


class Payload:
    """A distinct value whose identity the tests follow."""

    def __init__(self, name: str = "") -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Payload({self.name!r})"


# -- basic operations ---------------------------------------------------------------------


def test_insert_get_pop(table) -> None:
    value = Payload("a")
    table.insert(7, 10.0, value)
    assert len(table) == 1
    assert 7 in table
    assert 8 not in table
    assert table.get(7) is value
    assert table.keys() == [7]
    assert table.pop(7) is value
    assert len(table) == 0
    assert 7 not in table
    assert table.get(7) is None


def test_get_and_pop_defaults(table) -> None:
    assert table.get(1, "dflt") == "dflt"
    assert table.pop(1, "dflt") == "dflt"
    assert table.pop(1, None) is None
    with pytest.raises(KeyError) as info:
        table.pop(1)
    assert info.value.args == (1,)


def test_none_is_a_value(table) -> None:
    table.insert(1, 1.0, None)
    assert 1 in table
    assert table.get(1, "dflt") is None
    assert table.pop(1, "dflt") is None
    assert 1 not in table


def test_duplicate_insert_raises_and_keeps_the_first(table) -> None:
    first, second = Payload("first"), Payload("second")
    table.insert(3, 5.0, first)
    with pytest.raises(KeyError):
        table.insert(3, 1.0, second)
    assert table.get(3) is first
    assert table.next_deadline() == 5.0
    assert len(table) == 1


def test_keys_are_sorted(table) -> None:
    keys = [U64_MAX, 0, 2**63, 5, 2**32, 1]
    for k in keys:
        table.insert(k, 1.0, k)
    assert table.keys() == sorted(keys)
    assert set(map(type, table.keys())) == {int}


# -- argument validation --------------------------------------------------------------


@pytest.mark.parametrize("key", [0, 1, 2**32, 2**63, U64_MAX])
def test_full_uint64_range(table, key: int) -> None:
    table.insert(key, 1.0, "v")
    assert key in table
    assert table.get(key) == "v"
    assert table.keys() == [key]
    assert table.pop_expired(2.0) == [(key, "v")]


def _key_calls(key: object) -> list[Callable]:
    return [
        lambda t: t.insert(key, 1.0, "v"),
        lambda t: t.get(key),
        lambda t: t.pop(key, None),
        lambda t: key in t,
    ]


@pytest.mark.parametrize("key", [-1, 2**64, 2**70, -(2**64)])
def test_out_of_range_keys_raise_overflow(table, key: int) -> None:
    for call in _key_calls(key):
        with pytest.raises(OverflowError):
            call(table)
    assert len(table) == 0


@pytest.mark.parametrize("key", ["1", 1.0, None, b"\x01", 1j])
def test_non_integer_keys_raise_type_error(table, key: object) -> None:
    for call in _key_calls(key):
        with pytest.raises(TypeError):
            call(table)
    assert len(table) == 0


def test_integer_like_keys_become_ints(table) -> None:
    table.insert(True, 1.0, "bool")
    table.insert(np.uint64(U64_MAX), 1.0, "np.uint64")
    table.insert(np.int64(5), 1.0, "np.int64")
    assert table.keys() == [1, 5, U64_MAX]
    assert set(map(type, table.keys())) == {int}
    assert table.get(1) == "bool"
    assert table.pop(np.uint8(5)) == "np.int64"
    assert [type(k) for k, _ in table.pop_expired(2.0)] == [int, int]


@pytest.mark.parametrize("deadline", [0, -5, 1.5, np.float32(1.5), np.float64(2.0), INF, -INF])
def test_real_deadlines_are_accepted(table, deadline: object) -> None:
    table.insert(1, deadline, "v")
    assert table.next_deadline() == float(deadline)
    assert type(table.next_deadline()) is float


@pytest.mark.parametrize("bad", ["1.0", None, b"1", [1.0], 1j])
def test_non_numeric_times_raise_type_error(table, bad: object) -> None:
    with pytest.raises(TypeError):
        table.insert(1, bad, "v")
    with pytest.raises(TypeError):
        table.pop_expired(bad)
    assert len(table) == 0


def test_nan_times_raise_value_error(table) -> None:
    with pytest.raises(ValueError):
        table.insert(1, math.nan, "v")
    with pytest.raises(ValueError):
        table.pop_expired(math.nan)
    assert len(table) == 0


def test_capacity_hint(table_cls: type) -> None:
    for hint in (0, 1, 8, 1000):
        t = table_cls(hint)
        t.insert(1, 1.0, "v")
        assert t.get(1) == "v"
    assert len(table_cls(capacity_hint=3)) == 0
    for bad in (-1, 2**30 + 1, 2**64):
        with pytest.raises(ValueError):
            table_cls(bad)
    for bad in ("8", 8.0, None):
        with pytest.raises(TypeError):
            table_cls(bad)


def test_not_picklable(table) -> None:
    with pytest.raises(TypeError):
        pickle.dumps(table)


# -- deadlines ------------------------------------------------------------------------


def test_next_deadline_follows_the_entries(table) -> None:
    assert table.next_deadline() == INF
    table.insert(1, 5.0, "a")
    table.insert(2, 3.0, "b")
    table.insert(3, 3.0, "c")
    table.insert(4, INF, "d")
    assert table.next_deadline() == 3.0
    table.pop(2)
    assert table.next_deadline() == 3.0  # key 3 still has it
    table.pop(3)
    assert table.next_deadline() == 5.0
    table.insert(5, 4.0, "e")
    assert table.next_deadline() == 4.0
    table.pop(5)
    table.pop(1)
    assert table.next_deadline() == INF  # only key 4, no deadline
    table.pop(4)
    assert table.next_deadline() == INF


def test_pop_expired_is_strictly_before_now(table) -> None:
    table.insert(1, 1.0, "a")
    table.insert(2, 2.0, "b")
    table.insert(3, 3.0, "c")
    assert table.pop_expired(1.0) == []
    assert table.pop_expired(2.0) == [(1, "a")]
    assert table.keys() == [2, 3]
    assert table.next_deadline() == 2.0
    assert table.pop_expired(2.5) == [(2, "b")]
    assert table.next_deadline() == 3.0


def test_pop_expired_orders_by_deadline_then_key(table) -> None:
    entries = [(50, 2.0), (7, 1.0), (U64_MAX, 1.0), (0, 2.0), (9, 0.5), (3, 1.0), (8, 9.0)]
    for key, deadline in entries:
        table.insert(key, deadline, f"v{key}")
    got = table.pop_expired(5.0)
    assert type(got) is list
    assert all(type(item) is tuple for item in got)
    assert got == [(k, f"v{k}") for k in (9, 3, 7, U64_MAX, 0, 50)]
    assert table.keys() == [8]
    assert table.next_deadline() == 9.0


def test_infinite_deadlines_never_expire(table) -> None:
    table.insert(1, INF, "never")
    table.insert(2, -INF, "always")
    assert table.pop_expired(-1e308) == [(2, "always")]
    assert table.pop_expired(1e308) == []
    assert table.pop_expired(INF) == []
    assert table.keys() == [1]


def test_pop_expired_on_empty_table(table) -> None:
    assert table.pop_expired(1e9) == []


# -- growth, tombstones, collisions ---------------------------------------------------


def test_grows_from_a_tiny_hint(table_cls: type) -> None:
    t = table_cls(0)
    for k in range(5000):
        t.insert(k, float(5000 - k if k % 3 else k), k)  # after the evens go: 1.0, key 4999
    assert len(t) == 5000
    for k in range(0, 5000, 2):
        assert t.pop(k) == k
    for k in range(1, 5000, 2):
        assert t.get(k) == k
    assert 0 not in t
    assert t.keys() == list(range(1, 5000, 2))
    assert t.next_deadline() == 1.0


def test_sliding_window_of_requests(table_cls: type) -> None:
    """The broker's pattern: ids keep increasing, a window of them is in flight."""
    t = table_cls(8)
    window = 37
    for k in range(20_000):
        t.insert(k, float(k), k)
        if k >= window:
            assert t.pop(k - window) == k - window
    assert len(t) == window
    assert t.keys() == list(range(20_000 - window, 20_000))
    assert t.next_deadline() == float(20_000 - window)


@pytest.mark.parametrize("stride", [1, 2**32, 2**40, 2**63 // 1024])
def test_keys_that_share_low_or_high_bits(table_cls: type, stride: int) -> None:
    t = table_cls(0)
    keys = [i * stride for i in range(1024)]
    for k in keys:
        t.insert(k, 1.0, k)
    for k in keys[::3]:
        t.pop(k)
    kept = [k for i, k in enumerate(keys) if i % 3]
    assert t.keys() == kept
    assert all(t.get(k) == k for k in kept)
    assert t.pop_expired(2.0) == [(k, k) for k in kept]
    assert len(t) == 0


def test_reinserting_popped_keys(table_cls: type) -> None:
    t = table_cls(4)
    for round_ in range(50):
        for k in range(10):
            t.insert(k, float(round_), (round_, k))
        assert t.get(9) == (round_, 9)
        if round_ % 2:
            assert len(t.pop_expired(INF)) == 10
        else:
            for k in range(10):
                assert t.pop(k) == (round_, k)
        assert len(t) == 0


# -- close and references -------------------------------------------------------------

CLOSED_CALLS: dict[str, Callable] = {
    "insert": lambda t: t.insert(1, 1.0, "v"),
    "get": lambda t: t.get(1),
    "pop": lambda t: t.pop(1),
    "pop_with_default": lambda t: t.pop(1, None),
    "contains": lambda t: 1 in t,
    "pop_expired": lambda t: t.pop_expired(10.0),
    "next_deadline": lambda t: t.next_deadline(),
    "keys": lambda t: t.keys(),
}


@pytest.mark.parametrize("call", CLOSED_CALLS.values(), ids=CLOSED_CALLS.keys())
def test_closed_table_refuses(table, call: Callable) -> None:
    table.insert(1, 1.0, "v")
    table.close()
    with pytest.raises(ValueError, match="table is closed"):
        call(table)


def test_close_is_idempotent_and_empties(table) -> None:
    table.insert(1, 1.0, "v")
    table.insert(2, 2.0, "w")
    table.close()
    assert len(table) == 0
    table.close()
    assert len(table) == 0


def test_one_reference_per_entry(table_cls: type) -> None:
    value = Payload()
    base = sys.getrefcount(value)
    t = table_cls()
    t.insert(1, 1.0, value)
    assert sys.getrefcount(value) == base + 1
    assert t.get(1) is value
    assert sys.getrefcount(value) == base + 1
    assert t.pop(1) is value
    assert sys.getrefcount(value) == base
    t.insert(2, 1.0, value)
    t.insert(3, 5.0, value)
    with pytest.raises(KeyError):
        t.insert(3, 5.0, value)
    assert sys.getrefcount(value) == base + 2
    expired = t.pop_expired(2.0)
    assert sys.getrefcount(value) == base + 2  # one in the table, one in `expired`
    del expired
    assert sys.getrefcount(value) == base + 1
    for k in range(100, 200):  # growth moves references, it does not copy them
        t.insert(k, 9.0, value)
    assert sys.getrefcount(value) == base + 101
    t.close()
    assert sys.getrefcount(value) == base
    t = table_cls()
    t.insert(1, INF, value)
    del t  # deallocation releases too
    assert sys.getrefcount(value) == base


def test_value_finalizer_during_close_sees_a_closed_table(table_cls: type) -> None:
    t = table_cls()
    seen: list[str] = []

    class CallsBack:
        def __del__(self) -> None:
            try:
                t.get(1)
            except ValueError as e:
                seen.append(str(e))
            else:
                seen.append("open")

    t.insert(1, 1.0, CallsBack())
    t.insert(2, 1.0, CallsBack())
    t.close()
    assert seen == ["table is closed", "table is closed"]


class SneakyInt:
    """An integer whose conversion first runs `action`."""

    def __init__(self, value: int, action: Callable[[], object]) -> None:
        self.value = value
        self.action = action

    def __index__(self) -> int:
        self.action()
        return self.value

    def __float__(self) -> float:
        self.action()
        return float(self.value)


def test_argument_conversion_that_closes_the_table(table) -> None:
    table.insert(1, 1.0, "v")
    with pytest.raises(ValueError, match="table is closed"):
        table.insert(SneakyInt(2, table.close), 1.0, "v")


def test_argument_conversion_that_fills_the_table(table_cls: type) -> None:
    t = table_cls(0)

    def fill() -> None:
        for k in range(100, 1100):
            t.insert(k, 3.0, k)

    t.insert(SneakyInt(7, fill), 1.0, "seven")
    assert len(t) == 1001
    assert t.get(7) == "seven"
    assert t.pop_expired(SneakyInt(2, lambda: t.pop(100))) == [(7, "seven")]
    assert len(t) == 999


# -- model-based: random operation sequences against a dict ---------------------------

KEYS = st.one_of(
    st.integers(0, 24),
    st.sampled_from([2**32, 2**63, U64_MAX]),
    st.integers(0, U64_MAX),
)
DEADLINES = st.one_of(st.integers(0, 16).map(lambda n: n / 2), st.sampled_from([INF, -INF]))
NOWS = st.one_of(st.integers(0, 18).map(lambda n: n / 2), st.sampled_from([INF, -INF]))
ABSENT = object()


class TableVersusDict(RuleBasedStateMachine):
    """Drives one table and a {key: (deadline, value)} dict through the same operations."""

    def __init__(self, table_cls: type) -> None:
        super().__init__()
        self.table_cls = table_cls
        self.table = table_cls()
        self.model: dict[int, tuple[float, object]] = {}

    @initialize(hint=st.integers(0, 40))
    def start(self, hint: int) -> None:
        self.table = self.table_cls(hint)  # small hints force growth and rehashing

    @rule(key=KEYS, deadline=DEADLINES)
    def insert(self, key: int, deadline: float) -> None:
        value = Payload(f"{key}@{deadline}")
        if key in self.model:
            with pytest.raises(KeyError):
                self.table.insert(key, deadline, value)
        else:
            self.table.insert(key, deadline, value)
            self.model[key] = (deadline, value)

    @rule(start=st.integers(0, U64_MAX - 64), count=st.integers(1, 64), deadline=DEADLINES)
    def insert_run(self, start: int, count: int, deadline: float) -> None:
        for key in range(start, start + count):
            if key not in self.model:
                value = Payload(str(key))
                self.table.insert(key, deadline, value)
                self.model[key] = (deadline, value)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def pop_present(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.model)))
        assert self.table.pop(key) is self.model.pop(key)[1]

    @rule(key=KEYS, with_default=st.booleans())
    def pop_any(self, key: int, with_default: bool) -> None:
        entry = self.model.pop(key, None)
        if entry is not None:
            assert self.table.pop(key) is entry[1]
        elif with_default:
            assert self.table.pop(key, ABSENT) is ABSENT
        else:
            with pytest.raises(KeyError):
                self.table.pop(key)

    @rule(key=KEYS)
    def get(self, key: int) -> None:
        entry = self.model.get(key)
        assert self.table.get(key, ABSENT) is (ABSENT if entry is None else entry[1])
        assert (key in self.table) == (entry is not None)

    @rule(now=NOWS)
    def pop_expired(self, now: float) -> None:
        due = sorted((d, k) for k, (d, _) in self.model.items() if d < now)
        expected = [(k, self.model.pop(k)[1]) for _, k in due]
        got = self.table.pop_expired(now)
        assert [k for k, _ in got] == [k for k, _ in expected]
        assert all(a is b for (_, a), (_, b) in zip(got, expected, strict=True))

    @rule()
    def next_deadline(self) -> None:
        # A rule, not an invariant: checking after every step would refresh the cached
        # minimum each time and hide a stale cache from pop_expired.
        expected = min((d for d, _ in self.model.values()), default=INF)
        assert self.table.next_deadline() == expected

    @invariant()
    def same_entries(self) -> None:
        assert len(self.table) == len(self.model)
        assert self.table.keys() == sorted(self.model)

    def teardown(self) -> None:
        self.table.close()


def test_matches_a_dict_model(table_cls: type) -> None:
    run_state_machine_as_test(
        lambda: TableVersusDict(table_cls),
        settings=settings(
            max_examples=100,
            stateful_step_count=50,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
