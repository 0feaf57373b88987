"""Pure-Python twin of `ext._reqtable.RequestTable`: the same API and the same semantics.

`ext` uses it when MTSERVE_PUREPYTHON=1 or the C core is not built. A dict maps each key
to `(deadline, value)`. Like the C version, it caches the smallest deadline and rescans
only after the entry holding it was removed, validates and converts every argument before
touching the table, and marks itself closed before dropping any reference, so code run by
a value's `__del__` finds a closed table. Costs are those of a dict, except that
`pop_expired` (when something is due), `keys` and a rescan for `next_deadline` are O(n).
"""

from __future__ import annotations

import math
import operator
from typing import Final, NoReturn, final

_MISSING: Final = object()  # pop()'s "no default given"
_MAX_HINT: Final = 1 << 30
_KEY_LIMIT: Final = 1 << 64


def _as_hint(capacity_hint: int) -> int:
    """capacity_hint as a count: TypeError if not an integer, ValueError if out of range."""
    n = operator.index(capacity_hint)
    if not 0 <= n <= _MAX_HINT:
        raise ValueError(f"capacity_hint must be in [0, {_MAX_HINT}], got {n}")
    return n


def _as_key(key: int) -> int:
    """key as an int: TypeError if not an integer, OverflowError outside [0, 2**64)."""
    k = operator.index(key)
    if not 0 <= k < _KEY_LIMIT:
        raise OverflowError(f"key {k} is outside [0, 2**64)")
    return k


def _as_time(t: float, name: str) -> float:
    """t as a float: TypeError if not a real number, ValueError if NaN.

    Accepts what C's PyFloat_AsDouble accepts: floats and objects with __float__ or
    __index__, but not the strings and buffers that float() would parse.
    """
    cls = type(t)
    if not (isinstance(t, float) or hasattr(cls, "__float__") or hasattr(cls, "__index__")):
        raise TypeError(f"{name} must be a real number, not {cls.__name__}")
    d = float(t)
    if math.isnan(d):
        raise ValueError(f"{name} must not be NaN")
    return d


@final
class RequestTable:
    """In-flight requests by uint64 id, each with a deadline and an arbitrary value.

    RequestTable(capacity_hint=1024) holds capacity_hint entries before it first grows.
    Keys are integers in [0, 2**64) (TypeError for a non-integer, OverflowError out of
    range, in every method that takes one); deadlines are time.monotonic() seconds, with
    math.inf for none (TypeError for a non-number, ValueError for NaN).
    """

    __slots__ = ("_closed", "_entries", "_min_deadline", "_min_dirty")

    def __init__(self, capacity_hint: int = 1024) -> None:
        _as_hint(capacity_hint)  # validated as in C; a dict sizes itself
        self._entries: dict[int, tuple[float, object]] = {}
        self._min_deadline = math.inf  # smallest deadline, valid unless _min_dirty
        self._min_dirty = False  # an entry holding _min_deadline was removed
        self._closed = False

    def __len__(self) -> int:
        """Number of entries; 0 once closed."""
        return len(self._entries)

    def __contains__(self, key: int) -> bool:
        k = _as_key(key)
        self._check_open()
        return k in self._entries

    def __reduce__(self) -> NoReturn:
        raise TypeError("cannot pickle RequestTable")

    def insert(self, key: int, deadline: float, value: object) -> None:
        """Add key with its deadline and value; KeyError if key is already present."""
        k = _as_key(key)
        d = _as_time(deadline, "deadline")
        self._check_open()
        if k in self._entries:
            raise KeyError(f"key {k} is already in the table")
        self._entries[k] = (d, value)
        if not self._min_dirty and d < self._min_deadline:
            self._min_deadline = d

    def get(self, key: int, default: object = None) -> object:
        """The value of key, or default if it is absent."""
        k = _as_key(key)
        self._check_open()
        entry = self._entries.get(k)
        return default if entry is None else entry[1]

    def pop(self, key: int, default: object = _MISSING) -> object:
        """Remove key and return its value; default if absent, KeyError if none given."""
        k = _as_key(key)
        self._check_open()
        entry = self._entries.pop(k, None)
        if entry is None:
            if default is _MISSING:
                raise KeyError(k)
            return default
        if not self._entries:
            self._min_deadline = math.inf
            self._min_dirty = False
        elif entry[0] == self._min_deadline:
            self._min_dirty = True
        return entry[1]

    def pop_expired(self, now: float) -> list[tuple[int, object]]:
        """Remove every entry with deadline < now; [(key, value)] by deadline, then key."""
        t = _as_time(now, "now")
        self._check_open()
        if self._next_deadline() >= t:
            return []  # the common case: nothing is due
        expired = sorted(
            (d, k, v) for k, (d, v) in list(self._entries.items()) if d < t
        )  # keys are unique, so values are never compared
        for _, k, _ in expired:
            del self._entries[k]
        self._min_deadline = min((d for d, _ in self._entries.values()), default=math.inf)
        self._min_dirty = False
        return [(k, v) for _, k, v in expired]

    def next_deadline(self) -> float:
        """The smallest deadline among the entries; math.inf if there are none."""
        self._check_open()
        return self._next_deadline()

    def keys(self) -> list[int]:
        """All keys, ascending."""
        self._check_open()
        return sorted(self._entries)

    def close(self) -> None:
        """Drop every entry and its reference; later calls but close/len raise ValueError."""
        entries = self._entries
        self._entries = {}
        self._min_deadline = math.inf
        self._min_dirty = False
        self._closed = True
        entries.clear()  # last: a value's __del__ may call back into the table

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("table is closed")

    def _next_deadline(self) -> float:
        if self._min_dirty:
            self._min_deadline = min((d for d, _ in self._entries.values()), default=math.inf)
            self._min_dirty = False
        return self._min_deadline
