# Declarations of the worker's lock-free table of actions (see _actiontable.pyx).

from cpython.object cimport PyObject
from libc.stdint cimport int64_t, uint64_t


cdef extern from "_atomics.h" nogil:
    ctypedef uint64_t mt_atomic_u64      # _Atomic uint64_t
    ctypedef int64_t mt_atomic_i64       # _Atomic int64_t
    ctypedef double mt_atomic_double     # _Atomic double
    void mt_init_u64(mt_atomic_u64* p, uint64_t v)
    void mt_init_i64(mt_atomic_i64* p, int64_t v)
    void mt_init_double(mt_atomic_double* p, double v)
    uint64_t mt_load_acquire(mt_atomic_u64* p)
    void mt_store_release(mt_atomic_u64* p, uint64_t v)
    uint64_t mt_exchange_acq_rel(mt_atomic_u64* p, uint64_t v)
    bint mt_cas_acquire(mt_atomic_u64* p, uint64_t* expected, uint64_t desired)
    bint mt_cas_release(mt_atomic_u64* p, uint64_t* expected, uint64_t desired)
    int64_t mt_load_acquire_i64(mt_atomic_i64* p)
    void mt_store_release_i64(mt_atomic_i64* p, int64_t v)
    int64_t mt_fetch_add_i64(mt_atomic_i64* p, int64_t v)
    double mt_load_relaxed_double(mt_atomic_double* p)
    void mt_store_relaxed_double(mt_atomic_double* p, double v)
    void mt_fence_acquire()
    bint mt_atomics_lock_free()
    int mt_ctz64(uint64_t x)
    int mt_msb64(uint64_t x)
    int mt_popcount64(uint64_t x)


cdef enum SlotState:
    SLOT_FREE = 0       # owned by the producer: put() may write the slot's fields
    SLOT_QUEUED = 1     # published by put(): the first consumer to CAS it away owns it
    SLOT_RUNNING = 2    # owned by the consumer whose CAS won, until it finish()es it
    SLOT_DONE = 3       # finished: the producer's reap() frees it


cdef enum:
    STATE_BITS = 0x03   # word bits 0-1: the SlotState
    LANE_SHIFT = 2      # word bits 2-7: the lane, 0..63
    KEY_BITS = 0xFF     # state and lane: what a scan compares against
    GEN_SHIFT = 8       # word bits 8-63: the generation, + 1 on every put()


cdef enum:
    N_LANES = 64        # lanes 0..63: one QUEUED counter each
    DONE_COUNTER = 64   # counters[DONE_COUNTER]: slots finish() moved to DONE, not yet reaped
    IN_USE_COUNTER = 65 # counters[IN_USE_COUNTER]: slots that are not FREE (producer-written)
    N_COUNTERS = 66
    NOGIL_SCAN = 64     # a scan releases the GIL only when it has more slots than this to read


cdef struct Counter:
    mt_atomic_i64 n     # the count
    char pad[56]        # one counter per 64-byte cache line: lanes' consumers do not collide


cdef struct Slot:
    mt_atomic_u64 word          # state | lane << 2 | generation << 8; the only field CAS'd
    mt_atomic_double earliest   # claimable from then (monotonic s); written only while FREE
    mt_atomic_double latest     # end of the window (monotonic s, may be inf); ditto
    PyObject* value             # owned reference unless FREE; written while FREE, read by owner


cdef struct Taken:
    Py_ssize_t slot     # a slot that expire()'s CAS moved to RUNNING
    PyObject* value     # its value, a reference of expire()'s own once taken


cdef class ActionTable:
    cdef Slot* slots                    # `capacity` slots; freed only by __dealloc__
    cdef readonly Py_ssize_t capacity   # number of slots
    cdef Py_ssize_t cursor              # where put() starts looking for a FREE slot
    cdef bint closed                    # close() was called; read and written with the GIL
    cdef mt_atomic_u64* used            # bit i % 64 of word i >> 6: slot i is not FREE (producer)
    cdef mt_atomic_u64* summary         # bit w % 64 of word w >> 6: used[w] is not 0 (producer)
    cdef Py_ssize_t n_used              # words in used: ceil(capacity / 64)
    cdef Py_ssize_t n_summary           # words in summary: ceil(n_used / 64)
    cdef Counter* counters              # N_COUNTERS counters, see the enum above
    cdef Py_ssize_t nogil_above         # release the GIL for scans of more slots than this

    cdef int _check_open(self) except -1
    cdef Py_ssize_t _slot_index(self, object slot) except -1
    cdef object _table_full(self)
    cdef bint _long_scan(self) noexcept nogil
    cdef Py_ssize_t _first_free(self, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil
    cdef void _mark_used(self, Py_ssize_t i) noexcept nogil
    cdef void _mark_free(self, Py_ssize_t i) noexcept nogil
    cdef Py_ssize_t _scan_claim(self, int lane, double now) noexcept nogil
    cdef Py_ssize_t _scan_expire(self, int lane, double now, Py_ssize_t start, Taken* out,
                                 Py_ssize_t room, Py_ssize_t* resume) noexcept nogil
    cdef double _scan_earliest(self, int lane) noexcept nogil
