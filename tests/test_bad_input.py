"""Bad input, end to end: every malformed or invalid request gets exactly one error reply.

Real processes on loopback (the module's `cluster`). Each test sends one kind of bad input
and checks the reply's status code (shared/PROTOCOL.md), that its `error` says something
a person can act on, that no second answer follows, and that the broker keeps serving
(`assert_serving`: a PING and a good inference on a probe model). Failed uploads must leave
nothing behind: no model listed, no `*.part` temp file, no new blob in the store.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import onnx
import pytest
import zmq
from conftest import RawSocket, start_cluster
from onnx import TensorProto, helper, numpy_helper

from bench import zoo
from broker.quotas import TenantLimits
from mtcore.client import Client
from mtcore.cluster import LocalCluster
from mtcore.errors import (
    BadArgument,
    DeadlineUnmeetable,
    InputInvalid,
    ModelExists,
    ModelInvalid,
    ModelNotFound,
    MTError,
    QuotaExceeded,
    Status,
    TooLarge,
    UploadCorrupt,
)
from mtcore.protocol import TAG, Cmd

PROBE_TENANT = "bad-input-probe"
PROBE_MODEL = "probe"
PING_ID = 4_000_000_000  # ids of the liveness PINGs sent on a test's raw socket

pytestmark = pytest.mark.timeout(120)


# ---------------------------------------------------------------- helpers


def hdr(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def tenant_for(node_name: str) -> str:
    """A tenant name valid for the broker (letters, digits, ._-), unique per test."""
    return ("x" + re.sub(r"[^A-Za-z0-9._-]", "-", node_name))[:56]  # room for a suffix


def tiny_input(rows: int = 1) -> dict[str, np.ndarray]:
    return {"input": np.arange(4 * rows, dtype=np.float32).reshape(rows, 4)}


@pytest.fixture(scope="module")
def probe(cluster: LocalCluster) -> dict[str, Any]:
    """A tiny model of a dedicated tenant, for checking that inference still works."""
    with Client(cluster.address, tenant=PROBE_TENANT, timeout=60) as c:
        return c.upload_model(PROBE_MODEL, zoo.model_bytes("tiny_add"), replace=True)


@pytest.fixture
def tc(cluster: LocalCluster, request: pytest.FixtureRequest) -> Iterator[Client]:
    """A client whose tenant is this test's own."""
    with Client(cluster.address, tenant=tenant_for(request.node.name), timeout=60) as c:
        yield c


def assert_serving(cluster: LocalCluster, client: Client | None = None) -> None:
    """The broker still serves: no stray second answer, a PING and a good inference work."""
    if client is not None:
        assert not client.sock.poll(200), "a second answer arrived for an answered request"
        assert client.ping().startswith("mtserve")
        assert not client.sock.poll(0)
    with Client(cluster.address, tenant=PROBE_TENANT, timeout=30) as c:
        assert c.ping().startswith("mtserve")
        x = tiny_input(2)
        result = c.infer(PROBE_MODEL, x)
        out = result["output"]
        assert out.shape == (2, 4) and out.dtype == np.float32
        # tiny_add adds one bias vector to every row
        np.testing.assert_allclose(
            out - x["input"], np.broadcast_to(out[0] - x["input"][0], (2, 4)), rtol=1e-6, atol=1e-6
        )


def expect_reply(
    raw: RawSocket,
    status: Status,
    *,
    rid: int | None = None,
    rid_optional: bool = False,
    cmd: bytes | None = None,
    mentions: str = "",
) -> dict[str, Any]:
    """The next reply on `raw` is an error of `status`, with a message, echoing `rid`."""
    got_cmd, header, payload = raw.recv()
    assert header.get("status") == int(status), header
    error = header.get("error")
    assert isinstance(error, str) and len(error) >= 10, header
    if mentions:
        assert mentions.lower() in error.lower(), error
    if rid_optional:
        assert header.get("id") in (None, rid), header
    else:
        assert header.get("id") == rid, header
    if cmd is not None:
        assert got_cmd == cmd, (got_cmd, header)
    assert payload == []
    return header


def assert_raw_serving(raw: RawSocket, cluster: LocalCluster) -> None:
    """No second answer on `raw`: the next reply is the one to a fresh PING, then silence."""
    raw.request(Cmd.PING, {"id": PING_ID})
    got_cmd, header, _ = raw.recv()
    assert (got_cmd, header.get("id"), header.get("status")) == (Cmd.PING.value, PING_ID, 0), (
        "expected the PING's reply; an earlier request was answered twice?",
        got_cmd,
        header,
    )
    assert raw.silent(0.2), "an unexpected extra reply arrived"
    assert_serving(cluster)


def snapshot(cluster: LocalCluster) -> tuple[set[str], set[str]]:
    """(temp upload files, model blobs) on the broker's disk."""
    parts = {p.name for p in (cluster.state_dir / "uploads").glob("*.part")}
    blobs = {p.name for p in (cluster.state_dir / "models").rglob("*") if p.is_file()}
    return parts, blobs


def assert_nothing_left(
    cluster: LocalCluster,
    client: Client,
    before: tuple[set[str], set[str]],
    name: str,
    *,
    handle: str | None = None,
    sha256: str | None = None,
) -> None:
    """A failed upload left no model, no temp file and no blob (garbage goes on a tick)."""
    assert name not in {m["name"] for m in client.list_models()}
    with pytest.raises(ModelNotFound):
        client.model_info(name)
    deadline = time.monotonic() + 10
    while True:
        parts, blobs = snapshot(cluster)
        new_parts, new_blobs = parts - before[0], blobs - before[1]
        if handle is not None and f"{handle}.part" in parts:
            new_parts.add(f"{handle}.part")
        if sha256 is not None and f"{sha256}.onnx" in blobs:
            new_blobs.add(f"{sha256}.onnx")
        if not new_parts and not new_blobs:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"left behind: temp files {new_parts}, blobs {new_blobs}")
        time.sleep(0.05)


def begin(client: Client, name: str, data: bytes, **extra: Any) -> str:
    header = {"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), **extra}
    return client.call(Cmd.UPLOAD_BEGIN, header).header["upload"]


def chunk(client: Client, handle: str, offset: int, data: bytes) -> int:
    reply = client.call(Cmd.UPLOAD_CHUNK, {"upload": handle, "offset": offset}, [data])
    return reply.header["received"]


def commit(client: Client, handle: str) -> dict[str, Any]:
    return client.call(Cmd.UPLOAD_COMMIT, {"upload": handle}).header["model"]


def upload_fails(
    cluster: LocalCluster, client: Client, name: str, data: bytes, exc_type: type[MTError], **extra
) -> MTError:
    """Upload `data` in one chunk; the commit fails with `exc_type` and leaves nothing."""
    before = snapshot(cluster)
    handle = begin(client, name, data, **extra)
    assert chunk(client, handle, 0, data) == len(data)
    try:
        accepted = commit(client, handle)
    except exc_type as exc:
        error = exc
    else:
        pytest.fail(f"expected {exc_type.__name__}, but the model was accepted: {accepted}")
    assert error.status == exc_type.status
    assert len(error.message) >= 10
    assert_nothing_left(
        cluster, client, before, name, handle=handle, sha256=hashlib.sha256(data).hexdigest()
    )
    assert_serving(cluster, client)
    return error


# ---------------------------------------------------------------- bad ONNX models


def make_model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: list[onnx.TensorProto] = (),
    opsets: tuple[tuple[str, int], ...] = (("", 17),),
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "bad", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    model.ir_version = zoo.IR_VERSION
    return model


def vi(name: str, shape: list[Any] | None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def fixed_batch_model() -> bytes:
    """x[1, 4] + bias -> y[1, 4]: valid, but the batch dimension is fixed at 1."""
    bias = numpy_helper.from_array(np.arange(4, dtype=np.float32), "bias")
    nodes = [helper.make_node("Add", ["x", "bias"], ["y"])]
    return make_model(nodes, [vi("x", [1, 4])], [vi("y", [1, 4])], [bias]).SerializeToString()


def checker_fails_model() -> bytes:
    """Parses as ONNX, but a node reads a tensor nothing produces: onnx.checker rejects it."""
    nodes = [helper.make_node("Add", ["x", "ghost"], ["y"])]
    return make_model(nodes, [vi("x", ["N", 4])], [vi("y", ["N", 4])]).SerializeToString()


def external(name: str, location: str, nbytes: int, dtype: int = TensorProto.FLOAT) -> TensorProto:
    """A tensor whose bytes are 'elsewhere on disk': the path must never be followed."""
    itemsize = 1 if dtype == TensorProto.UINT8 else 4
    tensor = TensorProto(name=name, data_type=dtype, dims=[nbytes // itemsize])
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def readable_relative_file() -> str:
    """A file of >= 32 bytes relative to the service's working directory (the test's)."""
    for name in ("pyproject.toml", "setup.py", "Makefile"):
        if (Path.cwd() / name).is_file() and (Path.cwd() / name).stat().st_size >= 32:
            return name
    for path in sorted(Path.cwd().iterdir()):
        if path.is_file() and path.stat().st_size >= 32:
            return path.name
    pytest.skip("no file in the working directory to point external data at")


def external_initializer_model(location: str = "../../../../etc/passwd") -> bytes:
    nodes = [helper.make_node("Add", ["x", "w"], ["y"])]
    weight = external("w", location, 16)
    return make_model(nodes, [vi("x", ["N", 4])], [vi("y", ["N", 4])], [weight]).SerializeToString()


def external_constant_model() -> bytes:
    """External data in a Constant node's attribute: y = x + <32 bytes of a local file>."""
    u8 = TensorProto.UINT8
    const = external("c", readable_relative_file(), 32, u8)
    nodes = [
        helper.make_node("Constant", [], ["c"], value=const),
        helper.make_node("Add", ["x", "c"], ["y"]),
    ]
    inputs = [helper.make_tensor_value_info("x", u8, ["N", 32])]
    outputs = [helper.make_tensor_value_info("y", u8, ["N", 32])]
    return make_model(nodes, inputs, outputs).SerializeToString()


def if_model(then_nodes: list[onnx.NodeProto], then_inits=(), opsets=(("", 17),)) -> bytes:
    """y = If(true, then: <then_nodes> producing 't' from the outer 'x', else: x)."""
    cond = numpy_helper.from_array(np.array(True), "cond")
    then_g = helper.make_graph(
        then_nodes, "then", [], [vi("t", ["N", 4])], initializer=list(then_inits)
    )
    else_g = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["e"])], "else", [], [vi("e", ["N", 4])]
    )
    node = helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)
    model = make_model([node], [vi("x", ["N", 4])], [vi("y", ["N", 4])], [cond], opsets)
    return model.SerializeToString()


def external_subgraph_model() -> bytes:
    weight = external("sw", readable_relative_file(), 16)
    return if_model([helper.make_node("Add", ["x", "sw"], ["t"])], [weight])


def domain_model(domain: str, op: str) -> bytes:
    nodes = [helper.make_node(op, ["x"], ["y"], domain=domain)]
    model = make_model(
        nodes, [vi("x", ["N", 4])], [vi("y", ["N", 4])], opsets=(("", 17), (domain, 1))
    )
    return model.SerializeToString()


def subgraph_domain_model() -> bytes:
    """A contrib op (com.microsoft, which ONNX Runtime runs) hidden in an If branch."""
    node = helper.make_node("FastGelu", ["x"], ["t"], domain="com.microsoft")
    return if_model([node], opsets=(("", 17), ("com.microsoft", 1)))


def string_io_model() -> bytes:
    s = TensorProto.STRING
    nodes = [helper.make_node("Identity", ["x"], ["y"])]
    inputs = [helper.make_tensor_value_info("x", s, ["N"])]
    outputs = [helper.make_tensor_value_info("y", s, ["N"])]
    return make_model(nodes, inputs, outputs).SerializeToString()


def no_inputs_model() -> bytes:
    value = numpy_helper.from_array(np.ones(4, np.float32))
    nodes = [helper.make_node("Constant", [], ["y"], value=value)]
    return make_model(nodes, [], [vi("y", [4])]).SerializeToString()


def no_shape_model() -> bytes:
    nodes = [helper.make_node("Identity", ["x"], ["y"])]
    return make_model(nodes, [vi("x", None)], [vi("y", None)]).SerializeToString()


def empty_graph_model() -> bytes:
    return helper.make_model(helper.make_graph([], "empty", [], [])).SerializeToString()


def run_fails_model() -> bytes:
    """Loads in ONNX Runtime, but reshaping [N, 4] to [3] fails on the first run."""
    shape = numpy_helper.from_array(np.array([3], np.int64), "shape")
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"])]
    return make_model(nodes, [vi("x", ["N", 4])], [vi("y", [3])], [shape]).SerializeToString()


def negative_dim_model() -> bytes:
    """Declares dim_value -3: neither a size nor the protocol's -1 for 'dynamic'."""
    nodes = [helper.make_node("Identity", ["x"], ["y"])]
    return make_model(nodes, [vi("x", [-3, 4])], [vi("y", [-3, 4])]).SerializeToString()


def runtime_fails_model() -> bytes:
    """Passes onnx.checker, but MatMul of [1, 4] by [3, 2] fails in ONNX Runtime."""
    w = numpy_helper.from_array(np.ones((3, 2), np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    return make_model(nodes, [vi("x", [1, 4])], [vi("y", [1, 2])], [w]).SerializeToString()


# ---------------------------------------------------------------- malformed frames

PING = Cmd.PING.value


@pytest.mark.parametrize(
    ("frames", "status", "rid", "cmd"),
    [
        # no delimiter: the body starts with the tag (a DEALER that forgot the empty frame)
        pytest.param([TAG, PING, hdr({"id": 7})], Status.MALFORMED, None, PING, id="no-delimiter"),
        pytest.param(
            [b"", b"MTS9", PING, hdr({"id": 7})],
            Status.UNSUPPORTED_VERSION,
            7,
            PING,
            id="wrong-tag",
        ),
        pytest.param(
            [b"", b"GET / HTTP/1.1", PING, hdr({"id": 7})],
            Status.UNSUPPORTED_VERSION,
            7,
            PING,
            id="http-tag",
        ),
        pytest.param(
            [b"", TAG, b"\x7f", hdr({"id": 7})],
            Status.UNKNOWN_COMMAND,
            7,
            b"\x7f",
            id="unknown-cmd",
        ),
        pytest.param(
            [b"", TAG, b"\x00", hdr({"id": 7})], Status.UNKNOWN_COMMAND, 7, b"\x00", id="cmd-zero"
        ),
        pytest.param(
            [b"", TAG, b"\x01\x01", hdr({"id": 7})],
            Status.UNKNOWN_COMMAND,
            7,
            None,
            id="cmd-two-bytes",
        ),
        pytest.param(
            [b"", TAG, PING, b"\xc1\xc1\xc1"], Status.MALFORMED, None, PING, id="header-not-msgpack"
        ),
        pytest.param(
            [b"", TAG, PING, hdr({"id": 7, "x": "abc"})[:-2]],
            Status.MALFORMED,
            None,
            PING,
            id="header-truncated",
        ),
        pytest.param(
            [b"", TAG, PING, hdr([1, 2, 3])], Status.MALFORMED, None, PING, id="header-array"
        ),
        pytest.param([b"", TAG, PING, hdr(7)], Status.MALFORMED, None, PING, id="header-int"),
        pytest.param(
            [b"", TAG, PING, hdr({1: 2})], Status.MALFORMED, None, PING, id="header-int-keys"
        ),
        pytest.param([b"", TAG, PING], Status.MALFORMED, None, PING, id="no-header-frame"),
        pytest.param([b"", TAG], Status.MALFORMED, None, PING, id="tag-only"),
        pytest.param([b""], Status.MALFORMED, None, PING, id="delimiter-only"),
        pytest.param([b"", TAG, PING, hdr({})], Status.BAD_ARGUMENT, None, PING, id="id-missing"),
        pytest.param(
            [b"", TAG, PING, hdr({"id": -1})], Status.BAD_ARGUMENT, None, PING, id="id-negative"
        ),
        pytest.param(
            [b"", TAG, PING, hdr({"id": "7"})], Status.BAD_ARGUMENT, None, PING, id="id-string"
        ),
        pytest.param(
            [b"", TAG, PING, hdr({"id": 1.5})], Status.BAD_ARGUMENT, None, PING, id="id-float"
        ),
        pytest.param(
            [b"", TAG, PING, hdr({"id": True})], Status.BAD_ARGUMENT, None, PING, id="id-bool"
        ),
        pytest.param(
            [b"", TAG, PING, hdr({"id": 7, "tenant": "no spaces/allowed"})],
            Status.BAD_ARGUMENT,
            7,
            PING,
            id="bad-tenant",
        ),
        pytest.param(
            [b"", TAG, PING, hdr({"id": 7, "pad": "x" * (65 * 1024)})],
            Status.TOO_LARGE,
            None,
            PING,
            id="header-over-64k",
        ),
    ],
)
def test_malformed_frames(
    cluster: LocalCluster,
    probe: dict[str, Any],
    raw: RawSocket,
    frames: list[bytes],
    status: Status,
    rid: int | None,
    cmd: bytes | None,
) -> None:
    raw.send(frames)
    # When the header could not be read, the reply cannot echo an id; where it could, it
    # should (the no-delimiter case is routable but its parts are shifted: either is fine).
    expect_reply(raw, status, rid=rid if rid is not None else 7, rid_optional=rid is None, cmd=cmd)
    assert_raw_serving(raw, cluster)


def test_many_malformed_messages_in_a_row(
    cluster: LocalCluster, probe: dict[str, Any], raw: RawSocket
) -> None:
    """A burst of garbage interleaved with good requests: one answer each, in order."""
    for i in range(20):
        raw.send([b"", b"JUNK", PING, hdr({"id": i})])
        raw.request(Cmd.PING, {"id": 1000 + i})
    for i in range(20):
        expect_reply(raw, Status.UNSUPPORTED_VERSION, rid=i)
        _, header, _ = raw.recv()
        assert (header["id"], header["status"]) == (1000 + i, 0)
    assert_raw_serving(raw, cluster)


# ---------------------------------------------------------------- frame size limit


def test_oversize_frames_rejected(tmp_path: Path) -> None:
    """With --max-frame-mb 1, a 2 MiB INFER or UPLOAD_CHUNK frame gets TOO_LARGE."""
    small = start_cluster(
        tmp_path, workers=1, broker_args=["--profile-batches", "1", "--max-frame-mb", "1"]
    )
    raw = RawSocket(zmq.Context.instance(), small.address)
    try:
        with Client(small.address, tenant="small", timeout=60) as c:
            c.upload_model("tiny", zoo.model_bytes("tiny_add"))
            big = b"\0" * (2 * 1024 * 1024)
            desc = [["input", "float32", [len(big) // 16, 4]]]
            raw.request(
                Cmd.INFER, {"id": 1, "tenant": "small", "model": "tiny", "inputs": desc}, [big]
            )
            expect_reply(raw, Status.TOO_LARGE, rid=1, cmd=Cmd.INFER.value)

            data = zoo.model_bytes("tiny_add", seed=1)
            handle = begin(c, "tiny2", data)
            raw.request(
                Cmd.UPLOAD_CHUNK, {"id": 2, "tenant": "small", "upload": handle, "offset": 0}, [big]
            )
            expect_reply(raw, Status.TOO_LARGE, rid=2, cmd=Cmd.UPLOAD_CHUNK.value)

            # the client's own typed error, for a frame over the limit
            with pytest.raises(TooLarge) as info:
                c.infer("tiny", {"input": np.zeros((len(big) // 16, 4), np.float32)})
            assert info.value.status == 13

            # still serving: liveness on the raw socket, and a good inference
            raw.request(Cmd.PING, {"id": 3})
            _, header, _ = raw.recv()
            assert (header["id"], header["status"]) == (3, 0)
            assert raw.silent(0.2)
            assert_serving_client(c, "tiny")
            # the upload whose chunk was refused can still be completed
            assert chunk(c, handle, 0, data) == len(data)
            assert commit(c, handle)["name"] == "tiny2"
    finally:
        raw.close()
        small.stop()


def assert_serving_client(c: Client, model: str) -> None:
    assert not c.sock.poll(200)
    assert c.ping().startswith("mtserve")
    assert c.infer(model, tiny_input())["output"].shape == (1, 4)


# ---------------------------------------------------------------- infer


def infer_header(tenant: str, **fields: Any) -> dict[str, Any]:
    return {
        "id": 11,
        "tenant": tenant,
        "model": PROBE_MODEL,
        "inputs": [["input", "float32", [1, 4]]],
        **fields,
    }


GOOD_FRAME = np.zeros((1, 4), np.float32).tobytes()


def test_infer_unknown_model(cluster: LocalCluster, probe: dict[str, Any], tc: Client) -> None:
    with pytest.raises(ModelNotFound) as info:
        tc.infer("no-such-model", tiny_input())
    assert info.value.status == 30
    assert "no-such-model" in info.value.message
    # another tenant's model is invisible too
    with pytest.raises(ModelNotFound):
        tc.infer(PROBE_MODEL, tiny_input())
    assert_serving(cluster, tc)


@pytest.mark.parametrize(
    ("inputs", "mentions"),
    [
        pytest.param({"x": np.zeros((1, 4), np.float32)}, "input", id="wrong-name"),
        pytest.param(
            {"input": np.zeros((1, 4), np.float32), "extra": np.zeros(1, np.float32)},
            "extra",
            id="extra-input",
        ),
        pytest.param({}, "input", id="no-inputs"),
        pytest.param({"input": np.zeros((1, 4), np.float64)}, "float32", id="wrong-dtype"),
        pytest.param({"input": np.zeros((1, 4), np.int32)}, "float32", id="wrong-dtype-int"),
        pytest.param({"input": np.zeros(4, np.float32)}, "shape", id="rank-too-low"),
        pytest.param({"input": np.zeros((1, 4, 1), np.float32)}, "shape", id="rank-too-high"),
        pytest.param({"input": np.zeros((1, 5), np.float32)}, "axis 1", id="wrong-fixed-dim"),
        pytest.param({"input": np.zeros((0, 4), np.float32)}, "empty", id="empty-batch"),
    ],
)
def test_infer_inputs_do_not_match(
    cluster: LocalCluster, probe: dict[str, Any], inputs: dict[str, np.ndarray], mentions: str
) -> None:
    with Client(cluster.address, tenant=PROBE_TENANT, timeout=60) as c:
        with pytest.raises(InputInvalid) as info:
            c.infer(PROBE_MODEL, inputs)
        assert info.value.status == 40
        assert mentions in info.value.message
        assert_serving(cluster, c)


@pytest.mark.parametrize(
    ("fields", "frames", "status", "mentions"),
    [
        pytest.param({}, [GOOD_FRAME[:-4]], Status.INPUT_INVALID, "bytes", id="frame-too-short"),
        pytest.param({}, [GOOD_FRAME + b"\0"], Status.INPUT_INVALID, "bytes", id="frame-too-long"),
        pytest.param({}, [], Status.INPUT_INVALID, "frames", id="fewer-frames"),
        pytest.param(
            {}, [GOOD_FRAME, GOOD_FRAME], Status.INPUT_INVALID, "frames", id="more-frames"
        ),
        pytest.param(
            {"inputs": [["input", "complex64", [1, 4]]]},
            [GOOD_FRAME],
            Status.INPUT_INVALID,
            "complex64",
            id="unknown-dtype",
        ),
        pytest.param(
            {"inputs": [["input", "float32", [1, 4]], ["input", "float32", [1, 4]]]},
            [GOOD_FRAME, GOOD_FRAME],
            Status.INPUT_INVALID,
            "more than once",
            id="duplicate-input",
        ),
        pytest.param(
            {"inputs": [["input", "float32", [1, 4]]] * 65},
            [GOOD_FRAME] * 65,
            Status.TOO_LARGE,
            "limit",
            id="too-many-tensors",
        ),
        pytest.param({}, [GOOD_FRAME] * 4097, Status.TOO_LARGE, "limit", id="too-many-frames"),
        pytest.param(
            {"inputs": "input"}, [GOOD_FRAME], Status.BAD_ARGUMENT, "inputs", id="inputs-not-list"
        ),
        pytest.param(
            {"inputs": {"input": [1, 4]}},
            [GOOD_FRAME],
            Status.BAD_ARGUMENT,
            "inputs",
            id="inputs-map",
        ),
        pytest.param(
            {"inputs": [["input", "float32"]]},
            [GOOD_FRAME],
            Status.BAD_ARGUMENT,
            "description",
            id="desc-two-items",
        ),
        pytest.param(
            {"inputs": [["input", "float32", [1, -4]]]},
            [GOOD_FRAME],
            Status.BAD_ARGUMENT,
            "dimension",
            id="negative-dim",
        ),
        pytest.param(
            {"inputs": [["input", "float32", "1x4"]]},
            [GOOD_FRAME],
            Status.BAD_ARGUMENT,
            "shape",
            id="shape-not-list",
        ),
        pytest.param(
            {"inputs": None}, [GOOD_FRAME], Status.BAD_ARGUMENT, "inputs", id="inputs-nil"
        ),
        pytest.param({"model": 5}, [GOOD_FRAME], Status.BAD_ARGUMENT, "model", id="model-int"),
        pytest.param(
            {"deadline_ms": "soon"},
            [GOOD_FRAME],
            Status.BAD_ARGUMENT,
            "deadline_ms",
            id="deadline-string",
        ),
        pytest.param(
            {"deadline_ms": -5.0},
            [GOOD_FRAME],
            Status.BAD_ARGUMENT,
            "deadline_ms",
            id="deadline-negative",
        ),
        pytest.param(
            {"deadline_ms": 0}, [GOOD_FRAME], Status.BAD_ARGUMENT, "deadline_ms", id="deadline-zero"
        ),
        pytest.param(
            {"deadline_ms": float("nan")},
            [GOOD_FRAME],
            Status.BAD_ARGUMENT,
            "deadline_ms",
            id="deadline-nan",
        ),
        pytest.param(
            {"deadline_ms": float("inf")},
            [GOOD_FRAME],
            Status.BAD_ARGUMENT,
            "deadline_ms",
            id="deadline-inf",
        ),
        pytest.param(
            {"deadline_ms": True},
            [GOOD_FRAME],
            Status.BAD_ARGUMENT,
            "deadline_ms",
            id="deadline-bool",
        ),
    ],
)
def test_infer_bad_request(
    cluster: LocalCluster,
    probe: dict[str, Any],
    raw: RawSocket,
    fields: dict[str, Any],
    frames: list[bytes],
    status: Status,
    mentions: str,
) -> None:
    header = infer_header(PROBE_TENANT, **fields)
    if header["inputs"] is None:
        del header["inputs"]
    raw.request(Cmd.INFER, header, frames)
    expect_reply(raw, status, rid=11, cmd=Cmd.INFER.value, mentions=mentions)
    assert_raw_serving(raw, cluster)


def test_infer_good_raw_request_control(
    cluster: LocalCluster, probe: dict[str, Any], raw: RawSocket
) -> None:
    """The raw header the bad-request cases start from is itself good."""
    raw.request(Cmd.INFER, infer_header(PROBE_TENANT, deadline_ms=60_000.0), [GOOD_FRAME])
    got_cmd, header, payload = raw.recv()
    assert (got_cmd, header["status"], header["id"]) == (Cmd.INFER.value, 0, 11), header
    assert header["outputs"] == [["output", "float32", [1, 4]]] and len(payload) == 1
    assert_raw_serving(raw, cluster)


def test_deadline_unmeetable(cluster: LocalCluster, probe: dict[str, Any], tc: Client) -> None:
    info = tc.upload_model("mnv2", zoo.model_bytes("mobilenetv2"))
    assert info["profile"].get("1", 0) > 10, info["profile"]
    x = zoo.sample_inputs("mobilenetv2", 1)
    with pytest.raises(DeadlineUnmeetable) as exc:
        tc.infer("mnv2", x, deadline_ms=0.01)
    assert exc.value.status == 50
    assert "deadline" in exc.value.message
    assert_serving(cluster, tc)
    # a deadline it can meet is accepted
    assert tc.infer("mnv2", x, deadline_ms=60_000)["logits"].shape == (1, 1000)


# ---------------------------------------------------------------- uploads


def test_info_and_delete_bad_input(
    cluster: LocalCluster, probe: dict[str, Any], tc: Client
) -> None:
    with pytest.raises(ModelNotFound) as info:
        tc.model_info("nope")
    assert info.value.status == 30 and "nope" in info.value.message
    with pytest.raises(ModelNotFound):
        tc.delete_model("nope")
    with pytest.raises(BadArgument) as info:
        tc.call(Cmd.INFO, {})
    assert info.value.status == 14 and "model" in info.value.message
    with pytest.raises(BadArgument):
        tc.call(Cmd.DELETE, {"model": ["x"]})
    # another tenant's model can be neither seen nor deleted (assert_serving still uses it)
    with pytest.raises(ModelNotFound):
        tc.delete_model(PROBE_MODEL)
    assert_serving(cluster, tc)


def test_upload_sha256_mismatch(cluster: LocalCluster, probe: dict[str, Any], tc: Client) -> None:
    data = zoo.model_bytes("tiny_add")
    before = snapshot(cluster)
    wrong = hashlib.sha256(b"something else").hexdigest()
    handle = tc.call(Cmd.UPLOAD_BEGIN, {"name": "m", "size": len(data), "sha256": wrong}).header[
        "upload"
    ]
    chunk(tc, handle, 0, data)
    with pytest.raises(UploadCorrupt) as info:
        commit(tc, handle)
    assert info.value.status == 33 and "sha256" in info.value.message
    assert_nothing_left(cluster, tc, before, "m", handle=handle)
    assert_serving(cluster, tc)


def test_upload_truncated(cluster: LocalCluster, probe: dict[str, Any], tc: Client) -> None:
    data = zoo.model_bytes("tiny_add")
    before = snapshot(cluster)
    handle = begin(tc, "m", data)
    half = len(data) // 2
    assert chunk(tc, handle, 0, data[:half]) == half
    # skip a middle piece, send the tail: the gap must be noticed
    assert chunk(tc, handle, half + 8, data[half + 8 :]) == len(data) - 8
    with pytest.raises(UploadCorrupt) as info:
        commit(tc, handle)
    assert info.value.status == 33 and "incomplete" in info.value.message
    assert_nothing_left(cluster, tc, before, "m", handle=handle)
    # the handle is gone after a failed commit
    with pytest.raises(UploadCorrupt):
        commit(tc, handle)
    assert_serving(cluster, tc)


def test_upload_no_chunks(cluster: LocalCluster, probe: dict[str, Any], tc: Client) -> None:
    data = zoo.model_bytes("tiny_add")
    before = snapshot(cluster)
    handle = begin(tc, "m", data)
    with pytest.raises(UploadCorrupt):
        commit(tc, handle)
    assert_nothing_left(cluster, tc, before, "m", handle=handle)
    assert_serving(cluster, tc)


@pytest.mark.parametrize("offset", [-1, "end-8", "end"], ids=["negative", "overlaps-end", "past"])
def test_upload_chunk_beyond_declared_size(
    cluster: LocalCluster, probe: dict[str, Any], tc: Client, offset: Any
) -> None:
    data = zoo.model_bytes("tiny_add")
    before = snapshot(cluster)
    handle = begin(tc, "m", data)
    at = {"end-8": len(data) - 8, "end": len(data)}.get(offset, offset)
    with pytest.raises(UploadCorrupt) as info:
        chunk(tc, handle, at, data[:16])
    assert info.value.status == 33 and "declared size" in info.value.message
    # the upload was discarded: its handle is unknown now
    with pytest.raises(UploadCorrupt) as info:
        commit(tc, handle)
    assert "unknown upload handle" in info.value.message
    assert_nothing_left(cluster, tc, before, "m", handle=handle)
    assert_serving(cluster, tc)


def test_upload_unknown_handle(cluster: LocalCluster, probe: dict[str, Any], tc: Client) -> None:
    for cmd, payload in ((Cmd.UPLOAD_CHUNK, [b"abc"]), (Cmd.UPLOAD_COMMIT, [])):
        header = {"upload": "0123456789abcdef01234567", "offset": 0}
        with pytest.raises(UploadCorrupt) as info:
            tc.call(cmd, header, payload)
        assert info.value.status == 33 and "unknown upload handle" in info.value.message
        assert_serving(cluster, tc)


def test_upload_handle_of_another_tenant(
    cluster: LocalCluster, probe: dict[str, Any], tc: Client
) -> None:
    data = zoo.model_bytes("tiny_add")
    handle = begin(tc, "m", data)
    with Client(cluster.address, tenant=tc.tenant + "-other", timeout=60) as other:
        with pytest.raises(UploadCorrupt):
            chunk(other, handle, 0, data)
        with pytest.raises(UploadCorrupt):
            commit(other, handle)
        assert "m" not in {m["name"] for m in other.list_models()}
    # the owner's upload is unaffected
    chunk(tc, handle, 0, data)
    assert commit(tc, handle)["name"] == "m"
    assert_serving(cluster, tc)


@pytest.mark.parametrize(
    ("header", "mentions"),
    [
        pytest.param({"upload": 5}, "upload", id="handle-int"),
        pytest.param({"upload": "x"}, "offset", id="offset-missing"),
        pytest.param({"upload": "x", "offset": "0"}, "offset", id="offset-string"),
    ],
)
def test_upload_chunk_bad_header(
    cluster: LocalCluster, probe: dict[str, Any], tc: Client, header: dict, mentions: str
) -> None:
    data = zoo.model_bytes("tiny_add")
    if header["upload"] == "x":
        header = {**header, "upload": begin(tc, "m", data)}
    with pytest.raises(BadArgument) as info:
        tc.call(Cmd.UPLOAD_CHUNK, header, [data])
    assert info.value.status == 14 and mentions in info.value.message
    assert_serving(cluster, tc)


def test_upload_chunk_needs_one_frame(
    cluster: LocalCluster, probe: dict[str, Any], tc: Client
) -> None:
    data = zoo.model_bytes("tiny_add")
    handle = begin(tc, "m", data)
    for frames in ([], [data[:10], data[10:]]):
        with pytest.raises(BadArgument) as info:
            tc.call(Cmd.UPLOAD_CHUNK, {"upload": handle, "offset": 0}, frames)
        assert "payload frame" in info.value.message
    # the upload survives a refused chunk
    chunk(tc, handle, 0, data)
    assert commit(tc, handle)["name"] == "m"
    assert_serving(cluster, tc)


@pytest.mark.parametrize(
    ("build", "mentions"),
    [
        pytest.param(lambda: b"this is not an ONNX model \x00\xff\x13" * 8, "ONNX", id="not-onnx"),
        pytest.param(empty_graph_model, "graph", id="empty-graph"),
        pytest.param(checker_fails_model, "ghost", id="fails-onnx-checker"),
        pytest.param(external_initializer_model, "external data", id="external-initializer"),
        pytest.param(lambda: external_initializer_model(readable_relative_file()), "external",
                     id="external-initializer-existing-file"),
        pytest.param(external_subgraph_model, "external", id="external-in-subgraph"),
        pytest.param(lambda: domain_model("com.example.custom", "Backdoor"), "com.example.custom",
                     id="custom-domain"),
        pytest.param(lambda: domain_model("com.microsoft", "FastGelu"), "com.microsoft",
                     id="contrib-domain"),
        pytest.param(subgraph_domain_model, "com.microsoft", id="contrib-domain-in-subgraph"),
        pytest.param(string_io_model, "element type", id="string-tensors"),
        pytest.param(no_inputs_model, "no inputs", id="no-inputs"),
        pytest.param(no_shape_model, "shape", id="no-shape"),
        pytest.param(runtime_fails_model, "ONNX Runtime", id="runtime-cannot-load"),
        pytest.param(run_fails_model, "fails to run", id="runtime-cannot-run"),
    ],
)  # fmt: skip
def test_upload_invalid_model(
    cluster: LocalCluster, probe: dict[str, Any], tc: Client, build: Any, mentions: str
) -> None:
    exc = upload_fails(cluster, tc, "bad", build(), ModelInvalid)
    assert mentions in exc.message, exc.message


def test_upload_external_data_in_constant_cannot_read_files(
    cluster: LocalCluster, probe: dict[str, Any], tc: Client
) -> None:
    """A Constant node whose tensor is external data must be refused, not read from disk."""
    data = external_constant_model()
    before = snapshot(cluster)
    try:
        tc.upload_model("leak", data)
    except ModelInvalid as exc:
        assert "external" in exc.message, exc.message
        assert_nothing_left(cluster, tc, before, "leak", sha256=hashlib.sha256(data).hexdigest())
        assert_serving(cluster, tc)
        return
    leaked = bytes(tc.infer("leak", {"x": np.zeros((1, 32), np.uint8)})["y"][0])
    secret = (Path.cwd() / readable_relative_file()).read_bytes()[:32]
    pytest.fail(
        "a model whose Constant node points at external data was accepted"
        + (
            f" and served the bytes of a file on the worker's disk: {leaked!r}"
            if leaked == secret
            else ""
        )
    )


def test_upload_negative_dimension(
    cluster: LocalCluster, probe: dict[str, Any], tc: Client
) -> None:
    """Model info may only carry -1 (dynamic) or sizes: reject -3 or report it as dynamic."""
    try:
        info = tc.upload_model("negdim", negative_dim_model())
    except ModelInvalid as exc:
        assert "-3" in exc.message or "dimension" in exc.message, exc.message
    else:
        dims = [d for _, _, shape in [*info["inputs"], *info["outputs"]] for d in shape]
        assert all(isinstance(d, int) and d >= -1 for d in dims), (
            f"model info carries dimensions {dims}; the protocol allows sizes and -1 only"
        )
        assert tc.infer("negdim", {"x": np.ones((1, 4), np.float32)})["y"].shape == (1, 4)
    assert_serving(cluster, tc)


def test_upload_fixed_batch_with_max_batch(
    cluster: LocalCluster, probe: dict[str, Any], tc: Client
) -> None:
    data = fixed_batch_model()
    exc = upload_fails(cluster, tc, "fixed", data, ModelInvalid, max_batch=4)
    assert "max_batch=4" in exc.message and "cannot batch" in exc.message
    # without max_batch it is accepted with a cap of 1, and serves
    info = tc.upload_model("fixed", data)
    assert info["max_batch"] == 1
    assert info["inputs"] == [["x", "float32", [1, 4]]]
    x = np.ones((1, 4), np.float32)
    np.testing.assert_allclose(tc.infer("fixed", {"x": x})["y"], x + np.arange(4))
    with pytest.raises(InputInvalid):
        tc.infer("fixed", {"x": np.ones((2, 4), np.float32)})
    # max_batch=1 explicitly is fine too
    assert tc.upload_model("fixed", data, replace=True, max_batch=1)["max_batch"] == 1
    assert_serving(cluster, tc)


def test_upload_exists_then_replace(
    cluster: LocalCluster, probe: dict[str, Any], tc: Client
) -> None:
    first = tc.upload_model("dup", zoo.model_bytes("tiny_add", seed=0))
    second_bytes = zoo.model_bytes("tiny_add", seed=1)
    with pytest.raises(ModelExists) as info:
        tc.upload_model("dup", second_bytes)
    assert info.value.status == 32 and "replace" in info.value.message
    assert tc.model_info("dup")["sha256"] == first["sha256"]
    assert_serving(cluster, tc)
    second = tc.upload_model("dup", second_bytes, replace=True)
    assert second["sha256"] == hashlib.sha256(second_bytes).hexdigest() != first["sha256"]
    assert tc.model_info("dup")["sha256"] == second["sha256"]
    assert [m["name"] for m in tc.list_models()] == ["dup"]
    assert tc.infer("dup", tiny_input())["output"].shape == (1, 4)
    assert_serving(cluster, tc)


@pytest.mark.parametrize(
    ("fields", "exc_type", "mentions"),
    [
        pytest.param({"name": "bad name!"}, BadArgument, "model name", id="name-space"),
        pytest.param({"name": "../../etc/passwd"}, BadArgument, "model name", id="name-path"),
        pytest.param({"name": ""}, BadArgument, "model name", id="name-empty"),
        pytest.param({"name": "x" * 200}, BadArgument, "model name", id="name-long"),
        pytest.param({"name": 7}, BadArgument, "name", id="name-int"),
        pytest.param({"name": None}, BadArgument, "name", id="name-missing"),
        pytest.param({"size": 1 << 40}, TooLarge, "limit", id="size-over-limit"),
        pytest.param({"size": 0}, ModelInvalid, "empty", id="size-zero"),
        pytest.param({"size": -5}, BadArgument, "size", id="size-negative"),
        pytest.param({"size": "12"}, BadArgument, "size", id="size-string"),
        pytest.param({"sha256": "abc"}, BadArgument, "sha256", id="sha-short"),
        pytest.param({"sha256": "z" * 64}, BadArgument, "sha256", id="sha-not-hex"),
        pytest.param({"sha256": None}, BadArgument, "sha256", id="sha-missing"),
        pytest.param({"format": "tensorflow"}, BadArgument, "format", id="format"),
        pytest.param({"max_batch": 0}, BadArgument, "max_batch", id="max-batch-zero"),
        pytest.param({"max_batch": 1 << 20}, BadArgument, "max_batch", id="max-batch-huge"),
        pytest.param({"max_batch": "4"}, BadArgument, "max_batch", id="max-batch-string"),
        pytest.param({"replace": "yes"}, BadArgument, "replace", id="replace-string"),
    ],
)
def test_upload_begin_bad_header(
    cluster: LocalCluster,
    probe: dict[str, Any],
    tc: Client,
    fields: dict[str, Any],
    exc_type: type[MTError],
    mentions: str,
) -> None:
    data = zoo.model_bytes("tiny_add")
    header = {"name": "m", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    header.update(fields)
    header = {k: v for k, v in header.items() if v is not None}
    before = snapshot(cluster)
    with pytest.raises(exc_type) as info:
        tc.call(Cmd.UPLOAD_BEGIN, header)
    assert info.value.status == exc_type.status
    assert mentions in info.value.message, info.value.message
    assert snapshot(cluster)[0] == before[0], "a refused UPLOAD_BEGIN left a temp file"
    assert tc.list_models() == []
    assert_serving(cluster, tc)


def test_too_many_uploads_in_progress(
    cluster: LocalCluster, probe: dict[str, Any], tc: Client
) -> None:
    data = zoo.model_bytes("tiny_add")
    handles = [begin(tc, f"m{i}", data) for i in range(TenantLimits().uploads)]
    with pytest.raises(QuotaExceeded) as info:
        begin(tc, "one-more", data)
    assert info.value.status == 22 and "in progress" in info.value.message
    # another tenant is not affected, and finishing an upload frees a slot
    with Client(cluster.address, tenant=tc.tenant + "-other", timeout=60) as other:
        assert chunk(other, begin(other, "m", data), 0, data) == len(data)
    chunk(tc, handles[0], 0, data)
    assert commit(tc, handles[0])["name"] == "m0"
    begin(tc, "one-more", data)
    assert_serving(cluster, tc)


def test_failed_uploads_do_not_disturb_existing_model(
    cluster: LocalCluster, probe: dict[str, Any], tc: Client
) -> None:
    """A failed replace keeps the old model serving and its blob in place."""
    good = tc.upload_model("keep", zoo.model_bytes("tiny_add"))
    for data in (
        b"not a model at all, really not" * 4,
        checker_fails_model(),
        runtime_fails_model(),
    ):
        before = snapshot(cluster)
        with pytest.raises(ModelInvalid):
            tc.upload_model("keep", data, replace=True)
        assert tc.model_info("keep")["sha256"] == good["sha256"]
        parts, blobs = snapshot(cluster)
        assert parts <= before[0] and f"{good['sha256']}.onnx" in blobs
    assert tc.infer("keep", tiny_input())["output"].shape == (1, 4)
    assert_serving(cluster, tc)
