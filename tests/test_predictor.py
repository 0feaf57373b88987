"""The latency predictor: windows, percentiles, batch sizes, loads, drift, scoring."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtcore.predictor import Predictor, Window, percentile


def test_percentile_is_nearest_rank_and_always_a_sample() -> None:
    assert percentile([3.0, 1.0, 2.0], 99) == 3.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([5.0], 1) == 5.0
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 99) == 99.0 and percentile(values, 100) == 100.0


@given(st.lists(st.floats(0.001, 1e7), min_size=1, max_size=50), st.floats(0.1, 100))
def test_percentile_lies_within_the_samples(values: list[float], q: float) -> None:
    p = percentile(values, q)
    assert p in values and min(values) <= p <= max(values)


def test_the_window_keeps_the_last_samples_and_predicts_their_high_percentile() -> None:
    p = Predictor(window=10)
    p.seed_exec("m", "cpu", {1: [100.0] * 20})
    assert p.exec_us("m", "cpu", 1) == 100.0
    for us in (101.0, 102.0, 130.0, 99.0):
        p.observe_exec("m", "cpu", 1, us)
    assert p.exec_us("m", "cpu", 1) == 130.0  # p99 of 10 is their maximum
    assert len(p.exec_windows[("m", "cpu", 1)].samples) == 10


def test_unknown_batch_sizes_use_the_next_larger_or_scale_the_largest() -> None:
    p = Predictor()
    p.seed_exec("m", "cpu", {1: [10.0], 4: [30.0], 8: [50.0]})
    assert p.exec_us("m", "cpu", 2) == 30.0  # the smallest profiled batch holding 2 rows
    assert p.exec_us("m", "cpu", 16) == 100.0  # beyond the largest: linear
    assert p.exec_us("m", "gpu", 1) is None  # kinds are separate
    assert p.exec_us("other", "cpu", 1) is None


def test_a_sustained_change_is_a_drift_and_the_old_samples_go() -> None:
    p = Predictor(window=10, drift_ratio=1.5, drift_samples=3)
    p.seed_exec("m", "cpu", {1: [100.0] * 10})
    assert not p.observe_exec("m", "cpu", 1, 300.0)  # one slow run is noise
    assert not p.observe_exec("m", "cpu", 1, 310.0)
    assert p.observe_exec("m", "cpu", 1, 305.0)  # three in a row: drift
    assert p.exec_us("m", "cpu", 1) == 310.0
    assert list(p.exec_windows[("m", "cpu", 1)].samples) == [300.0, 310.0, 305.0]


def test_a_speed_up_is_followed_at_once_too() -> None:
    p = Predictor(window=10)
    p.seed_exec("m", "cpu", {1: [100.0] * 10})
    drifted = [p.observe_exec("m", "cpu", 1, 40.0) for _ in range(3)]
    assert drifted == [False, False, True]
    assert p.exec_us("m", "cpu", 1) == 40.0  # without drift it would stay 100 for 7 more


def test_noise_inside_the_band_is_not_a_drift() -> None:
    w = Window(10)
    flags = [w.add(v, 1.5, 3) for v in (100, 120, 90, 110, 130, 95, 140, 105, 100, 125)]
    assert not any(flags) and len(w.samples) == 10


def test_loads_predict_per_model_then_from_bandwidth() -> None:
    p = Predictor()
    assert p.load_us("a", "cpu", "host", 1_000_000) is None
    p.observe_load("a", "cpu", "host", 1_000_000, 1000.0)  # 1000 bytes/us
    p.observe_load("b", "cpu", "host", 1_000_000, 2000.0)  # 500 bytes/us: the slowest
    assert p.load_us("a", "cpu", "host", 1_000_000) == 1000.0  # its own window
    assert p.load_us("c", "cpu", "host", 4_000_000) == 8000.0  # bytes / slowest rate
    assert p.load_us("c", "cpu", "cold", 4_000_000) is None  # tiers are separate


def test_the_score_counts_measurements_within_their_prediction() -> None:
    p = Predictor()
    p.observe_exec("m", "cpu", 1, 100.0)  # nothing predicted yet: not scored
    assert p.within_share is None
    p.observe_exec("m", "cpu", 1, 90.0)  # predicted 100: within
    p.observe_exec("m", "cpu", 1, 120.0)  # predicted 100: over
    assert (p.predicted, p.within) == (2, 1) and p.within_share == pytest.approx(0.5)


def test_forget_drops_a_model() -> None:
    p = Predictor()
    p.seed_exec("m", "cpu", {1: [1.0]})
    p.observe_load("m", "cpu", "host", 10, 1.0)
    p.forget("m")
    assert p.exec_us("m", "cpu", 1) is None and p.load_us("m", "cpu", "host", 10) == 1.0


def test_the_generation_moves_only_when_an_estimate_may_have() -> None:
    p = Predictor(window=4, min_samples=2)
    p.seed_exec("m", "cpu", {1: [100.0, 100.0, 120.0, 100.0]})
    seen = p.exec_generation("m")
    p.observe_exec("m", "cpu", 1, 110.0)  # below the window's maximum: the same estimate
    assert p.exec_generation("m") == seen and p.exec_us("m", "cpu", 1) == 120.0
    p.observe_exec("m", "cpu", 1, 150.0)  # a new maximum
    assert p.exec_generation("m") != seen and p.exec_us("m", "cpu", 1) == 150.0
    seen = p.exec_generation("m")
    p.observe_exec("m", "cpu", 4, 300.0)  # a first sample of a new batch size
    assert p.exec_generation("m") != seen and p.exec_generation("other") == 0


def test_the_bandwidth_generation_moves_when_the_slowest_rate_does() -> None:
    p = Predictor(window=4)
    p.observe_load("a", "cpu", "host", 1000, 10.0)  # 100 B/us
    first = p.bandwidth_generation
    p.observe_load("b", "cpu", "host", 2000, 10.0)  # faster: the slowest is unchanged
    assert p.bandwidth_generation == first
    p.observe_load("c", "cpu", "host", 500, 10.0)  # slower: models without a window move
    assert p.bandwidth_generation != first
    assert p.load_us("d", "cpu", "host", 500) == 10.0
