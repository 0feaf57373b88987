"""Reporting for `mtbench`: request records -> summary, time series, results JSON, table, plots.

A benchmark run drives several *targets* (mtserve and its baselines) with the same workload and
keeps one `RequestRecord` per request. Everything here is a pure function of those records, so
the numbers in the table, in the JSON and in the plots come from one computation and agree.

Conventions, chosen once so every target is measured the same way:

* Percentiles use NumPy's default linear interpolation (the same as `bench/latency.py`).
* Only OK answers (status 0 with a latency) count towards latency and throughput; a request
  with no answer is a timeout whatever its status says, and is counted under status ``-1``.
* Rates divide by the run's nominal duration, not by the span of the records, so a target
  that answers fewer requests is not flattered by a shorter span.
* Ratios put mtserve in the numerator: latency ratio > 1 means mtserve is slower, throughput
  ratio > 1 means mtserve is faster; attainment is a difference (fractions do not divide well).
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any, NoReturn, TextIO

import numpy as np

SCHEMA = "mtbench/1"
LATENCY_SAMPLE_MAX = 2000
TIMEOUT_STATUS = -1
PERCENTILES = {"p50": 50.0, "p95": 95.0, "p99": 99.0, "p999": 99.9}
LATENCY_KEYS = (*PERCENTILES, "mean", "max")
TIMESERIES_KEYS = ("t", "sent_rps", "throughput_rps", "goodput_rps", "p50_ms", "p99_ms")
RATIO_KEYS = ("p50", "p99", "throughput", "goodput", "deadline_attainment")


@dataclass
class RequestRecord:
    """One request as the load generator saw it."""

    t_send: float  # seconds from the run's start when the request was sent
    latency_ms: float | None  # None if no answer (timeout)
    status: int  # protocol status code; 0 = OK; -1 = client-side timeout/no answer
    model: str
    tenant: str = ""
    deadline_ms: float | None = None
    batch: int = 1

    @property
    def ok(self) -> bool:
        """An answer counts only if the server said OK *and* it arrived."""
        return self.status == 0 and self.latency_ms is not None

    @property
    def good(self) -> bool:
        """OK and within its deadline; a request without a deadline is good whenever OK."""
        if not self.ok:
            return False
        return self.deadline_ms is None or self.latency_ms <= self.deadline_ms  # type: ignore[operator]

    @property
    def effective_status(self) -> int:
        """The status to file it under: no answer is a timeout even if status claims OK."""
        return TIMEOUT_STATUS if self.latency_ms is None else self.status


@dataclass
class ServerSample:
    """A periodic sample of the server's STATUS counters (both cumulative since start)."""

    t: float  # seconds from start
    loads: int  # cumulative model loads
    evictions: int  # cumulative evictions


# --------------------------------------------------------------------------- summary


def _percentiles(values: Sequence[float]) -> dict[str, float | None]:
    """p50..p99.9, mean and max; all None for no values, so 'no answers' is never 0 ms."""
    if len(values) == 0:
        return dict.fromkeys(LATENCY_KEYS)
    arr = np.asarray(values, dtype=float)
    out: dict[str, float | None] = {k: float(np.percentile(arr, q)) for k, q in PERCENTILES.items()}
    out["mean"] = float(arr.mean())
    out["max"] = float(arr.max())
    return out


def _check_duration(duration_s: float) -> None:
    if not (isinstance(duration_s, (int, float)) and math.isfinite(duration_s) and duration_s > 0):
        raise ValueError(f"duration_s must be a positive finite number, got {duration_s!r}")


def _sample_dicts(samples: Iterable[Any]) -> list[dict[str, Any]]:
    """Accept ServerSample objects or {t, loads, evictions} dicts; sort by time."""
    out = []
    for s in samples:
        d = asdict(s) if is_dataclass(s) and not isinstance(s, type) else dict(s)
        out.append({"t": float(d["t"]), "loads": int(d["loads"]), "evictions": int(d["evictions"])})
    out.sort(key=lambda d: d["t"])
    return out


def summarize(
    records: Sequence[RequestRecord],
    duration_s: float,
    samples: Sequence[ServerSample] = (),
) -> dict[str, Any]:
    """Headline numbers of one target's run.

    Loads and evictions are differences between the last and the first sample, so counters
    left over from a warm-up before the run are not charged to it; None without samples
    (a baseline with no model cache has nothing to report, which is not the same as 0).
    """
    _check_duration(duration_s)
    ok = [r for r in records if r.ok]
    good = sum(1 for r in ok if r.good)
    with_deadline = [r for r in records if r.deadline_ms is not None]
    attained = sum(1 for r in with_deadline if r.good)
    rejections = Counter(r.effective_status for r in records if not r.ok)
    srt = _sample_dicts(samples)
    return {
        "requests": len(records),
        "ok": len(ok),
        "duration_s": float(duration_s),
        "throughput_rps": len(ok) / duration_s,
        "goodput_rps": good / duration_s,
        "deadline_attainment": attained / len(with_deadline) if with_deadline else None,
        "latency_ms": _percentiles([r.latency_ms for r in ok]),  # type: ignore[misc]
        "rejections": {str(code): n for code, n in sorted(rejections.items())},
        "loads": srt[-1]["loads"] - srt[0]["loads"] if srt else None,
        "evictions": srt[-1]["evictions"] - srt[0]["evictions"] if srt else None,
        # Mean over every request sent: batch is what the client asked for, answered or not.
        "mean_batch": float(np.mean([r.batch for r in records])) if records else None,
    }


def timeseries(
    records: Sequence[RequestRecord], duration_s: float, bin_s: float = 1.0
) -> dict[str, Any]:
    """Per-bin rates and latency percentiles over [0, duration_s).

    Sends are binned by send time; answers (throughput, goodput) by *completion* time, since
    that is when the service delivered them; latency percentiles by send time, so a latency
    spike lines up with the load that caused it. Events outside the run are clamped into the
    first or last bin, so summing a rate times its bin width gives back the summary's count.
    The last bin may be shorter than bin_s; its rates divide by its real width.
    """
    _check_duration(duration_s)
    if not (bin_s > 0 and math.isfinite(bin_s)):
        raise ValueError(f"bin_s must be a positive finite number, got {bin_s!r}")
    n = max(1, math.ceil(duration_s / bin_s - 1e-9))
    starts = [i * bin_s for i in range(n)]
    widths = [min(bin_s, duration_s - s) for s in starts]

    def index(t: float) -> int:
        return min(n - 1, max(0, int(t // bin_s)))

    sent = [0] * n
    done = [0] * n
    good = [0] * n
    lat: list[list[float]] = [[] for _ in range(n)]
    for r in records:
        i = index(r.t_send)
        sent[i] += 1
        if r.ok:
            lat[i].append(r.latency_ms)  # type: ignore[arg-type]
            j = index(r.t_send + r.latency_ms / 1000.0)  # type: ignore[operator]
            done[j] += 1
            good[j] += r.good
    p50 = [float(np.percentile(v, 50)) if v else None for v in lat]
    p99 = [float(np.percentile(v, 99)) if v else None for v in lat]
    return {
        "bin_s": float(bin_s),
        "t": starts,
        "sent_rps": [c / w for c, w in zip(sent, widths, strict=True)],
        "throughput_rps": [c / w for c, w in zip(done, widths, strict=True)],
        "goodput_rps": [c / w for c, w in zip(good, widths, strict=True)],
        "p50_ms": p50,
        "p99_ms": p99,
    }


def latency_sample(records: Sequence[RequestRecord], k: int = LATENCY_SAMPLE_MAX) -> list[float]:
    """Up to k OK latencies, sorted and evenly strided, min and max kept.

    Deterministic (no RNG), so re-rendering plots from a saved JSON gives the same picture,
    and the extremes survive because the tail is what the CDF is for.
    """
    vals = sorted(float(r.latency_ms) for r in records if r.ok)  # type: ignore[arg-type]
    if len(vals) <= k:
        return vals
    idx = np.linspace(0, len(vals) - 1, k).round().astype(int)
    return [vals[i] for i in idx]


def target_result(
    records: Sequence[RequestRecord],
    duration_s: float,
    samples: Sequence[ServerSample] = (),
    bin_s: float = 1.0,
) -> dict[str, Any]:
    """Everything `build_results` needs about one target, so callers write one line each."""
    return {
        "summary": summarize(records, duration_s, samples),
        "timeseries": timeseries(records, duration_s, bin_s),
        "samples": _sample_dicts(samples),
        "latency_sample_ms": latency_sample(records),
    }


# --------------------------------------------------------------------------- results doc


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def ratios(targets: Mapping[str, Mapping[str, Any]], ours: str = "mtserve") -> dict[str, Any]:
    """mtserve against each other target; {} when mtserve was not run.

    None wherever a side has no value (no OK answers, no deadlines) or the baseline is 0,
    rather than inf or NaN, which JSON cannot carry.
    """
    if ours not in targets:
        return {}
    mine = targets[ours]["summary"]
    out: dict[str, Any] = {}
    for name, tgt in targets.items():
        if name == ours:
            continue
        theirs = tgt["summary"]
        a_att, b_att = mine.get("deadline_attainment"), theirs.get("deadline_attainment")
        out[name] = {
            "p50": _ratio(mine["latency_ms"]["p50"], theirs["latency_ms"]["p50"]),
            "p99": _ratio(mine["latency_ms"]["p99"], theirs["latency_ms"]["p99"]),
            "throughput": _ratio(mine["throughput_rps"], theirs["throughput_rps"]),
            "goodput": _ratio(mine["goodput_rps"], theirs["goodput_rps"]),
            "deadline_attainment": (
                a_att - b_att if a_att is not None and b_att is not None else None
            ),
        }
    return out


def build_results(
    benchmark: str,
    config: dict[str, Any],
    targets: Mapping[str, Mapping[str, Any]],
    meta: dict[str, Any] | None = None,
    ours: str = "mtserve",
) -> dict[str, Any]:
    """The whole results document, validated, so a bad document fails where it was made.

    `meta` is merged over the machine facts (python, cpu_count, platform, unix_time), so a
    caller can add library versions or override the timestamp.
    """
    full_meta: dict[str, Any] = {
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "unix_time": time.time(),
    }
    full_meta.update(meta or {})
    tdoc: dict[str, Any] = {}
    for name, t in targets.items():
        tdoc[name] = {
            "summary": t["summary"],
            "timeseries": t["timeseries"],
            "samples": _sample_dicts(t.get("samples", [])),
            "latency_sample_ms": [float(x) for x in t.get("latency_sample_ms", [])],
        }
    doc = {
        "schema": SCHEMA,
        "benchmark": benchmark,
        "config": config,
        "meta": full_meta,
        "targets": tdoc,
        "ratios": ratios(tdoc, ours),
    }
    validate(doc)
    return doc


# --------------------------------------------------------------------------- validation


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _fail(path: str, what: str) -> NoReturn:
    raise ValueError(f"{path}: {what}")


def _want_dict(v: Any, path: str, keys: Iterable[str] = ()) -> dict[str, Any]:
    if not isinstance(v, dict):
        _fail(path, "expected object")
    for k in keys:
        if k not in v:
            _fail(f"{path}.{k}", "missing")
    return v


def _want_num(v: Any, path: str, nullable: bool = False) -> None:
    if nullable and v is None:
        return
    if not _is_num(v):
        _fail(path, "expected number or null" if nullable else "expected number")


def _want_int(v: Any, path: str, nullable: bool = False, minimum: int | None = 0) -> None:
    if nullable and v is None:
        return
    if not _is_int(v):
        _fail(path, "expected integer or null" if nullable else "expected integer")
    if minimum is not None and v < minimum:
        _fail(path, f"expected >= {minimum}")


def _want_list(v: Any, path: str) -> list[Any]:
    if not isinstance(v, list):
        _fail(path, "expected array")
    return v


def _want_json(v: Any, path: str) -> None:
    """Free-form config/meta must still be plain JSON (no NaN, no tuples-as-keys, no objects)."""
    if v is None or isinstance(v, (str, bool)):
        return
    if isinstance(v, (int, float)):
        _want_num(v, path)
    elif isinstance(v, list):
        for i, x in enumerate(v):
            _want_json(x, f"{path}[{i}]")
    elif isinstance(v, dict):
        for k, x in v.items():
            if not isinstance(k, str):
                _fail(f"{path}.{k!r}", "expected string key")
            _want_json(x, f"{path}.{k}")
    else:
        _fail(path, f"expected JSON value, got {type(v).__name__}")


def _validate_summary(s: Any, p: str) -> None:
    keys = (
        "requests",
        "ok",
        "throughput_rps",
        "goodput_rps",
        "deadline_attainment",
        "latency_ms",
        "rejections",
        "loads",
        "evictions",
        "mean_batch",
    )
    s = _want_dict(s, p, keys)
    _want_int(s["requests"], f"{p}.requests")
    _want_int(s["ok"], f"{p}.ok")
    if s["ok"] > s["requests"]:
        _fail(f"{p}.ok", "exceeds requests")
    if "duration_s" in s:
        _want_num(s["duration_s"], f"{p}.duration_s")
    for k in ("throughput_rps", "goodput_rps"):
        _want_num(s[k], f"{p}.{k}")
        if s[k] < 0:
            _fail(f"{p}.{k}", "expected >= 0")
    att = s["deadline_attainment"]
    _want_num(att, f"{p}.deadline_attainment", nullable=True)
    if att is not None and not 0 <= att <= 1:
        _fail(f"{p}.deadline_attainment", "expected fraction in [0, 1]")
    lat = _want_dict(s["latency_ms"], f"{p}.latency_ms", LATENCY_KEYS)
    for k in LATENCY_KEYS:
        _want_num(lat[k], f"{p}.latency_ms.{k}", nullable=True)
    rej = _want_dict(s["rejections"], f"{p}.rejections")
    for code, n in rej.items():
        try:
            int(code)
        except ValueError:
            _fail(f"{p}.rejections.{code}", "expected integer status code as key")
        _want_int(n, f"{p}.rejections.{code}")
    # Counters can go down if the server restarted mid-run, so no sign check.
    _want_int(s["loads"], f"{p}.loads", nullable=True, minimum=None)
    _want_int(s["evictions"], f"{p}.evictions", nullable=True, minimum=None)
    _want_num(s["mean_batch"], f"{p}.mean_batch", nullable=True)


def _validate_timeseries(ts: Any, p: str) -> None:
    ts = _want_dict(ts, p, TIMESERIES_KEYS)
    if "bin_s" in ts:
        _want_num(ts["bin_s"], f"{p}.bin_s")
    n = len(_want_list(ts["t"], f"{p}.t"))
    for k in TIMESERIES_KEYS:
        vals = _want_list(ts[k], f"{p}.{k}")
        if len(vals) != n:
            _fail(f"{p}.{k}", f"expected {n} items like t, got {len(vals)}")
        nullable = k in ("p50_ms", "p99_ms")
        for i, v in enumerate(vals):
            _want_num(v, f"{p}.{k}[{i}]", nullable=nullable)


def _validate_target(t: Any, p: str) -> None:
    t = _want_dict(t, p, ("summary", "timeseries", "samples", "latency_sample_ms"))
    _validate_summary(t["summary"], f"{p}.summary")
    _validate_timeseries(t["timeseries"], f"{p}.timeseries")
    for i, smp in enumerate(_want_list(t["samples"], f"{p}.samples")):
        sp = f"{p}.samples[{i}]"
        smp = _want_dict(smp, sp, ("t", "loads", "evictions"))
        _want_num(smp["t"], f"{sp}.t")
        _want_int(smp["loads"], f"{sp}.loads")
        _want_int(smp["evictions"], f"{sp}.evictions")
    lat = _want_list(t["latency_sample_ms"], f"{p}.latency_sample_ms")
    if len(lat) > LATENCY_SAMPLE_MAX:
        _fail(f"{p}.latency_sample_ms", f"expected at most {LATENCY_SAMPLE_MAX} items")
    for i, v in enumerate(lat):
        _want_num(v, f"{p}.latency_sample_ms[{i}]")


def validate(doc: dict[str, Any]) -> None:
    """Check a results document by hand; raise ValueError naming the first bad path.

    Hand-written rather than jsonschema so the bench has no extra dependency, and so the
    message is a dotted path a person can find in the file at once.
    """
    doc = _want_dict(doc, "$", ("schema", "benchmark", "config", "meta", "targets", "ratios"))
    if doc["schema"] != SCHEMA:
        _fail("schema", f"expected {SCHEMA!r}, got {doc['schema']!r}")
    if not isinstance(doc["benchmark"], str) or not doc["benchmark"]:
        _fail("benchmark", "expected non-empty string")
    _want_json(_want_dict(doc["config"], "config"), "config")
    meta = _want_dict(doc["meta"], "meta", ("python", "cpu_count", "platform", "unix_time"))
    _want_json(meta, "meta")
    if not isinstance(meta["python"], str):
        _fail("meta.python", "expected string")
    if not isinstance(meta["platform"], str):
        _fail("meta.platform", "expected string")
    _want_int(meta["cpu_count"], "meta.cpu_count", nullable=True)
    _want_num(meta["unix_time"], "meta.unix_time")
    targets = _want_dict(doc["targets"], "targets")
    for name, t in targets.items():
        if not isinstance(name, str) or not name:
            _fail(f"targets.{name!r}", "expected non-empty string name")
        _validate_target(t, f"targets.{name}")
    for name, r in _want_dict(doc["ratios"], "ratios").items():
        if name not in targets:
            _fail(f"ratios.{name}", "names no target")
        r = _want_dict(r, f"ratios.{name}", RATIO_KEYS)
        for k in RATIO_KEYS:
            _want_num(r[k], f"ratios.{name}.{k}", nullable=True)


def write_json(doc: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Validate, then write atomically, so a crash never leaves a half file for plots to read."""
    validate(doc)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load and validate a results file, e.g. to re-plot an old run."""
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    validate(doc)
    return doc


# --------------------------------------------------------------------------- table


def _fmt(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def _fmt_x(v: float | None) -> str:
    return "-" if v is None else f"x{v:.2f}"


def print_table(doc: dict[str, Any], file: TextIO | None = None) -> None:
    """One row per target, then mtserve against each baseline; '-' marks 'not defined'."""
    file = sys.stdout if file is None else file
    header = (
        "target",
        "requests",
        "thru rps",
        "good rps",
        "attain %",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "p99.9 ms",
        "rejections",
        "loads",
        "evict",
    )
    rows = [header]
    for name, t in doc["targets"].items():
        s = t["summary"]
        lat = s["latency_ms"]
        att = s["deadline_attainment"]
        rej = ",".join(f"{c}:{n}" for c, n in s["rejections"].items()) or "-"
        rows.append(
            (
                name,
                str(s["requests"]),
                _fmt(s["throughput_rps"]),
                _fmt(s["goodput_rps"]),
                _fmt(None if att is None else 100 * att),
                _fmt(lat["p50"], ".2f"),
                _fmt(lat["p95"], ".2f"),
                _fmt(lat["p99"], ".2f"),
                _fmt(lat["p999"], ".2f"),
                rej,
                _fmt(s["loads"], "d"),
                _fmt(s["evictions"], "d"),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    # Names and rejection lists read left to right; numbers line up on the right.
    left = {0, 9}

    def line(r: Sequence[str]) -> str:
        cells = (
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        return "  ".join(cells).rstrip()

    print(f"benchmark: {doc['benchmark']}", file=file)
    print(line(header), file=file)
    print("  ".join("-" * w for w in widths), file=file)
    for r in rows[1:]:
        print(line(r), file=file)
    if doc.get("ratios"):
        ours = next((n for n in doc["targets"] if n not in doc["ratios"]), "mtserve")
        labels = {name: f"{ours} vs {name}:" for name in doc["ratios"]}
        lw = max(len(v) for v in labels.values())
        print(file=file)
        print(f"ratios ({ours} / other; latency < 1 and throughput > 1 favour {ours};", file=file)
        print("        attainment is a difference in percentage points)", file=file)
        for name, label in labels.items():
            r = doc["ratios"][name]
            att = r["deadline_attainment"]
            att_s = "-" if att is None else f"{100 * att:+.1f} pp"
            print(
                f"{label.ljust(lw)}  p50 {_fmt_x(r['p50']):>7}  p99 {_fmt_x(r['p99']):>7}"
                f"  throughput {_fmt_x(r['throughput']):>7}  goodput {_fmt_x(r['goodput']):>7}"
                f"  attainment {att_s:>9}",
                file=file,
            )


# --------------------------------------------------------------------------- plots


def _figure(nrows: int = 1, height: float = 4.0) -> tuple[Any, Any]:
    """A Figure on the Agg canvas, without pyplot, so no global backend state is touched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, 1, sharex=nrows > 1, squeeze=False)[:, 0]
    return fig, axes


def _nan(values: Sequence[float | None]) -> list[float]:
    """None -> NaN so matplotlib leaves a gap instead of drawing through an empty bin."""
    return [math.nan if v is None else v for v in values]


def _empty_note(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")


def plot(doc: dict[str, Any], outdir: str | os.PathLike[str], prefix: str = "") -> list[Path]:
    """Write latency_cdf.png, over_time.png and loads.png; return their paths.

    Targets keep the same colour across all three plots so they can be read side by side.
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    targets = doc["targets"]
    colours = {name: f"C{i % 10}" for i, name in enumerate(targets)}
    title = doc["benchmark"]
    paths = []

    fig, (ax,) = _figure()
    drawn = False
    for name, t in targets.items():
        lat = [v for v in t["latency_sample_ms"] if v > 0]  # log-x has no place for 0
        if not lat:
            continue
        y = np.arange(1, len(lat) + 1) / len(lat)
        ax.plot(lat, y, drawstyle="steps-post", color=colours[name], label=name)
        drawn = True
    if drawn:
        ax.set_xscale("log")
        ax.legend(loc="lower right")
        for q in (0.5, 0.99):
            ax.axhline(q, color="gray", lw=0.5, ls=":")
    else:
        _empty_note(ax, "no OK answers")
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("latency (ms, log scale)")
    ax.set_ylabel("fraction of OK answers")
    ax.set_title(f"{title}: latency CDF")
    ax.grid(True, which="both", alpha=0.3)
    paths.append(outdir / f"{prefix}latency_cdf.png")
    fig.savefig(paths[-1], dpi=100)

    fig, (ax_g, ax_p) = _figure(nrows=2, height=3.0)
    for name, t in targets.items():
        ts = t["timeseries"]
        # Each value describes a whole bin, so draw it at the bin's middle (the last may be short).
        half = ts.get("bin_s", 1.0) / 2
        end = t["summary"].get("duration_s", math.inf)
        x = [(b + min(b + 2 * half, end)) / 2 for b in ts["t"]]
        ax_g.plot(x, ts["goodput_rps"], color=colours[name], label=name)
        ax_p.plot(x, _nan(ts["p99_ms"]), color=colours[name], label=name, marker=".")
    ax_g.set_ylabel("goodput (req/s)")
    ax_g.set_title(f"{title}: goodput and p99 latency over time")
    ax_p.set_ylabel("p99 latency (ms)")
    ax_p.set_xlabel("time since start (s)")
    for a in (ax_g, ax_p):
        a.grid(True, alpha=0.3)
    if targets:
        ax_g.legend(loc="best")
    paths.append(outdir / f"{prefix}over_time.png")
    fig.savefig(paths[-1], dpi=100)

    fig, (ax,) = _figure()
    drawn = False
    for name, t in targets.items():
        smp = t["samples"]
        if not smp:
            continue
        ts = [s["t"] for s in smp]
        # Counters jump between samples: steps, not slopes.
        ax.step(
            ts, [s["loads"] for s in smp], where="post", color=colours[name], label=f"{name} loads"
        )
        ax.step(
            ts,
            [s["evictions"] for s in smp],
            where="post",
            color=colours[name],
            ls="--",
            label=f"{name} evictions",
        )
        drawn = True
    if drawn:
        ax.legend(loc="upper left")
    else:
        _empty_note(ax, "no server samples")
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("cumulative count")
    ax.set_title(f"{title}: model loads (solid) and evictions (dashed)")
    ax.grid(True, alpha=0.3)
    paths.append(outdir / f"{prefix}loads.png")
    fig.savefig(paths[-1], dpi=100)
    return paths
