"""Workload planning: arrival processes, Zipf popularity, open-loop mixes, trace files.

Statistical checks use sample sizes and tolerances of several standard deviations, with
fixed seeds, so they test behaviour and never flake; nothing here measures wall time.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from bench.workload import (
    Arrival,
    TenantMix,
    azure_like_trace,
    fixed_times,
    gamma_times,
    open_loop,
    poisson_times,
    read_trace,
    trace_stats,
    write_trace,
    zipf_weights,
)


def cv_of(x: np.ndarray) -> float:
    return float(np.std(x) / np.mean(x))


# ------------------------------------------------------------------ arrival processes


def test_fixed_times_exact_spacing() -> None:
    t = fixed_times(4.0, 10.0)
    assert t.size == 40
    assert t[0] == 0.0
    assert np.array_equal(t, np.arange(40) / 4.0)
    assert t[-1] < 10.0


def test_fixed_times_non_integer_count() -> None:
    t = fixed_times(3.0, 1.0)  # 0, 1/3, 2/3; 1.0 is not < duration
    assert np.array_equal(t, np.arange(3) / 3.0)
    t = fixed_times(3.0, 1.1)
    assert t.size == 4
    assert np.allclose(np.diff(t), 1 / 3.0, rtol=0, atol=1e-12)


def test_poisson_count_gaps_and_range() -> None:
    rate, duration = 1000.0, 100.0
    t = poisson_times(rate, duration, np.random.default_rng(1))
    mu = rate * duration
    assert abs(t.size - mu) < 4 * math.sqrt(mu)
    assert np.all(np.diff(t) >= 0)
    assert t[0] >= 0 and t[-1] < duration
    gaps = np.diff(t)
    assert abs(cv_of(gaps) - 1.0) < 0.1
    # Exponential mean 1/rate; standard error is (1/rate)/sqrt(n) ~ 0.3%.
    assert abs(gaps.mean() * rate - 1.0) < 0.02
    # Memorylessness: the median of an exponential is ln 2 times its mean.
    assert abs(np.median(gaps) * rate - math.log(2)) < 0.02


@pytest.mark.parametrize("cv", [0.5, 1.0, 3.0])
def test_gamma_rate_and_cv(cv: float) -> None:
    rate, duration = 500.0, 400.0  # ~200k gaps
    t = gamma_times(rate, cv, duration, np.random.default_rng(7))
    assert abs(t.size / duration / rate - 1.0) < 0.05
    gaps = np.diff(t)
    assert abs(cv_of(gaps) / cv - 1.0) < 0.10
    assert np.all(gaps >= 0) and t[-1] < duration


def test_processes_deterministic_under_seed() -> None:
    a = gamma_times(50.0, 2.0, 20.0, np.random.default_rng(3))
    b = gamma_times(50.0, 2.0, 20.0, np.random.default_rng(3))
    c = gamma_times(50.0, 2.0, 20.0, np.random.default_rng(4))
    assert np.array_equal(a, b)
    assert not np.array_equal(a[: min(a.size, c.size)], c[: min(a.size, c.size)])


def test_low_rate_can_give_no_arrivals() -> None:
    t = poisson_times(1e-6, 1.0, np.random.default_rng(0))
    assert t.size == 0


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: fixed_times(0, 1), "rate"),
        (lambda: fixed_times(-1, 1), "rate"),
        (lambda: fixed_times(1, 0), "duration"),
        (lambda: fixed_times(float("nan"), 1), "rate"),
        (lambda: poisson_times(1, float("inf"), np.random.default_rng()), "duration"),
        (lambda: gamma_times(1, 0, 1, np.random.default_rng()), "cv"),
        (lambda: gamma_times(1, -2, 1, np.random.default_rng()), "cv"),
        (lambda: zipf_weights(0, 1.0), "n must be an integer >= 1"),
        (lambda: zipf_weights(3, -1.0), "Zipf exponent"),
    ],
)
def test_argument_errors(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_rng_must_be_generator() -> None:
    with pytest.raises(TypeError, match="default_rng"):
        poisson_times(1.0, 1.0, 42)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- Zipf


@pytest.mark.parametrize("s", [0.0, 0.5, 1.0, 2.0])
def test_zipf_weights(s: float) -> None:
    w = zipf_weights(20, s)
    assert w.shape == (20,)
    assert math.isclose(w.sum(), 1.0, rel_tol=1e-12)
    assert np.all(np.diff(w) <= 0)
    assert math.isclose(w[0] / w[1], 2.0**s, rel_tol=1e-12)
    assert math.isclose(w[0] / w[9], 10.0**s, rel_tol=1e-12)


def test_zipf_single_model() -> None:
    assert np.array_equal(zipf_weights(1, 1.3), np.array([1.0]))


# ------------------------------------------------------------------------ open loop


def _two_tenants() -> list[TenantMix]:
    return [
        TenantMix("alice", 200.0, [f"a{i}" for i in range(10)], zipf_s=1.0, deadline_ms=50.0),
        TenantMix("bob", 50.0, ["b0", "b1"], zipf_s=0.0, process="gamma", cv=2.0),
    ]


def test_open_loop_sorted_and_per_tenant_rates() -> None:
    duration = 100.0
    arr = open_loop(_two_tenants(), duration, seed=5)
    ts = [a.t for a in arr]
    assert ts == sorted(ts)
    assert ts[0] >= 0 and ts[-1] < duration
    alice = [a for a in arr if a.tenant == "alice"]
    bob = [a for a in arr if a.tenant == "bob"]
    assert len(alice) + len(bob) == len(arr)
    assert abs(len(alice) - 20000) < 4 * math.sqrt(20000)
    # gamma with cv=2: count variance ~ cv^2 * mean.
    assert abs(len(bob) - 5000) < 4 * 2 * math.sqrt(5000)
    assert all(a.deadline_ms == 50.0 and a.model.startswith("a") for a in alice)
    assert all(a.deadline_ms is None and a.model in ("b0", "b1") for a in bob)
    assert all(isinstance(a.t, float) for a in arr[:10])


@pytest.mark.parametrize(
    ("kwargs", "weights"),
    [
        ({"zipf_s": 1.0}, zipf_weights(10, 1.0)),
        ({"shares": list(range(10, 0, -1))}, np.arange(10, 0, -1) / 55),
    ],
)
def test_open_loop_model_shares_follow_weights(kwargs: dict, weights: np.ndarray) -> None:
    models = [f"m{i}" for i in range(10)]
    arr = open_loop([TenantMix("t", 1000.0, models, **kwargs)], 50.0, seed=11)
    counts = np.array([sum(1 for a in arr if a.model == m) for m in models], dtype=float)
    expected = weights * counts.sum()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 27.88  # 99.9th percentile of chi-square with 9 degrees of freedom
    for i in range(3):
        assert abs(counts[i] / expected[i] - 1.0) < 0.05
    assert counts[0] > counts[1] > counts[2]


def test_open_loop_fixed_process_and_uniform_models() -> None:
    arr = open_loop([TenantMix("f", 10.0, ["x", "y"], zipf_s=0.0, process="fixed")], 3.0, 0)
    assert [a.t for a in arr] == pytest.approx([k / 10 for k in range(30)], abs=1e-12)


def test_open_loop_deterministic_and_seed_sensitive() -> None:
    a = open_loop(_two_tenants(), 10.0, seed=1)
    b = open_loop(_two_tenants(), 10.0, seed=1)
    c = open_loop(_two_tenants(), 10.0, seed=2)
    assert a == b
    assert a != c


def test_open_loop_tenant_stream_independent_of_other_tenants() -> None:
    mixes = _two_tenants()
    alone = open_loop([mixes[1]], 10.0, seed=3)
    together = [x for x in open_loop(list(reversed(mixes)), 10.0, seed=3) if x.tenant == "bob"]
    assert alone == together


def test_open_loop_ties_keep_mix_order() -> None:
    mixes = [
        TenantMix("p", 1.0, ["m"], process="fixed"),
        TenantMix("q", 1.0, ["m"], process="fixed"),
    ]
    arr = open_loop(mixes, 2.0, seed=0)
    assert [(a.t, a.tenant) for a in arr] == [(0.0, "p"), (0.0, "q"), (1.0, "p"), (1.0, "q")]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rate": 0.0}, "rate"),
        ({"models": []}, "models is empty"),
        ({"models": "resnet18"}, "list of names"),
        ({"models": ["a", "a"]}, "more than once"),
        ({"process": "uniform"}, "unknown process 'uniform'"),
        ({"cv": 0.0}, "cv"),
        ({"zipf_s": -1.0}, "zipf_s"),
        ({"deadline_ms": -5.0}, "deadline_ms"),
        ({"name": ""}, "name"),
        ({"shares": [1.0, 2.0]}, "2 shares for 1 models"),
        ({"shares": [0.0]}, "each share"),
    ],
)
def test_tenant_mix_validation(kwargs: dict, match: str) -> None:
    args = {"name": "t", "rate": 1.0, "models": ["m"]} | kwargs
    with pytest.raises(ValueError, match=match):
        TenantMix(**args)


def test_open_loop_argument_errors() -> None:
    mix = TenantMix("t", 1.0, ["m"])
    with pytest.raises(ValueError, match="duration"):
        open_loop([mix], 0.0, seed=0)
    with pytest.raises(ValueError, match="seed"):
        open_loop([mix], 1.0, seed=-1)
    with pytest.raises(ValueError, match="empty"):
        open_loop([], 1.0, seed=0)
    with pytest.raises(ValueError, match="unique"):
        open_loop([mix, TenantMix("t", 2.0, ["n"])], 1.0, seed=0)
    mix.process = "bursty"  # mutated after construction: caught when planning
    with pytest.raises(ValueError, match="unknown process"):
        open_loop([mix], 1.0, seed=0)


# ---------------------------------------------------------------- Azure-like trace


@pytest.fixture(scope="module")
def azure() -> list[Arrival]:
    return azure_like_trace(100, 600.0, 50.0, seed=2019)


def test_azure_mean_rate_and_metadata(azure: list[Arrival]) -> None:
    s = trace_stats(azure, duration=600.0)
    assert abs(s["mean_rate"] / 50.0 - 1.0) < 0.10
    assert all(a.tenant == "trace" and a.deadline_ms is None for a in azure)
    assert [a.t for a in azure] == sorted(a.t for a in azure)
    assert azure[-1].t < 600.0
    assert set(s["per_model"]) <= {f"model{i:03d}" for i in range(100)}


def test_azure_heavy_tail(azure: list[Arrival]) -> None:
    s = trace_stats(azure, duration=600.0)
    counts = sorted(s["per_model"].values(), reverse=True)
    assert sum(counts[:10]) / s["n"] > 0.5
    assert s["top_decile_share"] == pytest.approx(sum(counts[:10]) / s["n"])
    # Models come out in rank order: model000 is the most popular.
    assert next(iter(s["per_model"])) == "model000"


def test_azure_minute_variation(azure: list[Arrival]) -> None:
    per_minute = np.array(trace_stats(azure, duration=600.0)["per_minute"])
    assert per_minute.size == 10
    assert cv_of(per_minute) > 0.08
    # Without the minute factors only counting noise is left: the variation is what we added.
    flat = azure_like_trace(100, 600.0, 50.0, 2019, minute_sigma=0.0, global_sigma=0.0)
    assert cv_of(np.array(trace_stats(flat, duration=600.0)["per_minute"])) < 0.06


def test_azure_bursty(azure: list[Arrival]) -> None:
    assert trace_stats(azure)["interarrival_cv"] > 1.2
    smooth = azure_like_trace(
        100, 600.0, 50.0, 2019, burstiness=1.0, minute_sigma=0.0, global_sigma=0.0
    )
    assert abs(trace_stats(smooth)["interarrival_cv"] - 1.0) < 0.05


def test_azure_deterministic_and_options() -> None:
    a = azure_like_trace(20, 120.0, 20.0, seed=9, tenant="az", deadline_ms=100.0)
    b = azure_like_trace(20, 120.0, 20.0, seed=9, tenant="az", deadline_ms=100.0)
    c = azure_like_trace(20, 120.0, 20.0, seed=10, tenant="az", deadline_ms=100.0)
    assert a == b
    assert a != c
    assert all(x.tenant == "az" and x.deadline_ms == 100.0 for x in a)
    names = [f"net{i}" for i in range(3)]
    d = azure_like_trace(3, 90.0, 5.0, seed=1, models=names)
    assert {x.model for x in d} <= set(names)
    assert trace_stats(d, duration=90.0)["per_minute"][1] > 0  # the partial minute has load


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_models": 0}, "n_models"),
        ({"duration": -1.0}, "duration"),
        ({"mean_rate": 0.0}, "mean_rate"),
        ({"burstiness": 0.0}, "burstiness"),
        ({"minute_rho": 1.0}, "minute_rho"),
        ({"models": ["a", "b"]}, "2 names but n_models is 3"),
        ({"seed": -3}, "seed"),
    ],
)
def test_azure_argument_errors(kwargs: dict, match: str) -> None:
    args = {"n_models": 3, "duration": 60.0, "mean_rate": 10.0, "seed": 0} | kwargs
    with pytest.raises(ValueError, match=match):
        azure_like_trace(**args)


# ----------------------------------------------------------------------- trace files


def test_trace_round_trip(tmp_path: Path) -> None:
    arr = open_loop(_two_tenants(), 5.0, seed=4)
    path = tmp_path / "trace.csv"
    write_trace(path, arr)
    lines = path.read_text().splitlines()
    assert lines[0] == "t,tenant,model,deadline_ms"
    assert lines[1].split(",")[0] == f"{arr[0].t:.6f}"
    back = read_trace(path)
    assert len(back) == len(arr)
    for x, y in zip(arr, back, strict=True):
        assert abs(x.t - y.t) <= 1e-6
        assert (x.tenant, x.model) == (y.tenant, y.model)
        assert x.deadline_ms == y.deadline_ms  # 50.0 and None survive exactly
    assert any(y.deadline_ms is None for y in back)


def test_trace_round_trip_empty_and_quoted(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    write_trace(path, [])
    assert read_trace(path) == []
    odd = [Arrival(1.5, "acme, inc", 'model "x"', 12.345678)]
    write_trace(path, odd)
    assert read_trace(path) == odd


def test_read_trace_sorts_and_accepts_column_order(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("model,t,deadline_ms,tenant\nm,2.0,,a\nm,1.0,5,b\n\n")
    assert read_trace(path) == [Arrival(1.0, "b", "m", 5.0), Arrival(2.0, "a", "m", None)]


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ("", "line 1: empty file"),
        ("t,tenant,model\n0,a,m\n", "line 1: header"),
        ("t,tenant,model,deadline_ms,extra\n", "line 1: header"),
        ("t,tenant,model,deadline_ms\n0,a,m,\nx,a,m,\n", "line 3: t is not a number"),
        ("t,tenant,model,deadline_ms\n0,a,m,\n1,a,m,\n-1,a,m,\n", "line 4: t must be"),
        ("t,tenant,model,deadline_ms\nnan,a,m,\n", "line 2: t must be"),
        ("t,tenant,model,deadline_ms\n0,a,m\n", "line 2: expected 4 fields"),
        ("t,tenant,model,deadline_ms\n0,,m,\n", "line 2: tenant is empty"),
        ("t,tenant,model,deadline_ms\n0,a,,\n", "line 2: model is empty"),
        ("t,tenant,model,deadline_ms\n0,a,m,soon\n", "line 2: deadline_ms is not a number"),
        ("t,tenant,model,deadline_ms\n0,a,m,0\n", "line 2: deadline_ms must be"),
        ("t,tenant,model,deadline_ms\n\n0,a,m,1\n0,a,m,-1\n", "line 4: deadline_ms must be"),
    ],
)
def test_read_trace_errors_name_the_line(tmp_path: Path, body: str, match: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(body)
    with pytest.raises(ValueError, match=match) as exc:
        read_trace(path)
    assert str(path) in str(exc.value)


# ---------------------------------------------------------------------------- stats


def test_trace_stats_fields() -> None:
    arr = [
        Arrival(0.0, "a", "x", None),
        Arrival(10.0, "a", "x", None),
        Arrival(30.0, "b", "y", 5.0),
        Arrival(70.0, "a", "x", None),
        Arrival(90.0, "b", "z", None),
    ]
    s = trace_stats(arr)
    assert s["n"] == 5
    assert s["duration"] == 90.0
    assert s["mean_rate"] == pytest.approx(5 / 90)
    assert s["per_model"] == {"x": 3, "y": 1, "z": 1}
    assert list(s["per_model"]) == ["x", "y", "z"]
    assert s["per_tenant"] == {"a": 3, "b": 2}
    assert s["per_minute"] == pytest.approx([3 / 60, 2 / 30])
    gaps = np.array([10.0, 20.0, 40.0, 20.0])
    assert s["interarrival_cv"] == pytest.approx(gaps.std() / gaps.mean())
    assert s["top_model_share"] == pytest.approx(0.6)
    assert s["top_decile_share"] == pytest.approx(0.6)
    s120 = trace_stats(arr, duration=120.0)
    assert s120["mean_rate"] == pytest.approx(5 / 120)
    assert s120["per_minute"] == pytest.approx([3 / 60, 2 / 60])


def test_trace_stats_edge_cases() -> None:
    empty = trace_stats([])
    assert empty["n"] == 0 and empty["mean_rate"] == 0.0 and empty["per_model"] == {}
    assert math.isnan(empty["interarrival_cv"])
    fixed = open_loop([TenantMix("f", 5.0, ["m"], process="fixed")], 10.0, seed=0)
    assert trace_stats(fixed, duration=10.0)["interarrival_cv"] == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="shorter than the last arrival"):
        trace_stats(fixed, duration=5.0)
