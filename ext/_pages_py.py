"""Pure-Python twin of `ext._pages`: `PagePool` and `Allocation`, same API and semantics.

`ext` uses it when MTSERVE_PUREPYTHON=1 or the C core is not built. The buffer is one
anonymous private `mmap`; page states are a bytearray, one byte per page (1 while held),
so the scans are bytearray searches: `find(0)` for the lowest free page and
`find(bytes(k))` for the first run of k free pages. Views are slices of
`memoryview(mmap)`, so the mmap itself counts them and refuses to close while one lives;
the C version counts its exports to match. The buffer's address (`PagePool.address`, for
cudaHostRegister) is read once through ctypes, whose export is dropped at once so that it
never holds the mmap open. An unbacked pool (`backed=False`) has no mmap at all. The
argument checks and the messages below are shared with the C version, so both raise the
same exceptions.
"""

from __future__ import annotations

import ctypes
import mmap
import operator
import sys
from typing import Final, NoReturn, final

from mtcore.errors import PoolExhausted

ALIGN: Final = 64  # page_size must be a multiple: each page starts on a cache line
EXPORTED: Final = "cannot close the pool while memoryviews of its pages are alive"
UNBACKED: Final = (
    "the pool has no host memory: it keeps only the page accounting of memory that lives"
    " elsewhere (made with backed=False), so its pages have no views"
)


def _geometry(capacity_bytes: int, page_size: int) -> tuple[int, int]:
    """(page_size, pages_total): TypeError if not integers, ValueError if no usable pool."""
    capacity = operator.index(capacity_bytes)
    size = operator.index(page_size)
    if size <= 0 or size % ALIGN:
        raise ValueError(f"page_size must be a positive multiple of {ALIGN}, got {size}")
    total = capacity // size
    if total < 1:
        raise ValueError(f"capacity_bytes {capacity} holds no page of {size} bytes")
    if total * size > sys.maxsize:
        raise ValueError(f"capacity_bytes {capacity} is more than one buffer can hold")
    return size, total


def _pages_for(nbytes: int, page_size: int) -> tuple[int, int]:
    """(nbytes, pages) of a request, at least one page: TypeError or ValueError if bad."""
    n = operator.index(nbytes)
    if n < 0:
        raise ValueError(f"nbytes must be >= 0, got {n}")
    return n, max(1, -(-n // page_size))


def _exhausted(pages: int, nbytes: int, free: int, total: int, run: int | None) -> PoolExhausted:
    """The error for a request that does not fit; run is the largest free run if contiguous."""
    what = f"{pages} pages" if run is None else f"{pages} contiguous pages"
    message = f"cannot allocate {what} ({nbytes} bytes): {free} of {total} pages are free"
    if run is not None:
        message += f", the largest free run is {run}"
    return PoolExhausted(message)


@final
class PagePool:
    """One large buffer split into fixed-size pages: the host tier's weights live here.

    The host tier keeps each model's weights once, in pages of this buffer, so that a
    swap-in builds an inference session over them (numpy.frombuffer on a view) without
    copying. A tensor up to a page long takes any free page: `alloc` hands out the
    lowest-numbered free pages, adjacent or not, so scattered free pages never make a
    request fail. A tensor bigger than a page asks for a contiguous run, the one request
    that fragmentation can refuse; lowest-first placement keeps the low end dense and the
    long runs at the high end.

    PagePool(capacity_bytes, page_size=1 MiB, *, backed=True) has
    capacity_bytes // page_size pages (ValueError unless page_size is a positive multiple
    of 64 and there is at least one page). The buffer is one anonymous mmap, page-aligned
    and zero-filled lazily by the OS; pages handed out again are not cleared; `address` is
    where it starts, for registering it with cudaHostRegister. `close()` (or leaving a
    `with` block) releases it: BufferError while a memoryview of it lives, and afterwards
    every method and property but `close()` raises ValueError, as do the live allocations'
    methods. Calls are not synchronised beyond the GIL: share a pool between threads
    behind a lock.

    With backed=False there is no buffer: the pool keeps only the page accounting, for
    memory that lives elsewhere (a device pool's, on the GPU). Allocation, freeing and
    every counter work as in a backed pool; `address` is 0 and the allocations' `page()`
    and `view()` raise ValueError.
    """

    __slots__ = (
        "_address",
        "_backed",
        "_closed",
        "_free",
        "_live",
        "_mmap",
        "_requested",
        "_size",
        "_states",
        "_total",
    )

    def __init__(
        self, capacity_bytes: int, page_size: int = 1 << 20, *, backed: bool = True
    ) -> None:
        self._size, self._total = _geometry(capacity_bytes, page_size)
        self._backed = bool(backed)
        self._mmap: mmap.mmap | None = None  # the buffer; None if unbacked
        self._address = 0  # where the buffer starts; 0 if unbacked
        if self._backed:
            self._mmap = mmap.mmap(-1, self._size * self._total, flags=mmap.MAP_PRIVATE)
            # from_buffer exports the mmap; the ctypes object dies in this statement, and
            # the export with it, so close() still works.
            self._address = ctypes.addressof(ctypes.c_char.from_buffer(self._mmap))
        self._states = bytearray(self._total)  # one byte per page, 1 while held
        self._free = self._total  # pages whose state is 0
        self._requested = 0  # sum of the nbytes of live allocations
        self._live = 0  # allocations made and not yet freed
        self._closed = False

    def __enter__(self) -> PagePool:
        self._check_open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __reduce__(self) -> NoReturn:
        raise TypeError("cannot pickle PagePool")

    @property
    def backed(self) -> bool:
        """Whether the pool owns host memory (False: page accounting only)."""
        self._check_open()
        return self._backed

    @property
    def address(self) -> int:
        """The buffer's base address (page-aligned), or 0 for an unbacked pool."""
        self._check_open()
        return self._address

    @property
    def page_size(self) -> int:
        self._check_open()
        return self._size

    @property
    def pages_total(self) -> int:
        self._check_open()
        return self._total

    @property
    def pages_free(self) -> int:
        self._check_open()
        return self._free

    @property
    def bytes_reserved(self) -> int:
        """Bytes of the pages that live allocations hold."""
        self._check_open()
        return (self._total - self._free) * self._size

    @property
    def bytes_requested(self) -> int:
        """Sum of the nbytes that live allocations asked for."""
        self._check_open()
        return self._requested

    @property
    def live_allocations(self) -> int:
        """Allocations made and not yet freed; leak tests expect 0."""
        self._check_open()
        return self._live

    def alloc(self, nbytes: int, contiguous: bool = False) -> Allocation:
        """max(1, ceil(nbytes / page_size)) pages; PoolExhausted if they do not fit.

        The lowest-numbered free pages, adjacent or not; with contiguous=True the first
        run of adjacent free pages long enough. On failure nothing changes.
        """
        contiguous = bool(contiguous)
        n, k = _pages_for(nbytes, self._size)
        # Making a tracked object may run the cyclic GC, and finalizers may use this pool:
        # the list is made before the checks, the tuple and Allocation after the commit.
        found: list[int] = []
        self._check_open()
        if k > self._free:
            run = self._largest_run() if contiguous else None
            raise _exhausted(k, n, self._free, self._total, run)
        states = self._states
        if contiguous:
            start = states.find(bytes(k))
            if start < 0:
                raise _exhausted(k, n, self._free, self._total, self._largest_run())
            states[start : start + k] = b"\x01" * k
            found.extend(range(start, start + k))
        else:
            i = -1
            for _ in range(k):
                i = states.find(0, i + 1)
                states[i] = 1
                found.append(i)
        self._free -= k
        self._requested += n
        self._live += 1
        return Allocation._new(self, tuple(found), n)

    def largest_run(self) -> int:
        """The longest run of adjacent free pages."""
        self._check_open()
        return self._largest_run()

    def close(self) -> None:
        """Release the buffer; BufferError (and the pool stays open) while a view lives."""
        if self._closed:
            return
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                raise BufferError(EXPORTED) from None
        self._closed = True
        self._states = bytearray()

    # -- internals ---------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("pool is closed")

    def _check_backed(self) -> None:
        if not self._backed:
            raise ValueError(UNBACKED)

    def _largest_run(self) -> int:
        return max(map(len, self._states.split(b"\x01")))

    def _span(self, first: int, count: int) -> memoryview:
        """A writable view of pages first .. first + count - 1, into the mmap itself."""
        return memoryview(self._mmap)[first * self._size : (first + count) * self._size]

    def _release(self, pages: tuple[int, ...], nbytes: int) -> None:
        for p in pages:
            self._states[p] = 0
        self._free += len(pages)
        self._requested -= nbytes
        self._live -= 1


@final
class Allocation:
    """Pages of a PagePool, held until `free()`; made by `PagePool.alloc`.

    `pages` are the page indices, ascending; `contiguous` says whether they are adjacent
    (always so when asked contiguous, or for one page). `page(i)` and `view()` are
    writable memoryviews into the pool's buffer, never copies (ValueError in an unbacked
    pool, which has no buffer). `free()` does not look for live views: a view kept past it
    still works and sees what the next owner writes, so drop views (and arrays over them)
    first.
    """

    __slots__ = ("_contiguous", "_freed", "_nbytes", "_pages", "_pool")

    def __init__(self) -> NoReturn:
        raise TypeError("Allocation objects come from PagePool.alloc()")

    @classmethod
    def _new(cls, pool: PagePool, pages: tuple[int, ...], nbytes: int) -> Allocation:
        self = object.__new__(cls)
        self._pool = pool
        self._pages = pages
        self._nbytes = nbytes
        self._contiguous = pages[-1] - pages[0] + 1 == len(pages)
        self._freed = False
        return self

    def __reduce__(self) -> NoReturn:
        raise TypeError("cannot pickle Allocation")

    @property
    def pages(self) -> tuple[int, ...]:
        return self._pages

    @property
    def nbytes(self) -> int:
        return self._nbytes

    @property
    def contiguous(self) -> bool:
        return self._contiguous

    @property
    def freed(self) -> bool:
        return self._freed

    def page(self, i: int) -> memoryview:
        """A writable view of the i-th page (0 <= i < len(pages)), page_size bytes."""
        j = operator.index(i)
        self._check_usable()
        self._pool._check_backed()
        if not 0 <= j < len(self._pages):
            raise IndexError(f"page {j} is out of range for {len(self._pages)} pages")
        return self._pool._span(self._pages[j], 1)

    def view(self) -> memoryview:
        """A writable view of all the pages; ValueError unless they are adjacent."""
        self._check_usable()
        self._pool._check_backed()
        if not self._contiguous:
            raise ValueError("the pages are not adjacent: view them one by one with page(i)")
        return self._pool._span(self._pages[0], len(self._pages))

    def free(self) -> None:
        """Give the pages back to the pool; ValueError if already freed."""
        if self._freed:
            raise ValueError("already freed")
        self._pool._check_open()
        self._freed = True
        self._pool._release(self._pages, self._nbytes)

    def _check_usable(self) -> None:
        if self._freed:
            raise ValueError("allocation is freed")
        self._pool._check_open()
