"""worker.gpu: pinned and device page pools, the page-for-page copy, and the streams.

Everything that needs no device runs everywhere: gpu_status, the pinned pool unpinned,
the copy plan (`copy_runs`, `copy_ranges`), and every argument check of the device side,
on a DevicePool whose device memory is faked (`fake_device_pool`). The tests marked
`gpu` run where CuPy sees a device (tests/conftest.py skips them elsewhere) and check the
real thing: registration, copies of scattered pages, views aliasing the pool, an exec
kernel ordered after a weight copy, and memory given back on close.
"""

from __future__ import annotations

import gc
import itertools
import random
import sys
import types
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from ext import PagePool
from mtcore.errors import LoadFailed, PoolExhausted
from worker.gpu import GpuUnavailable, gpu_status
from worker.gpu.pools import (
    DeviceAllocation,
    DevicePool,
    PinnedPool,
    copy_pages,
    copy_ranges,
    copy_runs,
)

HAS_GPU = gpu_status()[0]
KIB = 1 << 10
MIB = 1 << 20
no_gpu_only = pytest.mark.skipif(HAS_GPU, reason="a GPU is visible here")


# -- gpu_status ---------------------------------------------------------------------------


def test_gpu_status_is_a_flag_and_a_reason() -> None:
    visible, reason = gpu_status()
    assert isinstance(visible, bool)
    assert isinstance(reason, str) and reason
    assert gpu_status() is gpu_status()  # cached


@no_gpu_only
def test_gpu_status_says_why_not_here() -> None:
    visible, reason = gpu_status()
    assert not visible
    assert reason.startswith(("cupy is not installed", "cupy cannot be imported",
                              "no CUDA device is visible: "))  # fmt: skip


def fake_cupy(count: int | Exception, name: bytes = b"Fake GPU") -> types.ModuleType:
    """A module standing in for cupy: its runtime reports `count` devices or raises."""

    def device_count() -> int:
        if isinstance(count, Exception):
            raise count
        return count

    runtime = types.SimpleNamespace(
        getDeviceCount=device_count,
        getDeviceProperties=lambda device: {"name": name},
        runtimeGetVersion=lambda: 13000,
        driverGetVersion=lambda: 13010,
    )
    module = types.ModuleType("cupy")
    module.cuda = types.SimpleNamespace(runtime=runtime)
    return module


@pytest.mark.parametrize(
    ("cupy", "want"),
    [
        (None, (False, "cupy is not installed")),
        (fake_cupy(RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")),
         (False, "no CUDA device is visible: cudaErrorNoDevice: no CUDA-capable device is"
                 " detected")),
        (fake_cupy(0), (False, "no CUDA device is visible: the device count is 0")),
        (fake_cupy(1, b"NVIDIA H200"), (True, "NVIDIA H200, CUDA runtime 13000, driver 13010")),
    ],
)  # fmt: skip
def test_gpu_status_cases(monkeypatch: pytest.MonkeyPatch, cupy, want) -> None:
    monkeypatch.setitem(sys.modules, "cupy", cupy)  # None: importing it fails
    assert gpu_status.__wrapped__() == want  # uncached


def test_gpu_status_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = fake_cupy(1)
    broken.cuda.runtime.getDeviceProperties = lambda device: {}  # KeyError
    monkeypatch.setitem(sys.modules, "cupy", broken)
    visible, reason = gpu_status.__wrapped__()
    assert not visible
    assert reason.startswith("no CUDA device is visible: ")


# -- the pinned pool, wherever it runs ------------------------------------------------------


def test_pinned_pool_is_a_full_page_pool() -> None:
    with PinnedPool(8 * 4 * KIB + 100, 4 * KIB) as pinned:
        assert pinned.pinned is HAS_GPU  # registered exactly where a GPU is visible
        pool = pinned.pool
        assert isinstance(pool, PagePool)
        assert (pool.page_size, pool.pages_total, pool.pages_free) == (4 * KIB, 8, 8)
        assert (pinned.address, pinned.nbytes) == (pool.address, 8 * 4 * KIB)
        a = pool.alloc(4 * KIB + 1)
        b = pool.alloc(3 * 4 * KIB, contiguous=True)
        assert (a.pages, b.pages) == ((0, 1), (2, 3, 4))
        assert (pool.bytes_reserved, pool.bytes_requested, pool.live_allocations) == (
            5 * 4 * KIB, 4 * 4 * KIB + 1, 2,
        )  # fmt: skip
        assert pinned.page_address(3) == pinned.address + 3 * 4 * KIB
        assert pinned.page_address(3) == np.frombuffer(b.page(1), np.uint8).ctypes.data
        with pytest.raises(IndexError, match="page 8 is out of range for 8 pages"):
            pinned.page_address(8)
        np.frombuffer(b.view(), np.uint8)[:] = 7
        assert bytes(b.page(2)[:3]) == b"\x07\x07\x07"
        a.free()
        b.free()
        assert (pool.pages_free, pool.live_allocations) == (8, 0)
    assert not pinned.pinned
    with pytest.raises(ValueError, match="pool is closed"):
        pool.alloc(1)
    with pytest.raises(ValueError, match="pool is closed"):
        pinned.page_address(0)
    pinned.close()  # idempotent
    pinned.unpin()


def test_pinned_pool_close_with_a_live_view_keeps_the_pool() -> None:
    pinned = PinnedPool(4 * 4 * KIB, 4 * KIB)
    view = pinned.pool.alloc(1).page(0)
    with pytest.raises(BufferError):
        pinned.close()
    assert not pinned.pinned  # unpinned first; the pool stays usable, pageable
    view[:2] = b"ok"
    del view
    pinned.close()


# -- the copy plan ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dst", "src", "runs"),
    [
        ((), (), []),
        ((5,), (2,), [(5, 2, 1)]),
        ((0, 1, 2, 3), (4, 5, 6, 7), [(0, 4, 4)]),  # adjacent on both sides: one copy
        ((0, 1, 2, 3), (4, 5, 7, 8), [(0, 4, 2), (2, 7, 2)]),  # a gap in src splits
        ((0, 2, 3), (1, 2, 3), [(0, 1, 1), (2, 2, 2)]),  # a gap in dst splits
        ((1, 3, 5), (0, 2, 4), [(1, 0, 1), (3, 2, 1), (5, 4, 1)]),  # scattered
        ((9, 10, 11), (4, 5, 6), [(9, 4, 3)]),
    ],
)
def test_copy_runs(dst, src, runs) -> None:
    assert copy_runs(dst, src) == runs


def test_copy_runs_needs_as_many_pages_each_side() -> None:
    with pytest.raises(ValueError, match="cannot copy 2 pages into 3: page i goes to page i"):
        copy_runs((0, 1, 2), (0, 1))


def test_copy_runs_cover_every_page_pair_once_maximally() -> None:
    """On random page lists (seeded; no Hypothesis, which the GPU machine may lack)."""
    rng = random.Random(0)
    for _ in range(500):
        k = rng.randint(1, 12)
        dst, src = (sorted(rng.sample(range(24), k)) for _ in range(2))
        runs = copy_runs(dst, src)
        pairs = [(d + j, s + j) for d, s, n in runs for j in range(n)]
        assert pairs == list(zip(dst, src, strict=True))
        for (d0, s0, n0), (d1, s1, _) in itertools.pairwise(runs):
            assert not (d1 == d0 + n0 and s1 == s0 + n0)  # no two runs could have been one


def test_copy_ranges_copy_only_the_bytes_asked_for() -> None:
    page = 64
    dst, src = (0, 1, 2, 5), (3, 4, 6, 7)
    assert copy_ranges(dst, src, page, 4 * page) == [
        (0, 3 * page, 2 * page), (2 * page, 6 * page, page), (5 * page, 7 * page, page),
    ]  # fmt: skip
    assert copy_ranges(dst, src, page, 2 * page + 10) == [(0, 3 * page, 2 * page),
                                                         (2 * page, 6 * page, 10)]  # fmt: skip
    assert copy_ranges(dst, src, page, 2 * page) == [(0, 3 * page, 2 * page)]
    assert copy_ranges(dst, src, page, 1) == [(0, 3 * page, 1)]
    assert copy_ranges((4,), (0,), page, 0) == []  # an empty allocation holds a page
    for nbytes in (-1, 4 * page + 1):
        with pytest.raises(ValueError, match="do not fit in 4 pages of 64"):
            copy_ranges(dst, src, page, nbytes)


# -- the device side without a device --------------------------------------------------------


@no_gpu_only
def test_device_pool_and_streams_need_a_gpu() -> None:
    from worker.gpu.streams import GpuStreams

    reason = gpu_status()[1]
    with pytest.raises(GpuUnavailable, match="a device memory pool needs a CUDA device: ") as e:
        DevicePool(8 * MIB, MIB)
    assert reason in str(e.value)
    assert isinstance(e.value, LoadFailed) and isinstance(e.value, RuntimeError)
    with pytest.raises(GpuUnavailable, match="CUDA streams need"):
        GpuStreams()


def fake_device_pool(pages: int, page_size: int, ptr: int = 0x7F00_0000_0000) -> DevicePool:
    """A DevicePool over no memory at `ptr`: its accounting and every check before CuPy's
    first call are real, so they are tested without a GPU."""
    pool = object.__new__(DevicePool)
    pool._pages = PagePool(pages * page_size, page_size, backed=False)
    pool.device = 0
    pool.nbytes = pages * page_size
    pool._memory = None
    pool.ptr = ptr
    pool._closed = False
    return pool


def test_device_pool_accounts_as_a_page_pool() -> None:
    device = fake_device_pool(8, 4 * KIB)
    assert (device.page_size, device.pages_total, device.pages_free, device.largest_run()) == (
        4 * KIB, 8, 8, 8,
    )  # fmt: skip
    a = device.alloc(4 * KIB + 1)
    b = device.alloc(2 * 4 * KIB, contiguous=True)
    assert isinstance(a, DeviceAllocation) and a.pool is device
    assert (a.pages, a.nbytes, a.contiguous, a.freed) == ((0, 1), 4 * KIB + 1, True, False)
    assert b.pages == (2, 3)
    assert (device.bytes_reserved, device.bytes_requested, device.live_allocations) == (
        4 * 4 * KIB, 3 * 4 * KIB + 1, 2,
    )  # fmt: skip
    with pytest.raises(PoolExhausted, match=r"5 contiguous pages .* 4 of 8 .* largest free run"):
        device.alloc(5 * 4 * KIB, contiguous=True)
    assert a.page_ptr(1) == device.ptr + 4 * KIB
    assert b.page_ptr(0) == device.ptr + 2 * 4 * KIB
    with pytest.raises(IndexError, match="page 2 is out of range for 2 pages"):
        a.page_ptr(2)
    a.free()
    with pytest.raises(ValueError, match="allocation is freed"):
        a.page_ptr(0)
    with pytest.raises(ValueError, match="already freed"):
        a.free()
    b.free()
    assert (device.pages_free, device.bytes_reserved, device.live_allocations) == (8, 0, 0)
    device.close()
    device.close()  # idempotent
    for name in ("page_size", "pages_free", "bytes_reserved", "live_allocations"):
        with pytest.raises(ValueError, match="pool is closed"):
            getattr(device, name)
    with pytest.raises(ValueError, match="pool is closed"):
        device.alloc(1)


def test_device_array_checks_its_bounds_before_touching_the_device() -> None:
    device = fake_device_pool(8, 4 * KIB)
    device.alloc(4 * KIB)
    scattered = device.alloc(4 * KIB)  # page 1
    device.alloc(4 * KIB)
    run = device.alloc(3 * 4 * KIB, contiguous=True)  # pages 3 4 5
    page = 4 * KIB
    for allocation, i, offset, dtype, shape, room in [
        (scattered, 0, 0, np.float32, page // 4 + 1, page),  # one float too many
        (scattered, 0, 8, np.float32, (page // 4,), page),
        (run, 0, 0, np.uint8, 3 * page + 1, 3 * page),  # a run goes past pages
        (run, 1, 0, np.uint8, (2, page + 1), 2 * page),  # from page 1: two pages left
        (run, 2, -4, np.uint8, 1, page),
    ]:
        with pytest.raises(ValueError, match=f"do not fit in the {room} bytes"):
            allocation.array(i, offset, dtype, shape)
    with pytest.raises(ValueError, match="not aligned for float32"):
        run.array(0, 2, np.float32, 4)
    with pytest.raises(ValueError, match="negative dimension"):
        run.array(0, 0, np.float32, (2, -1))
    with pytest.raises(IndexError):
        run.array(3, 0, np.uint8, 1)
    with pytest.raises(TypeError):
        run.array(0, 0.5, np.uint8, 1)


def test_copy_pages_checks_everything_before_queueing() -> None:
    device = fake_device_pool(8, 4 * KIB)
    with PinnedPool(8 * 4 * KIB, 4 * KIB) as host, PagePool(8 * 4 * KIB, 4 * KIB) as other:
        src = host.pool.alloc(2 * 4 * KIB)
        dst = device.alloc(2 * 4 * KIB)
        with pytest.raises(TypeError, match="host must be a PinnedPool"):
            copy_pages(host.pool, dst, src, None)
        with pytest.raises(TypeError, match="dst must be a DeviceAllocation"):
            copy_pages(host, src, dst, None)  # swapped
        with pytest.raises(ValueError, match="not one of the host pool's"):
            copy_pages(host, dst, other.alloc(2 * 4 * KIB), None)
        with pytest.raises(ValueError, match="cannot copy 2 pages into 3"):
            copy_pages(host, device.alloc(3 * 4 * KIB), src, None)
        small = fake_device_pool(8, 8 * KIB)
        with pytest.raises(ValueError, match="page for page copies need one size"):
            copy_pages(host, small.alloc(1), src, None)
        dst.free()
        with pytest.raises(ValueError, match="allocation is freed"):
            copy_pages(host, dst, src, None)
        dst = device.alloc(2 * 4 * KIB)
        src.free()
        with pytest.raises(ValueError, match="allocation is freed"):
            copy_pages(host, dst, src, None)
        device.close()
        with pytest.raises(ValueError, match="pool is closed"):
            copy_pages(host, dst, host.pool.alloc(1), None)


# -- on a GPU --------------------------------------------------------------------------------


@pytest.fixture
def streams() -> Iterator[Any]:
    from worker.gpu.streams import GpuStreams

    s = GpuStreams()
    yield s
    s.sync()


def fill(allocation, rng: np.random.Generator) -> list[bytes]:
    """Random bytes in each page of a host allocation; returns them."""
    contents = []
    for i in range(len(allocation.pages)):
        page = allocation.page(i)
        data = rng.integers(0, 256, len(page), np.uint8).tobytes()
        page[:] = data
        contents.append(data)
        page.release()
    return contents


def scattered(pool, singles: int, keep: set[int]):
    """Take `singles` one-page allocations of pool, free those whose index is not in
    `keep`, and return the kept ones (so the pool's free pages are scattered)."""
    held = [pool.alloc(1) for _ in range(singles)]
    for i, a in enumerate(held):
        if i not in keep:
            a.free()
    return [a for i, a in enumerate(held) if i in keep]


@pytest.mark.gpu
def test_gpu_status_names_the_device() -> None:
    import cupy

    visible, reason = gpu_status()
    assert visible
    name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    assert reason.startswith(f"{name}, CUDA runtime ")


@pytest.mark.gpu
def test_pinned_pool_registers_its_buffer() -> None:
    import cupy

    runtime = cupy.cuda.runtime
    pinned = PinnedPool(16 * MIB, MIB)
    try:
        assert pinned.pinned
        for address in (pinned.address, pinned.page_address(7), pinned.address + pinned.nbytes - 1):
            assert runtime.pointerGetAttributes(address).type == runtime.memoryTypeHost
        pinned.unpin()
        assert not pinned.pinned
        assert runtime.pointerGetAttributes(pinned.address).type != runtime.memoryTypeHost
    finally:
        pinned.close()


@pytest.mark.gpu
@pytest.mark.parametrize("pin", [True, False])
def test_copy_scattered_pages_and_read_them_back(streams: Any, pin: bool) -> None:
    page = 64 * KIB
    rng = np.random.default_rng(1)
    host = PinnedPool(32 * page, page)
    device = DevicePool(32 * page, page)
    try:
        if not pin:
            host.unpin()  # pageable: the same copy, staged by the driver
        host_keep = scattered(host.pool, 12, {0, 2, 3, 7, 8, 9})  # free: 1 4 5 6 10 11 12..
        device_keep = scattered(device, 10, {1, 3, 4, 5})  # free: 0 2 6 7 8 9 10..
        nbytes = 9 * page - 1000  # the last page is short
        src = host.pool.alloc(nbytes)
        dst = device.alloc(nbytes)
        assert src.pages == (1, 4, 5, 6, 10, 11, 12, 13, 14)
        assert dst.pages == (0, 2, 6, 7, 8, 9, 10, 11, 12)
        assert copy_runs(dst.pages, src.pages) == [(0, 1, 1), (2, 4, 1), (6, 5, 2), (8, 10, 5)]
        contents = fill(src, rng)
        for i in range(len(dst.pages)):  # what the copy must not touch stays 0xAB
            dst.array(i, 0, np.uint8, page).fill(0xAB)
        cupy_sync()
        copy_pages(host, dst, src, streams.weights)
        streams.weights.synchronize()
        for i, want in enumerate(contents):
            got = dst.array(i, 0, np.uint8, page).get()
            if i < len(contents) - 1:
                assert got.tobytes() == want
            else:
                assert got[: page - 1000].tobytes() == want[: page - 1000]
                assert (got[page - 1000 :] == 0xAB).all()
        for a in [src, *host_keep]:
            a.free()
        for a in [dst, *device_keep]:
            a.free()
        assert (device.pages_free, device.live_allocations, device.bytes_requested) == (32, 0, 0)
    finally:
        device.close()
        host.close()


def cupy_sync() -> None:
    import cupy

    cupy.cuda.Device().synchronize()


@pytest.mark.gpu
def test_arrays_alias_the_pool_and_allocate_nothing() -> None:
    import cupy

    page = 64 * KIB
    device = DevicePool(16 * page, page)
    try:
        device.alloc(page)
        run = device.alloc(3 * page, contiguous=True)  # pages 1 2 3
        before = cupy.get_default_memory_pool().used_bytes()
        whole = run.array(0, 0, np.float32, (3, page // 4))
        second = run.array(1, 256, np.float32, page // 4 - 64)
        assert cupy.get_default_memory_pool().used_bytes() == before
        assert whole.data.ptr == run.page_ptr(0) == device.ptr + page
        assert second.data.ptr == run.page_ptr(1) + 256
        assert device.ptr <= second.data.ptr < device.ptr + device.nbytes
        whole[:] = cupy.arange(3 * page // 4, dtype=cupy.float32).reshape(3, -1)
        assert float(second[0]) == page // 4 + 64  # the same memory
        second[0] = -1
        assert float(whole[1, 64]) == -1
        assert whole.flags.c_contiguous and whole.shape == (3, page // 4)
        run.free()
    finally:
        device.close()


@pytest.mark.gpu
def test_an_exec_kernel_ordered_after_the_copy_sees_the_weights(streams) -> None:
    import cupy

    page = MIB
    n = 96  # 96 MiB: a copy long enough that a kernel not ordered after it would race
    host = PinnedPool(n * page, page)
    device = DevicePool(n * page, page)
    try:
        src = host.pool.alloc(n * page, contiguous=True)
        dst = device.alloc(n * page, contiguous=True)
        values = np.frombuffer(src.view(), np.float32)
        values[:] = np.arange(values.size) % 1024  # small integers: float sums are exact
        want = float(values.astype(np.float64).sum())
        del values
        weights = dst.array(0, 0, np.float32, n * page // 4)
        with streams.exec:
            weights.fill(0)  # queued before the copy's order: must not undo it
        event0 = streams.order(streams.weights, streams.exec)
        copy_pages(host, dst, src, streams.weights)
        event = streams.order(streams.exec, streams.weights)
        with streams.exec:
            total = weights.astype(cupy.float64).sum()
        streams.exec.synchronize()
        assert event.done and event0.done
        assert float(total) == want
        dst.free()
        src.free()
    finally:
        streams.sync()
        device.close()
        host.close()


@pytest.mark.gpu
def test_streams_are_four_distinct_non_default_streams(streams) -> None:
    ptrs = [s.ptr for s in streams.all]
    assert len(set(ptrs)) == 4 and 0 not in ptrs
    assert streams.all == (streams.weights, streams.inputs, streams.exec, streams.outputs)
    streams.sync()


@pytest.mark.gpu
def test_close_gives_the_device_memory_back() -> None:
    import cupy

    runtime = cupy.cuda.runtime
    size = 512 * MIB
    gc.collect()
    free0 = runtime.memGetInfo()[0]
    device = DevicePool(size, MIB)
    assert runtime.memGetInfo()[0] <= free0 - size
    a = device.alloc(MIB)
    kept = a.array(0, 0, np.uint8, MIB)  # an array kept past close holds the memory
    device.close()
    with pytest.raises(ValueError, match="pool is closed"):
        _ = device.pages_free
    with pytest.raises(ValueError, match="pool is closed"):
        a.page_ptr(0)
    assert runtime.memGetInfo()[0] <= free0 - size
    kept.fill(1)  # still valid memory, not freed under it
    assert int(kept.sum()) == MIB
    del kept
    gc.collect()
    assert runtime.memGetInfo()[0] >= free0 - 64 * MIB  # back, give or take CuPy's own


@pytest.mark.gpu
def test_a_device_pool_larger_than_the_device_is_exhausted() -> None:
    import cupy

    total = cupy.cuda.runtime.memGetInfo()[1]
    with pytest.raises(PoolExhausted, match="cannot allocate a device pool of"):
        DevicePool(2 * total, MIB)
    DevicePool(MIB, MIB).close()  # the failure left the device usable
