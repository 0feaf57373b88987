"""What STATUS answers: `status_info`, read from every part of the broker.

`StatusReport` is mixed into `broker.broker.Broker` (see its docstring for why mixins).
A tenant sees counts only: workers' loads and memory, never another tenant's models.
The keys are documented in docs/PROTOCOL.md.
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

    def status_info(self: Broker, tenant: str) -> dict[str, Any]:
        answered = {str(status): count for status, count in self.answered.items()}
        return {
            "server": f"mtserve {VERSION}",
            "uptime_s": round(time.monotonic() - self.started, 3),
            "pid": os.getpid(),
            "scheduler": self.config.scheduler,
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
            "actions_expired": self.counters["actions_expired"],  # never answered: given up
            "loads_by_tier": {  # successful LOADs by where the worker found the model
                tier: self.counters[f"loads_from_{tier}"] for tier in TIERS
            },
            "predicted_within": self.predictor.within_share,  # exec/load within prediction
            "answers_by_status": answered,
        }
