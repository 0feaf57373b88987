"""Usage metering per tenant: the basis for pricing per inference, not per container.

Per tenant the broker counts requests answered, executor milliseconds (each batch's
measured exec time, split over its requests by rows), load milliseconds (each LOAD's
measured time, split over the tenants owning those bytes), bytes moved (request inputs
in, answers out, model bytes fetched by workers) and memory byte-seconds in each tier
(every second, the bytes of each model a worker reports holding on its device or host
tier, charged to the tenants owning it). Counts accumulate in memory and are added to
the registry's `usage` table every FLUSH_S and at shutdown, in one transaction, so
`mtserve tenant usage` reads them whether the broker runs or not; a crash loses at most
FLUSH_S of them.
"""

from __future__ import annotations

import sqlite3
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields

FLUSH_S = 5.0  # seconds between additions to the usage table
SAMPLE_S = 1.0  # seconds between memory samples

_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    tenant              TEXT PRIMARY KEY,
    requests            INTEGER NOT NULL DEFAULT 0,
    exec_ms             REAL NOT NULL DEFAULT 0,
    load_ms             REAL NOT NULL DEFAULT 0,
    bytes_in            INTEGER NOT NULL DEFAULT 0,
    bytes_out           INTEGER NOT NULL DEFAULT 0,
    bytes_fetched       INTEGER NOT NULL DEFAULT 0,
    device_byte_seconds REAL NOT NULL DEFAULT 0,
    host_byte_seconds   REAL NOT NULL DEFAULT 0
);
"""


@dataclass
class Usage:
    """One tenant's usage (since the table began, or since the last flush in memory)."""

    tenant: str
    requests: int = 0
    exec_ms: float = 0.0
    load_ms: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0
    bytes_fetched: int = 0
    device_byte_seconds: float = 0.0
    host_byte_seconds: float = 0.0


COUNTS = tuple(f.name for f in fields(Usage) if f.name != "tenant")


class Meter:
    """Usage since the last flush, by tenant. Blobs may be shared by tenants that
    uploaded the same bytes: what a blob costs is split over its `owners`."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.db.executescript(_SCHEMA)
        self.pending: dict[str, Usage] = defaultdict(lambda: Usage(""))
        self._flushed = 0.0
        self._sampled: float | None = None

    def _of(self, tenant: str) -> Usage:
        usage = self.pending[tenant]
        usage.tenant = tenant
        return usage

    def answered(self, tenant: str, exec_ms: float, bytes_in: int, bytes_out: int) -> None:
        usage = self._of(tenant)
        usage.requests += 1
        usage.exec_ms += exec_ms
        usage.bytes_in += bytes_in
        usage.bytes_out += bytes_out

    def shared(self, owners: Sequence[str], load_ms: float = 0.0, fetched: int = 0) -> None:
        """A load of, or a fetch of, a blob: split over the tenants that own it."""
        for tenant in owners:
            usage = self._of(tenant)
            usage.load_ms += load_ms / len(owners)
            usage.bytes_fetched += fetched // len(owners)

    def due(self, now: float) -> bool:
        """Whether a memory sample is due (the first call only starts the clock)."""
        if self._sampled is None:
            self._sampled = now
            return False
        return now - self._sampled >= SAMPLE_S

    def sample(self, now: float, held: Iterable[tuple[str, Sequence[str], int]]) -> None:
        """Charge memory held since the last sample: (tier, owners, bytes) per model."""
        since = now if self._sampled is None else self._sampled
        seconds, self._sampled = now - since, now
        for tier, owners, nbytes in held:
            for tenant in owners:
                usage = self._of(tenant)
                share = nbytes * seconds / len(owners)
                if tier == "device":
                    usage.device_byte_seconds += share
                else:
                    usage.host_byte_seconds += share

    def flush(self, now: float, force: bool = False) -> None:
        """Add what accumulated to the usage table (every FLUSH_S, or now if `force`)."""
        if not self.pending or (not force and now - self._flushed < FLUSH_S):
            return
        self._flushed = now
        columns = ", ".join(COUNTS)
        marks = ", ".join("?" for _ in COUNTS)
        adds = ", ".join(f"{c} = {c} + excluded.{c}" for c in COUNTS)
        rows = [(u.tenant, *(getattr(u, c) for c in COUNTS)) for u in self.pending.values()]
        self.db.execute("BEGIN")
        try:
            self.db.executemany(
                f"INSERT INTO usage (tenant, {columns}) VALUES (?, {marks})"
                f" ON CONFLICT(tenant) DO UPDATE SET {adds}",
                rows,
            )
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")
        self.pending.clear()


def read_usage(db: sqlite3.Connection) -> list[Usage]:
    """Every tenant's usage as recorded (what `mtserve tenant usage` prints)."""
    db.executescript(_SCHEMA)
    rows = db.execute(f"SELECT tenant, {', '.join(COUNTS)} FROM usage ORDER BY tenant")
    return [Usage(*row) for row in rows]
