"""The baselines of `mtbench compare`: the bare ZeroMQ server and Ray Serve.

The bare server must speak the tenant protocol subset well enough for mtserve's own
clients (PING, INFER, the error statuses), and must leave no process behind. The Ray
test is slow and runs only where `ray[serve]` is installed.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import onnxruntime as ort
import pytest
import zmq
from conftest import RawSocket

from bench import zoo
from bench.baselines import ray_serve
from bench.baselines.zmq_server import ZmqServerError, ZmqServerProcess
from mtcore.client import AsyncClient, Client
from mtcore.errors import InputInvalid, ModelNotFound, Status
from mtcore.protocol import TAG, Cmd

MODELS = ("tiny_add", "mlp")


@pytest.fixture(scope="module")
def model_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("zoo")
    return {name: zoo.save(name, directory) for name in MODELS}


@pytest.fixture(scope="module")
def server(
    model_paths: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ZmqServerProcess]:
    with ZmqServerProcess().start(model_paths, 1, tmp_path_factory.mktemp("bare")) as srv:
        yield srv


@pytest.fixture
def client(server: ZmqServerProcess) -> Iterator[Client]:
    with Client(server.address, timeout=10) as c:
        yield c


@pytest.fixture
def raw(server: ZmqServerProcess) -> Iterator[RawSocket]:
    sock = RawSocket(zmq.Context.instance(), server.address)
    try:
        yield sock
    finally:
        sock.close()


def reference(path: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, inputs), strict=True))


# ---------------------------------------------------------------------- bare server


def test_ping(client: Client) -> None:
    assert "bare" in client.ping()


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("batch", [1, 3])
def test_infer_matches_onnxruntime(
    client: Client, model_paths: dict[str, Path], name: str, batch: int
) -> None:
    inputs = zoo.sample_inputs(name, batch, seed=batch)
    result = client.infer(name, inputs, deadline_ms=0.001)  # deadlines are ignored
    want = reference(model_paths[name], inputs)
    assert set(result.outputs) == set(want)
    for out, value in want.items():
        np.testing.assert_allclose(result[out], value, rtol=1e-5)
    assert result.batch == 1
    assert {"exec", "total"} <= set(result.timing)
    assert 0 <= result.timing["exec"] <= result.timing["total"]


def test_async_client_many_in_flight(server: ZmqServerProcess, model_paths: dict) -> None:
    inputs = [zoo.sample_inputs("mlp", 1, seed=i) for i in range(16)]

    async def run() -> list:
        async with AsyncClient(server.address, timeout=10) as c:
            return await asyncio.gather(*(c.infer("mlp", x) for x in inputs))

    for x, got in zip(inputs, asyncio.run(run()), strict=True):
        np.testing.assert_allclose(
            got["logits"], reference(model_paths["mlp"], x)["logits"], rtol=1e-5
        )


def test_unknown_model(client: Client) -> None:
    with pytest.raises(ModelNotFound) as info:
        client.infer("no_such_model", zoo.sample_inputs("tiny_add"))
    assert info.value.status == Status.MODEL_NOT_FOUND
    client.ping()  # still serving


@pytest.mark.parametrize(
    "inputs",
    [
        {"wrong_name": np.zeros((1, 4), np.float32)},
        {"input": np.zeros((1, 5), np.float32)},  # fixed dimension differs
        {"input": np.zeros((1, 4), np.float64)},  # dtype
        {"input": np.zeros(4, np.float32)},  # rank
        {"input": np.zeros((1, 4), np.float32), "extra": np.zeros(1, np.float32)},
    ],
    ids=["name", "shape", "dtype", "rank", "extra"],
)
def test_wrong_inputs(client: Client, inputs: dict[str, np.ndarray]) -> None:
    with pytest.raises(InputInvalid) as info:
        client.infer("tiny_add", inputs)
    assert info.value.status == Status.INPUT_INVALID


def test_frame_length_mismatch(raw: RawSocket) -> None:
    raw.request(
        Cmd.INFER,
        {"id": 7, "model": "tiny_add", "inputs": [["input", "float32", [1, 4]]]},
        [b"\0" * 15],
    )
    cmd, header, payload = raw.recv(5)
    assert (cmd, header["status"], header["id"], payload) == (Cmd.INFER.value, 40, 7, [])


def test_malformed_frames(raw: RawSocket, client: Client) -> None:
    cases = [
        ([TAG, Cmd.PING.value, msgpack.packb({"id": 1})], 10, None),  # no delimiter
        ([b"", TAG, Cmd.PING.value, b"\xc1"], 10, None),  # header is not msgpack
        ([b"", TAG, Cmd.PING.value, msgpack.packb([1, 2])], 10, None),  # not a map
        ([b"", TAG, Cmd.PING.value], 10, None),  # no header frame
        ([b"", b"MTS9", Cmd.PING.value, msgpack.packb({"id": 2})], 11, 2),
        ([b"", TAG, b"\x7f", msgpack.packb({"id": 3})], 12, 3),
        ([b"", TAG, Cmd.LIST.value, msgpack.packb({"id": 4})], 12, 4),  # not served here
        ([b"", TAG, Cmd.PING.value, msgpack.packb({"id": "x"})], 14, None),
        ([b"", TAG, Cmd.INFER.value, msgpack.packb({"id": 5})], 14, 5),  # no model
    ]
    for frames, status, rid in cases:
        raw.send(frames)
        _, header, _ = raw.recv(5)
        assert header["status"] == status, (frames, header)
        assert header.get("id") == rid, (frames, header)
        assert header["error"]
    assert "bare" in client.ping()


def test_stop_leaves_no_process(model_paths: dict[str, Path], tmp_path: Path) -> None:
    srv = ZmqServerProcess().start({"tiny_add": model_paths["tiny_add"]}, 1, tmp_path)
    pid = srv.pid
    assert pid is not None
    with Client(srv.address, timeout=10) as c:
        c.infer("tiny_add", zoo.sample_inputs("tiny_add"))
    began = time.monotonic()
    srv.stop()
    assert time.monotonic() - began < 5  # SIGTERM, not the SIGKILL fallback
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert "stopped after" in (tmp_path / "zmq_server.log").read_text()
    srv.stop()  # idempotent


def test_bad_model_path_fails_fast(tmp_path: Path) -> None:
    with pytest.raises(ZmqServerError, match="exited"):
        ZmqServerProcess().start({"x": tmp_path / "missing.onnx"}, 1, tmp_path, timeout=30)


# ---------------------------------------------------------------------- Ray Serve


@pytest.mark.slow
def test_ray_serve_tiny_add(model_paths: dict[str, Path]) -> None:
    ok, why = ray_serve.available()
    if not ok:
        pytest.skip(why)
    inputs = zoo.sample_inputs("tiny_add", 2)
    want = reference(model_paths["tiny_add"], inputs)["output"]

    async def run(target: ray_serve.RayServeTarget) -> None:
        status, latency, outputs = await target.infer_outputs("tiny_add", inputs)
        assert status == 0 and latency is not None and latency > 0
        np.testing.assert_allclose(outputs["output"], want, rtol=1e-5)
        status, latency = await target.infer("tiny_add", inputs, 30_000)
        assert status == 0 and latency is not None
        assert (await target.infer("no_such_model", inputs, None))[0] == Status.MODEL_NOT_FOUND
        bad = {"wrong_name": inputs["input"]}
        assert (await target.infer("tiny_add", bad, None))[0] == Status.EXEC_FAILED

    with ray_serve.RayServeTarget().start(model_paths, models_per_replica=2) as target:
        assert target.start_s is not None
        asyncio.run(run(target))


def test_ray_available_reports() -> None:
    ok, why = ray_serve.available()
    assert isinstance(ok, bool) and why
    if not ok:
        assert "pip install" in why or "cannot be imported" in why
