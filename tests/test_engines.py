"""The engine seam (worker.engines): which engine a worker takes, and the torch engine
(worker.gpu.torch_backend) through the same loader, runner and worker as ONNX Runtime.

Here the torch engine runs on the CPU over the host pool's pages; on a GPU machine the
tests marked `gpu` (tests/test_gpu_pools.py, and the last ones here) run it on the device.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from bench import zoo
from ext import PagePool
from mtcore.actions import Infer, LoadModel, ProfileModel, UnloadModel
from mtcore.errors import ModelInvalid
from mtcore.protocol import encode_tensor
from tests.conftest import FP32_TOLERANCE, start_cluster
from worker.engines import OnnxEngine, available, choose_engine
from worker.executor import Job
from worker.gpu import gpu_status
from worker.loader import Loader
from worker.runner import Runner
from worker.tiers import DeviceTier, HostTier

MIB = 1 << 20
_ids = itertools.count(1)
torch = pytest.importorskip("torch")


def sha(name: str) -> str:
    return f"{name:0<64}"[:64]


@pytest.fixture
def torch_worker(tmp_path: Path, watchdog):
    """A torch engine's loader and runner over a 256 MiB host pool, on the CPU."""
    engine = choose_engine("torch")
    host = HostTier(engine.host_pool(256 * MIB, MIB), tmp_path / "tiers")
    device = DeviceTier(1 << 30)
    loader = Loader(host, device, 1, watchdog, 30.0, engine)
    yield loader, Runner(device, watchdog, 30.0, engine)
    device.clear()
    host.close()
    assert host.pool.live_allocations == 0
    engine.close()
    host.pool.close()


def job(action, data: bytes | None = None, frames=()) -> Job:
    j = Job(action, list(frames), data=data)
    j.claimed = j.received
    return j


def infer(runner: Runner, name: str, inputs: list[np.ndarray]):
    requests, frames = [], []
    for rid, x in enumerate(inputs):
        desc, buf = encode_tensor("input", x)
        requests.append([rid, [desc]])
        frames.append(buf)
    result, out = runner.infer(job(Infer(next(_ids), sha(name), requests=requests), frames=frames))
    assert result.ok, result.error
    return result, out


def reference(name: str, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(zoo.model_bytes(name), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


# -- choosing -------------------------------------------------------------------------------


def test_auto_takes_onnx_runtime_without_a_gpu_and_says_why_the_others_cannot_run() -> None:
    if gpu_status()[0]:
        pytest.skip("a GPU is visible: auto takes a GPU engine")
    engine = choose_engine("auto")
    assert isinstance(engine, OnnxEngine) and engine.kind == "cpu"
    why = available()
    assert why["onnxruntime"] == "" and why["tensorrt"]  # never installable here
    with pytest.raises(ValueError, match="tensorrt engine cannot run here"):
        choose_engine("tensorrt")
    with pytest.raises(ValueError, match="unknown engine 'tvm'"):
        choose_engine("tvm")


def test_torch_engine_runs_on_the_cpu_when_no_gpu_is_visible() -> None:
    engine = choose_engine("torch")
    assert engine.name == "torch"
    assert engine.kind == ("cpu-torch" if not gpu_status()[0] else engine.kind)


# -- the torch engine through the loader and runner ------------------------------------------


@pytest.mark.parametrize("name", ["tiny_add", "mlp", "mobilenetv2"])
def test_torch_engine_loads_and_runs_a_stacked_batch_equal_to_onnx_runtime(
    torch_worker, name: str
) -> None:
    loader, runner = torch_worker
    first = loader.load(job(LoadModel(next(_ids), sha(name)), zoo.model_bytes(name)))
    assert first.ok and first.tier == "cold", first.error
    xs = [zoo.sample_inputs(name, rows, seed=rows)["input"] for rows in (1, 2)]
    result, frames = infer(runner, name, xs)
    assert [r.status for r in result.results] == [0, 0]
    assert result.timing.exec > 0
    for x, buf in zip(xs, frames, strict=True):
        got = np.frombuffer(buf, np.float32).reshape(reference(name, x).shape)
        np.testing.assert_allclose(got, reference(name, x), **FP32_TOLERANCE)


def test_torch_weights_are_the_host_pages_themselves(torch_worker) -> None:
    loader, runner = torch_worker
    assert loader.load(job(LoadModel(next(_ids), sha("mlp")), zoo.model_bytes("mlp"))).ok
    host = loader.host.get(sha("mlp"))
    live = loader.device.peek(sha("mlp")).live
    x = zoo.sample_inputs("mlp", 1)["input"]
    before = infer(runner, "mlp", [x])[1][0]
    for allocation in host.allocations:  # zero the pages under the bound model
        for i in range(len(allocation.pages)):
            np.frombuffer(allocation.page(i), np.uint8)[:] = 0
    after = infer(runner, "mlp", [x])[1][0]
    assert live.model is loader.device.peek(sha("mlp")).live.model
    assert np.frombuffer(before, np.float32).any() and not np.frombuffer(after, np.float32).any()


def test_a_bad_request_fails_alone_and_a_bad_model_is_refused(torch_worker) -> None:
    loader, runner = torch_worker
    assert loader.load(job(LoadModel(next(_ids), sha("mlp")), zoo.model_bytes("mlp"))).ok
    good = zoo.sample_inputs("mlp", 1)["input"]
    bad = np.zeros((1, 7), np.float32)  # the wrong width
    requests, frames = [], []
    for rid, x in enumerate([good, bad]):
        desc, buf = encode_tensor("input", x)
        requests.append([rid, [desc]])
        frames.append(buf)
    result, _ = runner.infer(job(Infer(next(_ids), sha("mlp"), requests=requests), frames=frames))
    assert [r.status == 0 for r in result.results] == [True, False]
    refused = loader.load(job(LoadModel(next(_ids), sha("bad")), b"not onnx"))
    assert not refused.ok and "model" in refused.error
    assert loader.host.pool.live_allocations == len(loader.host.get(sha("mlp")).allocations)


def test_a_model_the_lowering_refuses_is_run_by_onnx_runtime_on_the_same_worker(
    torch_worker,
) -> None:
    from onnx import TensorProto, helper

    loader, runner = torch_worker
    node = helper.make_node("Einsum", ["input", "input"], ["out"], equation="ij,ij->ij")
    graph = helper.make_graph(
        [node], "einsum",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", 4])],
    )  # fmt: skip
    data = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    with pytest.raises(ModelInvalid, match="Einsum"):
        from worker.gpu.torch_engine import plan_model

        plan_model(data)
    assert loader.load(job(LoadModel(next(_ids), sha("einsum")), data)).ok
    assert loader.host.get(sha("einsum")).plan is None  # ONNX Runtime's graph
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    _, (out,) = infer(runner, "einsum", [x])
    np.testing.assert_array_equal(np.frombuffer(out, np.float32).reshape(2, 4), x * x)


def test_torch_profile_unload_and_reload_from_the_host_tier(torch_worker) -> None:
    loader, _ = torch_worker
    data = zoo.model_bytes("mlp")
    profiled = loader.profile(
        job(ProfileModel(next(_ids), sha("mlp"), batches=[1, 4], samples=3), data)
    )
    assert profiled.ok and set(profiled.profile) == {1, 4}
    assert all(len(v) == 3 and min(v) > 0 for v in profiled.profile.values())
    assert loader.load(job(LoadModel(next(_ids), sha("mlp")))).tier == "host"
    loader.unload(job(UnloadModel(next(_ids), sha("mlp"))))
    assert loader.device.models == {}
    assert loader.load(job(LoadModel(next(_ids), sha("mlp")))).tier == "host"


def test_adopted_weights_keep_their_places_for_a_page_for_page_copy(tmp_path: Path) -> None:
    tier = HostTier(PagePool(64 * MIB, MIB), tmp_path / "t")
    weights = [np.arange(n, dtype=np.float32) for n in (10, 300_000, 7, 65_536)]
    model = tier.adopt("a" * 64, None, weights, 0.0)
    for place, array, weight in zip(model.places, model.arrays, weights, strict=True):
        allocation = model.allocations[place.allocation]
        large = weight.nbytes > MIB  # a contiguous run of its own, else a place in a page
        buffer = allocation.view() if large else allocation.page(place.page)
        got = np.frombuffer(buffer, np.uint8)[place.offset : place.offset + weight.nbytes].view(
            np.float32
        )
        np.testing.assert_array_equal(got, weight)
        np.testing.assert_array_equal(array, weight)
    del buffer, got, array  # views of the pages: they go before the pool closes
    assert model.graph_path is None
    del model
    assert tier.drop("a" * 64) and tier.pool.live_allocations == 0
    with pytest.raises(ModelInvalid):
        choose_engine("torch").prepare(tier, "b" * 64, b"\x00garbage")
    assert tier.pool.live_allocations == 0
    tier.close()
    tier.pool.close()


# -- a real worker process ------------------------------------------------------------------


def test_a_torch_worker_serves_requests_and_reports_its_kind(tmp_path: Path) -> None:
    cluster = start_cluster(tmp_path, workers=1, worker_args=["--engine", "torch"])
    try:
        with cluster.client("t-torch", timeout=60) as client:
            client.upload_model("m", zoo.model_bytes("mobilenetv2"))
            x = zoo.sample_inputs("mobilenetv2", 2, seed=3)
            result = client.infer("m", x)
            got = next(iter(result.outputs.values()))
            np.testing.assert_allclose(got, reference("mobilenetv2", x["input"]), **FP32_TOLERANCE)
            (worker,) = client.status()["workers"]
            assert worker["kind"] == ("cpu-torch" if not gpu_status()[0] else worker["kind"])
    finally:
        cluster.stop()


def test_mtbench_gpu_writes_the_probe_and_says_why_without_a_gpu(tmp_path: Path, capsys) -> None:
    import json

    from bench import gpu

    if gpu_status()[0]:
        pytest.skip("a GPU is visible: bench/gpu_check.sh measures it")
    assert gpu.main(["--out", str(tmp_path)]) == 2
    doc = json.loads((tmp_path / "gpu.json").read_text())
    assert doc["probe"]["gpu_visible"] is False and doc["probe"]["gpu"] == gpu_status()[1]
    assert doc["probe"]["engines"]["onnxruntime"] == "available" and "goals" not in doc
    assert "no GPU is visible" in capsys.readouterr().out


# -- on a GPU (skipped here: no CUDA device) -------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["mlp", "mobilenetv2", "resnet18"])
def test_torch_engine_on_the_gpu_equals_onnx_runtime_and_gives_its_pages_back(
    tmp_path: Path, watchdog, name: str
) -> None:
    from worker.gpu.torch_backend import TorchEngine

    engine = TorchEngine(cuda=True, device_bytes=512 * MIB, page_size=2 * MIB)
    host = HostTier(engine.host_pool(512 * MIB, 2 * MIB), tmp_path / "tiers")
    device = DeviceTier(512 * MIB)
    loader = Loader(host, device, 1, watchdog, 30.0, engine)
    runner = Runner(device, watchdog, 30.0, engine)
    try:
        assert engine.pinned.pinned  # the host pool is registered pinned
        loaded = loader.load(job(LoadModel(next(_ids), sha(name)), zoo.model_bytes(name)))
        assert loaded.ok, loaded.error
        live = device.peek(sha(name)).live
        assert live.model.device.type == "cuda" and engine.pool.bytes_reserved > 0
        weight = live.model.weights[0]
        lo, hi = engine.pool.ptr, engine.pool.ptr + engine.pool.nbytes
        assert lo <= weight.data_ptr() < hi  # a view of the device pool's pages
        xs = [zoo.sample_inputs(name, rows, seed=rows)["input"] for rows in (1, 3)]
        _, frames = infer(runner, name, xs)
        for x, buf in zip(xs, frames, strict=True):
            want = reference(name, x)
            got = np.frombuffer(buf, np.float32).reshape(want.shape)
            np.testing.assert_allclose(got, want, **FP32_TOLERANCE)
        del live, weight
        loader.unload(job(UnloadModel(next(_ids), sha(name))))
        assert engine.pool.bytes_reserved == 0  # the device pages went back
    finally:
        device.clear()
        host.close()
        engine.close()
        host.pool.close()
