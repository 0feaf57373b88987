"""The model registry (SQLite) and the content-addressed model store on disk.

Both live under the broker's state directory and survive a restart. A row names a
tenant's model and points at a blob `models/<sha[:2]>/<sha256>.onnx`; identical bytes
uploaded by several tenants share one blob. A blob is written completely (temp file,
fsync, rename) before its row is committed, so a crash leaves either the old state or
the new one, never a half-written model.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtcore.protocol import DTYPES, TensorDesc

_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    tenant     TEXT NOT NULL,
    name       TEXT NOT NULL,
    sha256     TEXT NOT NULL,
    size       INTEGER NOT NULL,
    inputs     TEXT NOT NULL,     -- JSON list of [name, dtype, shape]
    outputs    TEXT NOT NULL,
    max_batch  INTEGER NOT NULL,
    profile    TEXT NOT NULL,     -- JSON map batch size -> exec microseconds
    created    REAL NOT NULL,     -- unix time
    measurements TEXT NOT NULL DEFAULT '{}',  -- JSON: the worker's profile (see ModelRecord)
    PRIMARY KEY (tenant, name)
);
CREATE TABLE IF NOT EXISTS shares (  -- read-only grants: grantee may run and inspect
    owner      TEXT NOT NULL,
    name       TEXT NOT NULL,
    grantee    TEXT NOT NULL,
    PRIMARY KEY (owner, name, grantee)
);
"""
SHARE_SEP = "/"  # a shared model is named "<owner>/<name>": neither part may contain it
MAX_GRANTEES = 256  # tenants one model may be shared with


@dataclass
class ModelRecord:
    """One tenant's model, as the registry holds it and the controller uses it."""

    tenant: str
    name: str
    sha256: str
    size: int
    inputs: tuple[TensorDesc, ...]
    outputs: tuple[TensorDesc, ...]
    max_batch: int
    profile: dict[int, float] = field(default_factory=dict)  # batch -> exec microseconds
    created: float = 0.0
    # What profiling measured beyond medians: every run per batch size ("samples"),
    # cold -> host ("prepare_us"), host -> device builds ("build_us"), a fresh build from
    # bytes ("fresh_us"), host-tier weight bytes and measured device-tier session bytes.
    measurements: dict[str, Any] = field(default_factory=dict, compare=False)
    state: str = "ready"
    input_plans: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    reply_row_bytes: int = field(default=0, repr=False, compare=False)  # largest output/row seen

    @property
    def batchable(self) -> bool:
        return self.max_batch > 1

    def predicted_us(self, rows: int) -> float | None:
        """Profiled execution time of the smallest profiled batch holding `rows`, if known."""
        fits = [b for b in self.profile if b >= rows]
        if fits:
            return self.profile[min(fits)]
        if self.profile:  # beyond the largest profiled batch: scale linearly
            largest = max(self.profile)
            return self.profile[largest] * rows / largest
        return None

    def reply_bytes(self, rows: int) -> int:
        """Predicted output bytes of a request of `rows` rows: the largest per row seen,
        else the signature's (a dynamic dimension counted as 1: learned from results)."""
        if self.reply_row_bytes:
            return self.reply_row_bytes * rows
        total = 0
        for desc in self.outputs:
            n = DTYPES[desc.dtype].itemsize
            for axis, dim in enumerate(desc.shape):
                n *= rows if (axis == 0 and self.batchable) else max(dim, 1)
            total += n
        return total

    def to_info(self) -> dict[str, Any]:
        """The protocol's model info map."""
        return {
            "name": self.name,
            "size": self.size,
            "sha256": self.sha256,
            "inputs": [d.to_wire() for d in self.inputs],
            "outputs": [d.to_wire() for d in self.outputs],
            "max_batch": self.max_batch,
            "state": self.state,
            "profile": {str(k): int(v) for k, v in self.profile.items()},  # msgpack keys: strings
            "created": self.created,
        }


def _descs_json(descs: tuple[TensorDesc, ...]) -> str:
    return json.dumps([d.to_wire() for d in descs])


def _descs_from_json(text: str) -> tuple[TensorDesc, ...]:
    return tuple(TensorDesc(n, t, tuple(s)) for n, t, s in json.loads(text))


class ModelStore:
    """Content-addressed blobs: the cold tier every worker fetches from."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / f"{sha256}.onnx"

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def put_file(self, sha256: str, source: Path) -> Path:
        """Move a complete, verified file into the store (atomic rename)."""
        target = self.path(sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            source.unlink(missing_ok=True)
        else:
            os.replace(source, target)
        return target

    def read(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()

    def remove(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)


class Registry:
    """SQLite rows plus an in-memory index, so lookups on the request path touch no disk."""

    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.store = ModelStore(state_dir / "models")
        self.db = sqlite3.connect(state_dir / "registry.sqlite", isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA busy_timeout=2000")  # `mtserve tenant` writes from outside
        self.db.executescript(_SCHEMA)
        self._migrate()
        self.models: dict[tuple[str, str], ModelRecord] = {}  # (tenant, name) -> record
        self.shares: dict[tuple[str, str], set[str]] = {}  # (owner, name) -> grantees
        self._load()
        self.load_shares()

    def _migrate(self) -> None:
        """Registries written before a column existed get it, with its default."""
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(models)")}
        if "measurements" not in columns:
            self.db.execute("ALTER TABLE models ADD COLUMN measurements TEXT NOT NULL DEFAULT '{}'")

    def _load(self) -> None:
        rows = self.db.execute(
            "SELECT tenant, name, sha256, size, inputs, outputs, max_batch, profile, created, "
            "measurements FROM models"
        ).fetchall()
        for tenant, name, sha, size, ins, outs, max_batch, profile, created, meas in rows:
            if not self.store.has(sha):
                continue  # blob lost outside our control: the model cannot be served
            self.models[(tenant, name)] = ModelRecord(
                tenant,
                name,
                sha,
                size,
                _descs_from_json(ins),
                _descs_from_json(outs),
                max_batch,
                {int(k): v for k, v in json.loads(profile).items()},
                created,
                json.loads(meas),
            )

    def load_shares(self) -> None:
        """(Re)read the grants: `mtserve tenant remove` drops a removed tenant's."""
        shares: dict[tuple[str, str], set[str]] = {}
        for owner, name, grantee in self.db.execute("SELECT owner, name, grantee FROM shares"):
            shares.setdefault((owner, name), set()).add(grantee)
        self.shares = shares

    def get(self, tenant: str, name: str) -> ModelRecord | None:
        return self.models.get((tenant, name))

    def resolve(self, tenant: str, ref: str) -> ModelRecord | None:
        """The model `tenant` may run and inspect by `ref`: its own `name`, or
        `owner/name` if the owner shared it with `tenant`. None otherwise, whether or not
        the model exists: a tenant learns nothing of models not shared with it."""
        owner, sep, name = ref.partition(SHARE_SEP)
        if not sep:
            return self.models.get((tenant, ref))
        if owner != tenant and tenant not in self.shares.get((owner, name), ()):
            return None
        return self.models.get((owner, name))

    def grantees(self, owner: str, name: str) -> list[str]:
        return sorted(self.shares.get((owner, name), ()))

    def share(self, owner: str, name: str, grant: list[str], revoke: list[str]) -> list[str]:
        """Grant and revoke read-only access to one model; the grantees after."""
        current = self.shares.setdefault((owner, name), set())
        for grantee in revoke:
            self.db.execute(
                "DELETE FROM shares WHERE owner = ? AND name = ? AND grantee = ?",
                (owner, name, grantee),
            )
            current.discard(grantee)
        for grantee in grant:
            self.db.execute(
                "INSERT OR IGNORE INTO shares (owner, name, grantee) VALUES (?, ?, ?)",
                (owner, name, grantee),
            )
            current.add(grantee)
        if not current:
            del self.shares[(owner, name)]
        return sorted(current)

    def shared_with(self, tenant: str) -> list[ModelRecord]:
        """Other tenants' models shared with `tenant`, by owner then name."""
        found = [
            self.models[key]
            for key, grantees in self.shares.items()
            if tenant in grantees and key in self.models
        ]
        return sorted(found, key=lambda m: (m.tenant, m.name))

    def list(self, tenant: str) -> list[ModelRecord]:
        return sorted((m for (t, _), m in self.models.items() if t == tenant), key=lambda m: m.name)

    def put(self, record: ModelRecord) -> ModelRecord | None:
        """Insert or replace a record; returns the record it replaced, if any."""
        record.created = record.created or time.time()
        self.db.execute(
            "INSERT OR REPLACE INTO models (tenant, name, sha256, size, inputs, outputs,"
            " max_batch, profile, created, measurements) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.tenant,
                record.name,
                record.sha256,
                record.size,
                _descs_json(record.inputs),
                _descs_json(record.outputs),
                record.max_batch,
                json.dumps({str(k): v for k, v in record.profile.items()}),
                record.created,
                json.dumps(record.measurements),
            ),
        )
        old = self.models.get((record.tenant, record.name))
        self.models[(record.tenant, record.name)] = record
        return old

    def set_profile(
        self,
        record: ModelRecord,
        profile: dict[int, float],
        measurements: dict[str, Any] | None = None,
    ) -> None:
        record.profile = dict(profile)
        record.measurements = dict(measurements or {})
        self.db.execute(
            "UPDATE models SET profile = ?, measurements = ?"
            " WHERE tenant = ? AND name = ? AND sha256 = ?",
            (
                json.dumps({str(k): v for k, v in profile.items()}),
                json.dumps(record.measurements),
                record.tenant,
                record.name,
                record.sha256,
            ),
        )

    def delete(self, tenant: str, name: str) -> ModelRecord | None:
        self.db.execute("DELETE FROM models WHERE tenant = ? AND name = ?", (tenant, name))
        self.db.execute("DELETE FROM shares WHERE owner = ? AND name = ?", (tenant, name))
        self.shares.pop((tenant, name), None)
        return self.models.pop((tenant, name), None)

    def orphans(self) -> list[str]:
        """Blobs in the store that no model refers to (left by a crash or a restart)."""
        used = {m.sha256 for m in self.models.values()}
        return [p.stem for p in self.store.root.glob("*/*.onnx") if p.stem not in used]

    def owners(self, sha256: str) -> list[str]:
        """The tenants with a model of these bytes (usage is split over them)."""
        return sorted({m.tenant for m in self.models.values() if m.sha256 == sha256})

    def owners_by_sha(self) -> dict[str, tuple[list[str], int]]:
        """sha256 -> (its owners, its size), for every blob at once."""
        out: dict[str, tuple[list[str], int]] = {}
        for m in self.models.values():
            owners, _ = out.setdefault(m.sha256, ([], m.size))
            if m.tenant not in owners:
                owners.append(m.tenant)
        return out

    def sha_in_use(self, sha256: str) -> bool:
        return any(m.sha256 == sha256 for m in self.models.values())

    def count(self) -> int:
        return len(self.models)

    def close(self) -> None:
        self.db.close()
