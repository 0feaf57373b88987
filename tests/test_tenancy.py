"""Per-tenant bounds against a live secure cluster: each one crossed gets its own status at
once, and the other tenants are served as before.

Limits are set the operator's way (`mtserve tenant set NAME --limit k=v`) while the broker
runs; each test waits until the tenant's STATUS shows them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import onnx
import pytest
import zmq
from onnx import TensorProto, helper

from bench import zoo
from mtcore import keys
from mtcore.client import Client
from mtcore.cluster import LocalCluster
from mtcore.errors import QuotaExceeded, RateLimited
from mtcore.protocol import TAG, Cmd, build, decode_header, encode_tensors

CLI = [sys.executable, "-m", "mtcore.cli", "--log-level", "warning"]
TILE = 65_536  # the Tile model's outputs: 4 floats in, 256 Ki floats (1 MiB) out per row


def set_limits(cluster: LocalCluster, tenant: str, **limits: float) -> Client:
    """Apply limits with the CLI; return the tenant's client once the broker has them."""
    cluster.add_principal(tenant)
    args = [f"--limit={k}={v}" for k, v in limits.items()]
    cmd = [*CLI, "tenant", "set", tenant, *args, "--state-dir", str(cluster.state_dir)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    client = cluster.client(tenant, timeout=120)
    stop = time.monotonic() + 30
    while time.monotonic() < stop:
        seen = client.status()["limits"]
        if all(seen[k] == pytest.approx(v) for k, v in limits.items()):
            return client
        time.sleep(0.05)
    pytest.fail(f"the broker did not apply {limits} within 30 s")


def tile_model() -> bytes:
    """x[N, 4] -> Tile(x, [1, TILE]): outputs far larger than inputs (the issue's attack)."""
    repeats = helper.make_tensor("repeats", TensorProto.INT64, [2], [1, TILE])
    node = helper.make_node("Tile", ["x", "repeats"], ["y"])
    graph = helper.make_graph(
        [node],
        "tile",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4 * TILE])],
        [repeats],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model.SerializeToString()


def test_the_request_rate_is_bounded_per_tenant(secure: LocalCluster) -> None:
    inputs = zoo.sample_inputs("tiny_add", 1)
    with set_limits(secure, "rated", rate=0.05, burst=2) as rated:  # 2 now, then 1 per 20 s
        rated.upload_model("m", zoo.model_bytes("tiny_add"))
        rated.infer("m", inputs)
        rated.infer("m", inputs)
        with pytest.raises(RateLimited) as refused:
            rated.infer("m", inputs)
    assert refused.value.status == 23 and "requests/s" in str(refused.value)
    with secure.client("bystander", timeout=120) as other:  # nobody else is slowed
        other.upload_model("m", zoo.model_bytes("tiny_add"))
        for _ in range(5):
            other.infer("m", inputs)


def test_models_and_upload_reservations_are_bounded_per_tenant(secure: LocalCluster) -> None:
    """The issue's lockout: idle upload reservations of one tenant; now its own limit."""
    data = zoo.model_bytes("tiny_add")
    with set_limits(secure, "hoarder", upload_bytes=1000, models=1) as hoarder:
        header = {"name": "big", "size": 600, "sha256": "0" * 64}
        hoarder.call(Cmd.UPLOAD_BEGIN, header)  # reserved, never sent
        with pytest.raises(QuotaExceeded, match="uploads in progress declare"):
            hoarder.call(Cmd.UPLOAD_BEGIN, {**header, "name": "big2"})
        hoarder.upload_model("one", data)  # 219 bytes still fit
        with pytest.raises(QuotaExceeded, match="models stored"):
            hoarder.upload_model("two", data)
        hoarder.upload_model("one", data, replace=True)  # replacing is not one more
    with secure.client("uploader", timeout=120) as other:
        assert other.upload_model("mine", data)["name"] == "mine"


def test_requests_in_flight_are_bounded_per_tenant(secure: LocalCluster) -> None:
    client = set_limits(secure, "eager", in_flight=1)
    client.upload_model("m", zoo.model_bytes("tiny_add"))
    client.close()
    statuses = burst(secure, "eager", "m", zoo.sample_inputs("tiny_add", 1), 40)
    assert sum(statuses.values()) == 40  # every request answered
    assert statuses[0] >= 1 and statuses[22] >= 1, statuses


def burst(cluster: LocalCluster, tenant: str, model: str, inputs, n: int) -> Counter[int]:
    """Send `n` INFERs at once on one DEALER, then read every reply: statuses by code."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    keys.read(cluster.add_principal(tenant)).apply_client(sock)
    sock.connect(cluster.address)
    descs, frames = encode_tensors(inputs)
    try:
        for i in range(n):
            header = {"id": i, "model": model, "inputs": descs}
            sock.send_multipart(build(TAG, Cmd.INFER, header, frames))
        return read_replies(sock, n)
    finally:
        sock.close()
        ctx.term()


def read_replies(sock: zmq.Socket, n: int, timeout: float = 120.0) -> Counter[int]:
    statuses: Counter[int] = Counter()
    ids: set[int] = set()
    stop = time.monotonic() + timeout
    while len(ids) < n and sock.poll(max(1, int((stop - time.monotonic()) * 1000))):
        frames = sock.recv_multipart()
        header = decode_header(frames[3])
        assert header["id"] not in ids  # exactly one answer each
        ids.add(header["id"])
        statuses[header["status"]] += 1
    assert len(ids) == n, f"{n - len(ids)} requests got no answer"
    return statuses


@pytest.mark.timeout(300)
def test_a_tenant_that_reads_nothing_is_held_to_its_reply_bytes(secure: LocalCluster) -> None:
    """The issue's attack: small requests to a model with huge outputs, never read. Its
    predicted outputs in flight, then the answers the broker holds because ZeroMQ's queue
    for the connection is full, count against the tenant's reply quota: the broker holds
    at most that for it, refuses the rest at once, and loses nothing it holds."""
    limit = 8 << 20
    with set_limits(secure, "sink", reply_bytes=limit) as sink:
        sink.upload_model("tile", tile_model())
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 1)  # this process stops reading from TCP at once
    sock.setsockopt(zmq.RCVBUF, 64 * 1024)
    keys.read(secure.add_principal("sink")).apply_client(sock)
    sock.connect(secure.address)
    descs, frames = encode_tensors({"x": np.ones((1, 4), np.float32)})
    sent = 0
    try:
        for _wave in range(40):  # until the broker holds answers for it
            for _ in range(20):
                header = {"id": sent, "model": "tile", "inputs": descs}
                sock.send_multipart(build(TAG, Cmd.INFER, header, frames))
                sent += 1
            held = wait_until_settled(secure, "sink")
            assert held["reply_bytes_held"] <= limit + 64 * 1024
            if held["reply_bytes_held"] > limit // 2:
                break
        assert held["reply_bytes_held"] > limit // 2, "no answer was ever held"
        with secure.client("neighbour", timeout=120) as other:  # served meanwhile
            other.upload_model("m", zoo.model_bytes("tiny_add"), replace=True)
            other.infer("m", zoo.sample_inputs("tiny_add", 1))
        statuses = read_replies(sock, sent)  # now read: everything held arrives, once
    finally:
        sock.close()
        ctx.term()
    assert statuses[0] >= 1 and statuses[22] >= 1 and set(statuses) <= {0, 22}, statuses


def wait_until_settled(cluster: LocalCluster, tenant: str, limit: float = 120.0) -> dict:
    """The admin's figures for `tenant` once none of its requests is in flight."""
    with Client(cluster.address, key_file=cluster.admin_key, timeout=30) as admin:
        stop = time.monotonic() + limit
        while time.monotonic() < stop:
            figures = admin.status()["tenants"].get(tenant)
            if figures and figures["in_flight"] == 0:
                return figures
            time.sleep(0.05)
    pytest.fail(f"{tenant}'s requests were still in flight after {limit} s")


def test_bad_limits_are_refused_by_the_cli(secure: LocalCluster) -> None:
    secure.add_principal("limited")
    for bad in ("nope=1", "rate=-1"):
        cmd = [*CLI, "tenant", "set", "limited", f"--limit={bad}",
               "--state-dir", str(secure.state_dir)]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and "limit" in done.stderr


def test_the_tile_model_really_outputs_a_mebibyte_per_row() -> None:
    """The attack above relies on it (ONNX checks the graph; sizes from its signature)."""
    model = onnx.load_from_string(tile_model())
    onnx.checker.check_model(model)
    dims = model.graph.output[0].type.tensor_type.shape.dim
    assert dims[1].dim_value * 4 == 1 << 20


def test_usage_is_metered_per_tenant(secure: LocalCluster) -> None:
    """`mtserve tenant usage` shows what a tenant's requests cost: exactly its 5."""
    inputs = zoo.sample_inputs("tiny_add", 2)
    with secure.client("metered", timeout=120) as metered:
        metered.upload_model("m", zoo.model_bytes("tiny_add", seed=7))  # its own bytes
        for _ in range(5):
            metered.infer("m", inputs)
    cmd = [*CLI, "tenant", "usage", "--json", "--state-dir", str(secure.state_dir)]
    stop = time.monotonic() + 60
    while time.monotonic() < stop:  # the broker adds usage every 5 s
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        rows = {u["tenant"]: u for u in json.loads(done.stdout)}
        mine = rows.get("metered")
        if mine and mine["requests"] >= 5 and mine["device_byte_seconds"] > 0:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"usage of 'metered' not recorded within 60 s: {rows.get('metered')}")
    assert mine["requests"] == 5 and mine["exec_ms"] > 0
    assert mine["bytes_in"] == 5 * inputs["input"].nbytes and mine["bytes_out"] > 0


def test_a_tenants_models_stay_within_its_worker_memory_bounds(secure: LocalCluster) -> None:
    """device_bytes and host_bytes bound what the tenant's models hold on the workers:
    three models that fit one at a time are run in turn; a larger one is refused."""
    models = [zoo.model_bytes("mlp", seed=20 + i) for i in range(3)]
    bound = len(models[0]) * 3 // 2  # room for one model, not two
    client = set_limits(secure, "memcap", device_bytes=bound, host_bytes=bound)
    inputs = zoo.sample_inputs("mlp", 1)
    with client:
        for i, data in enumerate(models):
            client.upload_model(f"m{i}", data)
        for _ in range(2):
            for i in range(3):
                client.infer(f"m{i}", inputs)
                assert client.status()["memory_held"]["device"] <= bound
        stop = time.monotonic() + 30  # host copies are dropped on the next memory sample
        while client.status()["memory_held"]["host"] > bound and time.monotonic() < stop:
            time.sleep(0.1)
        held = client.status()["memory_held"]
        assert 0 < held["device"] <= bound and 0 < held["host"] <= bound
        client.upload_model("big", zoo.model_bytes("mobilenetv2"))
        with pytest.raises(QuotaExceeded, match="device_bytes"):
            client.infer("big", zoo.sample_inputs("mobilenetv2", 1))
        client.infer("m0", inputs)  # and the tenant is served as before
