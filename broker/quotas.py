"""Per-tenant bounds: what one tenant may hold of the broker, checked before it holds it.

Every tenant has `TenantLimits`: the broker's defaults (`BrokerConfig.tenant_limits`)
with the operator's overrides for that tenant (`mtserve tenant set NAME --limit k=v`,
kept with its principal). Crossing one answers the request at once with its own status
(QUOTA_EXCEEDED 22, or RATE_LIMITED 23 for the request rate) and touches nothing else:
no other tenant waits or pays for it.

- stored models and bytes, and open upload reservations (count and declared bytes), so
  one tenant's idle uploads cannot lock the others out;
- requests per second (a token bucket: `rate` per second, up to `burst` at once);
- requests in flight (accepted, not yet answered);
- reply bytes: answers the broker holds for a tenant that does not read them (its
  `ReplyQueue` backlog) plus the predicted output bytes of its requests in flight, so a
  model whose outputs dwarf its inputs cannot turn a few small requests into gigabytes;
- worker memory: the bytes its models hold runnable in the device tiers (the scheduler
  evicts the tenant's own idle models to load another, and refuses at once a model larger
  than the bound) and in the host tiers (the broker has workers drop the tenant's least
  recently used host copies past it), and per run (its models run only on workers whose
  activation-arena wall is within `run_bytes`). The owner of a shared model pays.

`TenantBook` is one tenant's live counts; the broker keeps one per tenant it has seen.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from mtcore.errors import BadArgument, QuotaExceeded, RateLimited

MIB = 1 << 20
GIB = 1 << 30


@dataclass(frozen=True)
class TenantLimits:
    """One tenant's bounds (0 means unlimited where noted)."""

    models: int = 1000  # models stored
    stored_bytes: int = 64 * GIB  # bytes of models stored
    uploads: int = 16  # uploads begun and not yet committed or expired
    upload_bytes: int = 4 * GIB  # bytes those uploads declared
    rate: float = 0.0  # INFER requests per second; 0: unlimited
    burst: float = 0.0  # requests the bucket holds; 0: one second of `rate`
    in_flight: int = 10_000  # INFER requests accepted and not yet answered
    reply_bytes: int = 1 * GIB  # answers held unread + predicted outputs in flight
    device_bytes: int = 0  # its models runnable on the workers, all together; 0: unlimited
    host_bytes: int = 0  # its models' weights in the workers' host tiers; 0: unlimited
    run_bytes: int = 0  # activation memory one run may take: only workers walled within it
    weight: float = 1.0  # share of executor time under overload (from the principal)

    def with_overrides(self, overrides: dict[str, Any]) -> TenantLimits:
        """These limits with `overrides` applied; raises BadArgument for a bad one."""
        known = {f.name: f.type for f in fields(self)}
        changes: dict[str, Any] = {}
        for name, value in overrides.items():
            if name not in known or name == "weight":
                raise BadArgument(f"unknown tenant limit {name!r}; limits: {', '.join(LIMITS)}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise BadArgument(f"tenant limit {name} must be a number >= 0")
            changes[name] = float(value) if known[name] == "float" else int(value)
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


LIMITS = tuple(f.name for f in fields(TenantLimits) if f.name != "weight")


class TokenBucket:
    """`rate` tokens per second, at most `burst` saved; one token per request."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst or max(1.0, rate)
        self.tokens = self.burst
        self.stamp = now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def wait(self) -> float:
        """Seconds until the next token (after a refused `take`)."""
        return (1.0 - self.tokens) / self.rate if self.rate else math.inf


@dataclass
class TenantBook:
    """One tenant's live counts against its limits."""

    tenant: str
    limits: TenantLimits
    in_flight: int = 0  # INFER requests accepted, not answered
    reply_bytes_in_flight: int = 0  # predicted output bytes of those requests
    backlog_bytes: int = 0  # answers waiting in the ReplyQueue (the tenant does not read)
    bucket: TokenBucket | None = None

    def admit_infer(self, now: float, reply_bytes: int) -> None:
        """Count one more INFER, or raise the status crossing a limit earns."""
        limits = self.limits
        if limits.rate:
            if self.bucket is None or self.bucket.rate != limits.rate:
                self.bucket = TokenBucket(limits.rate, limits.burst, now)
            if not self.bucket.take(now):
                raise RateLimited(
                    f"over {limits.rate:g} requests/s; the next is allowed in "
                    f"{self.bucket.wait() * 1e3:.0f} ms"
                )
        if self.in_flight >= limits.in_flight:
            raise QuotaExceeded(
                f"{self.in_flight} requests in flight, the limit; wait for answers first"
            )
        held = self.backlog_bytes + self.reply_bytes_in_flight
        if held + reply_bytes > limits.reply_bytes:
            raise QuotaExceeded(
                f"{held} bytes of answers held or on their way (limit {limits.reply_bytes});"
                " read your replies"
            )
        self.in_flight += 1
        self.reply_bytes_in_flight += reply_bytes

    def answered(self, reply_bytes: int) -> None:
        self.in_flight -= 1
        self.reply_bytes_in_flight -= reply_bytes

    def check_upload(self, models: int, stored: int, open_uploads: int, open_bytes: int,
                     size: int, replacing: bool) -> None:  # fmt: skip
        """Raise QUOTA_EXCEEDED if an upload of `size` bytes would cross a limit."""
        limits = self.limits
        if not replacing and models >= limits.models:
            raise QuotaExceeded(f"{models} models stored, the limit; delete one first")
        if stored + size > limits.stored_bytes:
            raise QuotaExceeded(
                f"{stored} bytes of models stored; {size} more would cross the limit of "
                f"{limits.stored_bytes}"
            )
        if open_uploads >= limits.uploads:
            raise QuotaExceeded(
                f"{open_uploads} uploads in progress, the limit; commit them or let them expire"
            )
        if open_bytes + size > limits.upload_bytes:
            raise QuotaExceeded(
                f"uploads in progress declare {open_bytes} bytes; {size} more would cross the "
                f"limit of {limits.upload_bytes}"
            )
