# Declarations of the host memory pool's page allocator (see _pages.pyx).

from libc.stdint cimport uint8_t


cdef class PagePool:
    cdef char* base             # the anonymous mmap, total * size bytes; NULL if unbacked or closed
    cdef uint8_t* held          # one byte per page, 1 while held by an allocation; NULL once closed
    cdef bint has_buffer        # the pool owns host memory (False: page accounting only)
    cdef bint closed            # close() has run: every method but close() raises ValueError
    cdef Py_ssize_t size        # bytes per page, a positive multiple of 64
    cdef Py_ssize_t total       # number of pages in the buffer
    cdef Py_ssize_t free        # pages whose byte in `held` is 0
    cdef Py_ssize_t requested   # sum of the nbytes of live allocations
    cdef Py_ssize_t live        # allocations made and not yet freed
    cdef Py_ssize_t exports     # buffers exported through _Span and not yet released

    cdef int _check_open(self) except -1
    cdef int _check_backed(self) except -1
    cdef Py_ssize_t _first_run(self, Py_ssize_t k) noexcept
    cdef Py_ssize_t _largest_run(self) noexcept
    cdef object _span(self, Py_ssize_t first, Py_ssize_t count)
    cdef void _unmap(self) noexcept


cdef class Allocation:
    cdef PagePool pool              # the pool the pages belong to
    cdef readonly tuple pages       # page indices, ascending
    cdef readonly Py_ssize_t nbytes  # bytes asked for
    cdef readonly bint contiguous   # the pages are adjacent, so view() works
    cdef readonly bint freed        # free() was called (True too for one not made by alloc)

    cdef int _check_usable(self) except -1


cdef class _Span:
    cdef PagePool pool          # a reference that keeps the mapping alive while exported
    cdef Py_ssize_t offset      # first byte of the range within pool.base
    cdef Py_ssize_t length      # bytes in the range
