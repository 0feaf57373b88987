"""PagePool: the C core (ext._pages) and its pure-Python twin, held to one spec.

Every test runs against both implementations; the C one is skipped only when it is not
built. A Hypothesis state machine checks each against a list-of-pages model, and a
property test checks that both choose the same pages and raise the same errors. Unbacked
pools (backed=False, the accounting of a device pool) must account exactly as backed ones.
"""

from __future__ import annotations

import gc
import importlib.util
import mmap
import pickle
from types import ModuleType

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from ext import _pages_py
from mtcore.errors import PoolExhausted

C_BUILT = importlib.util.find_spec("ext._pages") is not None
PAGE = 64  # the smallest page size, so that tests stay small


@pytest.fixture(params=["c", "py"], scope="module")
def impl(request: pytest.FixtureRequest) -> ModuleType:
    """Each implementation's module; a broken C build fails here rather than skipping."""
    if request.param == "py":
        return _pages_py
    if not C_BUILT:
        pytest.skip("ext._pages is not built: python setup.py build_ext --inplace")
    from ext import _pages

    return _pages


@pytest.fixture
def pool(impl: ModuleType):
    p = impl.PagePool(8 * PAGE, PAGE)
    yield p
    p.close()


def address(view: memoryview) -> int:
    return np.frombuffer(view, np.uint8).ctypes.data


# -- basic operations ---------------------------------------------------------------------


def test_geometry_and_accounting(impl: ModuleType) -> None:
    with impl.PagePool(5 * PAGE + 63, PAGE) as p:  # the slack is no page
        assert (p.page_size, p.pages_total, p.pages_free, p.largest_run()) == (PAGE, 5, 5, 5)
        a = p.alloc(PAGE + 1)
        assert a.pages == (0, 1)
        assert (a.nbytes, a.contiguous, a.freed) == (PAGE + 1, True, False)
        assert (p.pages_free, p.bytes_reserved, p.bytes_requested) == (3, 2 * PAGE, PAGE + 1)
        assert p.live_allocations == 1
        a.free()
        assert a.freed
        assert (p.pages_free, p.bytes_reserved, p.bytes_requested, p.live_allocations) == (
            5, 0, 0, 0,
        )  # fmt: skip
    assert impl.PagePool(1 << 21).page_size == 1 << 20  # the default page


def test_page_numbers_past_the_small_int_cache_survive(impl: ModuleType) -> None:
    """Page indices above 256 are fresh int objects; the tuple must own them."""
    big = impl.PagePool(1024 * 4096, 4096)
    singles = [big.alloc(1) for _ in range(600)]
    gc.collect()
    assert [a.pages for a in singles] == [(i,) for i in range(600)]
    assert big.alloc(300 * 4096).pages == tuple(range(600, 900))
    assert sum(len(a.pages) for a in singles) == 600
    for allocation in singles:
        allocation.free()
    big.close()


def test_alloc_zero_takes_one_page(pool) -> None:
    a = pool.alloc(0)
    assert a.pages == (0,)
    assert a.contiguous
    assert (pool.pages_free, pool.bytes_reserved, pool.bytes_requested) == (7, PAGE, 0)
    assert len(a.page(0)) == PAGE


def test_lowest_pages_first_adjacent_or_not(pool) -> None:
    held = [pool.alloc(PAGE) for _ in range(8)]
    for i in (1, 3, 4, 6):
        held[i].free()
    a = pool.alloc(3 * PAGE)
    assert a.pages == (1, 3, 4)
    assert not a.contiguous
    with pytest.raises(ValueError, match="not adjacent"):
        a.view()
    assert len(a.page(2)) == PAGE
    a.free()
    assert pool.alloc(2 * PAGE, contiguous=True).pages == (3, 4)  # the first run long enough
    assert pool.largest_run() == 1


def test_pool_exhausted_changes_nothing(pool) -> None:
    a = pool.alloc(3 * PAGE)
    pool.alloc(PAGE)
    a.free()  # free: 0 1 2 _ 4 5 6 7
    before = (pool.pages_free, pool.bytes_reserved, pool.bytes_requested, pool.live_allocations)
    with pytest.raises(PoolExhausted, match=r"5 contiguous .* 7 of 8 .* largest free run is 4"):
        pool.alloc(5 * PAGE, contiguous=True)
    with pytest.raises(PoolExhausted, match=r"cannot allocate 8 pages \(512 bytes\): 7 of 8"):
        pool.alloc(8 * PAGE)
    with pytest.raises(MemoryError):  # PoolExhausted is a MemoryError too
        pool.alloc(1 << 80)  # any size: no overflow
    after = (pool.pages_free, pool.bytes_reserved, pool.bytes_requested, pool.live_allocations)
    assert after == before
    assert pool.alloc(7 * PAGE).pages == (0, 1, 2, 4, 5, 6, 7)


# -- views alias the pool's one buffer ------------------------------------------------------


def test_views_alias_the_buffer(pool) -> None:
    a = pool.alloc(3 * PAGE, contiguous=True)
    view = a.view()
    assert (len(view), view.format, view.ndim, view.readonly) == (3 * PAGE, "B", 1, False)
    assert address(view) % 64 == 0
    whole = np.frombuffer(view, np.uint32)
    whole[:] = np.arange(whole.size)
    second = np.frombuffer(a.page(1), np.uint32)
    assert address(a.page(1)) == address(view) + PAGE
    assert (second == np.arange(16, 32)).all()
    second[0] = 999
    assert whole[16] == 999
    b = pool.alloc(PAGE)  # another allocation's writes do not reach a's pages
    np.frombuffer(b.view(), np.uint8)[:] = 0xFF
    assert address(b.view()) == address(view) + 3 * PAGE
    assert (whole == np.r_[np.arange(16), 999, np.arange(17, 48)]).all()


def test_freed_pages_are_handed_out_again_uncleared(pool) -> None:
    a = pool.alloc(2 * PAGE)
    old = np.frombuffer(a.view(), np.uint8)  # kept past free(): the caller's to avoid
    old[:] = 7
    a.free()
    b = pool.alloc(PAGE)
    assert b.pages == (0,)
    new = np.frombuffer(b.page(0), np.uint8)
    assert (new == 7).all()  # not cleared
    new[:3] = 1
    assert old[:4].tolist() == [1, 1, 1, 7]
    del old, new


def test_a_view_outlives_its_pool_object(impl: ModuleType) -> None:
    view = impl.PagePool(2 * PAGE, PAGE).alloc(10).page(0)
    gc.collect()
    view[:4] = b"keep"
    assert bytes(view[:4]) == b"keep"


# -- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("capacity", "page_size", "error"),
    [
        (PAGE, 0, ValueError),
        (PAGE, -PAGE, ValueError),
        (PAGE, 100, ValueError),  # not a multiple of 64
        (PAGE - 1, PAGE, ValueError),  # no page
        (-PAGE, PAGE, ValueError),
        (1 << 80, PAGE, ValueError),  # more than one buffer can hold
        (PAGE * 1.0, PAGE, TypeError),
        (PAGE, "64", TypeError),
    ],
)
def test_bad_constructor_arguments(impl: ModuleType, capacity, page_size, error) -> None:
    with pytest.raises(error):
        impl.PagePool(capacity, page_size)


def test_bad_alloc_arguments(pool) -> None:
    with pytest.raises(ValueError, match="nbytes must be >= 0"):
        pool.alloc(-1)
    with pytest.raises(TypeError):
        pool.alloc(1.5)
    assert (pool.pages_free, pool.live_allocations) == (8, 0)


def test_double_free_and_freed_allocation(pool) -> None:
    a = pool.alloc(PAGE)
    a.free()
    with pytest.raises(ValueError, match="already freed"):
        a.free()
    with pytest.raises(ValueError, match="allocation is freed"):
        a.page(0)
    with pytest.raises(ValueError, match="allocation is freed"):
        a.view()
    assert (pool.pages_free, pool.live_allocations) == (8, 0)


def test_page_index(pool) -> None:
    a = pool.alloc(2 * PAGE)
    for i in (2, -1, 1 << 80):
        with pytest.raises(IndexError, match="out of range"):
            a.page(i)
    with pytest.raises(TypeError):
        a.page(1.0)
    assert address(a.page(np.int64(1))) == address(a.view()) + PAGE


def test_allocations_come_from_alloc_only(impl: ModuleType, pool) -> None:
    with pytest.raises(TypeError, match=r"PagePool\.alloc"):
        impl.Allocation()
    for obj in (pool, pool.alloc(1)):
        with pytest.raises(TypeError):
            pickle.dumps(obj)


def test_close_with_live_views(pool) -> None:
    a = pool.alloc(2 * PAGE, contiguous=True)
    view = a.view()
    part = view[PAGE:]
    array = np.frombuffer(a.page(0), np.uint8)
    del view  # part shares its export; array holds another
    with pytest.raises(BufferError, match="memoryviews of its pages are alive"):
        pool.close()
    assert pool.alloc(PAGE).pages == (2,)  # still open and usable
    part.release()
    with pytest.raises(BufferError):
        pool.close()
    del array
    pool.close()
    with pytest.raises(ValueError, match="pool is closed"):
        a.page(0)


def test_closed_pool(impl: ModuleType) -> None:
    p = impl.PagePool(4 * PAGE, PAGE)
    a = p.alloc(PAGE)
    exporter = a.page(0).obj  # what a view's buffer comes from; the view itself is gone
    p.close()
    p.close()  # idempotent
    assert_closed(p, a)
    with pytest.raises(ValueError):
        memoryview(exporter)  # no view of an unmapped buffer
    assert (a.pages, a.freed) == ((0,), False)


def assert_closed(p, a) -> None:
    """Every property and method of closed pool p, and of its live allocation a, fails."""
    for name in ("page_size", "pages_total", "pages_free", "bytes_reserved",
                 "bytes_requested", "live_allocations", "address", "backed"):  # fmt: skip
        with pytest.raises(ValueError, match="pool is closed"):
            getattr(p, name)
    for call in (p.largest_run, lambda: p.alloc(1), p.__enter__, a.view, a.free,
                 lambda: a.page(0)):  # fmt: skip
        with pytest.raises(ValueError, match="pool is closed"):
            call()


def test_context_manager(impl: ModuleType) -> None:
    with impl.PagePool(4 * PAGE, PAGE) as p:
        p.alloc(PAGE)
    with pytest.raises(ValueError, match="pool is closed"):
        p.alloc(PAGE)


def test_argument_conversion_that_closes_the_pool(impl: ModuleType) -> None:
    p = impl.PagePool(4 * PAGE, PAGE)

    class ClosesPool:
        def __index__(self) -> int:
            p.close()
            return 1

    with pytest.raises(ValueError, match="pool is closed"):
        p.alloc(ClosesPool())


# -- the address, and unbacked pools ------------------------------------------------------


def test_address_is_the_page_aligned_buffer(impl: ModuleType) -> None:
    p = impl.PagePool(4 * PAGE, PAGE)
    assert p.backed is True
    assert p.address != 0
    assert p.address % mmap.PAGESIZE == 0  # what cudaHostRegister has always accepted
    p.alloc(PAGE)
    b = p.alloc(2 * PAGE)
    assert address(b.view()) == address(b.page(0)) == p.address + PAGE
    assert address(b.page(1)) == p.address + 2 * PAGE
    assert p.address == p.address  # reading it again exports nothing new
    gc.collect()
    p.close()  # reading the address left no export behind (the twin's ctypes object)
    with pytest.raises(ValueError, match="pool is closed"):
        _ = p.address


def test_backed_is_keyword_only(impl: ModuleType) -> None:
    with pytest.raises(TypeError):
        impl.PagePool(4 * PAGE, PAGE, False)
    with impl.PagePool(4 * PAGE, PAGE, backed=True) as p:
        assert p.backed is True


def test_unbacked_pool_accounts_without_memory(impl: ModuleType) -> None:
    p = impl.PagePool(5 * PAGE + 63, PAGE, backed=False)
    assert (p.backed, p.address) == (False, 0)
    assert (p.page_size, p.pages_total, p.pages_free, p.largest_run()) == (PAGE, 5, 5, 5)
    a = p.alloc(PAGE + 1)
    b = p.alloc(PAGE, contiguous=True)
    assert (a.pages, a.nbytes, a.contiguous, a.freed) == ((0, 1), PAGE + 1, True, False)
    assert b.pages == (2,)
    assert (p.pages_free, p.bytes_reserved, p.bytes_requested, p.live_allocations) == (
        2, 3 * PAGE, 2 * PAGE + 1, 2,
    )  # fmt: skip
    for call in (a.view, lambda: a.page(0), lambda: a.page(5)):  # no memory before the index
        with pytest.raises(ValueError, match="the pool has no host memory: "):
            call()
    with pytest.raises(TypeError):
        a.page(1.0)
    with pytest.raises(PoolExhausted, match=r"3 contiguous .* 2 of 5 .* largest free run is 2"):
        p.alloc(3 * PAGE, contiguous=True)
    a.free()
    with pytest.raises(ValueError, match="allocation is freed"):
        a.view()
    with pytest.raises(ValueError, match="already freed"):
        a.free()
    assert (p.pages_free, p.bytes_requested, p.live_allocations, p.largest_run()) == (
        4, PAGE, 1, 2,
    )  # fmt: skip
    b.free()
    assert (p.pages_free, p.bytes_reserved, p.bytes_requested, p.live_allocations) == (
        5, 0, 0, 0,
    )  # fmt: skip
    p.close()


def test_unbacked_pool_can_be_huge(impl: ModuleType) -> None:
    """Nothing is mapped: the accounting of 1 TiB of 1 MiB pages costs a 1 MiB page map."""
    with impl.PagePool(1 << 40, 1 << 20, backed=False) as p:
        assert (p.pages_total, p.address) == (1 << 20, 0)
        assert p.alloc(3 << 30, contiguous=True).pages == tuple(range(3 << 10))


def test_closed_unbacked_pool(impl: ModuleType) -> None:
    p = impl.PagePool(4 * PAGE, PAGE, backed=False)
    a = p.alloc(PAGE)
    p.close()  # live allocations do not keep an unbacked pool open, nor a backed one
    p.close()  # idempotent
    assert_closed(p, a)
    assert (a.pages, a.freed) == ((0,), False)
    with impl.PagePool(4 * PAGE, PAGE, backed=False) as q:
        q.alloc(PAGE)
    with pytest.raises(ValueError, match="pool is closed"):
        q.alloc(PAGE)


@settings(max_examples=100, deadline=None)
@given(pages=st.integers(1, 24), ops=st.deferred(lambda: OPS))
def test_unbacked_pools_account_as_backed_ones(impl: ModuleType, pages: int, ops) -> None:
    assert trace(impl, pages, ops, backed=False) == trace(impl, pages, ops)


@pytest.mark.parametrize("nth", [1, 2])
@pytest.mark.parametrize("action", ["close", "alloc", "free"])
def test_a_collection_during_alloc_that_uses_the_pool(
    impl: ModuleType, action: str, nth: int
) -> None:
    """Making an object may start a collection, whose finalizers may use the pool.

    With the threshold at 1, CPython 3.11 collects twice in this alloc: in the argument
    check and when alloc makes its tuple (C) or its Allocation (twin). Elsewhere the
    points differ, or nothing happens; the pool must be consistent either way.
    """
    p = impl.PagePool(64 * PAGE, PAGE)
    held = [p.alloc(PAGE) for _ in range(3)]
    starts: list[str] = []

    def use_pool(phase: str, info: dict) -> None:
        if phase == "start":
            starts.append(phase)
            if len(starts) == nth:
                if action == "close":
                    p.close()
                elif action == "alloc":
                    held.append(p.alloc(3 * PAGE))
                else:
                    held.pop(0).free()

    threshold = gc.get_threshold()
    gc.callbacks.append(use_pool)
    gc.set_threshold(1)
    try:
        got = p.alloc(30 * PAGE)
    except ValueError as e:
        assert (action, str(e)) == ("close", "pool is closed")
        return
    finally:
        gc.set_threshold(*threshold)
        gc.callbacks.remove(use_pool)
    if action == "close" and len(starts) >= nth:
        with pytest.raises(ValueError, match="pool is closed"):
            got.page(0)
        return
    held.append(got)
    pages = [q for a in held for q in a.pages]
    assert len(pages) == len(set(pages))  # nothing handed out twice
    assert (p.pages_free, p.live_allocations) == (64 - len(pages), len(held))
    p.close()


# -- model-based: random sequences of alloc and free ----------------------------------------

NBYTES = st.one_of(st.integers(0, 26 * PAGE), st.integers(0, 26).map(lambda k: k * PAGE))


def model_pages(free: list[bool], k: int, contiguous: bool) -> tuple[int, ...] | None:
    """The pages alloc must choose given which pages are free, or None if it must fail."""
    if contiguous:
        starts = (s for s in range(len(free) - k + 1) if all(free[s : s + k]))
        start = next(starts, None)
        return None if start is None else tuple(range(start, start + k))
    candidates = [i for i, f in enumerate(free) if f]
    return tuple(candidates[:k]) if len(candidates) >= k else None


def model_largest_run(free: list[bool]) -> int:
    best = run = 0
    for f in free:
        run = run + 1 if f else 0
        best = max(best, run)
    return best


class PoolVersusModel(RuleBasedStateMachine):
    """Drives one pool and a list of free flags through the same allocs and frees."""

    def __init__(self, impl: ModuleType) -> None:
        super().__init__()
        self.impl = impl
        self.pool = impl.PagePool(8 * PAGE, PAGE)
        self.free = [True] * 8  # the model: page i is free
        self.live: list[tuple[object, int]] = []  # (allocation, stamp written in its pages)
        self.stamps = 0

    @initialize(pages=st.integers(1, 24), slack=st.integers(0, PAGE - 1))
    def start(self, pages: int, slack: int) -> None:
        self.pool.close()
        self.pool = self.impl.PagePool(pages * PAGE + slack, PAGE)
        self.free = [True] * pages

    def accounting(self) -> tuple[int, ...]:
        p = self.pool
        return (p.pages_free, p.bytes_reserved, p.bytes_requested, p.live_allocations,
                p.largest_run())  # fmt: skip

    @rule(nbytes=NBYTES, contiguous=st.booleans())
    def alloc(self, nbytes: int, contiguous: bool) -> None:
        k = max(1, -(-nbytes // PAGE))
        want = model_pages(self.free, k, contiguous)
        if want is None:
            before = self.accounting()
            with pytest.raises(PoolExhausted, match=f"cannot allocate {k} "):
                self.pool.alloc(nbytes, contiguous)
            assert self.accounting() == before
            return
        a = self.pool.alloc(nbytes, contiguous)
        assert a.pages == want
        assert (a.nbytes, a.freed) == (nbytes, False)
        assert a.contiguous == (want[-1] - want[0] + 1 == k)
        for p in want:
            self.free[p] = False
        self.stamps += 1
        for i in range(k):
            with a.page(i) as page:
                page[:8] = self.stamps.to_bytes(8, "little")
        self.live.append((a, self.stamps))

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free_one(self, data: st.DataObject) -> None:
        a, _ = self.live.pop(data.draw(st.integers(0, len(self.live) - 1)))
        a.free()
        assert a.freed
        for p in a.pages:
            self.free[p] = True

    @invariant()
    def accounting_matches(self) -> None:
        held = [p for a, _ in self.live for p in a.pages]
        assert len(held) == len(set(held))  # no page in two live allocations
        assert sorted(held) == [i for i, f in enumerate(self.free) if not f]
        requested = sum(a.nbytes for a, _ in self.live)
        assert self.accounting() == (
            self.free.count(True), len(held) * PAGE, requested, len(self.live),
            model_largest_run(self.free),
        )  # fmt: skip

    @invariant()
    def pages_keep_their_data(self) -> None:
        for a, stamp in self.live:
            assert list(a.pages) == sorted(a.pages)
            if a.contiguous:
                assert a.pages == tuple(range(a.pages[0], a.pages[0] + len(a.pages)))
                with a.view() as view:
                    assert all(
                        int.from_bytes(view[i * PAGE : i * PAGE + 8], "little") == stamp
                        for i in range(len(a.pages))
                    )
            for i in range(len(a.pages)):
                with a.page(i) as page:
                    assert int.from_bytes(page[:8], "little") == stamp

    def teardown(self) -> None:
        for a, _ in self.live:
            a.free()
        total = len(self.free)
        assert self.accounting() == (total, 0, 0, 0, total)
        self.pool.close()  # no export left behind: BufferError otherwise


def test_matches_a_model(impl: ModuleType) -> None:
    run_state_machine_as_test(
        lambda: PoolVersusModel(impl),
        settings=settings(
            max_examples=100,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


# -- both implementations agree ----------------------------------------------------------

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("alloc"), NBYTES, st.booleans()),
        st.tuples(st.just("free"), st.integers(0, 30)),
    ),
    max_size=40,
)


def trace(module: ModuleType, pages: int, ops: list[tuple], backed: bool = True) -> list[object]:
    """What each operation returned or raised, on a fresh pool of the given module."""
    out: list[object] = []
    live = []
    with module.PagePool(pages * PAGE, PAGE, backed=backed) as pool:
        for op in ops:
            if op[0] == "alloc":
                try:
                    a = pool.alloc(op[1], op[2])
                except PoolExhausted as e:
                    out.append(str(e))
                else:
                    live.append(a)
                    out.append((a.pages, a.contiguous))
            elif live:
                live.pop(op[1] % len(live)).free()
            out.append((pool.pages_free, pool.largest_run(), pool.bytes_reserved,
                        pool.bytes_requested, pool.live_allocations))  # fmt: skip
    return out


@pytest.mark.skipif(not C_BUILT, reason="ext._pages is not built")
@settings(max_examples=200, deadline=None)
@given(pages=st.integers(1, 24), ops=OPS)
def test_both_implementations_choose_the_same_pages(pages: int, ops: list[tuple]) -> None:
    from ext import _pages

    assert trace(_pages, pages, ops) == trace(_pages_py, pages, ops)
