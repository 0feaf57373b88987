"""What STATUS answers: `status_info`, read from every part of the broker.

`StatusReport` is mixed into `broker.broker.Broker` (see its docstring for why mixins).
A tenant sees its own figures only (`tenant_view`); an admin key (and every peer of an
insecure broker, which trusts everyone) sees the whole broker: workers, queues,
counters. The keys are documented in docs/PROTOCOL.md.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from mtcore.protocol import VERSION

if TYPE_CHECKING:
    from broker.broker import Broker

TIERS = ("device", "host", "cold")  # where a worker can find a model it loads


class StatusReport:
    """STATUS's `status_info` (a `Broker` mixin)."""

    def status_info(self: Broker, tenant: str, admin: bool) -> dict[str, Any]:
        return self.broker_view(tenant) if admin else self.tenant_view(tenant)

    def tenant_view(self: Broker, tenant: str) -> dict[str, Any]:
        """What one tenant may know: the server, and its own models and uploads."""
        return {
            "server": f"mtserve {VERSION}",
            "uptime_s": round(time.monotonic() - self.started, 3),
            "tenant": tenant,
            "tenant_models": len(self.registry.list(tenant)),
            "uploads_in_progress": self.uploads.count(tenant),
            **self.tenant_figures(tenant),
        }

    def tenant_figures(self: Broker, tenant: str) -> dict[str, Any]:
        book = self.book_of(tenant)
        return {
            "in_flight": book.in_flight,
            "reply_bytes_held": book.backlog_bytes,
            "memory_held": self.memory_held(tenant),
            "limits": book.limits.to_dict(),
        }

    def memory_held(self: Broker, tenant: str) -> dict[str, int]:
        """Bytes of the tenant's models in each tier of the workers, by their last reports:
        what its `device_bytes` and `host_bytes` limits bound."""
        mine = {m.sha256: m.size for m in self.registry.list(tenant)}
        held = {"device": 0, "host": 0}
        for worker in self.workers.values():
            tiers = worker.tiers
            if tiers is not None:
                held["device"] += sum(mine.get(sha, 0) for sha in tiers.device_models)
                held["host"] += sum(mine.get(sha, 0) for sha in tiers.host_models)
        return held

    def broker_view(self: Broker, tenant: str) -> dict[str, Any]:
        """The operator's view: every worker and counter, all tenants together."""
        answered = {str(status): count for status, count in self.answered.items()}
        return {
            "server": f"mtserve {VERSION}",
            "uptime_s": round(time.monotonic() - self.started, 3),
            "pid": os.getpid(),
            "scheduler": self.config.scheduler,
            "secure": self.principals is not None,
            "tenant": tenant,
            "workers": self.describe_workers(),
            "models": self.registry.count(),
            "tenant_models": len(self.registry.list(tenant)),
            "queued": self.queued(),
            "in_flight": len(self.pending),
            "uploads_in_progress": len(self.uploads.active),
            "messages": self.counters["messages"],
            "loads": self.counters["loads"],  # LOAD actions sent to workers
            "evictions": self.counters["evictions"],  # UNLOAD actions sent to workers
            "internal_errors": self.counters["internal_errors"],  # bugs caught by the loop
            "worker_malformed": self.counters["worker_malformed"],  # worker messages dropped
            "security": {  # refused: handshakes, messages, registrations, fetches, results
                "handshakes_refused": self.zap.counts["refused"] if self.zap else 0,
                "unauthenticated": self.counters["unauthenticated"],
                "workers_refused": self.counters["workers_refused"],
                "worker_fetch_refused": self.counters["worker_fetch_refused"],
                "worker_forged": self.counters["worker_forged"],
            },
            "actions_expired": self.counters["actions_expired"],  # never answered: given up
            "loads_by_tier": {  # successful LOADs by where the worker found the model
                tier: self.counters[f"loads_from_{tier}"] for tier in TIERS
            },
            "predicted_within": self.predictor.within_share,  # exec/load within prediction
            "isolation": self.config.isolation,
            "throttled_for_share": self.scheduler.fair.throttled,  # over a tenant's share
            "replies_held": len(self.replies),  # for tenants not reading them
            "replies_held_bytes": self.replies.held_bytes,
            "replies_dropped": self.replies.dropped,
            "tenants": {t: self.tenant_figures(t) for t in sorted(self.books)},
            "answers_by_status": answered,
        }
