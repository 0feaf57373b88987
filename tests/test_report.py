"""bench.report: known answers for the summary, the schema check, the table and the plots."""

from __future__ import annotations

import copy
import io
import json
import re

import numpy as np
import pytest

from bench import report
from bench.report import RequestRecord, ServerSample

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def ok(t: float, ms: float, deadline: float | None = None, batch: int = 1) -> RequestRecord:
    return RequestRecord(t, ms, 0, "m", deadline_ms=deadline, batch=batch)


def lat_records(values: list[float]) -> list[RequestRecord]:
    return [ok(i * 0.01, v) for i, v in enumerate(values)]


def make_doc(**meta: object) -> dict:
    """mtserve with deadlines, rejections and samples; a baseline without samples; an empty one."""
    ours = [ok(0.1 * i, 10.0 + i % 5, deadline=12.0) for i in range(40)]
    ours += [RequestRecord(2.0, None, -1, "m"), RequestRecord(2.5, 1.0, 3, "m")]
    base = [ok(0.1 * i, 20.0 + i % 3, deadline=12.0) for i in range(30)]
    samples = [ServerSample(0.0, 2, 0), ServerSample(2.0, 5, 1), ServerSample(4.0, 7, 3)]
    targets = {
        "mtserve": report.target_result(ours, 4.0, samples),
        "onnxruntime": report.target_result(base, 4.0),
        "ray": report.target_result([RequestRecord(0.5, None, -1, "m")], 4.0),
    }
    return report.build_results("unit", {"rate": 10, "models": ["m"]}, targets, meta or None)


# --------------------------------------------------------------------------- summarize


def test_percentiles_of_known_values():
    s = report.summarize(lat_records([float(v) for v in range(1, 101)]), duration_s=10.0)
    lat = s["latency_ms"]
    # NumPy linear interpolation on 1..100: position q/100 * 99.
    assert lat["p50"] == pytest.approx(50.5)
    assert lat["p95"] == pytest.approx(95.05)
    assert lat["p99"] == pytest.approx(99.01)
    assert lat["p999"] == pytest.approx(99.901)
    assert lat["mean"] == pytest.approx(50.5)
    assert lat["max"] == 100.0
    assert s["requests"] == s["ok"] == 100
    assert s["throughput_rps"] == pytest.approx(10.0)
    assert s["goodput_rps"] == pytest.approx(10.0)  # no deadlines: every OK is good
    assert s["deadline_attainment"] is None
    assert s["rejections"] == {}
    assert s["loads"] is None and s["evictions"] is None
    assert s["mean_batch"] == 1.0


def test_goodput_below_throughput_with_late_answers():
    recs = [
        ok(0.0, 5.0, deadline=10.0),
        ok(0.1, 10.0, deadline=10.0),  # exactly at the deadline counts as in time
        ok(0.2, 15.0, deadline=10.0),  # late
        ok(0.3, 50.0, deadline=10.0),  # late
        ok(0.4, 99.0),  # no deadline: good if OK
        RequestRecord(0.5, None, -1, "m", deadline_ms=10.0),  # timeout with a deadline
    ]
    s = report.summarize(recs, duration_s=2.0)
    assert s["ok"] == 5
    assert s["throughput_rps"] == pytest.approx(2.5)
    assert s["goodput_rps"] == pytest.approx(1.5)
    # 5 requests have deadlines, 2 met them.
    assert s["deadline_attainment"] == pytest.approx(2 / 5)


def test_rejections_by_status_including_timeouts():
    recs = [
        ok(0.0, 1.0),
        RequestRecord(0.1, 0.5, 3, "m"),
        RequestRecord(0.2, 0.5, 3, "m"),
        RequestRecord(0.3, 0.7, 7, "m"),
        RequestRecord(0.4, None, -1, "m"),
        RequestRecord(0.5, None, 0, "m"),  # "OK" with no answer is still a timeout
    ]
    s = report.summarize(recs, duration_s=1.0)
    assert s["rejections"] == {"-1": 2, "3": 2, "7": 1}
    assert s["ok"] == 1
    assert s["latency_ms"]["max"] == 1.0  # rejections' latencies do not count


def test_no_ok_answers_gives_none_latencies():
    s = report.summarize([RequestRecord(0.0, None, -1, "m")], duration_s=1.0)
    assert s["latency_ms"] == dict.fromkeys(report.LATENCY_KEYS)
    assert s["throughput_rps"] == 0.0
    empty = report.summarize([], duration_s=1.0)
    assert empty["requests"] == 0 and empty["mean_batch"] is None


def test_loads_and_evictions_from_samples_last_minus_first():
    samples = [ServerSample(5.0, 9, 4), ServerSample(0.0, 3, 1), ServerSample(2.0, 6, 2)]
    s = report.summarize([ok(0.0, 1.0)], 6.0, samples)  # out of order on purpose
    assert s["loads"] == 6
    assert s["evictions"] == 3


def test_mean_batch():
    s = report.summarize([ok(0, 1, batch=1), ok(0, 1, batch=4), ok(0, 1, batch=7)], 1.0)
    assert s["mean_batch"] == pytest.approx(4.0)


def test_bad_duration_rejected():
    with pytest.raises(ValueError, match="duration_s"):
        report.summarize([], 0.0)


# --------------------------------------------------------------------------- timeseries


def test_timeseries_bins():
    recs = [
        ok(0.1, 10.0),
        ok(0.2, 20.0, deadline=5.0),  # late
        ok(1.5, 30.0),
        ok(1.99, 100.0),  # sent in bin 1, completes at 2.09 -> bin 2
        RequestRecord(2.2, None, -1, "m"),
    ]
    ts = report.timeseries(recs, duration_s=3.0, bin_s=1.0)
    assert ts["t"] == [0.0, 1.0, 2.0]
    assert ts["sent_rps"] == [2.0, 2.0, 1.0]
    assert ts["throughput_rps"] == [2.0, 1.0, 1.0]
    assert ts["goodput_rps"] == [1.0, 1.0, 1.0]
    assert ts["p50_ms"][0] == pytest.approx(15.0)
    assert ts["p50_ms"][1] == pytest.approx(65.0)
    assert ts["p99_ms"][2] is None and ts["p50_ms"][2] is None  # only a timeout was sent


def test_timeseries_partial_last_bin_and_totals():
    recs = [ok(0.1 * i, 1.0) for i in range(25)]  # t in [0, 2.4]
    ts = report.timeseries(recs, duration_s=2.5, bin_s=1.0)
    assert ts["t"] == [0.0, 1.0, 2.0]
    assert ts["sent_rps"] == pytest.approx([10.0, 10.0, 10.0])  # 5 in a 0.5 s bin
    widths = [1.0, 1.0, 0.5]
    assert sum(r * w for r, w in zip(ts["throughput_rps"], widths, strict=True)) == pytest.approx(
        25
    )


# --------------------------------------------------------------------------- sample, ratios


def test_latency_sample_downsample_keeps_extremes():
    vals = list(np.random.default_rng(0).exponential(10.0, size=5000))
    recs = lat_records(vals)
    sample = report.latency_sample(recs)
    assert len(sample) == report.LATENCY_SAMPLE_MAX
    assert sample == sorted(sample)
    assert sample[0] == min(vals) and sample[-1] == max(vals)
    assert report.latency_sample(recs) == sample  # deterministic
    assert report.latency_sample(lat_records([3.0, 1.0])) == [1.0, 3.0]


def _summ(p50, p99, thr, good, att):
    lat = dict.fromkeys(report.LATENCY_KEYS)
    lat.update(p50=p50, p99=p99)
    return {
        "summary": {
            "latency_ms": lat,
            "throughput_rps": thr,
            "goodput_rps": good,
            "deadline_attainment": att,
        }
    }


def test_ratios_math_and_none():
    targets = {
        "mtserve": _summ(2.0, 10.0, 300.0, 150.0, 0.9),
        "ort": _summ(1.0, 20.0, 100.0, 50.0, 0.6),
        "ray": _summ(None, None, 0.0, 0.0, None),
    }
    r = report.ratios(targets)
    assert set(r) == {"ort", "ray"}
    assert r["ort"]["p50"] == pytest.approx(2.0)
    assert r["ort"]["p99"] == pytest.approx(0.5)
    assert r["ort"]["throughput"] == pytest.approx(3.0)
    assert r["ort"]["goodput"] == pytest.approx(3.0)
    assert r["ort"]["deadline_attainment"] == pytest.approx(0.3)  # a difference
    assert r["ray"] == dict.fromkeys(report.RATIO_KEYS)  # missing values and division by 0
    assert report.ratios(targets, ours="absent") == {}
    targets["mtserve"] = _summ(None, 5.0, 0.0, 0.0, None)
    r = report.ratios(targets)
    assert r["ort"]["p50"] is None and r["ort"]["p99"] == pytest.approx(0.25)
    assert r["ort"]["throughput"] == 0.0 and r["ort"]["deadline_attainment"] is None


# --------------------------------------------------------------------------- results, validate


def test_build_results_shape():
    doc = make_doc(onnxruntime="1.2.3", unix_time=123.0)
    assert doc["schema"] == "mtbench/1"
    assert doc["meta"]["onnxruntime"] == "1.2.3" and doc["meta"]["unix_time"] == 123.0
    assert {"python", "cpu_count", "platform"} <= set(doc["meta"])
    assert set(doc["targets"]) == {"mtserve", "onnxruntime", "ray"}
    assert set(doc["ratios"]) == {"onnxruntime", "ray"}
    mt = doc["targets"]["mtserve"]
    assert mt["samples"][-1] == {"t": 4.0, "loads": 7, "evictions": 3}
    assert mt["summary"]["loads"] == 5 and mt["summary"]["evictions"] == 3
    assert mt["summary"]["rejections"] == {"-1": 1, "3": 1}
    assert len(mt["latency_sample_ms"]) == 40
    assert doc["targets"]["ray"]["latency_sample_ms"] == []
    assert doc["ratios"]["onnxruntime"]["deadline_attainment"] == pytest.approx(24 / 40)
    report.validate(doc)
    json.dumps(doc, allow_nan=False)


def _break(doc: dict, path: list, value: object) -> dict:
    d = copy.deepcopy(doc)
    node = d
    for k in path[:-1]:
        node = node[k]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return d


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (["schema"], "mtbench/0", "schema: expected 'mtbench/1'"),
        (["benchmark"], "", "benchmark: expected non-empty string"),
        (["config"], [], "config: expected object"),
        (["config", "rate"], float("nan"), "config.rate: expected number"),
        (["meta", "cpu_count"], "4", "meta.cpu_count: expected integer or null"),
        (
            ["targets", "mtserve", "summary", "latency_ms", "p50"],
            "fast",
            "targets.mtserve.summary.latency_ms.p50: expected number or null",
        ),
        (
            ["targets", "mtserve", "summary", "latency_ms", "p999"],
            KeyError,
            "targets.mtserve.summary.latency_ms.p999: missing",
        ),
        (["targets", "onnxruntime", "summary", "ok"], 10**6, "targets.onnxruntime.summary.ok"),
        (
            ["targets", "mtserve", "summary", "deadline_attainment"],
            1.5,
            "targets.mtserve.summary.deadline_attainment: expected fraction",
        ),
        (
            ["targets", "mtserve", "summary", "rejections", "-1"],
            True,
            "targets.mtserve.summary.rejections.-1: expected integer",
        ),
        (
            ["targets", "mtserve", "timeseries", "p99_ms"],
            [1.0],
            "targets.mtserve.timeseries.p99_ms: expected 4 items",
        ),
        (
            ["targets", "mtserve", "samples", 1, "loads"],
            2.5,
            "targets.mtserve.samples[1].loads: expected integer",
        ),
        (
            ["targets", "mtserve", "latency_sample_ms", 0],
            None,
            "targets.mtserve.latency_sample_ms[0]: expected number",
        ),
        (["targets", "ray"], KeyError, "ratios.ray: names no target"),
        (["ratios", "onnxruntime", "p99"], "x2", "ratios.onnxruntime.p99: expected number or null"),
    ],
)
def test_validate_rejects_with_path(path, value, message):
    doc = make_doc()
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        report.validate(_break(doc, path, value))


def test_validate_rejects_non_dict():
    with pytest.raises(ValueError, match=r"^\$: expected object"):
        report.validate([])  # type: ignore[arg-type]


def test_write_json_round_trip(tmp_path):
    doc = make_doc()
    out = report.write_json(doc, tmp_path / "sub" / "res.json")
    assert out == tmp_path / "sub" / "res.json"
    assert json.loads(out.read_text()) == doc
    assert report.read_json(out) == doc
    assert sorted(p.name for p in out.parent.iterdir()) == ["res.json"]  # no temp left
    bad = _break(doc, ["schema"], "nope")
    with pytest.raises(ValueError, match="schema"):
        report.write_json(bad, out)
    assert json.loads(out.read_text()) == doc  # old file untouched


# --------------------------------------------------------------------------- table, plots


def test_print_table_contents():
    doc = make_doc()
    buf = io.StringIO()
    report.print_table(doc, file=buf)
    text = buf.getvalue()
    for name in ("mtserve", "onnxruntime", "ray"):
        assert name in text
    mt = doc["targets"]["mtserve"]["summary"]
    assert f"{mt['latency_ms']['p50']:.2f}" in text
    assert f"{mt['throughput_rps']:.1f}" in text
    assert "-1:1,3:1" in text
    assert "mtserve vs onnxruntime" in text and "mtserve vs ray" in text
    assert f"x{doc['ratios']['onnxruntime']['p50']:.2f}" in text
    lines = text.splitlines()
    header = next(ln for ln in lines if ln.startswith("target"))
    table = lines[lines.index(header) + 2 :]
    rows = [
        ln for ln in table if ln.split() and ln.split()[0] in doc["targets"] and " vs " not in ln
    ]
    assert len(rows) == 3
    # Right-aligned columns: the p50 column ends at the same offset on every row.
    end = header.index("p50 ms") + len("p50 ms")
    for row in rows[:2]:
        assert row[end - 1] != " " and row[end] == " "


def test_plot_writes_three_pngs(tmp_path):
    doc = make_doc()
    paths = report.plot(doc, tmp_path / "plots", prefix="unit_")
    assert [p.name for p in paths] == [
        "unit_latency_cdf.png",
        "unit_over_time.png",
        "unit_loads.png",
    ]
    for p in paths:
        data = p.read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_MAGIC)


def test_plot_without_samples_or_ok_answers(tmp_path):
    recs = [RequestRecord(0.1, None, -1, "m"), RequestRecord(0.2, 1.0, 5, "m")]
    doc = report.build_results(
        "empty",
        {},
        {"mtserve": report.target_result(recs, 1.0), "ort": report.target_result([], 1.0)},
    )
    paths = report.plot(doc, tmp_path)
    assert len(paths) == 3
    for p in paths:
        assert p.read_bytes().startswith(PNG_MAGIC)
    report.print_table(doc, file=io.StringIO())
