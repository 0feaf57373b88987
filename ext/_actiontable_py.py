"""Pure-Python twin of `ext._actiontable.ActionTable`: the same API and the same semantics.

`ext` uses it when MTSERVE_PUREPYTHON=1 or the C core is not built. It is NOT lock-free:
CPython offers no compare-and-swap on a Python object, so one `threading.Lock` guards
every method and a claim is atomic because it runs under that lock. What it keeps of the
C version is everything observable: the slot that `put` picks (the first FREE slot from
where the last put left off, wrapping), the order of `claim` (smallest `latest` among the
eligible, ties to the lowest slot), the states a slot goes through, the exceptions and
their messages (the argument checks and messages below are shared with the C version).

Layout: one bytearray of slot states (so `put`, `reap` and `counts` search it at C
speed), parallel lists for value, lane, earliest and latest, and per lane the set of its
QUEUED slots, so `claim`, `expire` and `next_earliest` cost O(queued slots of the lane)
(the C version scans the slots that are not FREE, through a bitmap), and a count of the
DONE slots, so that `reap` returns at once when there are none (as the C version does).

Re-entrancy: arguments are converted before the lock is taken and `close` drops the
values after releasing it, so a `__float__` or a value's `__del__` that calls back into
the table does not deadlock on the (non-reentrant) lock.
"""

from __future__ import annotations

import math
import operator
import threading
from typing import Final, NoReturn, final

from ext._reqtable_py import _as_time  # one definition of what a time may be

FREE: Final = 0  # owned by the producer: put() may fill it
QUEUED: Final = 1  # published by put(): claim() or expire() may take it
RUNNING: Final = 2  # taken by one consumer, which must finish() it
DONE: Final = 3  # finished: reap() hands its value back and frees it
STATE_NAMES: Final = ("FREE", "QUEUED", "RUNNING", "DONE")
LANES: Final = 64  # lanes are 0 .. LANES - 1
MAX_CAPACITY: Final = 1 << 24


class TableFull(MemoryError):
    """put() found no FREE slot: every slot is queued, running or waiting for reap()."""


def _as_capacity(capacity: int) -> int:
    """capacity as a count: TypeError if not an integer, ValueError if out of range."""
    n = operator.index(capacity)
    if not 1 <= n <= MAX_CAPACITY:
        raise ValueError(f"capacity must be in [1, {MAX_CAPACITY}], got {n}")
    return n


def _as_lane(lane: int) -> int:
    """lane as an int: TypeError if not an integer, ValueError outside [0, LANES)."""
    n = operator.index(lane)
    if not 0 <= n < LANES:
        raise ValueError(f"lane must be in [0, {LANES - 1}], got {n}")
    return n


def _as_slot(slot: int, capacity: int) -> int:
    """slot as an index: TypeError if not an integer, IndexError outside [0, capacity)."""
    i = operator.index(slot)
    if not 0 <= i < capacity:
        raise IndexError(f"slot {i} is out of range [0, {capacity})")
    return i


def _full(capacity: int, queued: int, running: int, done: int) -> TableFull:
    """The error of a put() into a table with no FREE slot."""
    return TableFull(
        f"all {capacity} slots are in use ({queued} queued, {running} running,"
        f" {done} done): reap() frees the done ones"
    )


def _not_running(slot: int, state: int) -> ValueError:
    """The error of a finish() on a slot that is not RUNNING."""
    return ValueError(f"slot {slot} is {STATE_NAMES[state]}, not RUNNING")


@final
class ActionTable:
    """The worker's table of actions: fixed slots, one producer, any number of consumers.

    ActionTable(capacity) has `capacity` slots, each FREE, QUEUED, RUNNING or DONE. The
    I/O thread `put`s an action (FREE -> QUEUED) with its lane and window; executor
    threads `claim` (or `expire`) one of their lane (QUEUED -> RUNNING) and `finish` it
    (RUNNING -> DONE); the I/O thread `reap`s the finished ones (DONE -> FREE). Times are
    time.monotonic() seconds (TypeError for a non-number, ValueError for NaN); latest may
    be math.inf. An action with earliest > latest is never claimed; it only expires.
    """

    __slots__ = (
        "_capacity",
        "_closed",
        "_cursor",
        "_done",
        "_earliest",
        "_lanes",
        "_latest",
        "_lock",
        "_queued",
        "_states",
        "_values",
    )

    def __init__(self, capacity: int) -> None:
        n = _as_capacity(capacity)
        self._capacity = n  # number of slots
        self._lock = threading.Lock()  # held by every method: this twin is not lock-free
        self._states = bytearray(n)  # each slot's state, FREE (0) to start
        self._values: list[object] = [None] * n  # each slot's value, None while FREE
        self._lanes = [0] * n  # each slot's lane, meaningful unless FREE
        self._earliest = [0.0] * n  # each slot's earliest, meaningful unless FREE
        self._latest = [0.0] * n  # each slot's latest, meaningful unless FREE
        self._queued: list[set[int]] = [set() for _ in range(LANES)]  # QUEUED slots by lane
        self._cursor = 0  # where put() starts looking for a FREE slot
        self._done = 0  # how many slots are DONE: reap() has nothing to do while 0
        self._closed = False  # close() was called: every method but close refuses

    @property
    def capacity(self) -> int:
        """Number of slots (still readable once closed)."""
        return self._capacity

    def __reduce__(self) -> NoReturn:
        raise TypeError("cannot pickle ActionTable")

    def put(self, value: object, lane: int, earliest: float, latest: float) -> int:
        """Queue value in a FREE slot for lane's consumers; its index. TableFull if none.

        Producer only: one thread may call put and reap.
        """
        ln = _as_lane(lane)
        e = _as_time(earliest, "earliest")
        la = _as_time(latest, "latest")
        with self._lock:
            self._check_open()
            states = self._states
            i = states.find(FREE, self._cursor)
            if i < 0:
                i = states.find(FREE, 0, self._cursor)
                if i < 0:
                    raise _full(self._capacity, *self._counts()[1:])
            self._values[i] = value
            self._lanes[i] = ln
            self._earliest[i] = e
            self._latest[i] = la
            states[i] = QUEUED
            self._queued[ln].add(i)
            self._cursor = i + 1 if i + 1 < self._capacity else 0
            return i

    def claim(self, lane: int, now: float) -> tuple[int, object] | None:
        """Take the QUEUED slot of lane with earliest <= now and the smallest latest (ties:
        the lowest slot), QUEUED -> RUNNING; (slot, value), or None if none is eligible."""
        ln = _as_lane(lane)
        t = _as_time(now, "now")
        with self._lock:
            self._check_open()
            queued = self._queued[ln]
            if not queued:
                return None
            earliest, latest = self._earliest, self._latest
            best = min(((latest[i], i) for i in queued if earliest[i] <= t), default=None)
            if best is None:
                return None
            i = best[1]
            queued.remove(i)
            self._states[i] = RUNNING
            return i, self._values[i]

    def expire(self, lane: int, now: float) -> list[tuple[int, object]]:
        """Take every QUEUED slot of lane with latest < now, QUEUED -> RUNNING, so that the
        caller can answer and then finish() each; [(slot, value)] in slot order."""
        ln = _as_lane(lane)
        t = _as_time(now, "now")
        with self._lock:
            self._check_open()
            queued = self._queued[ln]
            latest = self._latest
            due = sorted(i for i in queued if latest[i] < t)
            for i in due:
                queued.remove(i)
                self._states[i] = RUNNING
            return [(i, self._values[i]) for i in due]

    def next_earliest(self, lane: int) -> float:
        """The smallest earliest among lane's QUEUED slots (math.inf if none): how long a
        consumer of that lane may sleep."""
        ln = _as_lane(lane)
        with self._lock:
            self._check_open()
            earliest = self._earliest
            return min((earliest[i] for i in self._queued[ln]), default=math.inf)

    def finish(self, slot: int) -> None:
        """RUNNING -> DONE, by the thread that claimed the slot; ValueError if not RUNNING."""
        i = _as_slot(slot, self._capacity)
        with self._lock:
            self._check_open()
            if self._states[i] != RUNNING:
                raise _not_running(i, self._states[i])
            self._states[i] = DONE
            self._done += 1

    def reap(self) -> list[object]:
        """Free every DONE slot and return their values, in slot order. Producer only."""
        with self._lock:
            self._check_open()
            states, values = self._states, self._values
            out = []
            i = states.find(DONE) if self._done else -1
            while i >= 0:
                out.append(values[i])
                values[i] = None
                states[i] = FREE
                self._done -= 1
                i = states.find(DONE, i + 1) if self._done else -1
            return out

    def state(self, slot: int) -> int:
        """The state of slot: FREE, QUEUED, RUNNING or DONE."""
        i = _as_slot(slot, self._capacity)
        with self._lock:
            self._check_open()
            return self._states[i]

    def counts(self) -> tuple[int, int, int, int]:
        """How many slots are FREE, QUEUED, RUNNING and DONE."""
        with self._lock:
            self._check_open()
            return self._counts()

    def close(self) -> None:
        """Drop every value; later calls but close raise ValueError. Idempotent."""
        with self._lock:
            values = self._values
            self._values = [None] * self._capacity
            self._states = bytearray(self._capacity)
            for queued in self._queued:
                queued.clear()
            self._done = 0
            self._closed = True
        values.clear()  # outside the lock: a value's __del__ may call back into the table

    def _counters(self) -> tuple[int, int, tuple[int, ...]]:
        """(slots not FREE, DONE slots, QUEUED slots of each lane): what the C version's
        fast paths count, for the tests to compare."""
        with self._lock:
            self._check_open()
            in_use = self._capacity - self._states.count(FREE)
            return in_use, self._done, tuple(len(queued) for queued in self._queued)

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("table is closed")

    def _counts(self) -> tuple[int, int, int, int]:
        states = self._states
        free, queued, running = states.count(FREE), states.count(QUEUED), states.count(RUNNING)
        return free, queued, running, self._capacity - free - queued - running
