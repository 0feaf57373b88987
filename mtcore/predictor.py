"""The latency predictor: how long an action will take, from what such actions took.

DNN execution time is nearly constant for a given model, batch size and machine kind,
so the controller can plan with it. Per (model, worker kind, batch size) the predictor
keeps a rolling window of measured execution times and predicts a high percentile of it
(Clockwork keeps the last 10 and takes the 99th, in effect their maximum: conservative,
so a plan made with it rarely runs late). Windows start from the upload profile's
samples. Loads are predicted the same way per (model, kind, tier); a model with no load
measured yet gets its bytes over the bandwidth measured for other models of that kind
and tier (the slowest seen, again conservative).

The controller plans with `headroom` on top (PLANNING_HEADROOM, 10%): the maximum of ten
samples is exceeded by about one run in eleven, however steady the runs; a tenth more
covers the run-to-run spread measured here (a few percent on an idle core) so that plans
hold for nearly every action, at the price of a tenth of a batch of slack.

Drift: when the newest samples of a window all lie outside the band the older ones set
(a slower neighbour, a throttled CPU, a changed machine), the older samples are dropped,
so the prediction follows the new regime at once instead of after a whole window.
`observe_*` return True then, for the controller to replan.

No I/O, no clocks: microseconds in, microseconds out.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import dataclass, field

PLANNING_HEADROOM = 1.15  # the scheduler's predictor: estimates 15% above the percentile
Key = tuple[str, str, int]  # (model sha256, worker kind, batch size)
LoadKey = tuple[str, str, str]  # (model sha256, worker kind, tier: "host" or "cold")


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) of values, nearest-rank: always a measured value."""
    rank = max(1, math.ceil(q / 100.0 * len(values)))
    if rank == len(values):  # the high percentiles of a short window: its maximum
        return max(values)
    return sorted(values)[rank - 1]


@dataclass
class Window:
    """The last `size` samples of one duration, with drift detection."""

    size: int
    samples: deque[float] = field(default_factory=deque)
    _estimates: dict[float, float] = field(default_factory=dict)  # q -> percentile, until add

    def add(self, value: float, drift_ratio: float, drift_samples: int) -> bool:
        """Add a sample; True when it completed a drift and the older samples were dropped."""
        self._estimates.clear()
        self.samples.append(value)
        while len(self.samples) > self.size:
            self.samples.popleft()
        return self._drifted(drift_ratio, drift_samples)

    def _drifted(self, ratio: float, recent_n: int) -> bool:
        if len(self.samples) < 2 * recent_n:
            return False
        values = list(self.samples)
        older, recent = values[:-recent_n], values[-recent_n:]
        low, high = min(older) / ratio, max(older) * ratio
        if low <= values[-1] <= high:
            return False  # the newest is within the band: no drift (the common case)
        if min(recent) > high or max(recent) < low:
            self.samples = deque(recent)
            return True
        return False

    def estimate(self, q: float) -> float | None:
        """The q-th percentile of the window, cached until the next sample (the scheduler
        asks for it several times per request)."""
        if not self.samples:
            return None
        cached = self._estimates.get(q)
        if cached is None:
            cached = self._estimates[q] = percentile(list(self.samples), q)
        return cached


@dataclass
class Predictor:
    """Predicted microseconds of exec and load actions, learned from measurements."""

    window: int = 10  # samples kept per key
    quantile: float = 99.0  # the percentile predicted
    drift_ratio: float = 1.5  # a sample this far outside the older ones' range is off
    drift_samples: int = 3  # this many in a row is a drift
    headroom: float = 1.0  # estimates are the percentile times this (planning margin)
    min_samples: int = 5  # a batch size's window predicts alone from this many samples on
    exec_windows: dict[Key, Window] = field(default_factory=dict)
    # (model, kind) -> batch sizes with a window, sorted: the fallback's lookup, O(sizes)
    _sizes: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    load_windows: dict[LoadKey, Window] = field(default_factory=dict)
    # (kind, tier) -> bytes per microsecond, the slowest recent load of any model
    bandwidth: dict[tuple[str, str], Window] = field(default_factory=dict)
    # model -> how many times its exec estimates changed: a cache of them is good while
    # this stands still (most samples neither set nor drop a window's percentile)
    _generations: dict[str, int] = field(default_factory=dict)
    bandwidth_generation: int = 0  # changes whenever a bandwidth estimate may have
    predicted: int = 0  # measurements compared with a prediction made before them
    within: int = 0  # of those, how many took no longer than predicted

    # -- execution ------------------------------------------------------------

    def seed_exec(self, model: str, kind: str, samples: dict[int, list[float]]) -> None:
        """Start windows from an upload profile (every run per batch size)."""
        for batch, times in samples.items():
            window = self._exec_window(model, kind, batch)
            window._estimates.clear()
            for us in times[-self.window :]:
                window.samples.append(float(us))
            while len(window.samples) > self.window:
                window.samples.popleft()
        self._bump(model)

    def exec_generation(self, model: str) -> int:
        """Changes whenever an exec estimate of the model may have changed."""
        return self._generations.get(model, 0)

    def _bump(self, model: str) -> None:
        self._generations[model] = self._generations.get(model, 0) + 1

    def exec_us(self, model: str, kind: str, batch: int) -> float | None:
        """Predicted exec time of `batch` rows; None when nothing is known of the model.

        A batch size with no window (or fewer than `min_samples` in it, e.g. a size
        first seen at run time) takes the smallest well-measured size above it; beyond
        the largest, that one's time scaled linearly (batches grow about linearly on a
        busy CPU, less than linearly on a GPU: conservative either way).
        """
        window = self.exec_windows.get((model, kind, batch))
        own = window.estimate(self.quantile) if window is not None else None
        if own is not None and len(window.samples) >= self.min_samples:
            return own * self.headroom
        fallback = self._other_sizes(model, kind, batch)
        if own is None or fallback is None:
            best = own if fallback is None else fallback
        else:
            best = max(own, fallback)  # a thin window: the larger of it and its neighbour
        return None if best is None else best * self.headroom

    def typical_exec_us(self, model: str, kind: str, batch: int) -> float | None:
        """The median measured exec time of `batch` rows, without headroom: what a run
        really costs on average (the fair share's unit), not what planning allows."""
        window = self.exec_windows.get((model, kind, batch))
        if window is not None and window.samples:
            return window.estimate(50.0)
        planned = self.exec_us(model, kind, batch)
        return None if planned is None else planned / self.headroom

    def _other_sizes(self, model: str, kind: str, batch: int) -> float | None:
        """The estimate from other batch sizes: the smallest (well-measured, if any)
        size above `batch`, else the largest scaled linearly."""
        windows = self.exec_windows
        sizes = [b for b in self._sizes.get((model, kind), ())
                 if b != batch and windows[(model, kind, b)].samples]  # fmt: skip
        thick = [b for b in sizes if len(windows[(model, kind, b)].samples) >= self.min_samples]
        sizes = thick or sizes
        if not sizes:
            return None
        above = [b for b in sizes if b >= batch]
        if above:
            return windows[(model, kind, above[0])].estimate(self.quantile)
        largest = sizes[-1]
        estimate = windows[(model, kind, largest)].estimate(self.quantile)
        return None if estimate is None else estimate * batch / largest

    def observe_exec(self, model: str, kind: str, batch: int, us: float) -> bool:
        """A measured exec time; True on a drift (the older samples were dropped)."""
        self._score(self.exec_us(model, kind, batch), us)
        window = self._exec_window(model, kind, batch)
        before = self._standing(window)
        drifted = window.add(float(us), self.drift_ratio, self.drift_samples)
        if drifted or self._standing(window) != before:
            self._bump(model)
        return drifted

    def _standing(self, window: Window) -> tuple[float | None, bool, bool]:
        """What the model's estimates read of one window: its percentile, whether it
        predicts alone, whether it has samples at all."""
        n = len(window.samples)
        return window.estimate(self.quantile), n >= self.min_samples, n > 0

    def _exec_window(self, model: str, kind: str, batch: int) -> Window:
        window = self.exec_windows.get((model, kind, batch))
        if window is None:
            window = self.exec_windows[(model, kind, batch)] = Window(self.window)
            bisect.insort(self._sizes.setdefault((model, kind), []), batch)
        return window

    # -- loads --------------------------------------------------------------------

    def load_us(self, model: str, kind: str, tier: str, nbytes: int) -> float | None:
        """Predicted time to make a model runnable from `tier` ("host" or "cold")."""
        window = self.load_windows.get((model, kind, tier))
        if window is not None and window.samples:
            return window.estimate(self.quantile) * self.headroom
        rates = self.bandwidth.get((kind, tier))
        if rates is None or not rates.samples:
            return None
        return nbytes / min(rates.samples) * self.headroom

    def seed_load(self, model: str, kind: str, tier: str, samples: list[float]) -> None:
        """Start a load window from the upload profile's measured builds."""
        window = self.load_windows.setdefault((model, kind, tier), Window(self.window))
        window._estimates.clear()
        for us in samples[-self.window :]:
            window.samples.append(float(us))
        while len(window.samples) > self.window:
            window.samples.popleft()

    def observe_load(self, model: str, kind: str, tier: str, nbytes: int, us: float) -> bool:
        self._score(self.load_us(model, kind, tier, nbytes), us)
        if us > 0 and nbytes > 0:
            rates = self.bandwidth.setdefault((kind, tier), Window(self.window))
            slowest = min(rates.samples, default=None)
            rates.add(nbytes / us, self.drift_ratio, self.drift_samples)
            if min(rates.samples) != slowest:
                self.bandwidth_generation += 1
        window = self.load_windows.setdefault((model, kind, tier), Window(self.window))
        return window.add(float(us), self.drift_ratio, self.drift_samples)

    # -- accounting -----------------------------------------------------------------

    def _score(self, predicted_us: float | None, measured_us: float) -> None:
        if predicted_us is None:
            return
        self.predicted += 1
        if measured_us <= predicted_us:
            self.within += 1

    @property
    def within_share(self) -> float | None:
        """Share of measurements that stayed within the prediction made before them."""
        return self.within / self.predicted if self.predicted else None

    def forget(self, model: str) -> None:
        """A model went away: drop its windows."""
        for key in [k for k in self.exec_windows if k[0] == model]:
            del self.exec_windows[key]
        for key in [k for k in self._sizes if k[0] == model]:
            del self._sizes[key]
        for key in [k for k in self.load_windows if k[0] == model]:
            del self.load_windows[key]
        self._bump(model)
