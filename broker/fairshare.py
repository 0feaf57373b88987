"""Performance isolation: executor time shared by tenant weight when demand exceeds it.

Each tenant's *demand* is the predicted executor time its arriving requests ask for, per
second (an exponentially weighted rate, time constant TAU_S, over the time since the
tenant became active when that is shorter, so a burst counts at its full rate from its
first requests), admitted or not. While
the demands of all tenants fit the cluster's capacity (executor-seconds per second: the
executors of every worker) nobody is throttled. When they do not, capacity is shared
max-min fairly by weight (water-filling: each tenant gets its demand or `level * weight`,
whichever is less, with `level` set so the shares fill the capacity), and a tenant whose
demand is over its share is held to it: a request of that tenant whose predicted work,
added to the tenant's queued work, exceeds its share of the request's own deadline
horizon is answered OVERLOADED at once. A tenant within its share is never throttled
here, and the share computed for the others leaves room for it to burst (its demand is
counted with MARGIN), so the tenant over its share is the one that waits or is refused.

Both schedulers call it at admission (`check`) and keep its count of queued work
(`book`/`unbook`); the weights come from the tenants' principals.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from mtcore.errors import Overloaded

TAU_S = 1.0  # seconds: time constant of the demand rates
MARGIN = 1.5  # held only past this much of its share; one not held may burst this much
RECOMPUTE_S = 0.01  # shares are recomputed at most this often
ACTIVE = 1e-3  # demand (executor-seconds per second) below which a tenant is idle
MIN_WINDOW_S = 0.01  # a demand is never measured over less than this


class FairShare:
    """Demand per tenant and max-min fair shares of executor time."""

    def __init__(self, weight: Callable[[str], float], enabled: bool = True) -> None:
        self.weight = weight
        self.enabled = enabled
        self.capacity = 0.0  # executor-seconds per second (set by the scheduler)
        self._sum: dict[str, float] = {}  # tenant -> decayed seconds asked, at `_stamp`
        self._stamp: dict[str, float] = {}
        self._since: dict[str, float] = {}  # tenant -> when it became active
        self.queued: dict[str, float] = {}  # tenant -> predicted seconds of its queued work
        self._shares: dict[str, float] = {}  # tenant -> its share (inf: not throttled)
        self._computed = -math.inf
        self.throttled = 0  # requests refused for being over a share

    def _decayed(self, tenant: str, now: float) -> float:
        total = self._sum.get(tenant, 0.0)
        return total * math.exp(-(now - self._stamp.get(tenant, now)) / TAU_S)

    def demand(self, tenant: str, now: float) -> float:
        """Executor-seconds per second the tenant asks for, lately."""
        age = max(MIN_WINDOW_S, now - self._since.get(tenant, now))
        return self._decayed(tenant, now) / (TAU_S * -math.expm1(-age / TAU_S))

    def offer(self, tenant: str, cost_s: float, now: float) -> None:
        """A request of `tenant` asking for `cost_s` seconds of executor time arrived."""
        self._sum[tenant] = self._decayed(tenant, now) + cost_s
        self._stamp[tenant] = now
        self._since.setdefault(tenant, now)

    def book(self, tenant: str, cost_s: float) -> None:
        self.queued[tenant] = self.queued.get(tenant, 0.0) + cost_s

    def unbook(self, tenant: str, cost_s: float) -> None:
        left = self.queued.get(tenant, 0.0) - cost_s
        if left > 1e-12:
            self.queued[tenant] = left
        else:
            self.queued.pop(tenant, None)

    def check(self, tenant: str, cost_s: float, horizon_s: float, now: float) -> None:
        """Record the request's demand; raise Overloaded if its tenant must be held."""
        self.offer(tenant, cost_s, now)
        if not self.enabled or self.capacity <= 0:
            return
        share = self.share(tenant, now)
        if math.isinf(share):
            return
        queued = self.queued.get(tenant, 0.0)
        allowed = share * max(horizon_s, 0.0)
        if queued + cost_s > allowed:
            self.throttled += 1
            raise Overloaded(
                f"tenant '{tenant}' asks for {self.demand(tenant, now):.2f} executor-seconds"
                f" per second, over its share of {share:.2f} (weight "
                f"{self.weight(tenant):g}) while others wait; its queued work "
                f"({queued * 1e3:.1f} ms) already fills its share of the deadline"
            )

    def held(self, tenant: str, now: float) -> bool:
        """Whether the tenant is held to a share now (over it, under overload)."""
        return self.enabled and self.capacity > 0 and not math.isinf(self.share(tenant, now))

    def holding(self, now: float) -> bool:
        """Whether some tenant is held to a share now."""
        return self.enabled and self.capacity > 0 and bool(self._current(now))

    def share(self, tenant: str, now: float) -> float:
        """The tenant's share of executor time now (inf while it is not to be held)."""
        return self._current(now).get(tenant, math.inf)

    def _current(self, now: float) -> dict[str, float]:
        """The held tenants' shares, recomputed at most every RECOMPUTE_S."""
        if now - self._computed >= RECOMPUTE_S:
            self._shares = self._compute(now)
            self._computed = now
        return self._shares

    def _compute(self, now: float) -> dict[str, float]:
        demands = {t: self.demand(t, now) for t in self._sum}
        for tenant in [t for t, d in demands.items() if d < ACTIVE]:
            del demands[tenant]
            for table in (self._sum, self._stamp, self._since):  # idle: forget it for now
                table.pop(tenant, None)
        if sum(demands.values()) <= self.capacity or len(demands) < 2:
            return {}
        weights = {t: max(self.weight(t), 1e-9) for t in demands}
        level = _water_level(demands, weights, self.capacity)
        # Held: a tenant clearly over its share (demands are estimates: one at its share
        # give or take MARGIN is not held). The others keep their demand and room to
        # burst; the held ones share what is left by weight.
        over = {t for t, d in demands.items() if d > MARGIN * level * weights[t]}
        if not over:
            return {}
        reserved = sum(MARGIN * d for t, d in demands.items() if t not in over)
        left = max(0.0, self.capacity - reserved)
        total = sum(weights[t] for t in over) or 1.0
        return {t: left * weights[t] / total for t in over}


def _water_level(demands: dict[str, float], weights: dict[str, float], capacity: float) -> float:
    """The level L with sum(min(demand, L * weight)) == capacity (demands exceed it)."""
    order = sorted(demands, key=lambda t: demands[t] / weights[t])
    left, weight_left = capacity, sum(weights.values())
    for tenant in order:
        level = left / weight_left
        if demands[tenant] <= level * weights[tenant]:
            left -= demands[tenant]
            weight_left -= weights[tenant]
            continue
        return level
    return math.inf
