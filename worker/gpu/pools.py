"""Pinned host pages, device pages, and the copy from one to the other.

A swap-in moves a model's weights from the host tier to the GPU. The host tier packs each
model's tensors into pages of one buffer (`worker.tiers.pack`, `HostTier._place`): a
tensor's place is (page of its allocation, offset in that page). The device pool has
pages of the same size with the same accounting (`ext.PagePool(backed=False)`), so a
copy made page for page, page i of the host allocation to page i of the device one,
keeps every place: a tensor's device address is `page_ptr(page) + offset`, found without
a table. Pages adjacent on both sides move in one copy (`copy_runs`), so a model placed
in long runs is a few large DMAs.

The host buffer is registered as pinned memory once, whole (`PinnedPool`), rather than
allocated pinned: it stays the same `ext.PagePool` the host tier always used, and copies
from it are true asynchronous DMAs. Without a GPU it is a plain pool, so the host tier
never needs to know.

The device pool is one cudaMalloc (`cupy.cuda.Memory`), made at startup and kept: no
allocator runs during a swap-in, and no other user of the GPU (PyTorch's caching
allocator, CuPy's pool) can take its pages. Arrays over it (`DeviceAllocation.array`)
are views that hold that allocation, never copies.

CuPy is imported only where a GPU is used, so this module imports without it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import operator
import warnings
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import numpy as np

from ext import Allocation, PagePool
from mtcore.errors import PoolExhausted
from worker.gpu import GpuUnavailable, gpu_status, require_gpu

log = logging.getLogger("mtserve.worker")
CUDA_ERROR_MEMORY_ALLOCATION = 2  # cudaErrorMemoryAllocation: cudaMalloc found no room


# -- the copy plan (pure: tested without a GPU) --------------------------------------------


def copy_runs(dst_pages: Sequence[int], src_pages: Sequence[int]) -> list[tuple[int, int, int]]:
    """(dst_first, src_first, count) for each run of pages adjacent on both sides.

    Page i of src goes to page i of dst; consecutive pairs whose pages both follow the
    previous pair's join its run, so each run is one copy. ValueError unless both have
    the same number of pages.
    """
    if len(dst_pages) != len(src_pages):
        raise ValueError(
            f"cannot copy {len(src_pages)} pages into {len(dst_pages)}: page i goes to page i"
        )
    runs: list[tuple[int, int, int]] = []
    for d, s in zip(dst_pages, src_pages, strict=True):
        if runs:
            d0, s0, n = runs[-1]
            if d == d0 + n and s == s0 + n:
                runs[-1] = (d0, s0, n + 1)
                continue
        runs.append((d, s, 1))
    return runs


def copy_ranges(
    dst_pages: Sequence[int], src_pages: Sequence[int], page_size: int, nbytes: int
) -> list[tuple[int, int, int]]:
    """(dst_offset, src_offset, length) in bytes from each pool's base: the copies that
    move the first nbytes of src's pages into dst's, page i to page i.

    Only the bytes asked for move: the last page of a run-sized tensor is often short,
    and an allocation of 0 bytes (which still holds a page) copies nothing.
    """
    if not 0 <= nbytes <= len(src_pages) * page_size:
        raise ValueError(f"{nbytes} bytes do not fit in {len(src_pages)} pages of {page_size}")
    ranges = []
    done = 0  # bytes of the allocation that the runs so far cover
    for d, s, count in copy_runs(dst_pages, src_pages):
        length = min(count * page_size, nbytes - done)
        if length <= 0:
            break
        ranges.append((d * page_size, s * page_size, length))
        done += count * page_size
    return ranges


# -- host pages: pinned when a GPU is visible ----------------------------------------------


class PinnedPool:
    """The host tier's page pool, its whole buffer registered as pinned memory.

    `pool` is a plain backed `ext.PagePool`: the host tier allocates, views and frees its
    pages as it does any pool's. Where a GPU is visible the buffer is registered with
    cudaHostRegister (all of it pinned at once: registering faults in every page), so
    copies from it are asynchronous DMAs; elsewhere, or if the driver refuses, `pinned`
    is False and it is an ordinary pool, from which copies still work, staged by the
    driver. `unpin()` undoes the registration; `close()` unpins, then closes the pool.
    """

    def __init__(self, capacity_bytes: int, page_size: int = 1 << 20) -> None:
        self.pool = PagePool(capacity_bytes, page_size)
        self.address = self.pool.address  # kept: unpin() must work after pool.close()
        self.nbytes = self.pool.pages_total * self.pool.page_size  # the whole buffer
        self.pinned = False  # registered with cudaHostRegister, until unpin()
        if gpu_status()[0]:
            self._pin()

    def _pin(self) -> None:
        import cupy

        try:
            cupy.cuda.runtime.hostRegister(self.address, self.nbytes, 0)  # cudaHostRegisterDefault
        except cupy.cuda.runtime.CUDARuntimeError as exc:
            log.warning(
                "the host pool (%d bytes) stays pageable: cudaHostRegister failed: %s",
                self.nbytes,
                exc,
            )
            return
        self.pinned = True

    def page_address(self, page: int) -> int:
        """The host address of page `page` of the pool (a pool page index, as in an
        allocation's `pages`); ValueError once the pool is closed."""
        p = operator.index(page)
        total = self.pool.pages_total  # checks the pool is open
        if not 0 <= p < total:
            raise IndexError(f"page {p} is out of range for {total} pages")
        return self.address + p * self.pool.page_size

    def unpin(self) -> None:
        """Unregister the buffer (idempotent). The pool stays usable, pageable; no copy
        from it may be in flight."""
        if not self.pinned:
            return
        self.pinned = False
        import cupy

        try:
            cupy.cuda.runtime.hostUnregister(self.address)
        except cupy.cuda.runtime.CUDARuntimeError as exc:  # e.g. the context is gone
            log.warning("cudaHostUnregister of the host pool failed: %s", exc)

    def close(self) -> None:
        """Unpin, then close the pool (BufferError while a view of it lives, as
        PagePool.close(); the pool then stays open, unpinned)."""
        self.unpin()
        self.pool.close()

    def __enter__(self) -> PinnedPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Unmapping a buffer still registered may leave its pages locked in RAM until exit.
        if getattr(self, "pinned", False):
            warnings.warn("a PinnedPool was not closed", ResourceWarning, stacklevel=2)
            with contextlib.suppress(Exception):  # at exit CuPy may be half torn down
                self.unpin()


# -- device pages ------------------------------------------------------------------------


class DevicePool:
    """One device allocation split into fixed-size pages, accounted as a PagePool.

    DevicePool(capacity_bytes, page_size=1 MiB, device=0) holds capacity_bytes //
    page_size pages of one cudaMalloc on `device`; the arguments are checked as
    PagePool's. GpuUnavailable (a LoadFailed) where no GPU can be used, PoolExhausted if
    the device has no room for the pool. `alloc` hands out pages exactly as
    PagePool.alloc does, and the accounting properties read the same. `close()` ends
    the accounting and drops the pool's hold on the device memory, which is freed once
    no array made by `DeviceAllocation.array` is left: an array kept past close stays
    valid, never dangling. Not synchronised beyond the GIL, like PagePool.
    """

    def __init__(self, capacity_bytes: int, page_size: int = 1 << 20, device: int = 0) -> None:
        cupy = require_gpu("a device memory pool")
        self._pages = PagePool(capacity_bytes, page_size, backed=False)  # checks the sizes
        self.device = operator.index(device)
        self.nbytes = self._pages.pages_total * self._pages.page_size
        try:
            with cupy.cuda.Device(self.device):
                memory = cupy.cuda.Memory(self.nbytes)
        except cupy.cuda.runtime.CUDARuntimeError as exc:
            self._pages.close()
            if exc.status == CUDA_ERROR_MEMORY_ALLOCATION:
                raise PoolExhausted(
                    f"cannot allocate a device pool of {self.nbytes} bytes on device"
                    f" {self.device}: {exc}"
                ) from None
            raise GpuUnavailable(f"cannot use CUDA device {self.device}: {exc}") from None
        self._memory: Any = memory  # cupy.cuda.Memory; None once closed
        self.ptr: int = memory.ptr  # the device address of page 0
        self._closed = False

    @property
    def page_size(self) -> int:
        return self._pages.page_size

    @property
    def pages_total(self) -> int:
        return self._pages.pages_total

    @property
    def pages_free(self) -> int:
        return self._pages.pages_free

    @property
    def bytes_reserved(self) -> int:
        """Bytes of the pages that live allocations hold."""
        return self._pages.bytes_reserved

    @property
    def bytes_requested(self) -> int:
        """Sum of the nbytes that live allocations asked for."""
        return self._pages.bytes_requested

    @property
    def live_allocations(self) -> int:
        """Allocations made and not yet freed; leak tests expect 0."""
        return self._pages.live_allocations

    def largest_run(self) -> int:
        """The longest run of adjacent free pages."""
        return self._pages.largest_run()

    def alloc(self, nbytes: int, contiguous: bool = False) -> DeviceAllocation:
        """Pages as PagePool.alloc chooses them; PoolExhausted if they do not fit."""
        return DeviceAllocation(self, self._pages.alloc(nbytes, contiguous))

    def close(self) -> None:
        """End the accounting and let the device memory go (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._pages.close()
        self._memory = None

    def __enter__(self) -> DevicePool:
        self._check_open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("pool is closed")


class DeviceAllocation:
    """Pages of a DevicePool, held until `free()`; made by `DevicePool.alloc`.

    As an `ext.Allocation`: `pages` (ascending pool page indices), `nbytes`,
    `contiguous`, `freed`, and `free()`. `page_ptr(i)` is the device address of its
    i-th page; `array(i, offset, dtype, shape)` a CuPy array over device memory from
    there. Like host views, an array kept past `free()` sees what the next owner writes.
    """

    __slots__ = ("_allocation", "_pool")

    def __init__(self, pool: DevicePool, allocation: Allocation) -> None:
        self._pool = pool
        self._allocation = allocation  # the unbacked pool's: the pages and the counters

    @property
    def pages(self) -> tuple[int, ...]:
        return self._allocation.pages

    @property
    def nbytes(self) -> int:
        return self._allocation.nbytes

    @property
    def contiguous(self) -> bool:
        return self._allocation.contiguous

    @property
    def freed(self) -> bool:
        return self._allocation.freed

    @property
    def pool(self) -> DevicePool:
        return self._pool

    def page_ptr(self, i: int) -> int:
        """The device address of the i-th page (0 <= i < len(pages))."""
        j = self._index(i)
        return self._pool.ptr + self.pages[j] * self._pool.page_size

    def array(self, i: int, offset: int, dtype: Any, shape: int | Sequence[int]) -> Any:
        """A cupy.ndarray (C order) over device memory at byte `offset` of page i.

        The array may run past page i while the pages after it are adjacent (all of a
        contiguous allocation from page 0): ValueError if it does not fit there, or if
        the offset is not a multiple of the dtype's alignment. Nothing is allocated; the
        array holds the pool's device memory alive.
        """
        j = self._index(i)
        off = operator.index(offset)
        kind = np.dtype(dtype)
        dims = (
            (operator.index(shape),)
            if not isinstance(shape, Sequence)
            else tuple(operator.index(d) for d in shape)
        )
        if any(d < 0 for d in dims):
            raise ValueError(f"negative dimension in shape {dims}")
        size = self._pool.page_size
        pages = self.pages
        run = 1  # pages adjacent from page j on
        while j + run < len(pages) and pages[j + run] == pages[j] + run:
            run += 1
        length = math.prod(dims) * kind.itemsize
        if off < 0 or off + length > run * size:
            raise ValueError(
                f"{length} bytes at offset {off} do not fit in the {run * size} bytes of"
                f" adjacent pages from page {j}"
            )
        if off % kind.alignment:
            raise ValueError(f"offset {off} is not aligned for {kind} ({kind.alignment} bytes)")
        import cupy

        memptr = cupy.cuda.MemoryPointer(self._pool._memory, pages[j] * size + off)
        return cupy.ndarray(dims, kind, memptr=memptr)

    def free(self) -> None:
        """Give the pages back to the pool; ValueError if already freed or pool closed."""
        self._allocation.free()

    def _index(self, i: int) -> int:
        """i as a page index of this allocation, once it is known to be usable."""
        j = operator.index(i)
        if self._allocation.freed:
            raise ValueError("allocation is freed")
        self._pool._check_open()
        if not 0 <= j < len(self.pages):
            raise IndexError(f"page {j} is out of range for {len(self.pages)} pages")
        return j


# -- the copy ------------------------------------------------------------------------------


def _first_page_address(src: Allocation) -> int:
    """Where src's first page is, read from a view of it (ValueError if freed, closed or
    unbacked): the one proof that src belongs to the pool its page numbers index."""
    view = src.page(0)
    try:
        return np.frombuffer(view, np.uint8).ctypes.data  # the array dies here, and its export
    finally:
        view.release()  # so that the pool can close


def copy_pages(host: PinnedPool, dst: DeviceAllocation, src: Allocation, stream: Any) -> None:
    """Queue the copy of host allocation `src` (of `host.pool`) into device allocation
    `dst`, page i to page i, on CuPy stream `stream`: one cudaMemcpyAsync per run of
    pages adjacent on both sides, of the first `src.nbytes` bytes.

    Returns at once: both allocations must stay held, and src's pages unchanged, until
    the stream passes the copy (record an event after it). TypeError for arguments of
    the wrong kinds; ValueError if either allocation is freed, either pool closed, the
    page sizes or page counts differ, or src is not an allocation of host's pool.
    """
    if not isinstance(host, PinnedPool):
        raise TypeError(f"host must be a PinnedPool, not {type(host).__name__}")
    if not isinstance(dst, DeviceAllocation):
        raise TypeError(f"dst must be a DeviceAllocation, not {type(dst).__name__}")
    if not isinstance(src, Allocation):
        raise TypeError(f"src must be an ext.Allocation, not {type(src).__name__}")
    dst._index(0)  # freed or closed: ValueError
    size = host.pool.page_size  # closed: ValueError
    if dst.pool.page_size != size:
        raise ValueError(
            f"the device pool's pages are {dst.pool.page_size} bytes and the host pool's"
            f" {size}: page for page copies need one size"
        )
    if _first_page_address(src) != host.address + src.pages[0] * size:
        raise ValueError("the source allocation is not one of the host pool's")
    ranges = copy_ranges(dst.pages, src.pages, size, src.nbytes)  # checked before any copy
    import cupy

    runtime = cupy.cuda.runtime
    with cupy.cuda.Device(dst.pool.device):
        for d, s, length in ranges:
            runtime.memcpyAsync(
                dst.pool.ptr + d, host.address + s, length, runtime.memcpyHostToDevice, stream.ptr
            )
