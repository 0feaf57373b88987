"""mtbench's drivers, targets and CLI: behaviour, not timings (this machine is shared and noisy).

Open loop must send every planned request once and record it once, in plan order, with
latencies counted from the scheduled time; the drain bound must turn silence into
timeouts; mtserve's rejections must keep their status codes; the CLI must leave a
valid results document and its plots behind.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from bench import cli, report, zoo
from bench.report import TIMEOUT_STATUS, ServerSample
from bench.runner import (
    OpenLoopStats,
    pipelined_throughput,
    run_closed_loop,
    run_open_loop,
)
from bench.targets import InProcessTarget, MtserveTarget, ZmqTarget, memory_mb_for
from bench.workload import Arrival, TenantMix, open_loop

PNGS = {"latency_cdf.png", "over_time.png", "loads.png"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny_add models with different weights."""
    root = tmp_path_factory.mktemp("zoo")
    return {f"tiny{s}": zoo.save("tiny_add", root / str(s), seed=s) for s in (0, 1)}


@pytest.fixture
def inprocess(tiny: dict[str, Path]):
    target = InProcessTarget(threads=1)
    target.start(tiny)
    try:
        yield target
    finally:
        target.stop()


def tiny_inputs(names) -> dict:
    return dict.fromkeys(names, zoo.sample_inputs("tiny_add"))


class Silent:
    """A target that never answers: the drain bound must end the run."""

    name = "silent"
    address = None

    async def infer(self, model, inputs, deadline_ms, tenant="bench"):
        await asyncio.sleep(3600)

    def sample(self, t: float = 0.0) -> ServerSample | None:
        return ServerSample(t, 0, 0)


# ---------------------------------------------------------------------------- open loop


def test_open_loop_in_process_fixed_rate(inprocess: InProcessTarget) -> None:
    mix = TenantMix("bench", 40.0, ["tiny0", "tiny1"], process="fixed")
    arrivals = open_loop([mix], 1.0, seed=1)
    stats = OpenLoopStats()
    began = time.perf_counter()
    records, samples, duration = asyncio.run(
        run_open_loop(inprocess, arrivals, tiny_inputs(mix.models), duration=1.0, stats=stats)
    )
    assert time.perf_counter() - began < 20
    assert duration == 1.0
    assert len(records) == len(arrivals) == 40
    assert [(r.t_send, r.model) for r in records] == [(a.t, a.model) for a in arrivals]
    assert all(r.status == 0 and r.latency_ms is not None and r.latency_ms > 0 for r in records)
    assert samples == []  # in-process has no counters
    late = stats.summary()
    assert len(stats.late_ms) == 40
    assert 0 <= late["mean"] < 100 and late["max"] < 1000  # sane, not tight
    doc = report.build_results("t", {}, {"inprocess": report.target_result(records, duration)})
    assert doc["targets"]["inprocess"]["summary"]["ok"] == 40


def test_open_loop_drain_turns_silence_into_timeouts() -> None:
    arrivals = [Arrival(0.01 * i, "bench", "m", 5.0) for i in range(5)]
    began = time.perf_counter()
    records, samples, _ = asyncio.run(
        run_open_loop(Silent(), arrivals, {"m": {}}, duration=0.1, drain_s=0.2, progress=False)
    )
    assert time.perf_counter() - began < 5
    assert [r.status for r in records] == [TIMEOUT_STATUS] * 5
    assert all(r.latency_ms is None for r in records)
    assert samples  # sampled at least at start and end


def test_open_loop_mtserve_deadlines_and_samples(tiny: dict[str, Path]) -> None:
    size = max(p.stat().st_size for p in tiny.values())
    target = MtserveTarget(workers=1, memory_mb=memory_mb_for(1, size), threads=1)
    target.start(tiny, tenants=["a", "b"])
    try:
        mixes = [
            TenantMix("a", 30.0, ["tiny0", "tiny1"], deadline_ms=2000.0),
            TenantMix("b", 30.0, ["tiny1", "tiny0"], deadline_ms=2000.0),
        ]
        arrivals = open_loop(mixes, 1.0, seed=2)
        # A deadline nobody can meet must come back as a deadline status, not a timeout.
        arrivals.append(Arrival(1.0, "a", "tiny0", 0.001))
        records, samples, duration = asyncio.run(
            run_open_loop(target, arrivals, tiny_inputs(tiny), duration=1.1, progress=False)
        )
    finally:
        target.stop()
    assert len(records) == len(arrivals)
    assert {r.tenant for r in records} == {"a", "b"}
    assert sum(r.status == 0 for r in records) >= len(records) - 3
    assert records[-1].status in (50, 51)
    assert samples and samples[-1].loads >= 1
    doc = report.build_results(
        "t", {}, {"mtserve": report.target_result(records, duration, samples)}
    )
    report.validate(doc)
    assert doc["targets"]["mtserve"]["summary"]["deadline_attainment"] is not None


# ---------------------------------------------------------------------------- closed loop, pipeline


def test_closed_loop_counts(inprocess: InProcessTarget) -> None:
    records, _, elapsed = asyncio.run(
        run_closed_loop(
            inprocess, ["tiny0", "tiny1"], tiny_inputs(["tiny0", "tiny1"]),
            clients=4, duration=30.0, max_requests=120, zipf_s=1.0, progress=False,
        )
    )  # fmt: skip
    assert len(records) == 120 and elapsed < 30
    assert all(r.ok for r in records)
    assert {r.model for r in records} == {"tiny0", "tiny1"}
    records, _, elapsed = asyncio.run(
        run_closed_loop(
            inprocess, ["tiny0"], tiny_inputs(["tiny0"]),
            clients=2, duration=0.3, max_requests=10**9, progress=False,
        )
    )  # fmt: skip
    assert len(records) > 0 and 0.3 <= elapsed < 5  # the duration stopped it, not the cap


def test_pipelined_throughput_against_bare_server(tiny: dict[str, Path]) -> None:
    target = ZmqTarget(threads=1)
    target.start(tiny)
    try:
        run = pipelined_throughput(
            target.address, "tiny0", zoo.sample_inputs("tiny_add"), n=500, window=32
        )
        one = pipelined_throughput(
            target.address, "tiny1", zoo.sample_inputs("tiny_add"), n=20, window=1
        )
    finally:
        target.stop()
    assert run["answered"] == run["ok"] == 500 and run["statuses"] == {"0": 500}
    assert len(run["records"]) == 500 and run["rps"] > 0
    assert one["ok"] == 20


# ---------------------------------------------------------------------------- CLI


def test_cli_run_quick_writes_json_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "run"
    rc = cli.main(
        ["run", "--quick", "--target", "inprocess", "--model-kind", "tiny_add", "--models", "2",
         "--tenants", "2", "--process", "gamma", "--cv", "2", "--deadline-ms", "50",
         "--no-progress", "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    assert {p.name for p in out.iterdir()} == {"run.json", *PNGS}
    doc = report.read_json(out / "run.json")
    summary = doc["targets"]["inprocess"]["summary"]
    assert summary["requests"] > 0 and summary["ok"] == summary["requests"]
    assert doc["config"]["tenants"] == ["tenant0", "tenant1"]
    assert doc["config"]["source"] == "gamma"


def test_cli_run_closed_loop_and_trace(tmp_path: Path) -> None:
    from bench.workload import write_trace

    trace = tmp_path / "trace.csv"
    write_trace(trace, [Arrival(0.05 * i, "t", f"m{i % 2}", None) for i in range(10)])
    assert cli.main(
        ["run", "--target", "inprocess", "--model-kind", "tiny_add", "--trace", str(trace),
         "--no-progress", "--out", str(tmp_path / "trace")]
    ) == 0  # fmt: skip
    doc = json.loads((tmp_path / "trace" / "run.json").read_text())
    assert doc["targets"]["inprocess"]["summary"]["ok"] == 10
    assert sorted(doc["config"]["models"]) == ["m0", "m1"]
    assert cli.main(
        ["run", "--quick", "--target", "inprocess", "--model-kind", "tiny_add", "--closed", "3",
         "--no-progress", "--out", str(tmp_path / "closed")]
    ) == 0  # fmt: skip
    doc = json.loads((tmp_path / "closed" / "run.json").read_text())
    assert doc["config"]["loop"] == "closed"
    assert doc["targets"]["inprocess"]["summary"]["requests"] == 200


def test_compare_tiny_latency_quick(tmp_path: Path) -> None:
    assert cli.main(["compare", "tiny-latency", "--quick", "--out", str(tmp_path)]) == 0
    doc = report.read_json(tmp_path / "tiny-latency.json")
    assert set(doc["targets"]) == {"mtserve", "mtserve-spin", "zmq", "inprocess"}
    assert set(doc["ratios"]) == {"mtserve-spin", "zmq", "inprocess"}
    assert doc["ratios"]["zmq"]["p50"] is not None
    assert doc["config"]["goal"]["metric"] == "p50 mtserve / zmq"
    assert doc["config"]["goal_spin"]["metric"] == "p50 mtserve --spin-us 1000 / zmq"
    assert doc["config"]["goal_spin"]["value"] is not None
    assert {f"tiny-latency_{p}" for p in PNGS} <= {p.name for p in tmp_path.iterdir()}


def test_memory_budget_holds_exactly_m_models() -> None:
    size = 14_179_237  # mobilenetv2
    mb = memory_mb_for(8, size)
    assert 8 * size <= mb * (1 << 20) < 9 * size


def test_hops_floor_measures_both_shapes_in_one_run() -> None:
    from bench import bench_hops

    row = bench_hops.measure(requests=50, rounds=2)
    assert len(row["rounds_direct_us"]) == len(row["rounds_relayed_us"]) == 2
    assert row["direct_p50_us"] > 0 and row["relayed_p50_us"] > 0
    # the p50s are rounded to 0.1 us and the ratio (from unrounded ones) to 0.01
    assert row["ratio"] == pytest.approx(row["relayed_p50_us"] / row["direct_p50_us"], abs=0.01)
