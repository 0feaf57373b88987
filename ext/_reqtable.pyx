"""The broker's table of in-flight requests, in C.

Why C: the broker touches this table twice per request on its hot path (`insert` when it
dispatches a request, `pop` when the reply comes back) and sweeps it for deadlines a few
times a second, so its per-call overhead bounds the broker's request rate.

Layout: open addressing over uint64 keys with linear probing. Each `Slot` holds the key,
the deadline (a double, inf for none) and an owned reference to the value. A removal
leaves a tombstone so that probe chains stay intact; tombstones that no chain can cross
any more become empty again at once. The capacity is a power of two and the array is
rehashed (dropping all tombstones, growing or shrinking to keep live entries at most
35%, never below the capacity sized from `capacity_hint`) when an insert would push the
load, live + tombstones, over 0.7.

Costs: `insert`, `get`, `pop` and `in` are O(1) expected. `next_deadline` is O(1) unless
the entry holding the smallest deadline was removed since the last call; then it rescans
the array once, O(capacity). `pop_expired` is O(1) when nothing is due; otherwise it scans
the array twice, O(capacity), and sorts what expired. That is fine: the broker calls it at
most a few times a second. `keys` is O(capacity + n log n); it is meant for shutdown.

References: a live slot owns one reference to its value, taken by `insert` and released
by `pop`, `pop_expired` (handed to the caller), `close` and deallocation. Before any
reference is released, which may run arbitrary `__del__` code, the table is left in a
consistent state, and arguments are converted before the table is touched, so re-entrant
calls are safe. The type does not take part in cyclic garbage collection: a value that
refers back to its table keeps both alive until `close()` breaks the cycle.

The GIL is held throughout; every call is short. The pure-Python twin,
ext/_reqtable_py.py, keeps the same API and semantics, and tests/test_reqtable.py runs
against both.
"""

cimport cython
from cpython.exc cimport PyErr_Clear, PyErr_Occurred
from cpython.float cimport PyFloat_AS_DOUBLE, PyFloat_CheckExact
from cpython.long cimport PyLong_CheckExact
from cpython.mem cimport PyMem_Calloc, PyMem_Free, PyMem_Malloc
from cpython.number cimport PyNumber_Index
from cpython.object cimport PyObject
from cpython.ref cimport Py_INCREF, Py_XDECREF
from libc.math cimport INFINITY, isnan
from libc.stdint cimport uint64_t
from libc.stdlib cimport qsort

cdef extern from "Python.h":
    # Without Cython's error check, so that _as_key can word the OverflowError like the twin.
    unsigned long long _ull_or_error "PyLong_AsUnsignedLongLong"(object) noexcept

cdef object _MISSING = object()   # pop()'s "no default given"
cdef Py_ssize_t _MAX_HINT = 1 << 30
cdef Py_ssize_t _MIN_CAPACITY = 8


cdef inline uint64_t _hash(uint64_t key) noexcept nogil:
    """splitmix64's finalizer: spreads sequential request ids evenly over the slots."""
    key = (key ^ (key >> 30)) * <uint64_t>0xBF58476D1CE4E5B9
    key = (key ^ (key >> 27)) * <uint64_t>0x94D049BB133111EB
    return key ^ (key >> 31)


cdef inline Py_ssize_t _capacity_for(Py_ssize_t n) noexcept nogil:
    """The smallest power of two, at least 8, that holds n entries within the 0.7 load."""
    cdef Py_ssize_t capacity = _MIN_CAPACITY
    while n * 10 > capacity * 7:
        capacity <<= 1
    return capacity


cdef Py_ssize_t _as_hint(object capacity_hint) except -1:
    """capacity_hint as a count: TypeError if not an integer, ValueError if out of range."""
    cdef object n = PyNumber_Index(capacity_hint)
    if not 0 <= n <= _MAX_HINT:
        raise ValueError(f"capacity_hint must be in [0, {_MAX_HINT}], got {n}")
    return n


cdef uint64_t _as_key(object key) except? 0:
    """key as a uint64: TypeError if not an integer, OverflowError outside [0, 2**64)."""
    cdef uint64_t k
    if not PyLong_CheckExact(key):  # bool, numpy integers, anything with __index__
        key = PyNumber_Index(key)
    k = _ull_or_error(key)
    if k == <uint64_t>-1 and PyErr_Occurred():
        PyErr_Clear()
        raise OverflowError(f"key {key} is outside [0, 2**64)")
    return k


cdef double _as_time(object t, str name) except? -1.0:
    """t as a double: TypeError if not a real number, ValueError if NaN."""
    cdef double d
    if PyFloat_CheckExact(t):  # the hot path, spared the try block's cost
        d = PyFloat_AS_DOUBLE(t)
    else:
        try:
            d = t
        except TypeError:
            raise TypeError(f"{name} must be a real number, not {type(t).__name__}") from None
    if isnan(d):
        raise ValueError(f"{name} must not be NaN")
    return d


cdef int _by_deadline_then_key(const void* a, const void* b) noexcept nogil:
    """qsort order of expired slots: deadline ascending, then key ascending."""
    cdef const Slot* x = <const Slot*>a
    cdef const Slot* y = <const Slot*>b
    if x.deadline != y.deadline:
        return -1 if x.deadline < y.deadline else 1
    if x.key != y.key:
        return -1 if x.key < y.key else 1
    return 0


cdef int _by_value(const void* a, const void* b) noexcept nogil:
    """qsort order of uint64 keys."""
    cdef uint64_t x = (<const uint64_t*>a)[0]
    cdef uint64_t y = (<const uint64_t*>b)[0]
    return (x > y) - (x < y)


cdef list _expired_to_list(Slot* expired, Py_ssize_t n):
    """[(key, value), ...] from expired[:n], taking over its references; frees expired."""
    cdef list out = []
    cdef Py_ssize_t i = 0
    cdef object value
    try:
        while i < n:
            value = <object>expired[i].value  # a new reference replaces the slot's
            Py_XDECREF(expired[i].value)
            expired[i].value = NULL
            out.append((expired[i].key, value))
            i += 1
    finally:
        while i < n:  # only after an error: drop the references not handed over
            Py_XDECREF(expired[i].value)
            i += 1
        PyMem_Free(expired)
    return out


@cython.final
cdef class RequestTable:
    """In-flight requests by uint64 id, each with a deadline and an arbitrary value.

    RequestTable(capacity_hint=1024) holds capacity_hint entries before it first grows.
    Keys are integers in [0, 2**64) (TypeError for a non-integer, OverflowError out of
    range, in every method that takes one); deadlines are time.monotonic() seconds, with
    math.inf for none (TypeError for a non-number, ValueError for NaN).
    """

    def __cinit__(self, capacity_hint=1024):
        self.min_capacity = _capacity_for(_as_hint(capacity_hint))
        self.slots = <Slot*>PyMem_Calloc(self.min_capacity, sizeof(Slot))
        if self.slots == NULL:
            raise MemoryError()
        self.capacity = self.min_capacity
        self.mask = self.capacity - 1
        self.min_deadline = INFINITY

    def __dealloc__(self):
        self._release()

    def __len__(self):
        """Number of entries; 0 once closed."""
        return self.live

    def __contains__(self, key):
        cdef uint64_t k = _as_key(key)
        self._check_open()
        return self.slots[self._probe(k)].state == SLOT_LIVE

    def insert(self, key, deadline, value):
        """Add key with its deadline and value; KeyError if key is already present."""
        cdef uint64_t k = _as_key(key)
        cdef double d = _as_time(deadline, "deadline")
        cdef Py_ssize_t i
        self._check_open()
        self._make_room()
        i = self._probe(k)
        if self.slots[i].state == SLOT_LIVE:
            raise KeyError(f"key {k} is already in the table")
        self._store(i, k, d, value)

    def get(self, key, default=None):
        """The value of key, or default if it is absent."""
        cdef uint64_t k = _as_key(key)
        cdef Slot* slot
        self._check_open()
        slot = &self.slots[self._probe(k)]
        if slot.state == SLOT_LIVE:
            return <object>slot.value
        return default

    def pop(self, key, default=_MISSING):
        """Remove key and return its value; default if absent, KeyError if none given."""
        cdef uint64_t k = _as_key(key)
        cdef Py_ssize_t i
        cdef PyObject* ref
        self._check_open()
        i = self._probe(k)
        if self.slots[i].state != SLOT_LIVE:
            if default is _MISSING:
                raise KeyError(k)
            return default
        ref = self._detach(i)
        value = <object>ref  # takes its own reference, so releasing the slot's runs no code
        Py_XDECREF(ref)
        return value

    def pop_expired(self, now):
        """Remove every entry with deadline < now; [(key, value)] by deadline, then key."""
        cdef double t = _as_time(now, "now")
        cdef Py_ssize_t n
        cdef Slot* expired
        self._check_open()
        if self._next_deadline() >= t:
            return []  # the common case: nothing is due
        n = self._count_expired(t)
        expired = <Slot*>PyMem_Malloc(n * sizeof(Slot))
        if expired == NULL:
            raise MemoryError()
        self._move_expired(t, expired)
        qsort(expired, n, sizeof(Slot), _by_deadline_then_key)
        return _expired_to_list(expired, n)

    def next_deadline(self):
        """The smallest deadline among the entries; math.inf if there are none."""
        self._check_open()
        return self._next_deadline()

    def keys(self):
        """All keys, ascending."""
        cdef Py_ssize_t i, n = 0
        cdef uint64_t* keys
        self._check_open()
        keys = <uint64_t*>PyMem_Malloc(self.live * sizeof(uint64_t))
        if keys == NULL:
            raise MemoryError()
        for i in range(self.capacity):  # copy first: building ints may run arbitrary code
            if self.slots[i].state == SLOT_LIVE:
                keys[n] = self.slots[i].key
                n += 1
        qsort(keys, n, sizeof(uint64_t), _by_value)
        try:
            return [keys[i] for i in range(n)]
        finally:
            PyMem_Free(keys)

    def close(self):
        """Drop every entry and its reference; later calls but close/len raise ValueError."""
        self._release()

    # -- internals ---------------------------------------------------------------------

    cdef int _check_open(self) except -1:
        if self.closed:
            raise ValueError("table is closed")
        return 0

    cdef Py_ssize_t _probe(self, uint64_t key) noexcept:
        """Index of the slot holding key or, if none does, of the slot key belongs in.

        Walks from the key's home slot to the first empty one and prefers the first
        tombstone passed for an insert. Terminates: the load limit keeps a slot empty.
        """
        cdef Py_ssize_t i = <Py_ssize_t>(_hash(key) & <uint64_t>self.mask)
        cdef Py_ssize_t first_tombstone = -1
        cdef Slot* slot
        while True:
            slot = &self.slots[i]
            if slot.state == SLOT_EMPTY:
                return i if first_tombstone < 0 else first_tombstone
            if slot.state == SLOT_LIVE:
                if slot.key == key:
                    return i
            elif first_tombstone < 0:
                first_tombstone = i
            i = (i + 1) & self.mask

    cdef int _make_room(self) except -1:
        """Rehash first if one more entry would push live + tombstones over 0.7."""
        if (self.live + self.tombstones + 1) * 10 <= self.capacity * 7:
            return 0
        return self._rehash(max(self.min_capacity, _capacity_for(2 * (self.live + 1))))

    cdef int _rehash(self, Py_ssize_t new_capacity) except -1:
        """Move the live entries into a fresh array of new_capacity slots."""
        cdef Slot* old = self.slots
        cdef Py_ssize_t old_capacity = self.capacity, i
        cdef Slot* fresh = <Slot*>PyMem_Calloc(new_capacity, sizeof(Slot))
        if fresh == NULL:
            raise MemoryError()
        self.slots = fresh
        self.capacity = new_capacity
        self.mask = new_capacity - 1
        self.tombstones = 0
        for i in range(old_capacity):
            if old[i].state == SLOT_LIVE:
                self.slots[self._probe(old[i].key)] = old[i]  # the reference moves along
        PyMem_Free(old)
        return 0

    cdef void _store(self, Py_ssize_t i, uint64_t key, double deadline, object value) noexcept:
        """Fill slot i (empty or a tombstone) with a new entry."""
        cdef Slot* slot = &self.slots[i]
        if slot.state == SLOT_TOMBSTONE:
            self.tombstones -= 1
        Py_INCREF(value)
        slot.key = key
        slot.deadline = deadline
        slot.value = <PyObject*>value
        slot.state = SLOT_LIVE
        self.live += 1
        if not self.min_dirty and deadline < self.min_deadline:
            self.min_deadline = deadline

    cdef PyObject* _detach(self, Py_ssize_t i) noexcept:
        """Remove the entry in slot i; the caller takes over its value's reference."""
        cdef Slot* slot = &self.slots[i]
        cdef PyObject* value = slot.value
        slot.value = NULL
        slot.state = SLOT_TOMBSTONE
        self.live -= 1
        self.tombstones += 1
        if self.live == 0:
            self.min_deadline = INFINITY
            self.min_dirty = False
        elif slot.deadline == self.min_deadline:
            self.min_dirty = True
        self._trim_tombstones(i)
        return value

    cdef void _trim_tombstones(self, Py_ssize_t i) noexcept:
        """Empty the tombstone at i and the run of tombstones before it, if the slot after
        i is empty: a probe chain that crossed them would stop there anyway."""
        if self.slots[(i + 1) & self.mask].state != SLOT_EMPTY:
            return
        while self.slots[i].state == SLOT_TOMBSTONE:
            self.slots[i].state = SLOT_EMPTY
            self.tombstones -= 1
            i = (i + self.mask) & self.mask  # i - 1, wrapping

    cdef double _next_deadline(self) noexcept:
        """The smallest live deadline, rescanning only after its holder was removed."""
        cdef Py_ssize_t i
        cdef double smallest = INFINITY
        if self.min_dirty:
            for i in range(self.capacity):
                if self.slots[i].state == SLOT_LIVE and self.slots[i].deadline < smallest:
                    smallest = self.slots[i].deadline
            self.min_deadline = smallest
            self.min_dirty = False
        return self.min_deadline

    cdef Py_ssize_t _count_expired(self, double now) noexcept:
        """Number of entries with deadline < now."""
        cdef Py_ssize_t i, n = 0
        for i in range(self.capacity):
            if self.slots[i].state == SLOT_LIVE and self.slots[i].deadline < now:
                n += 1
        return n

    cdef void _move_expired(self, double now, Slot* out) noexcept:
        """Detach every entry with deadline < now into out, which takes their references,
        and recompute the smallest deadline from the entries that stay."""
        cdef Py_ssize_t i, n = 0
        cdef double smallest = INFINITY
        for i in range(self.capacity):
            if self.slots[i].state != SLOT_LIVE:
                continue
            if self.slots[i].deadline < now:
                out[n] = self.slots[i]
                out[n].value = self._detach(i)
                n += 1
            elif self.slots[i].deadline < smallest:
                smallest = self.slots[i].deadline
        self.min_deadline = smallest
        self.min_dirty = False

    cdef void _release(self) noexcept:
        """Close: detach the array first, then drop the references, so that code run by a
        value's __del__ finds a closed, consistent table."""
        cdef Slot* slots = self.slots
        cdef Py_ssize_t capacity = self.capacity, i
        self.slots = NULL
        self.capacity = 0
        self.mask = 0
        self.live = 0
        self.tombstones = 0
        self.min_deadline = INFINITY
        self.min_dirty = False
        self.closed = True
        for i in range(capacity):
            if slots[i].state == SLOT_LIVE:
                Py_XDECREF(slots[i].value)
        PyMem_Free(slots)
