"""Who may connect: principals (tenants, workers, admins), their CURVE keys and limits.

A principal is a name, a role and one CURVE public key, kept in the registry's SQLite
database (table `principals`) beside the models, so `mtserve tenant add` works whether
the broker runs or not: the broker re-reads the table whenever another process changed
it (`refresh`, on every housekeeping tick and before refusing an unknown key), so a key
added is usable at once and a key removed or rotated stops working within a tick, even
on a connection opened before.

Roles: a `tenant` owns models and sends requests; a `worker` may register on the
backend; an `admin` is a tenant that also sees every tenant's figures in STATUS. A key
has exactly one role, so a tenant key cannot register as a worker and a worker key
cannot act as a tenant. Names share one namespace (a tenant and a worker cannot both be
"x"); they are 1-64 letters, digits and `._-`, never containing `/`, so `owner/model`
names a model shared by another tenant unambiguously.

The secret halves live in key files (`mtcore/keys.py`), never in the database:
`provision` writes them under `<state_dir>/keys/` with mode 0600 for the operator to
hand out.
"""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtcore import keys
from mtcore.errors import BadArgument

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
KEYS_DIR = "keys"
BROKER_KEY = "broker"  # <state_dir>/keys/broker.key_secret: the broker's own pair

_SCHEMA = """
CREATE TABLE IF NOT EXISTS principals (
    name       TEXT PRIMARY KEY,
    role       TEXT NOT NULL,
    public_key TEXT NOT NULL UNIQUE,  -- Z85, 40 characters
    weight     REAL NOT NULL DEFAULT 1.0,
    limits     TEXT NOT NULL DEFAULT '{}',  -- JSON: overrides of the default tenant limits
    created    REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Principal:
    """One identity the broker knows: who, as what, with which key."""

    name: str
    role: str  # one of mtcore.keys.ROLES
    public_key: str  # Z85
    weight: float = 1.0  # share of executor time under overload (tenants)
    limits: dict[str, Any] = field(default_factory=dict, compare=False)  # quota overrides
    created: float = 0.0

    @property
    def admin(self) -> bool:
        return self.role == "admin"


def check_name(name: str) -> str:
    if not NAME.fullmatch(name) or name == BROKER_KEY:
        raise BadArgument(
            f"principal name {name!r:.70} must be 1-64 letters, digits or ._- (not 'broker')"
        )
    return name


def keys_dir(state_dir: Path) -> Path:
    return Path(state_dir) / KEYS_DIR


def key_path(state_dir: Path, name: str) -> Path:
    """Where `provision` writes a principal's secret key file."""
    return keys_dir(state_dir) / f"{name}.key_secret"


def broker_key(state_dir: Path) -> keys.KeyFile:
    """The broker's own key pair, created on first use (secret file mode 0600)."""
    path = key_path(state_dir, BROKER_KEY)
    if path.exists():
        key = keys.read(path)
        key.require_secret(path)
        return key
    key = keys.generate(BROKER_KEY, "broker")
    keys.write_secret(path, key)
    keys.write_public(path.with_suffix(".key"), key)
    return key


class Principals:
    """The principals table and an in-memory index of it by public key."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.db.executescript(_SCHEMA)
        self.by_key: dict[str, Principal] = {}
        self.by_name: dict[str, Principal] = {}
        self._version = -1
        self.generation = 0  # how many times the table was (re)read: who reads it compares
        self.refresh()

    @classmethod
    def open(cls, state_dir: Path) -> Principals:
        """Its own connection to `<state_dir>/registry.sqlite` (for the CLI)."""
        Path(state_dir).mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(Path(state_dir) / "registry.sqlite", isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA busy_timeout=5000")
        return cls(db)

    # ------------------------------------------------------------------ reading

    def refresh(self) -> bool:
        """Re-read the table if any connection changed the database since the last read."""
        version = self.db.execute("PRAGMA data_version").fetchone()[0]
        if version == self._version:
            return False
        self._version = version
        rows = self.db.execute(
            "SELECT name, role, public_key, weight, limits, created FROM principals"
        ).fetchall()
        found = [Principal(n, r, k, w, json.loads(lim), c) for n, r, k, w, lim, c in rows]
        self.by_key = {p.public_key: p for p in found}
        self.by_name = {p.name: p for p in found}
        self.generation += 1
        return True

    def list(self) -> list[Principal]:
        return sorted(self.by_name.values(), key=lambda p: (p.role, p.name))

    # ------------------------------------------------------------------ writing

    def add(
        self, name: str, role: str, public_key: str, weight: float = 1.0, limits: dict | None = None
    ) -> Principal:
        check_name(name)
        if role not in keys.ROLES:
            raise BadArgument(f"role must be one of {', '.join(keys.ROLES)}")
        if not weight > 0:
            raise BadArgument("weight must be a positive number")
        self.refresh()
        if name in self.by_name:
            raise BadArgument(f"principal '{name}' exists; `rotate` gives it a new key")
        principal = Principal(name, role, public_key, weight, dict(limits or {}), time.time())
        self.db.execute(
            "INSERT INTO principals (name, role, public_key, weight, limits, created)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (name, role, public_key, weight, json.dumps(principal.limits), principal.created),
        )
        self.refresh()
        return principal

    def remove(self, name: str) -> Principal:
        principal = self.get(name)
        self.db.execute("DELETE FROM principals WHERE name = ?", (name,))
        with contextlib.suppress(sqlite3.OperationalError):  # no shares table yet: none to drop
            self.db.execute("DELETE FROM shares WHERE grantee = ?", (name,))  # a new one by
        self.refresh()  # this name must not inherit them
        return principal

    def rotate(self, name: str, public_key: str) -> Principal:
        self.get(name)
        self.db.execute("UPDATE principals SET public_key = ? WHERE name = ?", (public_key, name))
        self.refresh()
        return self.by_name[name]

    def configure(
        self, name: str, weight: float | None = None, limits: dict[str, Any] | None = None
    ) -> Principal:
        """Change a principal's weight, or merge limit overrides (a None value drops one)."""
        principal = self.get(name)
        if weight is not None:
            if not weight > 0:
                raise BadArgument("weight must be a positive number")
            self.db.execute("UPDATE principals SET weight = ? WHERE name = ?", (weight, name))
        if limits:
            merged = {k: v for k, v in (principal.limits | limits).items() if v is not None}
            self.db.execute(
                "UPDATE principals SET limits = ? WHERE name = ?", (json.dumps(merged), name)
            )
        self.refresh()
        return self.by_name[name]

    def get(self, name: str) -> Principal:
        self.refresh()
        principal = self.by_name.get(name)
        if principal is None:
            raise BadArgument(f"no principal '{name}'; `mtserve tenant list` shows them")
        return principal


def provision(
    principals: Principals,
    state_dir: Path,
    name: str,
    role: str = "tenant",
    *,
    weight: float = 1.0,
    endpoint: str = "",
    out: Path | None = None,
) -> Path:
    """Create `name` with a fresh key pair; write its secret key file (mode 0600).

    The file names the broker's public key and, if given, its endpoint, so it is all a
    client needs. Returns the file's path (`out`, or `<state_dir>/keys/<name>.key_secret`).
    """
    check_name(name)
    key = _new_key(state_dir, name, role, endpoint)
    principals.add(name, role, key.public_key, weight)
    return keys.write_secret(Path(out) if out else key_path(state_dir, name), key)


def reissue(
    principals: Principals,
    state_dir: Path,
    name: str,
    *,
    endpoint: str = "",
    out: Path | None = None,
) -> Path:
    """Rotate `name`'s key: a new pair, the old key refused from the next refresh on."""
    key = _new_key(state_dir, name, principals.get(name).role, endpoint)
    principals.rotate(name, key.public_key)
    return keys.write_secret(Path(out) if out else key_path(state_dir, name), key)


def _new_key(state_dir: Path, name: str, role: str, endpoint: str) -> keys.KeyFile:
    """A fresh pair for `name`, naming this broker's key and (if known) its endpoint."""
    server = broker_key(state_dir)
    return keys.generate(name, role, server.public_key, endpoint or _endpoint(state_dir, role))


def _endpoint(state_dir: Path, role: str) -> str:
    """Where a running broker of this state directory listens for `role`, if it says."""
    try:
        endpoints = json.loads((Path(state_dir) / "endpoints.json").read_text())
    except (OSError, ValueError):
        return ""
    return str(endpoints.get("backend" if role == "worker" else "frontend", ""))
