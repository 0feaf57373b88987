"""CURVE key files: one file per identity, readable by the Python and the C client alike.

A key file is ZeroMQ Property Language (ZPL, rfc.zeromq.org/spec/4), the format of
czmq's certificates, so `zcert_load` reads it too. mtserve writes exactly this layout
(4-space indents, values in double quotes, Z85 keys of 40 characters):

    #   mtserve key: tenant "alice". Secret: keep it mode 0600.
    metadata
        name = "alice"
        role = "tenant"
        server-key = "<the broker's public key>"
        endpoint = "tcp://127.0.0.1:5555"
    curve
        public-key = "<this identity's public key>"
        secret-key = "<this identity's secret key>"

A secret file (`*.key_secret`) has both keys and is created with mode 0600 (never
readable by others, not even for a moment); a public file (`*.key`) has no `secret-key`
line. `server-key` and `endpoint` tell a client where and to whom it connects, so one
file is all a tenant or a worker needs. The broker's own secret file has no `server-key`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import zmq

ROLES = ("tenant", "worker", "admin")  # who a key may act as (see broker/principals.py)
Z85_KEY = re.compile(r"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")
_LINE = re.compile(r'^(\s+)([A-Za-z0-9$\-_@.&+/]+)\s*=\s*"([^"]*)"\s*$')


class KeyFileError(ValueError):
    """A key file that cannot be read, or that lacks what its use needs."""


@dataclass(frozen=True)
class KeyFile:
    """One identity's keys (Z85 text) and what it needs to reach its broker."""

    name: str
    role: str  # one of ROLES, or "broker"
    public_key: str
    secret_key: str = ""  # empty in a public file
    server_key: str = ""  # the broker's public key; empty in the broker's own file
    endpoint: str = ""  # where the broker listens for this role, if known

    def require_secret(self, path: Path | str) -> None:
        if not self.secret_key:
            raise KeyFileError(f"{path}: has no secret-key (a public key file?)")

    def apply_client(self, sock: zmq.Socket) -> None:
        """Make `sock` a CURVE client of the broker with this identity."""
        if not (self.secret_key and self.server_key):
            raise KeyFileError(f"key of '{self.name}' needs secret-key and server-key")
        sock.curve_publickey = self.public_key.encode()
        sock.curve_secretkey = self.secret_key.encode()
        sock.curve_serverkey = self.server_key.encode()

    def apply_server(self, sock: zmq.Socket, domain: str) -> None:
        """Make `sock` a CURVE server whose peers are checked by ZAP in `domain`."""
        if not self.secret_key:
            raise KeyFileError(f"key of '{self.name}' has no secret-key")
        sock.curve_server = True
        sock.curve_publickey = self.public_key.encode()
        sock.curve_secretkey = self.secret_key.encode()
        sock.zap_domain = domain.encode()


def generate(name: str, role: str, server_key: str = "", endpoint: str = "") -> KeyFile:
    """A fresh key pair for `name` (libzmq's CSPRNG)."""
    public, secret = zmq.curve_keypair()
    return KeyFile(name, role, public.decode(), secret.decode(), server_key, endpoint)


def render(key: KeyFile, secret: bool) -> str:
    kind = "Secret: keep it mode 0600." if secret else "Public: may be shared."
    lines = [f'#   mtserve key: {key.role} "{key.name}". {kind}', "metadata"]
    lines.append(f'    name = "{key.name}"')
    lines.append(f'    role = "{key.role}"')
    if key.server_key:
        lines.append(f'    server-key = "{key.server_key}"')
    if key.endpoint:
        lines.append(f'    endpoint = "{key.endpoint}"')
    lines += ["curve", f'    public-key = "{key.public_key}"']
    if secret:
        lines.append(f'    secret-key = "{key.secret_key}"')
    return "\n".join(lines) + "\n"


def write_secret(path: Path | str, key: KeyFile) -> Path:
    """Write the secret file atomically, mode 0600 from its creation on."""
    key.require_secret(path)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(render(key, secret=True))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_public(path: Path | str, key: KeyFile) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(key, secret=False))
    return path


def read(path: Path | str) -> KeyFile:
    """Parse a key file written by `render` (or by czmq: the same subset of ZPL)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from exc
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#") or not line[0].isspace():
            continue  # blank, comment or a section name
        match = _LINE.match(line)
        if match is None:
            raise KeyFileError(f'{path}:{number}: not a `name = "value"` line')
        values[match.group(2)] = match.group(3)
    public = values.get("public-key", "")
    if not Z85_KEY.fullmatch(public):
        raise KeyFileError(f"{path}: no valid public-key (40 Z85 characters)")
    for field in ("secret-key", "server-key"):
        if values.get(field) and not Z85_KEY.fullmatch(values[field]):
            raise KeyFileError(f"{path}: {field} is not 40 Z85 characters")
    return KeyFile(
        values.get("name", path.stem.split(".")[0]),
        values.get("role", ""),
        public,
        values.get("secret-key", ""),
        values.get("server-key", ""),
        values.get("endpoint", ""),
    )
