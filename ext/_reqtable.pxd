# Declarations of the broker's table of in-flight requests (see _reqtable.pyx).

from cpython.object cimport PyObject
from libc.stdint cimport uint8_t, uint64_t


cdef enum SlotState:
    SLOT_EMPTY = 0      # never used since the last rehash: a probe stops here
    SLOT_LIVE = 1       # holds an entry
    SLOT_TOMBSTONE = 2  # held an entry that was removed: a probe walks past it


cdef struct Slot:
    uint64_t key        # the request id; meaningful only while state is SLOT_LIVE
    double deadline     # time.monotonic() seconds, inf for none; only while SLOT_LIVE
    PyObject* value     # an owned reference while SLOT_LIVE, NULL otherwise
    uint8_t state       # a SlotState


cdef class RequestTable:
    cdef Slot* slots                # the open-addressing array, `capacity` long; NULL once closed
    cdef Py_ssize_t capacity        # number of slots, a power of two (0 once closed)
    cdef Py_ssize_t mask            # capacity - 1, to reduce a hash to a slot index
    cdef Py_ssize_t min_capacity    # the capacity sized from capacity_hint; rehash never goes below
    cdef Py_ssize_t live            # slots in state SLOT_LIVE, i.e. len(table)
    cdef Py_ssize_t tombstones      # slots in state SLOT_TOMBSTONE; they count towards the load
    cdef double min_deadline        # smallest live deadline (inf if none), valid unless min_dirty
    cdef bint min_dirty             # an entry holding min_deadline was removed: rescan on demand
    cdef bint closed                # close() was called: every method but close/len refuses

    cdef int _check_open(self) except -1
    cdef Py_ssize_t _probe(self, uint64_t key) noexcept
    cdef int _make_room(self) except -1
    cdef int _rehash(self, Py_ssize_t new_capacity) except -1
    cdef void _store(self, Py_ssize_t i, uint64_t key, double deadline, object value) noexcept
    cdef PyObject* _detach(self, Py_ssize_t i) noexcept
    cdef void _trim_tombstones(self, Py_ssize_t i) noexcept
    cdef double _next_deadline(self) noexcept
    cdef Py_ssize_t _count_expired(self, double now) noexcept
    cdef void _move_expired(self, double now, Slot* out) noexcept
    cdef void _release(self) noexcept
