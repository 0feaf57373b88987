"""The page allocator behind the worker's host memory pool, in C.

Why pages: the host tier keeps each model's weights once, in fixed-size pages of one
large buffer, so that a swap-in builds an inference session over them (numpy.frombuffer
on a view) without copying. A tensor up to a page long takes any free page: `alloc`
hands out the lowest-numbered free pages, adjacent or not, so scattered free pages never
make a request fail. A tensor bigger than a page asks for a contiguous run, the one
request that fragmentation can refuse; lowest-first placement keeps the low end dense and
the long runs at the high end.

Layout: `held` has one byte per page, 1 while an allocation holds it. A byte map rather
than a bit map: a host pool has tens of thousands of pages (64 GiB in 1 MiB pages is a
64 KiB map), so bits would save nothing that matters, while bytes keep every scan a plain
loop without shifts or masks and match the twin's bytearray one for one.

Unbacked pools: `PagePool(..., backed=False)` maps no buffer and keeps only the page map
and counters, the accounting of memory that lives elsewhere: a device memory pool's pages
are on the GPU (worker/gpu/pools.py). `base` is then NULL for the pool's whole life, so
whether a pool is closed is its own flag, `closed`, not `base == NULL`.

Address: `PagePool.address` is `base` as an int (0 when unbacked), so that the worker can
register the whole buffer as pinned memory (cudaHostRegister) and copy pages to the GPU
from `address + page * page_size`.

Views: `page()` and `view()` return memoryviews of a `_Span`, a small exporter of one
range of the buffer that holds a reference to its pool; the pool counts the buffers its
spans export, and `close()` raises BufferError while one lives, as mmap.close() does in
the twin. Since a span holds its pool, a pool is never deallocated with live exports, so
__dealloc__ may always munmap. Like the twin's, the pool itself is not a buffer.

Re-entrancy: making an object may start a collection, whose finalizers may use the pool.
`alloc` makes its tuple and Allocation before it reads the page map, and from its checks
to its commit no Python code runs, so such code always finds the pool consistent.

Costs: `alloc`, `free` and `largest_run` are O(pages_total) byte scans. The GIL is held
throughout: a scan of even 64 Ki bytes takes microseconds, less than what releasing and
retaking the GIL would cost, and holding it keeps each call atomic without a lock.

Errors: C calls are checked by `_check_os`, the one checker (OSError from errno). The
argument checks and the PoolExhausted message come from the twin, ext/_pages_py.py, so
both raise the same exceptions in the same words; tests/test_pages.py runs against both.
"""

cimport cython
from libc.stdint cimport uintptr_t
from cpython.buffer cimport PyBUF_FORMAT, PyBUF_ND, PyBUF_STRIDES
from cpython.exc cimport PyErr_SetFromErrno
from cpython.mem cimport PyMem_Calloc, PyMem_Free
from cpython.number cimport PyNumber_Index
from cpython.ref cimport Py_INCREF
from cpython.tuple cimport PyTuple_New, PyTuple_SET_ITEM
from posix.mman cimport MAP_ANONYMOUS, MAP_FAILED, MAP_PRIVATE, PROT_READ, PROT_WRITE, mmap, munmap

from ext._pages_py import EXPORTED, UNBACKED, _exhausted, _geometry, _pages_for


cdef inline int _put(tuple t, Py_ssize_t j, Py_ssize_t value) except -1:
    """t[j] = value, in a tuple being built; an int is not tracked by the GC, so no code runs.

    `item` must be declared an object: left untyped, Cython infers Py_ssize_t, and then
    SET_ITEM steals a temporary that is freed at once (ints above 256 are not cached).
    """
    cdef object item = value
    Py_INCREF(item)
    PyTuple_SET_ITEM(t, j, item)
    return 0


cdef int _check_os(bint failed) except -1:
    """The checker of every C call: OSError from errno if it failed."""
    if failed:
        PyErr_SetFromErrno(OSError)
    return 0


@cython.final
@cython.auto_pickle(False)
cdef class PagePool:
    """One large buffer split into fixed-size pages: the host tier's weights live here.

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

    def __cinit__(self, capacity_bytes, page_size=1 << 20, *, bint backed=True):
        cdef void* base
        self.size, self.total = _geometry(capacity_bytes, page_size)
        self.has_buffer = backed
        self.held = <uint8_t*>PyMem_Calloc(self.total, 1)
        if self.held == NULL:
            raise MemoryError()
        if backed:
            base = mmap(NULL, self.total * self.size, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
            _check_os(base == MAP_FAILED)
            self.base = <char*>base
        self.free = self.total

    def __dealloc__(self):
        self._unmap()  # no export can be alive: each holds a reference to the pool

    def __enter__(self):
        self._check_open()
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __reduce__(self):
        raise TypeError("cannot pickle PagePool")

    @property
    def backed(self):
        """Whether the pool owns host memory (False: page accounting only)."""
        self._check_open()
        return self.has_buffer

    @property
    def address(self):
        """The buffer's base address (page-aligned), or 0 for an unbacked pool."""
        self._check_open()
        return <uintptr_t>self.base

    @property
    def page_size(self):
        self._check_open()
        return self.size

    @property
    def pages_total(self):
        self._check_open()
        return self.total

    @property
    def pages_free(self):
        self._check_open()
        return self.free

    @property
    def bytes_reserved(self):
        """Bytes of the pages that live allocations hold."""
        self._check_open()
        return (self.total - self.free) * self.size

    @property
    def bytes_requested(self):
        """Sum of the nbytes that live allocations asked for."""
        self._check_open()
        return self.requested

    @property
    def live_allocations(self):
        """Allocations made and not yet freed; leak tests expect 0."""
        self._check_open()
        return self.live

    def alloc(self, nbytes, bint contiguous=False):
        """max(1, ceil(nbytes / page_size)) pages; PoolExhausted if they do not fit.

        The lowest-numbered free pages, adjacent or not; with contiguous=True the first
        run of adjacent free pages long enough. On failure nothing changes.
        """
        cdef Py_ssize_t n, k, start, i = 0, j, p
        cdef tuple pages
        cdef Allocation allocation
        want_bytes, want_pages = _pages_for(nbytes, self.size)  # ints of any size
        # The objects first: making them may run the cyclic GC, and finalizers may use this
        # pool. From the checks to the commit below no Python code runs.
        pages = PyTuple_New(want_pages) if want_pages <= self.total else ()
        allocation = Allocation.__new__(Allocation)
        self._check_open()
        if want_pages > self.free:
            raise _exhausted(want_pages, want_bytes, self.free, self.total,
                             self._largest_run() if contiguous else None)
        n, k = want_bytes, want_pages  # both fit now: k <= free, n <= k * size
        if contiguous:
            start = self._first_run(k)
            if start < 0:
                raise _exhausted(k, n, self.free, self.total, self._largest_run())
            for j in range(k):
                _put(pages, j, start + j)
        else:
            for j in range(k):  # terminates: k <= free
                while self.held[i]:
                    i += 1
                _put(pages, j, i)
                i += 1
        for p in pages:
            self.held[p] = 1
        self.free -= k
        self.requested += n
        self.live += 1
        allocation.pool = self
        allocation.pages = pages
        allocation.nbytes = n
        allocation.contiguous = pages[k - 1] - pages[0] + 1 == k
        allocation.freed = False
        return allocation

    def largest_run(self):
        """The longest run of adjacent free pages."""
        self._check_open()
        return self._largest_run()

    def close(self):
        """Release the buffer; BufferError (and the pool stays open) while a view lives."""
        if self.closed:
            return
        if self.exports:
            raise BufferError(EXPORTED)
        self._unmap()

    # -- internals ---------------------------------------------------------------------

    cdef int _check_open(self) except -1:
        if self.closed:
            raise ValueError("pool is closed")
        return 0

    cdef int _check_backed(self) except -1:
        if not self.has_buffer:
            raise ValueError(UNBACKED)
        return 0

    cdef Py_ssize_t _first_run(self, Py_ssize_t k) noexcept:
        """Start of the first run of k adjacent free pages, or -1 if there is none."""
        cdef Py_ssize_t i, run = 0
        for i in range(self.total):
            if self.held[i]:
                run = 0
            else:
                run += 1
                if run == k:
                    return i - k + 1
        return -1

    cdef Py_ssize_t _largest_run(self) noexcept:
        cdef Py_ssize_t i, run = 0, best = 0
        for i in range(self.total):
            if self.held[i]:
                run = 0
            else:
                run += 1
                if run > best:
                    best = run
        return best

    cdef object _span(self, Py_ssize_t first, Py_ssize_t count):
        """A writable view of pages first .. first + count - 1, exported by a _Span."""
        cdef _Span span = _Span.__new__(_Span)
        span.pool = self
        span.offset = first * self.size
        span.length = count * self.size
        return memoryview(span)

    cdef void _unmap(self) noexcept:
        """Close: unmap the buffer and drop the page map (no exports may be alive)."""
        if self.base != NULL:
            munmap(self.base, self.total * self.size)  # fails only for a bad range: ignored
            self.base = NULL
        PyMem_Free(self.held)
        self.held = NULL
        self.closed = True


@cython.final
@cython.auto_pickle(False)
cdef class Allocation:
    """Pages of a PagePool, held until `free()`; made by `PagePool.alloc`.

    `pages` are the page indices, ascending; `contiguous` says whether they are adjacent
    (always so when asked contiguous, or for one page). `page(i)` and `view()` are
    writable memoryviews into the pool's buffer, never copies (ValueError in an unbacked
    pool, which has no buffer). `free()` does not look for live views: a view kept past it
    still works and sees what the next owner writes, so drop views (and arrays over them)
    first.
    """

    def __cinit__(self):
        self.freed = True  # until alloc() fills it in: a bare one is unusable, not unsafe

    def __init__(self):
        raise TypeError("Allocation objects come from PagePool.alloc()")

    def __reduce__(self):
        raise TypeError("cannot pickle Allocation")

    def page(self, i):
        """A writable view of the i-th page (0 <= i < len(pages)), page_size bytes."""
        j = PyNumber_Index(i)
        self._check_usable()
        self.pool._check_backed()
        if not 0 <= j < len(self.pages):
            raise IndexError(f"page {j} is out of range for {len(self.pages)} pages")
        return self.pool._span(self.pages[j], 1)

    def view(self):
        """A writable view of all the pages; ValueError unless they are adjacent."""
        self._check_usable()
        self.pool._check_backed()
        if not self.contiguous:
            raise ValueError("the pages are not adjacent: view them one by one with page(i)")
        return self.pool._span(self.pages[0], len(self.pages))

    def free(self):
        """Give the pages back to the pool; ValueError if already freed."""
        cdef Py_ssize_t p
        if self.freed:
            raise ValueError("already freed")
        self.pool._check_open()
        self.freed = True
        for p in self.pages:
            self.pool.held[p] = 0
        self.pool.free += len(self.pages)
        self.pool.requested -= self.nbytes
        self.pool.live -= 1

    cdef int _check_usable(self) except -1:
        if self.freed:
            raise ValueError("allocation is freed")
        return self.pool._check_open()


@cython.final
@cython.auto_pickle(False)
cdef class _Span:
    """The exporter of one range of a pool's buffer: writable unsigned bytes, 1-D.

    Made by PagePool._span for one memoryview; counts its exports in the pool.
    """

    def __getbuffer__(self, Py_buffer* buffer, int flags):
        if self.pool is None:  # made by _Span.__new__, not by a pool
            raise ValueError("not a view of a pool")
        self.pool._check_open()
        buffer.buf = self.pool.base + self.offset
        buffer.obj = self
        buffer.len = self.length
        buffer.readonly = 0
        buffer.itemsize = 1
        buffer.ndim = 1
        # As PyBuffer_FillInfo does: each field only when asked for, NULL otherwise.
        buffer.format = NULL
        buffer.shape = NULL
        buffer.strides = NULL
        if (flags & PyBUF_FORMAT) == PyBUF_FORMAT:
            buffer.format = b"B"
        if (flags & PyBUF_ND) == PyBUF_ND:
            buffer.shape = &buffer.len
        if (flags & PyBUF_STRIDES) == PyBUF_STRIDES:
            buffer.strides = &buffer.itemsize
        buffer.suboffsets = NULL
        buffer.internal = NULL
        self.pool.exports += 1

    def __releasebuffer__(self, Py_buffer* buffer):
        self.pool.exports -= 1
