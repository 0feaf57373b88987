"""The worker's table of actions, in C: one producer, any number of consumers, no lock.

Why C: the worker's I/O thread puts every action it receives here and its loader and
exec executor threads take them from here; with a lock, a consumer scanning the table
would stall the others and the I/O thread. Here the consumers take a slot with one
compare-and-swap, and a long scan runs without the GIL.

Layout: a fixed C array of `Slot`s. Each slot has one atomic 64-bit `word` (state in bits
0-1, lane in bits 2-7, a generation in bits 8-63 that every put() increments), its window
`earliest` and `latest` (C11 _Atomic doubles, read relaxed), and `value`, an owned
reference unless the slot is FREE. A slot goes FREE -> QUEUED (put) -> RUNNING (claim or
expire) -> DONE (finish) -> FREE (reap). put() looks for a FREE slot from where the last
put left off, wrapping; claim() takes, among the QUEUED slots of its lane with earliest
<= now, the one with the smallest latest, ties to the lowest slot.

Beside the slots: `used`, a bitmap of the slots that are not FREE, and `summary`, a bitmap
of used's non-zero words; one QUEUED counter per lane; a DONE counter; and the number of
slots in use. Only the producer makes a slot FREE or not (put and reap), so it alone
writes used, summary and the in-use count (plain read, then release store); consumers
read them. The counters are C11 _Atomic int64, each on its own cache line.

Memory ordering, in brief. Ownership passes with the state: a FREE slot belongs to the
producer, a QUEUED one to nobody, a RUNNING one to the consumer whose CAS won, a DONE one
back to the producer; only the owner of a FREE slot writes its fields.
- put() writes value, lane, earliest and latest, then publishes the word with a release
  store. A consumer's acquire load that reads that word therefore sees those fields.
- A scan reads the word (acquire), then the times (relaxed). Between the two, the slot
  can be claimed, finished, reaped and put again: the times may be the next action's.
  Such a read is harmless: the times are atomics (a relaxed load costs what a plain one
  does on x86-64 and AArch64, and it makes the race defined behaviour, not a torn read),
  and the CAS expects the exact word the scan read, generation included. If the slot
  moved on, the CAS fails and the scan starts over; if it succeeds, nobody changed the
  word since it was read, so the times read were this generation's. No ABA: the 56-bit
  generation does not wrap (2**56 puts into one slot).
- The CAS QUEUED -> RUNNING is an acquire, so the winner sees `value`; only the winner
  reads it, after the CAS, with the GIL (to take its own reference).
- finish() moves RUNNING -> DONE with a release CAS and reap() reads DONE with an acquire
  load, so everything the consumer did with the slot happens before the producer frees
  and refills it.
- Reference counts change only with the GIL held. close() (with the GIL) marks the table
  closed, then swaps every word to FREE and drops the references; a consumer whose CAS
  won meanwhile sees `closed` once it has the GIL back and raises without touching the
  value. The array itself is freed only by __dealloc__, which cannot run while a method,
  and so a scan, is running, because its caller holds a reference.

Fast paths and bounds: what keeps the common calls O(1).
- claim(), expire() and next_earliest() first read their lane's QUEUED counter and, if it
  is 0, return None, [] or inf at once, with the GIL held: executors call them on every
  wake-up, mostly with an empty lane. put() raises the counter before the release store
  that publishes the slot; the winning QUEUED -> RUNNING CAS lowers it after. So a put()
  that happened before the call (the I/O thread posts the executor's semaphore after
  it) has its increment seen, and only the take of that same slot can have undone it: a
  0 hides only a put() running concurrently, which a scan could miss as well, and whose
  semaphore post makes the consumer call again. The counter never goes negative: a
  decrement follows the CAS, which synchronises with the put() and its increment.
- reap() reads the DONE counter and returns [] at once if it is 0. finish() raises it
  before its RUNNING -> DONE CAS (and lowers it again if the CAS cannot succeed), reap()
  lowers it after freeing each slot, so it is never below the number of DONE slots. reap()
  stops when its own decrement, a read-modify-write and so of the latest value, leaves 0:
  a finish() that happened before the reap() was counted there, so 0 means its slot has
  been freed already.
- Scans (claim, expire, next_earliest, reap, counts) walk only the slots that are not
  FREE, through summary and used: O(capacity / 4096 + slots in use), in slot order, so
  claim's ties and expire's and reap's orders are as before. put() searches used for a
  FREE slot 64 slots at a time. put() sets the slot's bit (and, for a word that was 0, its
  summary bit) before the release store that publishes the slot; reap() clears it after
  storing FREE. So a scan that does not see a bit misses only a concurrent put(), and a
  bit over a slot that is FREE, or of another lane or state, is skipped by the word check
  as before. Why a bitmap rather than a high-water mark (the highest slot ever put + 1):
  put() keeps its choice, the first FREE slot from where the last put left off, which
  makes claim's ties to the lowest slot close to first come, first served; but it sweeps
  the whole table, so such a mark would soon be the capacity. Preferring the lowest FREE
  slot would keep a mark low, but a new action would take a just-freed low slot and win
  ties against older ones, which can starve them under load. The bitmap bounds a scan by
  the slots in use wherever they are.
- A scan releases the GIL only when it has more than NOGIL_SCAN (64) slots in use (plus
  summary words) to read: below that, it costs less than the GIL round trip. Under the
  GIL or not, it runs the same CAS protocol (other consumers may be scanning without it).

Why C11 <stdatomic.h> (ext/_atomics.h) over GCC's __atomic builtins: the fields are
declared _Atomic, so the compiler makes every access to them atomic, even a careless
plain one in later Cython code, and the code is standard C for GCC, Clang and MSVC.

Costs: put() is O(1) unless it must search past busy slots (64 to a bitmap word);
claim(), expire() and next_earliest() are O(1) on a lane with nothing QUEUED, reap() when
nothing is DONE, and otherwise each reads the slots in use, not the whole table. A put +
claim + finish + reap costs ~0.15 us, about the same at 256 and 4096 slots (it was ~0.9
and ~5.6 us when every call scanned every slot and released the GIL). Only scans of more
than NOGIL_SCAN slots release the GIL; put(), finish(), reap(), state(), counts() and
close() always keep it. The type does not take part in cyclic garbage collection: close()
breaks cycles through values.

The pure-Python twin, ext/_actiontable_py.py, has the same API and semantics (but a
lock); tests/test_actiontable.py runs against both.
"""

cimport cython
from cpython.exc cimport PyErr_Clear, PyErr_Occurred
from cpython.float cimport PyFloat_AS_DOUBLE, PyFloat_CheckExact
from cpython.long cimport PyLong_CheckExact
from cpython.mem cimport PyMem_Calloc, PyMem_Free
from cpython.object cimport PyObject
from cpython.ref cimport Py_INCREF, Py_XDECREF, Py_XINCREF
from libc.math cimport INFINITY, isnan
from libc.stdint cimport int64_t, uint64_t

from ext._actiontable_py import (
    TableFull,
    _as_capacity,
    _as_lane,
    _as_slot,
    _as_time,
    _full,
    _not_running,
)

cdef extern from "Python.h":
    # Without Cython's error check: an overflow falls back to the twin's check and message.
    Py_ssize_t _ssize_or_error "PyLong_AsSsize_t"(object) noexcept

if not mt_atomics_lock_free():
    raise ImportError("ext._actiontable needs lock-free 64-bit atomics on this machine")

FREE = SLOT_FREE
QUEUED = SLOT_QUEUED
RUNNING = SLOT_RUNNING
DONE = SLOT_DONE

__all__ = ["DONE", "FREE", "QUEUED", "RUNNING", "ActionTable", "TableFull"]


cdef enum:
    EXPIRE_CHUNK = 64   # expire() takes slots in chunks of this many (a buffer on the stack)

cdef uint64_t ALL_ONES = ~(<uint64_t>0)


cdef inline int _lane(object lane) except -1:
    """lane as a C int; the twin's _as_lane words the errors."""
    cdef Py_ssize_t n
    if PyLong_CheckExact(lane):
        n = _ssize_or_error(lane)
        if 0 <= n < 64:
            return <int>n
        if n == -1 and PyErr_Occurred():
            PyErr_Clear()
    return _as_lane(lane)


cdef inline double _time(object t, str name) except? -1.0:
    """t as a double; the twin's _as_time converts the rest and words the errors."""
    cdef double d
    if PyFloat_CheckExact(t):
        d = PyFloat_AS_DOUBLE(t)
        if not isnan(d):
            return d
    return _as_time(t, name)


cdef inline uint64_t _key(int lane, int state) noexcept nogil:
    """The low byte of a word: what a scan for `state` slots of `lane` compares."""
    return (<uint64_t>lane << LANE_SHIFT) | <uint64_t>state


cdef inline uint64_t _with_state(uint64_t word, int state) noexcept nogil:
    """word with its state bits replaced: same lane, same generation."""
    return (word & ~(<uint64_t>STATE_BITS)) | <uint64_t>state


cdef inline bint _dense(uint64_t bm) noexcept nogil:
    """Whether the set bits of the bitmap word bm fill more than half of the span from its
    lowest to its highest: then a scan reads the whole span slot by slot (its FREE slots
    fail the word check) rather than picking the bits out, which costs ~1.5x a slot."""
    return bm != 0 and 2 * mt_popcount64(bm) > mt_msb64(bm) - mt_ctz64(bm) + 1


cdef inline Py_ssize_t _run(uint64_t* bm, bint dense, Py_ssize_t* end) noexcept nogil:
    """Take the next run of slots to read off the bitmap word *bm (not 0): return its first
    bit, and set *end past its last: the whole span if dense, else the lowest bit alone."""
    cdef uint64_t b = bm[0]
    cdef Py_ssize_t lo = mt_ctz64(b)
    if dense:
        end[0] = mt_msb64(b) + 1
        bm[0] = 0
    else:
        end[0] = lo + 1
        bm[0] = b & (b - 1)
    return lo


@cython.final
cdef class ActionTable:
    """The worker's table of actions: fixed slots, one producer, any number of consumers.

    ActionTable(capacity) has `capacity` slots, each FREE, QUEUED, RUNNING or DONE. The
    I/O thread `put`s an action (FREE -> QUEUED) with its lane and window; executor
    threads `claim` (or `expire`) one of their lane (QUEUED -> RUNNING) and `finish` it
    (RUNNING -> DONE); the I/O thread `reap`s the finished ones (DONE -> FREE). Times are
    time.monotonic() seconds (TypeError for a non-number, ValueError for NaN); latest may
    be math.inf. An action with earliest > latest is never claimed; it only expires.
    """

    def __cinit__(self, capacity):
        cdef Py_ssize_t n = _as_capacity(capacity), i
        self.slots = <Slot*>PyMem_Calloc(n, sizeof(Slot))
        self.n_used = (n + 63) >> 6
        self.n_summary = (self.n_used + 63) >> 6
        self.used = <mt_atomic_u64*>PyMem_Calloc(
            self.n_used + self.n_summary, sizeof(mt_atomic_u64))
        self.counters = <Counter*>PyMem_Calloc(N_COUNTERS, sizeof(Counter))
        if self.slots == NULL or self.used == NULL or self.counters == NULL:
            raise MemoryError()  # __dealloc__ frees what was allocated
        self.summary = self.used + self.n_used
        for i in range(n):
            mt_init_u64(&self.slots[i].word, SLOT_FREE)
            mt_init_double(&self.slots[i].earliest, 0.0)
            mt_init_double(&self.slots[i].latest, 0.0)
        for i in range(self.n_used + self.n_summary):
            mt_init_u64(&self.used[i], 0)
        for i in range(N_COUNTERS):
            mt_init_i64(&self.counters[i].n, 0)
        self.nogil_above = NOGIL_SCAN
        self.capacity = n

    def __dealloc__(self):
        cdef Py_ssize_t i
        PyMem_Free(self.used)
        PyMem_Free(self.counters)
        if self.slots == NULL:
            return
        for i in range(self.capacity):
            Py_XDECREF(self.slots[i].value)  # NULL in FREE slots and once closed
        PyMem_Free(self.slots)

    def put(self, value, lane, earliest, latest):
        """Queue value in a FREE slot for lane's consumers; its index. TableFull if none.

        Producer only: one thread may call put and reap.
        """
        cdef int ln = _lane(lane)
        cdef double e = _time(earliest, "earliest")
        cdef double la = _time(latest, "latest")
        cdef Py_ssize_t i
        cdef Slot* slot
        cdef uint64_t word
        self._check_open()
        i = self._first_free(self.cursor, self.capacity)  # from where the last put left off
        if i < 0:
            i = self._first_free(0, self.cursor)  # wrapping
            if i < 0:
                raise self._table_full()
        slot = &self.slots[i]
        word = mt_load_acquire(&slot.word)  # FREE: only its generation matters
        Py_INCREF(value)
        slot.value = <PyObject*>value
        mt_store_relaxed_double(&slot.earliest, e)
        mt_store_relaxed_double(&slot.latest, la)
        self._mark_used(i)  # before the publish: a scan that finds the word finds the bit
        mt_fetch_add_i64(&self.counters[ln].n, 1)  # before the publish too: see claim()
        word = ((word >> GEN_SHIFT) + 1) << GEN_SHIFT  # a new generation: stale CASes fail
        mt_store_release(&slot.word, word | _key(ln, SLOT_QUEUED))  # publish: fields first
        self.cursor = i + 1 if i + 1 < self.capacity else 0
        return i

    def claim(self, lane, now):
        """Take the QUEUED slot of lane with earliest <= now and the smallest latest (ties:
        the lowest slot), QUEUED -> RUNNING; (slot, value), or None if none is eligible."""
        cdef int ln = _lane(lane)
        cdef double t = _time(now, "now")
        cdef Py_ssize_t i
        self._check_open()
        if mt_load_acquire_i64(&self.counters[ln].n) <= 0:
            return None  # nothing of lane's is QUEUED, but what a concurrent put() adds
        if self._long_scan():
            with nogil:
                i = self._scan_claim(ln, t)
        else:
            i = self._scan_claim(ln, t)
        if i < 0:
            return None
        if self.closed:  # close() ran during the scan and dropped the slot's reference
            raise ValueError("table is closed")
        value = <object>self.slots[i].value  # our own reference, before anything can run
        return i, value

    def expire(self, lane, now):
        """Take every QUEUED slot of lane with latest < now, QUEUED -> RUNNING, so that the
        caller can answer and then finish() each; [(slot, value)] in slot order."""
        cdef int ln = _lane(lane)
        cdef double t = _time(now, "now")
        cdef Py_ssize_t k, taken, start = 0
        cdef Taken out[EXPIRE_CHUNK]
        cdef bint long_scan
        cdef list result = []
        self._check_open()
        if mt_load_acquire_i64(&self.counters[ln].n) <= 0:
            return result  # see claim()
        long_scan = self._long_scan()
        while start >= 0:  # a chunk of at most EXPIRE_CHUNK slots at a time, in slot order
            if long_scan:
                with nogil:
                    taken = self._scan_expire(ln, t, start, out, EXPIRE_CHUNK, &start)
            else:
                taken = self._scan_expire(ln, t, start, out, EXPIRE_CHUNK, &start)
            if taken == 0:
                break
            if self.closed:  # close() ran meanwhile and dropped the references
                raise ValueError("table is closed")
            for k in range(taken):  # our own references first: building the list may run code
                out[k].value = self.slots[out[k].slot].value
                Py_XINCREF(out[k].value)
            try:
                for k in range(taken):
                    result.append((out[k].slot, <object>out[k].value))
            finally:
                for k in range(taken):
                    Py_XDECREF(out[k].value)
        return result

    def next_earliest(self, lane):
        """The smallest earliest among lane's QUEUED slots (math.inf if none): how long a
        consumer of that lane may sleep."""
        cdef int ln = _lane(lane)
        cdef double smallest
        self._check_open()
        if mt_load_acquire_i64(&self.counters[ln].n) <= 0:
            return INFINITY  # see claim()
        if self._long_scan():
            with nogil:
                smallest = self._scan_earliest(ln)
        else:
            smallest = self._scan_earliest(ln)
        return smallest

    def finish(self, slot):
        """RUNNING -> DONE, by the thread that claimed the slot; ValueError if not RUNNING."""
        cdef Py_ssize_t i = self._slot_index(slot)
        cdef uint64_t word
        self._check_open()
        word = mt_load_acquire(&self.slots[i].word)
        if (word & STATE_BITS) == SLOT_RUNNING:
            mt_fetch_add_i64(&self.counters[DONE_COUNTER].n, 1)  # before the CAS: see reap()
            while (word & STATE_BITS) == SLOT_RUNNING:
                if mt_cas_release(&self.slots[i].word, &word, _with_state(word, SLOT_DONE)):
                    return
            mt_fetch_add_i64(&self.counters[DONE_COUNTER].n, -1)  # another thread moved it
        raise _not_running(i, word & STATE_BITS)

    def reap(self):
        """Free every DONE slot and return their values, in slot order. Producer only."""
        cdef Py_ssize_t s, w, i, lo, hi
        cdef bint dense
        cdef uint64_t sm, bm, word
        cdef int64_t left
        cdef PyObject* ref
        cdef list out = []
        self._check_open()
        # The DONE counter is raised before finish()'s CAS and lowered here after each slot
        # is freed, so it is never below the number of DONE slots. When it reads 0, every
        # finish() that happened before this call has been reaped: stop there.
        if mt_load_acquire_i64(&self.counters[DONE_COUNTER].n) <= 0:
            return out
        for s in range(self.n_summary):
            sm = mt_load_acquire(&self.summary[s])
            while sm != 0:
                w = (s << 6) | mt_ctz64(sm)
                sm &= sm - 1
                bm = mt_load_acquire(&self.used[w])
                dense = _dense(bm)
                while bm != 0:
                    lo = _run(&bm, dense, &hi)
                    for i in range((w << 6) + lo, (w << 6) + hi):
                        word = mt_load_acquire(&self.slots[i].word)
                        if (word & STATE_BITS) != SLOT_DONE:
                            continue
                        ref = self.slots[i].value
                        self.slots[i].value = NULL
                        mt_store_release(&self.slots[i].word, word & ~(<uint64_t>KEY_BITS))  # FREE
                        self._mark_free(i)
                        left = mt_fetch_add_i64(&self.counters[DONE_COUNTER].n, -1) - 1
                        try:
                            out.append(<object>ref)  # the list's reference replaces the slot's
                        finally:
                            Py_XDECREF(ref)
                        if left <= 0:
                            return out
        return out

    def state(self, slot):
        """The state of slot: FREE, QUEUED, RUNNING or DONE."""
        cdef Py_ssize_t i = self._slot_index(slot)
        self._check_open()
        return mt_load_acquire(&self.slots[i].word) & STATE_BITS

    def counts(self):
        """How many slots are FREE, QUEUED, RUNNING and DONE (each slot read once, so a
        snapshot only while no other thread moves a slot)."""
        cdef Py_ssize_t s, w, i, lo, hi
        cdef bint dense
        cdef uint64_t sm, bm
        cdef Py_ssize_t c[4]
        self._check_open()
        c[0] = c[1] = c[2] = c[3] = 0
        for s in range(self.n_summary):  # only the slots that are not FREE
            sm = mt_load_acquire(&self.summary[s])
            while sm != 0:
                w = (s << 6) | mt_ctz64(sm)
                sm &= sm - 1
                bm = mt_load_acquire(&self.used[w])
                dense = _dense(bm)
                while bm != 0:
                    lo = _run(&bm, dense, &hi)
                    for i in range((w << 6) + lo, (w << 6) + hi):
                        c[mt_load_acquire(&self.slots[i].word) & STATE_BITS] += 1
        return self.capacity - c[1] - c[2] - c[3], c[1], c[2], c[3]

    def close(self):
        """Drop every value; later calls but close raise ValueError. Idempotent."""
        cdef Py_ssize_t i
        cdef PyObject* ref
        if self.closed:
            return
        self.closed = True  # first: a value's __del__ below may call back into the table
        for i in range(self.capacity):
            mt_exchange_acq_rel(&self.slots[i].word, SLOT_FREE)
            ref = self.slots[i].value
            self.slots[i].value = NULL
            Py_XDECREF(ref)

    def __reduce__(self):
        raise TypeError("cannot pickle ActionTable")

    # -- for tests ---------------------------------------------------------------------

    def _counters(self):
        """(slots not FREE, the DONE counter, the QUEUED counter of each lane): the fast
        paths' bookkeeping, which matches counts() whenever no other thread is in a call."""
        self._check_open()
        return (
            mt_load_acquire_i64(&self.counters[IN_USE_COUNTER].n),
            mt_load_acquire_i64(&self.counters[DONE_COUNTER].n),
            tuple([mt_load_acquire_i64(&self.counters[i].n) for i in range(N_LANES)]),
        )

    def _release_gil_above(self, Py_ssize_t slots):
        """Scans release the GIL when more than `slots` slots are not FREE (default
        NOGIL_SCAN); 0 makes every scan release it, as the stress tests want."""
        self.nogil_above = slots

    # -- internals ---------------------------------------------------------------------

    cdef int _check_open(self) except -1:
        if self.closed:
            raise ValueError("table is closed")
        return 0

    cdef Py_ssize_t _slot_index(self, object slot) except -1:
        """slot as an index; the twin's _as_slot converts the rest and words the errors."""
        cdef Py_ssize_t i
        if PyLong_CheckExact(slot):
            i = _ssize_or_error(slot)
            if 0 <= i < self.capacity:
                return i
            if i == -1 and PyErr_Occurred():
                PyErr_Clear()
        return _as_slot(slot, self.capacity)

    cdef object _table_full(self):
        """The TableFull error, with the counts in its message."""
        queued, running, done = self.counts()[1:]
        return _full(self.capacity, queued, running, done)

    cdef bint _long_scan(self) noexcept nogil:
        """Whether a scan would read enough slots (those not FREE) and summary words to
        be worth a GIL round trip: a few ns a slot, against ~100 ns or more for the GIL."""
        return (mt_load_acquire_i64(&self.counters[IN_USE_COUNTER].n) + self.n_summary
                > self.nogil_above)

    cdef Py_ssize_t _first_free(self, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
        """The lowest FREE slot in [lo, hi), -1 if none. Producer only: used is its own."""
        cdef Py_ssize_t w, last
        cdef uint64_t free
        if lo >= hi:
            return -1
        w = lo >> 6
        last = (hi - 1) >> 6
        free = ~mt_load_acquire(&self.used[w]) & (ALL_ONES << (lo & 63))
        while True:
            if w == last and (hi & 63) != 0:
                free &= ((<uint64_t>1) << (hi & 63)) - 1
            if free != 0:
                return (w << 6) | mt_ctz64(free)
            w += 1
            if w > last:
                return -1
            free = ~mt_load_acquire(&self.used[w])

    cdef void _mark_used(self, Py_ssize_t i) noexcept nogil:
        """Producer only, in put(): slot i is no longer FREE (its bit, then the summary's)."""
        cdef Py_ssize_t w = i >> 6, s = w >> 6
        cdef uint64_t bits = mt_load_acquire(&self.used[w])
        mt_store_release(&self.used[w], bits | ((<uint64_t>1) << (i & 63)))
        if bits == 0:
            mt_store_release(&self.summary[s],
                             mt_load_acquire(&self.summary[s]) | ((<uint64_t>1) << (w & 63)))
        mt_store_release_i64(&self.counters[IN_USE_COUNTER].n,
                             mt_load_acquire_i64(&self.counters[IN_USE_COUNTER].n) + 1)

    cdef void _mark_free(self, Py_ssize_t i) noexcept nogil:
        """Producer only, in reap(), after the word went FREE: slot i is FREE again."""
        cdef Py_ssize_t w = i >> 6, s = w >> 6
        cdef uint64_t bits = mt_load_acquire(&self.used[w]) & ~((<uint64_t>1) << (i & 63))
        mt_store_release(&self.used[w], bits)
        if bits == 0:
            mt_store_release(&self.summary[s],
                             mt_load_acquire(&self.summary[s]) & ~((<uint64_t>1) << (w & 63)))
        mt_store_release_i64(&self.counters[IN_USE_COUNTER].n,
                             mt_load_acquire_i64(&self.counters[IN_USE_COUNTER].n) - 1)

    cdef Py_ssize_t _scan_claim(self, int lane, double now) noexcept nogil:
        """Move the best eligible slot (QUEUED in lane, earliest <= now, smallest latest,
        lowest index) QUEUED -> RUNNING and return its index; -1 if none is eligible."""
        cdef uint64_t key = _key(lane, SLOT_QUEUED)
        cdef Slot* slots = self.slots
        cdef Py_ssize_t s, w, i, lo, hi, best
        cdef bint dense
        cdef uint64_t sm, bm, word, best_word = 0
        cdef double latest, best_latest = INFINITY
        while True:
            best = -1
            for s in range(self.n_summary):  # the slots not FREE, in slot order
                sm = mt_load_acquire(&self.summary[s])
                while sm != 0:
                    w = (s << 6) | mt_ctz64(sm)
                    sm &= sm - 1
                    bm = mt_load_acquire(&self.used[w])
                    dense = _dense(bm)
                    while bm != 0:
                        lo = _run(&bm, dense, &hi)
                        for i in range((w << 6) + lo, (w << 6) + hi):
                            word = mt_load_acquire(&slots[i].word)
                            if (word & KEY_BITS) != key:
                                continue
                            if not mt_load_relaxed_double(&slots[i].earliest) <= now:
                                continue
                            latest = mt_load_relaxed_double(&slots[i].latest)
                            if best < 0 or latest < best_latest:
                                best, best_word, best_latest = i, word, latest
            if best < 0:
                return -1
            if mt_cas_acquire(&slots[best].word, &best_word,
                              _with_state(best_word, SLOT_RUNNING)):
                mt_fetch_add_i64(&self.counters[lane].n, -1)
                return best
            # Lost to another consumer (or the slot moved on): the scan is stale, start over.

    cdef Py_ssize_t _scan_expire(self, int lane, double now, Py_ssize_t start, Taken* out,
                                 Py_ssize_t room, Py_ssize_t* resume) noexcept nogil:
        """From slot `start` on, move each slot QUEUED in lane with latest < now QUEUED ->
        RUNNING, recording it in out, until `room` are: the number moved. *resume is then
        where to go on from, or -1 if the scan reached the end."""
        cdef uint64_t key = _key(lane, SLOT_QUEUED)
        cdef Slot* slots = self.slots
        cdef Py_ssize_t s, w, i, lo, hi, k = 0
        cdef bint dense
        cdef uint64_t sm, bm, word
        for s in range(start >> 12, self.n_summary):
            sm = mt_load_acquire(&self.summary[s])
            if s == start >> 12:
                sm &= ALL_ONES << ((start >> 6) & 63)
            while sm != 0:
                w = (s << 6) | mt_ctz64(sm)
                sm &= sm - 1
                bm = mt_load_acquire(&self.used[w])
                if w == start >> 6:
                    bm &= ALL_ONES << (start & 63)
                dense = _dense(bm)
                while bm != 0:
                    lo = _run(&bm, dense, &hi)
                    for i in range((w << 6) + lo, (w << 6) + hi):
                        word = mt_load_acquire(&slots[i].word)
                        while ((word & KEY_BITS) == key
                               and mt_load_relaxed_double(&slots[i].latest) < now):
                            if mt_cas_acquire(&slots[i].word, &word,
                                              _with_state(word, SLOT_RUNNING)):
                                mt_fetch_add_i64(&self.counters[lane].n, -1)
                                out[k].slot = i
                                k += 1
                                if k == room:
                                    resume[0] = i + 1
                                    return k
                                break
                            # the CAS failed and loaded the current word into `word`: look again
        resume[0] = -1
        return k

    cdef double _scan_earliest(self, int lane) noexcept nogil:
        """The smallest earliest among slots QUEUED in lane; inf if none."""
        cdef uint64_t key = _key(lane, SLOT_QUEUED)
        cdef Slot* slots = self.slots
        cdef Py_ssize_t s, w, i, lo, hi
        cdef bint dense
        cdef uint64_t sm, bm, word, again
        cdef double earliest, smallest = INFINITY
        for s in range(self.n_summary):
            sm = mt_load_acquire(&self.summary[s])
            while sm != 0:
                w = (s << 6) | mt_ctz64(sm)
                sm &= sm - 1
                bm = mt_load_acquire(&self.used[w])
                dense = _dense(bm)
                while bm != 0:
                    lo = _run(&bm, dense, &hi)
                    for i in range((w << 6) + lo, (w << 6) + hi):
                        word = mt_load_acquire(&slots[i].word)
                        while (word & KEY_BITS) == key:
                            earliest = mt_load_relaxed_double(&slots[i].earliest)
                            mt_fence_acquire()  # orders the read of earliest before the re-read
                            again = mt_load_acquire(&slots[i].word)
                            if again == word:  # earliest belongs to the word we matched
                                if earliest < smallest:
                                    smallest = earliest
                                break
                            word = again
        return smallest
