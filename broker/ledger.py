"""The work ledger: how many seconds of queued execution must run before a given request.

The predictive scheduler keeps one ledger per worker: the queued requests it planned to
run there, each with its order key (when earliest-deadline-first order reaches it) and
the seconds it adds. Admission asks how much of that work runs before a new request:
the work of every entry whose key is no later than its own.

Entries are kept sorted by key. New requests nearly always carry the latest key (their
deadline is the latest so far) and leave in key order, so an insertion is nearly always
an append, and the question is answered from the total less the few entries with a
later key, scanned from the end: O(1) in the common case, without a tree to maintain.
"""

from __future__ import annotations

import bisect


class WorkLedger:
    """Seconds of queued work, keyed by order key, with 'work ordered before k'."""

    def __init__(self) -> None:
        self._entries: list[tuple[float, int, float]] = []  # (key, id, seconds), sorted
        self.total = 0.0  # seconds of work in the ledger

    @property
    def entries(self) -> int:
        return len(self._entries)

    def add(self, key: float, ident: int, seconds: float) -> None:
        entry = (key, ident, seconds)
        entries = self._entries
        if not entries or entries[-1] <= entry:
            entries.append(entry)
        else:
            bisect.insort(entries, entry)
        self.total += seconds

    def remove(self, key: float, ident: int, seconds: float) -> None:
        entries = self._entries
        i = bisect.bisect_left(entries, (key, ident))
        if i < len(entries) and entries[i][1] == ident:
            del entries[i]
            self.total = self.total - seconds if entries else 0.0

    def before(self, key: float) -> float:
        """Seconds of work whose key is no later than `key`."""
        later = 0.0
        entries = self._entries
        i = len(entries) - 1
        while i >= 0 and entries[i][0] > key:
            later += entries[i][2]
            i -= 1
        return max(0.0, self.total - later)
