"""The worker's memory tiers and the loader's tasks, without sockets.

Host tier: weights in pool pages, exact accounting, nothing left behind on failure.
Device tier: sessions over those pages (no copy), budget and LRU eviction, never
releasing a session that is running. Loader: every LOAD outcome has its stage status.
"""

from __future__ import annotations

import gc
import itertools
from pathlib import Path

import numpy as np
import pytest

from bench import zoo
from ext import PagePool
from mtcore.actions import ActionStatus, LoadModel, ProfileModel, UnloadModel
from mtcore.errors import LoadFailed, ModelInvalid, PoolExhausted
from tests.conftest import FP32_TOLERANCE
from worker.executor import Job
from worker.loader import NEED_BYTES, Loader
from worker.onnx_backend import build_session, make_session
from worker.tiers import ALIGN, DeviceTier, HostTier, Runnable, pack, resident_bytes
from worker.watchdog import Watchdog

MIB = 1 << 20


@pytest.fixture
def host(tmp_path: Path):
    tier = HostTier(PagePool(256 * MIB, MIB), tmp_path / "tiers")
    yield tier
    tier.close()
    assert tier.pool.live_allocations == 0
    tier.pool.close()


def sha(name: str) -> str:
    return f"{name:0<64}"[:64]


# -- packing ------------------------------------------------------------------------


def test_pack_places_small_tensors_without_overlap_and_large_ones_apart() -> None:
    page = 4096
    sizes = [100, 3000, 5000, 64, 1, 4096, 2000, 9000, 0]
    placement, pages, large = pack(sizes, page)
    assert sorted(large) == [2, 7]  # bigger than a page: contiguous runs
    spans: dict[int, list[tuple[int, int]]] = {}
    for i, (p, offset) in enumerate(placement):
        if i in large:
            assert p == -1
            continue
        assert 0 <= p < pages and offset % ALIGN == 0
        end = offset + max(sizes[i], 1)
        assert end <= page
        spans.setdefault(p, []).append((offset, end))
    for intervals in spans.values():
        intervals.sort()
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(intervals))


# -- host tier ----------------------------------------------------------------------


def test_prepare_moves_weights_into_pages_and_drop_returns_them(host: HostTier) -> None:
    model = host.prepare(sha("r18"), zoo.model_bytes("resnet18"))
    assert model.weight_bytes > 40 * MIB  # ResNet-18's 11.7 M parameters, float32
    assert host.pool.bytes_requested >= model.weight_bytes
    assert (model.graph_path.parent / "weights.bin").stat().st_size == 0
    assert model.graph_path.stat().st_size < 1 * MIB  # the graph without its weights
    assert host.get(sha("r18")) is model and host.prepared == 1
    assert host.prepare(sha("r18"), b"unused: already prepared") is model
    assert host.drop(sha("r18"))
    assert host.pool.live_allocations == 0 and host.pool.bytes_requested == 0
    assert not model.graph_path.parent.exists()


def test_a_session_reads_the_pool_pages_themselves(host: HostTier) -> None:
    model = host.prepare(sha("mlp"), zoo.model_bytes("mlp"))
    live = build_session(model, 1)
    x = zoo.sample_inputs("mlp", 2)
    want = make_session(zoo.model_bytes("mlp"), 1).run(None, x)[0]
    got = live.session.run(None, x)[0]
    np.testing.assert_allclose(got, want, **FP32_TOLERANCE)
    for allocation in model.allocations:  # zero the pages: a copy would not notice
        for i in range(len(allocation.pages)):
            np.frombuffer(allocation.page(i), np.uint8)[:] = 0
    assert not np.allclose(live.session.run(None, x)[0], got)


def test_a_corrupt_model_leaves_no_pages_and_no_files(host: HostTier) -> None:
    with pytest.raises(ModelInvalid):
        host.prepare(sha("bad"), b"\x08\x07not an onnx model")
    assert host.pool.live_allocations == 0
    assert not (host.workdir / sha("bad")).exists()
    assert sha("bad") not in host.models


def test_a_full_pool_evicts_idle_models_but_never_ones_with_sessions(tmp_path: Path) -> None:
    tier = HostTier(PagePool(60 * MIB, MIB), tmp_path / "t")
    try:
        first = tier.prepare(sha("a"), zoo.model_bytes("resnet18", seed=1))
        first.sessions = 1  # a runnable copy is built on it
        held = tier.pool.bytes_requested
        assert held >= first.weight_bytes
        with pytest.raises(PoolExhausted):
            tier.prepare(sha("b"), zoo.model_bytes("resnet18", seed=2))
        assert tier.pool.bytes_requested == held  # unchanged by the failure
        first.sessions = 0
        second = tier.prepare(sha("b"), zoo.model_bytes("resnet18", seed=2))
        assert list(tier.models) == [sha("b")] and tier.evicted == 1
        assert second.weight_bytes == first.weight_bytes
    finally:
        tier.close()
        tier.pool.close()


# -- device tier --------------------------------------------------------------------


def test_device_budget_evicts_least_recently_used_idle_sessions(host: HostTier) -> None:
    models = [host.prepare(sha(f"m{i}"), zoo.model_bytes("mlp", seed=i)) for i in range(3)]
    device = DeviceTier(budget=250)
    for m in models[:2]:
        assert device.add(Runnable(m, build_session(m, 1), 100)) == []
    running = device.checkout(sha("m0"))  # m0 is now most recent and running
    assert device.add(Runnable(models[2], build_session(models[2], 1), 100)) == [sha("m1")]
    assert models[1].sessions == 0 and models[0].sessions == 1
    with pytest.raises(LoadFailed):  # only a running session could make room
        device.add(Runnable(models[1], build_session(models[1], 1), 200))
    assert device.drop(sha("m0"))
    assert models[0].sessions == 1  # still running: released when the run ends
    assert not host.drop(sha("m0"))
    device.checkin(running)
    assert models[0].sessions == 0 and host.drop(sha("m0"))


# -- loader -------------------------------------------------------------------------


def make_loader(host: HostTier, watchdog: Watchdog, budget: int = 1 << 30) -> Loader:
    return Loader(host, DeviceTier(budget), 1, watchdog, max_run_s=30.0)


def load_job(name: str, data: bytes | None = None, **kw) -> Job:
    job = Job(LoadModel(7, sha(name)), data=data, **kw)
    job.claimed = job.received
    return job


def test_load_climbs_from_cold_then_finds_host_then_device(host, watchdog) -> None:
    loader = make_loader(host, watchdog)
    assert loader.load(load_job("mlp")) is NEED_BYTES
    first = loader.load(load_job("mlp", zoo.model_bytes("mlp")))
    assert first.ok and first.tier == "cold" and first.tiers.device_models == [sha("mlp")]
    loader.unload(Job(UnloadModel(8, sha("mlp"))))
    assert loader.load(load_job("mlp")).tier == "host"
    assert loader.load(load_job("mlp")).tier == "device"
    assert loader.has(sha("mlp"))
    loader.unload(Job(UnloadModel(9, sha("mlp"), forget=True)))
    assert not loader.has(sha("mlp")) and host.pool.live_allocations == 0


@pytest.mark.parametrize(
    ("setup", "status"),
    [
        ("fetch_failed", ActionStatus.LOAD_FETCH_FAILED),
        ("corrupt", ActionStatus.LOAD_INVALID),
        ("pool_too_small", ActionStatus.LOAD_POOL_EXHAUSTED),
        ("budget_too_small", ActionStatus.LOAD_NO_ROOM),
    ],
)
def test_each_failed_load_has_its_own_status(tmp_path, watchdog, setup, status) -> None:
    pool_bytes = 8 * MIB if setup == "pool_too_small" else 256 * MIB
    host = HostTier(PagePool(pool_bytes, MIB), tmp_path / "t")
    loader = make_loader(host, watchdog, budget=1 if setup == "budget_too_small" else 1 << 30)
    data = b"garbage" if setup == "corrupt" else zoo.model_bytes("mobilenetv2")
    job = load_job("m", data)
    if setup == "fetch_failed":
        job.data, job.error = None, LoadFailed("the store said no")
    result = loader.load(job)
    assert result.status is status and result.error
    assert loader.device.models == {}
    if setup != "budget_too_small":  # that one keeps the prepared weights for later
        assert host.pool.live_allocations == 0
    host.close()
    host.pool.close()


def test_profile_reports_every_sample_and_both_build_times(host, watchdog) -> None:
    loader = make_loader(host, watchdog)
    job = Job(ProfileModel(3, sha("mlp"), batches=[1, 4], samples=6), data=zoo.model_bytes("mlp"))
    result = loader.profile(job)
    assert result.ok, result.error
    assert sorted(result.profile) == [1, 4] and all(len(t) == 6 for t in result.profile.values())
    assert len(result.build_us) == 5 and result.fresh_us > 0 and result.prepare_us > 0
    assert result.weight_bytes > 0 and result.session_bytes > 0
    assert sha("mlp") in result.tiers.host_models  # prepared at upload: swap-in is cheap


@pytest.mark.slow
def test_load_unload_cycles_return_memory_and_pages(host, watchdog) -> None:
    """2,000 load/unload cycles over mixed zoo models; every 10th also forgets the model
    (its pages go back and the next load prepares it again). Resident memory after the
    last cycle is within 5% of where it stood after the first 100."""
    loader = make_loader(host, watchdog, budget=64 * MIB)
    names = ["mlp", "tiny_add", "mobilenetv2", "mlp"]
    data = {name: zoo.model_bytes(name) for name in set(names)}
    levels = []
    for cycle in range(2000):
        name = names[cycle % len(names)]
        result = loader.load(load_job(name, data[name]))
        assert result.ok, result.error
        loader.unload(Job(UnloadModel(1, sha(name), forget=cycle % 10 == 9)))
        if cycle in (99, 1999):
            gc.collect()
            levels.append(resident_bytes())
    for name in set(names):
        loader.forget(sha(name))
    assert host.pool.live_allocations == 0 and host.pool.bytes_requested == 0
    assert loader.device.models == {}
    assert levels[1] <= levels[0] * 1.05, levels


def int4_model(n: int = 4096) -> bytes:
    """y = x + dequantize(w) with w a packed INT4 initializer (n/2 bytes on disk)."""
    from onnx import TensorProto, helper

    values = np.random.default_rng(0).integers(-8, 8, n).astype(np.int8)
    w = helper.make_tensor("w", TensorProto.INT4, [n], values.tolist())
    scale = helper.make_tensor("s", TensorProto.FLOAT, [], [0.5])
    graph = helper.make_graph(
        [
            helper.make_node("DequantizeLinear", ["w", "s"], ["wf"]),
            helper.make_node("Add", ["x", "wf"], ["y"]),
        ],
        "int4",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
        [w, scale],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model.SerializeToString()


def test_packed_initializers_are_left_to_onnx_runtime(host: HostTier) -> None:
    """numpy cannot view INT4 exactly: ORT keeps reading those from its own file."""
    data = int4_model()
    model = host.prepare(sha("int4"), data)
    assert model.names == [] and host.pool.live_allocations == 0
    assert (model.graph_path.parent / "weights.bin").stat().st_size > 0  # kept for ORT
    x = np.ones((2, 4096), np.float32)
    want = make_session(data, 1).run(None, {"x": x})[0]
    np.testing.assert_allclose(build_session(model, 1).session.run(None, {"x": x})[0], want)


def test_a_session_that_cannot_fit_evicts_nothing(host: HostTier) -> None:
    models = [host.prepare(sha(f"e{i}"), zoo.model_bytes("mlp", seed=i)) for i in range(3)]
    device = DeviceTier(budget=100)
    device.add(Runnable(models[0], build_session(models[0], 1), 60))
    device.add(Runnable(models[1], build_session(models[1], 1), 30))
    busy = device.checkout(sha("e0"))  # 60 bytes that cannot go
    with pytest.raises(LoadFailed):
        device.add(Runnable(models[2], build_session(models[2], 1), 50))
    assert list(device.models) == [sha("e1"), sha("e0")]  # e1 was not evicted for nothing
    device.checkin(busy)
