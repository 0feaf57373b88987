"""Workloads for ``mtbench``: which requests to send, and when.

This module only *plans* load; it never talks to a server.  A plan is a list of
:class:`Arrival` records (time offset, tenant, model, deadline) that a driver replays
open-loop, in the spirit of Triton's ``perf_analyzer --request-intervals`` and of the
workload generators of Clockwork (OSDI '20), INFaaS (ATC '21) and Shepherd (NSDI '23).
Keeping planning separate from sending means a plan can be written to disk, inspected,
replayed against mtserve and a baseline alike, and tested without sockets.

Everything random takes a seed or a :class:`numpy.random.Generator`, never the global
state, so the same arguments always give the same plan: two systems compared "under the
same load" really see the same request sequence.

Arrival processes (all renewal processes on ``[0, duration)``, times in seconds):

* ``fixed``: evenly spaced, first request at ``t = 0``; the classic constant-rate load.
* ``poisson``: exponential gaps; memoryless, the usual "many independent users" model.
* ``gamma``: gamma gaps with a chosen coefficient of variation ``cv``: ``cv < 1`` is more
  regular than Poisson, ``cv = 1`` is Poisson, ``cv > 1`` is bursty (clusters of requests
  separated by long gaps), which is what stresses batching and admission control.

Model popularity follows a Zipf law, as model-serving papers assume (a few hot models,
a long tail of cold ones).  :func:`azure_like_trace` synthesises a trace shaped like the
Azure Functions 2019 trace for machines that cannot download it.
"""

from __future__ import annotations

import csv
import math
import os
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

__all__ = [
    "PROCESSES",
    "TRACE_COLUMNS",
    "Arrival",
    "TenantMix",
    "azure_like_trace",
    "fixed_times",
    "gamma_times",
    "open_loop",
    "poisson_times",
    "read_trace",
    "trace_stats",
    "write_trace",
    "zipf_weights",
]

PROCESSES: tuple[str, ...] = ("poisson", "fixed", "gamma")
TRACE_COLUMNS: tuple[str, ...] = ("t", "tenant", "model", "deadline_ms")

# The largest number of gaps drawn at once: bounds memory for huge rate * duration while
# keeping the usual case (one draw covers the whole run) to a single numpy call.
_MAX_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class Arrival:
    """One planned request.

    Frozen (and slotted) because a plan is shared between the driver, the stats and the
    trace writer, and none of them may change what the others see.
    """

    t: float  # seconds from the start of the run
    tenant: str
    model: str
    deadline_ms: float | None  # the request's deadline relative to its send time, or none


# --------------------------------------------------------------------------- validation


def _check_positive(name: str, value: float) -> float:
    """Reject zero, negative, NaN and infinite values with a message naming the argument."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number, got {value!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return v


def _check_nonnegative(name: str, value: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number >= 0, got {value!r}") from None
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return v


def _check_rng(rng: object) -> np.random.Generator:
    """Insist on a Generator: the legacy global state would make plans irreproducible."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(
            f"rng must be a numpy.random.Generator (e.g. numpy.random.default_rng(seed)), "
            f"got {type(rng).__name__}"
        )
    return rng


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    return int(seed)


def _check_deadline(deadline_ms: float | None) -> float | None:
    if deadline_ms is None:
        return None
    return _check_positive("deadline_ms", deadline_ms)


# --------------------------------------------------------------------- arrival processes


def _renewal_times(
    draw_gaps: Callable[[int], np.ndarray], mean_gap: float, cv: float, horizon: float
) -> np.ndarray:
    """Cumulative sums of i.i.d. gaps, cut at ``horizon`` (the first arrival is one gap in).

    Gaps are drawn in chunks sized for the expected count plus a few standard deviations
    (the count of a renewal process has variance ~ expected * cv**2), so one draw almost
    always suffices; the chunk sizes depend only on the arguments, so the result is still
    deterministic under a seed.
    """
    expected = horizon / mean_gap
    chunk = int(min(_MAX_CHUNK, expected + 6.0 * max(cv, 1.0) * math.sqrt(expected) + 16))
    parts: list[np.ndarray] = []
    last = 0.0
    while last < horizon:
        times = last + np.cumsum(draw_gaps(chunk))
        parts.append(times)
        last = float(times[-1])
    times = np.concatenate(parts) if parts else np.empty(0)
    return times[times < horizon]


def fixed_times(rate: float, duration: float) -> np.ndarray:
    """Constant-rate send times ``k / rate`` for every ``k >= 0`` with ``k / rate < duration``.

    The first request goes at ``t = 0`` so that a run of ``duration`` seconds sends exactly
    ``ceil(rate * duration)`` requests.  Times are computed as ``k / rate`` (not by adding
    ``1 / rate`` repeatedly) so there is no accumulated rounding drift over long runs.
    """
    rate = _check_positive("rate", rate)
    duration = _check_positive("duration", duration)
    n = math.ceil(rate * duration)
    t = np.arange(n, dtype=np.float64) / rate
    return t[t < duration]


def poisson_times(rate: float, duration: float, rng: np.random.Generator) -> np.ndarray:
    """Poisson-process send times on ``[0, duration)``: exponential gaps of mean ``1 / rate``.

    The memoryless model of many independent clients; the count is Poisson with mean
    ``rate * duration`` and the gaps have a coefficient of variation of 1.
    """
    rate = _check_positive("rate", rate)
    duration = _check_positive("duration", duration)
    rng = _check_rng(rng)
    scale = 1.0 / rate
    return _renewal_times(lambda k: rng.exponential(scale, k), scale, 1.0, duration)


def gamma_times(rate: float, cv: float, duration: float, rng: np.random.Generator) -> np.ndarray:
    """Send times on ``[0, duration)`` with gamma gaps of mean ``1 / rate`` and CV ``cv``.

    A gamma law with shape ``k = 1 / cv**2`` and scale ``cv**2 / rate`` has exactly that
    mean and coefficient of variation, so one parameter moves the load from regular
    (``cv < 1``) through Poisson (``cv = 1``, exponential gaps) to bursty (``cv > 1``,
    many near-zero gaps between long silences) at an unchanged mean rate.  For very large
    ``cv`` (shape << 1) some gaps underflow to exactly 0, i.e. simultaneous requests.
    """
    rate = _check_positive("rate", rate)
    cv = _check_positive("cv", cv)
    duration = _check_positive("duration", duration)
    rng = _check_rng(rng)
    shape = 1.0 / (cv * cv)
    scale = cv * cv / rate
    return _renewal_times(lambda k: rng.gamma(shape, scale, k), 1.0 / rate, cv, duration)


def zipf_weights(n: int, s: float) -> np.ndarray:
    """Zipf popularity ``p_i ∝ 1 / i**s`` for ranks ``i = 1..n``, normalised to sum to 1.

    ``s = 0`` is uniform; ``s = 1`` is the classic Zipf law where the top model gets twice
    the traffic of the second; larger ``s`` concentrates load on the head.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be an integer >= 1 (the number of models), got {n!r}")
    s = _check_nonnegative("s (the Zipf exponent)", s)
    w = np.arange(1, int(n) + 1, dtype=np.float64) ** -s
    return w / w.sum()


# ------------------------------------------------------------------------- open loop


@dataclass
class TenantMix:
    """One tenant's share of an open-loop workload.

    Each tenant sends at its own ``rate`` with its own arrival ``process``, choosing among
    its ``models`` by Zipf popularity (first = most popular), or by ``shares`` when given.
    Tenants are independent, as different customers of a multi-tenant service are.
    """

    name: str
    rate: float  # requests/s for this tenant
    models: list[str] = field(default_factory=list)  # most popular first
    zipf_s: float = 1.0  # popularity exponent over `models` (0 = uniform)
    deadline_ms: float | None = None
    process: Literal["poisson", "fixed", "gamma"] = "poisson"
    cv: float = 1.0  # gaps' coefficient of variation, for process="gamma"
    shares: Sequence[float] | None = None  # each model's share of requests, instead of Zipf

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the tenant and the field if the mix cannot be planned.

        Called at construction and again by :func:`open_loop`, since the dataclass is
        mutable and fields may have been changed in between.
        """
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"TenantMix.name must be a non-empty string, got {self.name!r}")
        where = f"tenant {self.name!r}"
        _check_positive(f"{where}: rate", self.rate)
        if isinstance(self.models, str):
            raise ValueError(f"{where}: models must be a list of names, not one string")
        if not self.models:
            raise ValueError(f"{where}: models is empty; give at least one model name")
        for m in self.models:
            if not isinstance(m, str) or not m:
                raise ValueError(f"{where}: model names must be non-empty strings, got {m!r}")
        dupes = sorted(m for m, c in Counter(self.models).items() if c > 1)
        if dupes:
            raise ValueError(f"{where}: models listed more than once: {dupes}")
        _check_nonnegative(f"{where}: zipf_s", self.zipf_s)
        if self.deadline_ms is not None:
            _check_positive(f"{where}: deadline_ms", self.deadline_ms)
        if self.process not in PROCESSES:
            raise ValueError(
                f"{where}: unknown process {self.process!r}; choose one of {list(PROCESSES)}"
            )
        _check_positive(f"{where}: cv", self.cv)
        if self.shares is not None:
            if len(self.shares) != len(self.models):
                n, m = len(self.shares), len(self.models)
                raise ValueError(f"{where}: {n} shares for {m} models")
            for x in self.shares:
                _check_positive(f"{where}: each share", x)

    def weights(self) -> np.ndarray:
        """The probability of each of `models`: `shares` normalised, or Zipf(`zipf_s`)."""
        if self.shares is None:
            return zipf_weights(len(self.models), self.zipf_s)
        w = np.asarray(self.shares, dtype=np.float64)
        return w / w.sum()


def _tenant_rng(seed: int, name: str) -> np.random.Generator:
    """A stream keyed by (seed, tenant name), not by the tenant's position in the list.

    So adding, removing or reordering other tenants leaves this tenant's requests
    unchanged, which keeps A/B comparisons of mixes honest.  CRC32 rather than ``hash()``
    because Python's string hash is salted per process.
    """
    data = name.encode("utf-8")
    return np.random.default_rng([seed, zlib.crc32(data), len(data)])


def _mix_times(mix: TenantMix, duration: float, rng: np.random.Generator) -> np.ndarray:
    if mix.process == "fixed":
        return fixed_times(mix.rate, duration)
    if mix.process == "gamma":
        return gamma_times(mix.rate, mix.cv, duration, rng)
    return poisson_times(mix.rate, duration, rng)


def open_loop(mixes: Sequence[TenantMix], duration: float, seed: int) -> list[Arrival]:
    """Plan an open-loop run: every tenant's arrivals merged and sorted by time.

    Open loop means send times do not depend on responses, so an overloaded server sees
    its queue grow instead of the load politely backing off (the failure mode closed-loop
    generators hide).  Each tenant's times come from its process and each arrival's model
    is drawn independently by the tenant's weights (Zipf or shares) over its models.  Ties
    (e.g. several ``fixed`` tenants at ``t = 0``) keep the order of ``mixes``.

    Deterministic: the same ``(mixes, duration, seed)`` gives the identical list, and a
    tenant's requests depend only on ``seed``, its own name and its own settings.
    """
    duration = _check_positive("duration", duration)
    seed = _check_seed(seed)
    if not mixes:
        raise ValueError("mixes is empty; give at least one TenantMix")
    names = [m.name for m in mixes]
    dupes = sorted(n for n, c in Counter(names).items() if c > 1)
    if dupes:
        raise ValueError(f"tenant names must be unique (each keys its own random stream): {dupes}")

    all_t: list[np.ndarray] = []
    all_tenant: list[np.ndarray] = []
    all_model: list[np.ndarray] = []
    for ti, mix in enumerate(mixes):
        mix.validate()
        rng = _tenant_rng(seed, mix.name)
        t = _mix_times(mix, duration, rng)
        idx = rng.choice(len(mix.models), size=t.size, p=mix.weights())
        all_t.append(t)
        all_tenant.append(np.full(t.size, ti, dtype=np.int64))
        all_model.append(idx)

    t = np.concatenate(all_t)
    tenant_idx = np.concatenate(all_tenant)
    model_idx = np.concatenate(all_model)
    order = np.argsort(t, kind="stable")
    out: list[Arrival] = []
    for tt, ti, mi in zip(
        t[order].tolist(), tenant_idx[order].tolist(), model_idx[order].tolist(), strict=True
    ):
        mix = mixes[ti]
        dl = None if mix.deadline_ms is None else float(mix.deadline_ms)
        out.append(Arrival(tt, mix.name, mix.models[mi], dl))
    return out


# ------------------------------------------------------------------ Azure-like trace


def _ar1_log(
    rng: np.random.Generator, rows: int, steps: int, sigma: float, rho: float
) -> np.ndarray:
    """Stationary Gaussian AR(1) paths, shape ``(rows, steps)``, marginal N(0, sigma**2).

    Started from the stationary law so the first minute is as variable as the others.
    """
    x = np.empty((rows, steps))
    x[:, 0] = rng.normal(0.0, sigma, rows)
    innov = sigma * math.sqrt(1.0 - rho * rho)
    for m in range(1, steps):
        x[:, m] = rho * x[:, m - 1] + rng.normal(0.0, innov, rows)
    return x


def azure_like_trace(
    n_models: int,
    duration: float,
    mean_rate: float,
    seed: int,
    *,
    tenant: str = "trace",
    models: Sequence[str] | None = None,
    deadline_ms: float | None = None,
    burstiness: float = 2.0,
    popularity_sigma: float = 2.0,
    minute_sigma: float = 0.5,
    minute_rho: float = 0.8,
    global_sigma: float = 0.3,
) -> list[Arrival]:
    """A synthetic trace shaped like the Azure Functions 2019 trace, one function per model.

    The real trace (Shahrad et al., "Serverless in the Wild", ATC '20) cannot be
    downloaded here.  Clockwork, INFaaS and Shepherd use it by mapping each function to a
    model and replaying its per-minute invocation counts; this function synthesises the
    three properties those papers rely on:

    1. **Heavy-tailed popularity.**  Model ``i``'s long-run rate is drawn lognormal with
       log-std ``popularity_sigma`` (default 2, i.e. rates spanning ~3 orders of magnitude
       over 100 models; the real trace spans ~8 over 10^5 functions) and the rates are
       scaled so they sum to ``mean_rate``.  Models are sorted most popular first, so
       ``models[0]`` is the hottest.  With the defaults and 100 models the top 10% of
       models typically receive 60-85% of requests.
    2. **Minute-level variation.**  Each model's rate is multiplied, minute by minute, by
       ``exp(x_i[m] + g[m])`` where ``x_i`` is a per-model AR(1) in log space (marginal
       std ``minute_sigma``, lag-1 correlation ``minute_rho``) and ``g`` is an AR(1)
       shared by all models (std ``global_sigma``, same ``minute_rho``) standing in for the
       load swings common to the whole platform.  Each model's factors are then
       renormalised so its time-average over the run is exactly 1: the per-minute total
       rate varies, but the run's expected mean rate is exactly ``mean_rate`` and the
       popularity ranking is exactly that of step 1.  Runs shorter than a minute have no
       minute variation; a final partial minute counts in proportion to its length.
    3. **Bursts within a minute.**  Each model's arrivals form a gamma renewal process with
       gap CV ``burstiness`` (1 = Poisson) run in "operational time" (the integral of its
       piecewise-constant rate) and mapped back to wall time, so within any minute the
       gaps have that CV at that minute's rate, and bursts continue across minute edges.

    What it does **not** reproduce: diurnal and weekly periodicity (the real trace covers
    14 days; the AR(1) here is stationary); timer-triggered functions firing at exact
    periods; functions idle for most minutes (on/off behaviour); correlation among the
    functions of one application beyond the single shared factor; execution times,
    memory sizes and cold starts (other tables of the trace); and the real sub-minute
    timing, which the trace does not record either (papers spread each minute's count
    uniformly or as Poisson; here it is gamma).

    ``models`` names the models (default ``model000``, ``model001``, ...; rank order);
    every arrival carries ``tenant`` and ``deadline_ms``.  Deterministic under ``seed``.
    """
    if isinstance(n_models, bool) or not isinstance(n_models, (int, np.integer)) or n_models < 1:
        raise ValueError(f"n_models must be an integer >= 1, got {n_models!r}")
    n_models = int(n_models)
    duration = _check_positive("duration", duration)
    mean_rate = _check_positive("mean_rate", mean_rate)
    seed = _check_seed(seed)
    burstiness = _check_positive("burstiness", burstiness)
    popularity_sigma = _check_nonnegative("popularity_sigma", popularity_sigma)
    minute_sigma = _check_nonnegative("minute_sigma", minute_sigma)
    global_sigma = _check_nonnegative("global_sigma", global_sigma)
    rho = _check_nonnegative("minute_rho", minute_rho)
    if rho >= 1:
        raise ValueError(f"minute_rho must be in [0, 1) for a stationary AR(1), got {minute_rho}")
    deadline_ms = _check_deadline(deadline_ms)
    if not isinstance(tenant, str) or not tenant:
        raise ValueError(f"tenant must be a non-empty string, got {tenant!r}")
    if models is None:
        width = max(3, len(str(n_models - 1)))
        names = [f"model{i:0{width}d}" for i in range(n_models)]
    else:
        names = list(models)
        if len(names) != n_models:
            raise ValueError(f"models has {len(names)} names but n_models is {n_models}")
        if any(not isinstance(m, str) or not m for m in names) or len(set(names)) != n_models:
            raise ValueError("models must be distinct non-empty strings")

    rng = np.random.default_rng(seed)
    base = np.sort(rng.lognormal(0.0, popularity_sigma, n_models))[::-1]
    base *= mean_rate / base.sum()

    n_min = max(1, math.ceil(duration / 60.0))
    edges = np.minimum(np.arange(n_min + 1, dtype=np.float64) * 60.0, duration)
    lengths = np.diff(edges)
    log_f = _ar1_log(rng, n_models, n_min, minute_sigma, rho)
    log_f += _ar1_log(rng, 1, n_min, global_sigma, rho)
    f = np.exp(log_f)
    f /= (f * lengths).sum(axis=1, keepdims=True) / duration  # time-average 1 per model
    rate = base[:, None] * f  # requests/s, (model, minute)

    # Unit-mean gamma gaps in operational time: shape 1/cv^2, scale cv^2.
    shape, scale = 1.0 / burstiness**2, burstiness**2
    times: list[np.ndarray] = []
    model_idx: list[np.ndarray] = []
    for i in range(n_models):
        cum = np.concatenate([[0.0], np.cumsum(rate[i] * lengths)])
        ops = _renewal_times(lambda k: rng.gamma(shape, scale, k), 1.0, burstiness, cum[-1])
        t = np.interp(ops, cum, edges)
        times.append(t)
        model_idx.append(np.full(t.size, i, dtype=np.int64))

    t_all = np.concatenate(times)
    m_all = np.concatenate(model_idx)
    order = np.argsort(t_all, kind="stable")
    return [
        Arrival(tt, tenant, names[mi], deadline_ms)
        for tt, mi in zip(t_all[order].tolist(), m_all[order].tolist(), strict=True)
    ]


# ------------------------------------------------------------------------ trace files


def write_trace(path: str | os.PathLike[str], arrivals: Iterable[Arrival]) -> None:
    """Write ``arrivals`` as CSV: header ``t,tenant,model,deadline_ms``, one row each.

    Times and deadlines have 6 decimals (microseconds, far below any scheduling
    granularity); a missing deadline is an empty field.  CSV because it is what people
    open in a spreadsheet or pandas, and what other load generators can be scripted to
    read.  Rounding is monotone, so a sorted plan stays sorted.
    """
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(TRACE_COLUMNS)
        for a in arrivals:
            dl = "" if a.deadline_ms is None else f"{a.deadline_ms:.6f}"
            w.writerow((f"{a.t:.6f}", a.tenant, a.model, dl))


def read_trace(path: str | os.PathLike[str]) -> list[Arrival]:
    """Read a trace written by :func:`write_trace` (or by hand / another tool).

    The header must name exactly the columns ``t, tenant, model, deadline_ms`` (any order).
    Every row is validated — ``t`` a finite number >= 0, non-empty tenant and model,
    ``deadline_ms`` empty or a positive finite number — and the first bad row raises
    ValueError naming the file and its line number, since a replay that silently skips
    or misreads rows measures a different workload.  Blank lines are ignored.  The result
    is sorted by ``t`` (stably), so traces concatenated or edited by hand replay in order.
    """
    out: list[Arrival] = []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise ValueError(
                f"{path}, line 1: empty file; expected header {','.join(TRACE_COLUMNS)}"
            )
        cols = [c.strip() for c in header]
        if sorted(cols) != sorted(TRACE_COLUMNS):
            raise ValueError(
                f"{path}, line {reader.line_num}: header has columns {cols}; "
                f"expected exactly {list(TRACE_COLUMNS)} (any order)"
            )
        pos = {c: i for i, c in enumerate(cols)}
        it, iten, imod, idl = (pos[c] for c in TRACE_COLUMNS)
        for row in reader:
            line = reader.line_num
            if not row or all(not c.strip() for c in row):
                continue

            def bad(msg: str, line: int = line) -> ValueError:
                return ValueError(f"{path}, line {line}: {msg}")

            if len(row) != len(cols):
                raise bad(f"expected {len(cols)} fields, got {len(row)}: {row!r}")
            try:
                t = float(row[it])
            except ValueError:
                raise bad(f"t is not a number: {row[it]!r}") from None
            if not math.isfinite(t) or t < 0:
                raise bad(f"t must be a finite number >= 0, got {row[it]!r}")
            tenant, model = row[iten].strip(), row[imod].strip()
            if not tenant:
                raise bad("tenant is empty")
            if not model:
                raise bad("model is empty")
            raw = row[idl].strip()
            dl: float | None = None
            if raw:
                try:
                    dl = float(raw)
                except ValueError:
                    raise bad(f"deadline_ms is not a number: {raw!r}") from None
                if not math.isfinite(dl) or dl <= 0:
                    raise bad(f"deadline_ms must be empty or a positive number, got {raw!r}")
            out.append(Arrival(t, tenant, model, dl))
    out.sort(key=lambda a: a.t)
    return out


# ----------------------------------------------------------------------------- stats


def trace_stats(arrivals: Sequence[Arrival], duration: float | None = None) -> dict:
    """Summary of a plan, to check a workload is what it claims before spending a run on it.

    ``duration`` is the run length; by default the time of the last arrival (which slightly
    overstates the rate of short runs: pass the generator's duration when known).

    Returns a dict with:

    * ``n``: number of arrivals; ``duration``: seconds; ``mean_rate``: ``n / duration``.
    * ``per_model`` / ``per_tenant``: request counts by name, most requested first (models
      of the same name under different tenants are counted together).
    * ``per_minute``: request rate (req/s) in each minute ``[60k, 60k + 60)``; a final
      partial minute is divided by its own length.
    * ``interarrival_cv``: std / mean of the gaps between consecutive arrivals of the
      merged stream (1 for Poisson, > 1 bursty, 0 fixed); NaN with fewer than 2 gaps.
    * ``top_model_share``: fraction of requests to the most requested model;
      ``top_decile_share``: fraction to the top 10% of models (at least one model).
    """
    t = np.sort(np.fromiter((a.t for a in arrivals), dtype=np.float64, count=len(arrivals)))
    n = int(t.size)
    if duration is None:
        dur = float(t[-1]) if n else 0.0
    else:
        dur = _check_positive("duration", duration)
        if n and t[-1] > dur:
            raise ValueError(f"duration {dur} is shorter than the last arrival at t={t[-1]}")
    per_model = dict(Counter(a.model for a in arrivals).most_common())
    per_tenant = dict(Counter(a.tenant for a in arrivals).most_common())

    per_minute: list[float] = []
    if dur > 0:
        n_min = max(1, math.ceil(dur / 60.0))
        counts = np.bincount(np.minimum((t // 60.0).astype(np.int64), n_min - 1), minlength=n_min)
        lengths = np.minimum(np.arange(1, n_min + 1) * 60.0, dur) - np.arange(n_min) * 60.0
        per_minute = (counts / lengths).tolist()

    gaps = np.diff(t)
    cv = float("nan")
    if gaps.size >= 2 and gaps.mean() > 0:
        cv = float(gaps.std() / gaps.mean())

    counts_sorted = sorted(per_model.values(), reverse=True)
    k = max(1, math.ceil(len(counts_sorted) / 10))
    return {
        "n": n,
        "duration": dur,
        "mean_rate": n / dur if dur > 0 else 0.0,
        "per_model": per_model,
        "per_tenant": per_tenant,
        "per_minute": per_minute,
        "interarrival_cv": cv,
        "top_model_share": counts_sorted[0] / n if n else 0.0,
        "top_decile_share": sum(counts_sorted[:k]) / n if n else 0.0,
    }
