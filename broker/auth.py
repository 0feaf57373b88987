"""The ZAP handler: which CURVE keys may complete a handshake, on which socket.

ZeroMQ asks a ZAP handler (rfc.zeromq.org/spec/27) at every CURVE handshake on a socket
with a `zap_domain`; the handler answers 200 (the connection proceeds, and every message
it carries gets the handler's User-Id) or 400 (libzmq drops it before any message
arrives). This one runs in the broker's own loop (its REP socket is polled there, so no
thread and no lock on the principals): the broker's two ROUTERs use the domains
`tenant` and `worker`, a key is accepted only on the domain of its role, and the User-Id
is the key itself (Z85), which the broker maps to its principal on every message, so a
key removed or rotated stops acting at once even on a connection opened before.

pyzmq's `zmq.auth` authenticator does the same job from a thread (asyncio in pyzmq 27);
in the loop, a handshake waits at most for one turn of it, and there is nothing to share.
"""

from __future__ import annotations

import logging
from collections import Counter

import zmq
import zmq.utils.z85 as z85

from broker.principals import Principals

log = logging.getLogger("mtserve.auth")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # fixed by the ZAP spec
DOMAINS = {"tenant": ("tenant", "admin"), "worker": ("worker",)}  # domain -> roles it admits
LOG_EVERY = 100  # refusals: log the first, then one in this many


class ZapHandler:
    """Answers ZAP requests from the principals table (polled by the broker's loop)."""

    def __init__(self, ctx: zmq.Context, principals: Principals) -> None:
        self.principals = principals
        self.sock = ctx.socket(zmq.REP)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(ZAP_ENDPOINT)  # before any socket with a zap_domain binds
        self.counts: Counter[str] = Counter()  # "accepted", "refused"

    def handle_all(self) -> None:
        """Answer every waiting request (each handshake sends one)."""
        while True:
            try:
                request = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.sock.send_multipart(self.answer(request))

    def answer(self, request: list[bytes]) -> list[bytes]:
        """The reply frames for one ZAP request."""
        if len(request) < 6:
            return self._refuse(b"", "not a ZAP request", request)
        version, request_id, domain, address, _routing_id, mechanism = request[:6]
        credentials = request[6:]
        if version != b"1.0":
            return self._refuse(request_id, "ZAP version must be 1.0", request)
        roles = DOMAINS.get(domain.decode("ascii", "replace"))
        if roles is None:
            return self._refuse(request_id, f"unknown ZAP domain {domain!r}", request)
        if mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != 32:
            return self._refuse(request_id, "CURVE required", request)
        key = z85.encode(credentials[0]).decode("ascii")
        principal = self._lookup(key)
        if principal is None:
            return self._refuse(request_id, "unknown key", request, address)
        if principal.role not in roles:
            why = f"a {principal.role} key ('{principal.name}') may not connect as a {domain!r}"
            return self._refuse(request_id, why, request, address)
        self.counts["accepted"] += 1
        return [b"1.0", request_id, b"200", b"OK", key.encode(), b""]

    def _lookup(self, key: str):
        """The key's principal. An unknown key re-reads the table if the database changed
        (one PRAGMA: cheap next to the handshake): a client refused now never retries, so
        a key added a moment ago must be found on its first try."""
        principal = self.principals.by_key.get(key)
        if principal is None and self.principals.refresh():
            principal = self.principals.by_key.get(key)
        return principal

    def _refuse(
        self, request_id: bytes, why: str, request: list[bytes], address: bytes = b"?"
    ) -> list[bytes]:
        self.counts["refused"] += 1
        if self.counts["refused"] % LOG_EVERY == 1:
            log.warning(
                "refused a connection from %s: %s (%d refused so far)",
                address.decode("ascii", "replace"), why, self.counts["refused"],
            )  # fmt: skip
        return [b"1.0", request_id, b"400", why.encode()[:255], b"", b""]

    def close(self) -> None:
        self.sock.close(linger=0)
