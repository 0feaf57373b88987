"""Registry and store, uploads in progress, model checks and request input validation."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper

import broker.uploads as uploads_module
from bench import zoo
from broker.commits import CommitValidator, batch_cap
from broker.registry import ModelStore, Registry
from broker.uploads import (
    Upload,
    Uploads,
    check_model_name,
    verify_sha256,
)
from broker.validate import order_inputs
from mtcore.errors import (
    BadArgument,
    InputInvalid,
    ModelInvalid,
    Overloaded,
    Status,
    TooLarge,
    UploadCorrupt,
)
from mtcore.modelcheck import ModelSignature, check_model
from mtcore.protocol import TensorDesc
from tests.factories import make_model

# ---------------------------------------------------------------- registry and store


@pytest.fixture
def open_registry(tmp_path: Path) -> Iterator[Callable[[], Registry]]:
    """Opens registries on one state directory and closes them all at teardown."""
    opened: list[Registry] = []

    def _open() -> Registry:
        registry = Registry(tmp_path / "state")
        opened.append(registry)
        return registry

    yield _open
    for registry in opened:
        registry.close()


def store_blob(registry: Registry, data: bytes) -> str:
    sha = hashlib.sha256(data).hexdigest()
    source = registry.store.root.parent / f"incoming-{sha[:8]}-{time.monotonic_ns()}"
    source.write_bytes(data)
    registry.store.put_file(sha, source)
    assert not source.exists()
    return sha


def record(registry: Registry, tenant: str, name: str, data: bytes, **kwargs):
    sha = store_blob(registry, data)
    return make_model(name, sha=sha, size=len(data), tenant=tenant, **kwargs)


def test_registry_persists_across_reopen(open_registry) -> None:
    reg = open_registry()
    rec = record(reg, "alice", "m", b"model bytes", max_batch=4)
    assert reg.put(rec) is None
    assert rec.created > 0
    reg.set_profile(rec, {1: 120.5, 4: 400.0})
    assert rec.profile == {1: 120.5, 4: 400.0}
    reg.close()

    again = open_registry()
    got = again.get("alice", "m")
    assert got == rec  # every field, including inputs, outputs, created and the profile
    assert got.profile == {1: 120.5, 4: 400.0}
    assert all(isinstance(k, int) for k in got.profile)
    assert got.inputs == (TensorDesc("input", "float32", (-1, 4)),)
    assert again.store.read(got.sha256) == b"model bytes"
    assert again.count() == 1


def test_registry_replace_returns_old_record(open_registry) -> None:
    reg = open_registry()
    old = record(reg, "alice", "m", b"v1")
    new = record(reg, "alice", "m", b"v2")
    assert reg.put(old) is None
    assert reg.put(new) is old
    assert reg.get("alice", "m") is new
    assert reg.count() == 1
    reg.close()
    assert open_registry().get("alice", "m").sha256 == new.sha256


def test_registry_delete(open_registry) -> None:
    reg = open_registry()
    rec = record(reg, "alice", "m", b"bytes")
    reg.put(rec)
    assert reg.delete("alice", "m") is rec
    assert reg.get("alice", "m") is None
    assert reg.delete("alice", "m") is None
    assert not reg.sha_in_use(rec.sha256)
    reg.close()
    again = open_registry()
    assert again.get("alice", "m") is None and again.count() == 0


def test_registry_tenants_are_separate(open_registry) -> None:
    reg = open_registry()
    alice = record(reg, "alice", "m", b"alice's")
    bob = record(reg, "bob", "m", b"bob's")
    reg.put(alice)
    reg.put(bob)
    assert reg.get("alice", "m") is alice and reg.get("bob", "m") is bob
    assert reg.list("alice") == [alice] and reg.list("bob") == [bob]
    assert reg.list("carol") == []
    reg.delete("alice", "m")
    assert reg.get("bob", "m") is bob
    reg.close()
    again = open_registry()
    assert again.get("alice", "m") is None and again.get("bob", "m").sha256 == bob.sha256


def test_registry_list_sorted_by_name(open_registry) -> None:
    reg = open_registry()
    for name in ("zeta", "alpha", "mid"):
        reg.put(record(reg, "alice", name, name.encode()))
    assert [m.name for m in reg.list("alice")] == ["alpha", "mid", "zeta"]


def test_identical_bytes_share_one_blob(open_registry) -> None:
    reg = open_registry()
    alice = record(reg, "alice", "a", b"same bytes")
    bob = record(reg, "bob", "b", b"same bytes")
    reg.put(alice)
    reg.put(bob)
    assert alice.sha256 == bob.sha256
    blobs = [p for p in reg.store.root.rglob("*") if p.is_file()]
    assert blobs == [reg.store.path(alice.sha256)]
    reg.delete("alice", "a")
    assert reg.sha_in_use(alice.sha256)
    reg.delete("bob", "b")
    assert not reg.sha_in_use(alice.sha256)


def test_registry_skips_rows_whose_blob_is_gone(open_registry) -> None:
    reg = open_registry()
    rec = record(reg, "alice", "m", b"bytes")
    reg.put(rec)
    reg.close()
    reg.store.remove(rec.sha256)
    assert open_registry().get("alice", "m") is None


def test_store_layout(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    sha = hashlib.sha256(b"x").hexdigest()
    assert store.path(sha) == tmp_path / "models" / sha[:2] / f"{sha}.onnx"
    assert not store.has(sha)
    source = tmp_path / "in"
    source.write_bytes(b"x")
    assert store.put_file(sha, source) == store.path(sha)
    assert store.has(sha) and store.read(sha) == b"x"
    store.remove(sha)
    store.remove(sha)  # idempotent
    assert not store.has(sha)


def test_predicted_us() -> None:
    model = make_model(profile={1: 100.0, 4: 250.0, 8: 400.0})
    assert model.predicted_us(1) == 100.0
    assert model.predicted_us(3) == 250.0  # the smallest profiled batch holding 3 rows
    assert model.predicted_us(8) == 400.0
    assert model.predicted_us(16) == 800.0  # beyond the largest: linear
    assert make_model().predicted_us(1) is None


def test_model_info_map() -> None:
    info = make_model("m", profile={1: 10.7, 2: 20.2}).to_info()
    assert info["name"] == "m" and info["state"] == "ready" and info["size"] == 1000
    assert info["inputs"] == [["input", "float32", [-1, 4]]]
    assert info["profile"] == {"1": 10, "2": 20}  # msgpack-friendly keys


# ---------------------------------------------------------------- uploads


@pytest.fixture
def uploads(tmp_path: Path) -> Iterator[Uploads]:
    u = Uploads(tmp_path / "uploads", max_model_bytes=1 << 20)
    yield u
    u.close()


DATA = bytes(range(256)) * 40  # 10 KiB
SHA = hashlib.sha256(DATA).hexdigest()


def begin(uploads: Uploads, tenant: str = "alice", data: bytes = DATA, sha: str | None = None):
    return uploads.begin(
        tenant, "m", len(data), sha or hashlib.sha256(data).hexdigest(), False, None
    )


def send(uploads: Uploads, upload: Upload, offset: int, data: bytes = DATA, size: int = 1000):
    return uploads.write_chunk(upload, offset, memoryview(data)[offset : offset + size])


def test_upload_in_order(uploads: Uploads) -> None:
    upload = begin(uploads)
    assert upload.path.suffix == ".part" and upload.path.parent == uploads.directory
    received = [send(uploads, upload, off, size=4096) for off in range(0, len(DATA), 4096)]
    assert received == [4096, 8192, 10240]
    path = uploads.finish(upload)
    assert path.read_bytes() == DATA
    assert upload.handle not in uploads.active


def test_upload_out_of_order_and_resent_chunks(uploads: Uploads) -> None:
    upload = begin(uploads)
    offsets = [9000, 0, 3000, 10000, 1000, 3000, 6000, 2000, 0, 4000, 5000, 7000, 10000, 8000]
    for offset in offsets:
        send(uploads, upload, offset)
    assert upload.received() == len(DATA)
    assert upload.ranges == [(0, len(DATA))]
    assert uploads.finish(upload).read_bytes() == DATA


def test_upload_overlapping_chunks(uploads: Uploads) -> None:
    upload = begin(uploads)
    for offset, size in ((0, 700), (500, 5000), (5200, 4000), (9000, 1240)):
        send(uploads, upload, offset, size=size)
    assert upload.received() == len(DATA)
    assert uploads.finish(upload).read_bytes() == DATA


def test_upload_missing_chunk(uploads: Uploads) -> None:
    upload = begin(uploads)
    for offset in range(0, len(DATA), 1000):
        if offset != 4000:
            send(uploads, upload, offset)
    with pytest.raises(UploadCorrupt) as info:
        uploads.finish(upload)
    assert info.value.status == Status.UPLOAD_CORRUPT
    assert "incomplete" in info.value.message
    assert not upload.path.exists()
    assert upload.handle not in uploads.active


def test_upload_sha_checked_after_finish(uploads: Uploads) -> None:
    """finish() checks coverage only; verify_sha256 (run off the loop) checks the hash."""
    upload = begin(uploads)
    send(uploads, upload, 0, size=len(DATA))
    path = uploads.finish(upload)
    assert verify_sha256(path, SHA) == DATA
    assert path.exists()  # the caller owns it now


def test_upload_sha_mismatch(uploads: Uploads) -> None:
    upload = begin(uploads, sha="0" * 64)
    send(uploads, upload, 0, size=len(DATA))
    path = uploads.finish(upload)
    with pytest.raises(UploadCorrupt, match="sha256 mismatch") as info:
        verify_sha256(path, upload.sha256)
    assert info.value.status == Status.UPLOAD_CORRUPT
    assert not path.exists()
    assert list(uploads.directory.iterdir()) == []


def test_upload_corrupted_bytes(uploads: Uploads) -> None:
    upload = begin(uploads)
    bad = bytearray(DATA)
    bad[5000] ^= 0xFF
    send(uploads, upload, 0, bytes(bad), size=len(DATA))
    path = uploads.finish(upload)
    with pytest.raises(UploadCorrupt, match="sha256 mismatch"):
        verify_sha256(path, upload.sha256)
    assert not path.exists()


def test_commit_validator(tmp_path: Path) -> None:
    """Hash, then model check, in the pool: each failure carries its own status."""
    good = zoo.model_bytes("tiny_add")
    validator = CommitValidator(threads=1)
    try:
        path = tmp_path / "good.part"
        path.write_bytes(good)
        signature = validator.submit(path, hashlib.sha256(good).hexdigest()).result(timeout=60)
        assert signature.inputs == (TensorDesc("input", "float32", (-1, 4)),)
        with pytest.raises(UploadCorrupt):
            validator.submit(path, "0" * 64).result(timeout=60)
        assert not path.exists()
        junk = tmp_path / "junk.part"
        junk.write_bytes(b"not onnx")
        with pytest.raises(ModelInvalid):
            validator.submit(junk, hashlib.sha256(b"not onnx").hexdigest()).result(timeout=60)
    finally:
        validator.close()


@pytest.mark.parametrize(("offset", "size"), [(10000, 241), (10240, 1), (-1, 10), (20000, 5)])
def test_upload_chunk_beyond_size(uploads: Uploads, offset: int, size: int) -> None:
    upload = begin(uploads)
    with pytest.raises(UploadCorrupt) as info:
        uploads.write_chunk(upload, offset, memoryview(b"\0" * size))
    assert info.value.status == Status.UPLOAD_CORRUPT
    assert upload.handle not in uploads.active  # discarded
    assert not upload.path.exists()
    with pytest.raises(UploadCorrupt):
        uploads.get("alice", upload.handle)


def test_upload_last_byte_chunk_accepted(uploads: Uploads) -> None:
    upload = begin(uploads)
    assert uploads.write_chunk(upload, len(DATA) - 1, memoryview(DATA[-1:])) == 1


def test_upload_get(uploads: Uploads) -> None:
    upload = begin(uploads)
    assert uploads.get("alice", upload.handle) is upload
    for tenant, handle in (("bob", upload.handle), ("alice", "nope")):
        with pytest.raises(UploadCorrupt) as info:
            uploads.get(tenant, handle)
        assert info.value.status == Status.UPLOAD_CORRUPT


def test_upload_expire(uploads: Uploads) -> None:
    stale, fresh = begin(uploads), begin(uploads)
    now = time.monotonic()
    stale.touched = now - 100
    fresh.touched = now - 1
    assert uploads.expire(now, timeout=10) == 1
    assert not stale.path.exists() and fresh.path.exists()
    assert set(uploads.active) == {fresh.handle}
    with pytest.raises(UploadCorrupt):
        uploads.get("alice", stale.handle)
    assert uploads.expire(now, timeout=10) == 0


def test_upload_activity_keeps_it_alive(uploads: Uploads) -> None:
    upload = begin(uploads)
    upload.touched = time.monotonic() - 100
    uploads.get("alice", upload.handle)  # a chunk or commit arrives
    assert uploads.expire(time.monotonic(), timeout=10) == 0


def test_stale_part_files_removed_at_construction(tmp_path: Path) -> None:
    directory = tmp_path / "uploads"
    directory.mkdir()
    (directory / "abc.part").write_bytes(b"half an upload")
    (directory / "def.part").write_bytes(b"")
    (directory / "notes.txt").write_text("not ours to delete")
    u = Uploads(directory, max_model_bytes=100)
    try:
        assert sorted(p.name for p in directory.iterdir()) == ["notes.txt"]
        assert u.active == {}
    finally:
        u.close()


def test_upload_close_removes_temp_files(tmp_path: Path) -> None:
    u = Uploads(tmp_path / "uploads", max_model_bytes=1 << 20)
    paths = [begin(u).path for _ in range(3)]
    u.close()
    assert not any(p.exists() for p in paths) and u.active == {}


def test_upload_begin_arguments(uploads: Uploads) -> None:
    upload = uploads.begin("alice", "m", 10, SHA.upper(), True, 4)
    assert upload.sha256 == SHA and upload.replace and upload.max_batch == 4
    cases = [
        (("alice", "m", 0, SHA), ModelInvalid),  # an empty file is no model
        (("alice", "m", -5, SHA), BadArgument),
        (("alice", "m", (1 << 20) + 1, SHA), TooLarge),
        (("alice", "m", 10, "abc"), BadArgument),
        (("alice", "m", 10, "g" * 64), BadArgument),
        (("alice", "m", 10, SHA + "0"), BadArgument),
        (("alice", "../evil", 10, SHA), BadArgument),
    ]
    for (tenant, name, size, sha), exc in cases:
        with pytest.raises(exc) as info:
            uploads.begin(tenant, name, size, sha, False, None)
        assert info.value.status == exc.status
    assert len(uploads.active) == 1  # failed begins leave nothing behind
    assert len(list(uploads.directory.iterdir())) == 1


@pytest.mark.parametrize(
    "name", ["m", "A", "resnet50", "m.v2:prod-1_x", "0abc", "a" * 128, "x" + "-" * 127]
)
def test_model_name_valid(name: str) -> None:
    assert check_model_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", ".hidden", "-x", "_x", ":x", "a/b", "../etc", "a b", "a\n", "é", "a" * 129, "a\0"],
)
def test_model_name_invalid(name: str) -> None:
    with pytest.raises(BadArgument) as info:
        check_model_name(name)
    assert info.value.status == Status.BAD_ARGUMENT


# ---------------------------------------------------------------- modelcheck


def _graph_model(nodes, inputs, outputs, initializers=(), opsets=(("", 17),)) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    model.ir_version = 9
    return model


def _vi(name: str, shape, elem: int = TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def _fixed_batch_model() -> bytes:
    node = helper.make_node("Relu", ["x"], ["y"])
    return _graph_model([node], [_vi("x", [1, 4])], [_vi("y", [1, 4])]).SerializeToString()


@pytest.mark.parametrize(
    ("name", "out_name", "in_shape", "out_shape"),
    [
        ("tiny_add", "output", (-1, 4), (-1, 4)),
        ("mlp", "logits", (-1, 256), (-1, 10)),
        ("mobilenetv2", "logits", (-1, 3, 224, 224), (-1, 1000)),
    ],
)
def test_check_model_accepts_zoo(name: str, out_name: str, in_shape, out_shape) -> None:
    signature = check_model(zoo.model_bytes(name))
    assert signature.inputs == (TensorDesc("input", "float32", in_shape),)
    assert signature.outputs == (TensorDesc(out_name, "float32", out_shape),)
    assert signature.batchable
    assert signature.fixed_batch_reason() == ""


def test_check_model_fixed_batch() -> None:
    signature = check_model(_fixed_batch_model())
    assert signature.inputs == (TensorDesc("x", "float32", (1, 4)),)
    assert not signature.batchable
    assert "'x'" in signature.fixed_batch_reason()


def test_check_model_mixed_batch_is_not_batchable() -> None:
    node = helper.make_node("ReduceSum", ["x"], ["y"], keepdims=0)
    model = _graph_model([node], [_vi("x", ["batch", 4])], [_vi("y", [])])
    signature = check_model(model.SerializeToString())
    assert signature.inputs[0].shape == (-1, 4)
    assert not signature.batchable  # the output has no batch axis
    assert "'y'" in signature.fixed_batch_reason()


@pytest.mark.parametrize(
    "data",
    [b"", b"this is not an ONNX model", b"\xff" * 64, b"\x08\x09\x12\x03abc\x3a\x05\x0a\x03"],
    ids=["empty", "text", "ff", "truncated-protobuf"],
)
def test_check_model_rejects_non_onnx(data: bytes) -> None:
    with pytest.raises(ModelInvalid) as info:
        check_model(data)
    assert info.value.status == Status.MODEL_INVALID


def test_check_model_rejects_external_data() -> None:
    model = zoo.build("tiny_add")
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "../../../etc/passwd"
    with pytest.raises(ModelInvalid, match="external data"):
        check_model(model.SerializeToString())


def test_check_model_rejects_custom_domain() -> None:
    node = helper.make_node("Evil", ["x"], ["y"], domain="com.example.evil")
    model = _graph_model(
        [node], [_vi("x", [-1, 4])], [_vi("y", [-1, 4])], opsets=[("", 17), ("com.example.evil", 1)]
    )
    with pytest.raises(ModelInvalid, match=r"com\.example\.evil"):
        check_model(model.SerializeToString())


def test_check_model_rejects_checker_failures() -> None:
    node = helper.make_node("Add", ["x", "undefined"], ["y"])
    model = _graph_model([node], [_vi("x", [-1, 4])], [_vi("y", [-1, 4])])
    with pytest.raises(ModelInvalid, match=r"onnx\.checker"):
        check_model(model.SerializeToString())


def test_check_model_rejects_empty_graph() -> None:
    model = _graph_model([], [_vi("x", [1])], [_vi("x", [1])])
    with pytest.raises(ModelInvalid, match="no graph nodes"):
        check_model(model.SerializeToString())


def test_check_model_rejects_dtypes_off_the_wire() -> None:
    node = helper.make_node("Identity", ["x"], ["y"])
    model = _graph_model(
        [node], [_vi("x", [-1, 4], TensorProto.UINT16)], [_vi("y", [-1, 4], TensorProto.UINT16)]
    )
    with pytest.raises(ModelInvalid, match="element type"):
        check_model(model.SerializeToString())


def test_check_model_rejects_shapeless_inputs() -> None:
    node = helper.make_node("Identity", ["x"], ["y"])
    model = _graph_model([node], [_vi("x", None)], [_vi("y", None)])
    with pytest.raises(ModelInvalid):  # the checker or our own shape check
        check_model(model.SerializeToString())


def test_check_model_ignores_initializers_listed_as_inputs() -> None:
    model = zoo.build("tiny_add")
    bias = model.graph.initializer[0]
    model.graph.input.append(_vi(bias.name, list(bias.dims)))
    signature = check_model(model.SerializeToString())
    assert [d.name for d in signature.inputs] == ["input"]


def test_batch_cap() -> None:
    batchable = check_model(zoo.model_bytes("tiny_add"))
    fixed = check_model(_fixed_batch_model())
    assert batch_cap(batchable, None, 8) == 8
    assert batch_cap(batchable, 32, 8) == 32
    assert batch_cap(batchable, 1, 8) == 1
    assert batch_cap(fixed, None, 8) == 1
    assert batch_cap(fixed, 1, 8) == 1
    with pytest.raises(ModelInvalid, match="cannot batch") as info:
        batch_cap(fixed, 4, 8)
    assert "'x'" in info.value.message


def test_signature_batchable_rules() -> None:
    dyn = TensorDesc("x", "float32", (-1, 4))
    assert ModelSignature((dyn,), (dyn,)).batchable
    assert not ModelSignature((dyn,), (TensorDesc("y", "float32", ()),)).batchable
    assert not ModelSignature((TensorDesc("x", "float32", (2, -1)),), (dyn,)).batchable


# ---------------------------------------------------------------- request inputs


def _two_input_model(max_batch: int = 8):
    lead = -1 if max_batch > 1 else 1
    return make_model(
        "two",
        max_batch=max_batch,
        inputs=(
            TensorDesc("a", "float32", (lead, 3)),
            TensorDesc("b", "int64", (lead,)),
        ),
    )


def _frame(desc: TensorDesc) -> bytes:
    return os.urandom(desc.nbytes())


def test_order_inputs_reorders_to_signature() -> None:
    model = _two_input_model()
    b, a = TensorDesc("b", "int64", (5,)), TensorDesc("a", "float32", (5, 3))
    fb, fa = _frame(b), _frame(a)
    descs, frames, batch = order_inputs(model, [b, a], [fb, fa])
    assert descs == [a, b] and frames == [fa, fb] and batch == 5
    descs, frames, batch = order_inputs(model, [a, b], [fa, fb])
    assert descs == [a, b] and frames == [fa, fb] and batch == 5


def test_order_inputs_non_batchable_is_one_row() -> None:
    model = _two_input_model(max_batch=1)
    a, b = TensorDesc("a", "float32", (1, 3)), TensorDesc("b", "int64", (1,))
    assert order_inputs(model, [a, b], [_frame(a), _frame(b)])[2] == 1


A = TensorDesc("a", "float32", (2, 3))
B = TensorDesc("b", "int64", (2,))


@pytest.mark.parametrize(
    ("descs", "match"),
    [
        ([A], "takes inputs"),  # missing
        ([A, B, TensorDesc("c", "int64", (2,))], "takes inputs"),  # extra
        ([A, TensorDesc("B", "int64", (2,))], "takes inputs"),  # names are case-sensitive
        ([A, A, B], "more than once"),  # duplicate
        ([TensorDesc("a", "float64", (2, 3)), B], "must be float32"),  # dtype
        ([TensorDesc("a", "float32", (2, 3, 1)), B], "shape"),  # rank
        ([TensorDesc("a", "float32", (6,)), B], "shape"),  # rank
        ([TensorDesc("a", "float32", (2, 4)), B], "axis 1"),  # fixed dim
        ([A, TensorDesc("b", "int64", (3,))], "disagree"),  # batch sizes
        ([TensorDesc("a", "float32", (0, 3)), TensorDesc("b", "int64", (0,))], "empty batch"),
    ],
    ids=[
        "missing",
        "extra",
        "case",
        "duplicate",
        "dtype",
        "rank-up",
        "rank-down",
        "fixed-dim",
        "batch-disagree",
        "empty-batch",
    ],
)
def test_order_inputs_rejects(descs: list[TensorDesc], match: str) -> None:
    with pytest.raises(InputInvalid, match=match) as info:
        order_inputs(_two_input_model(), descs, [_frame(d) for d in descs])
    assert info.value.status == Status.INPUT_INVALID


def test_order_inputs_rejects_wrong_fixed_batch() -> None:
    model = _two_input_model(max_batch=1)
    a, b = TensorDesc("a", "float32", (2, 3)), TensorDesc("b", "int64", (2,))
    with pytest.raises(InputInvalid, match="axis 0"):
        order_inputs(model, [a, b], [_frame(a), _frame(b)])


@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 40)), max_size=60))
def test_upload_ranges_match_a_byte_set(pieces: list[tuple[int, int]]) -> None:
    """Incremental range merging agrees with counting the distinct bytes received."""
    upload = Upload("h", "t", "m", 10**6, "0" * 64, False, None, Path("unused"), None)  # type: ignore[arg-type]
    seen: set[int] = set()
    for start, length in pieces:
        upload.add_range(start, start + length)
        seen.update(range(start, start + length))
        assert upload.received() == len(seen)
        ends, starts = [r[1] for r in upload.ranges[:-1]], [r[0] for r in upload.ranges[1:]]
        assert all(e < s for e, s in zip(ends, starts, strict=True))  # disjoint and sorted


def test_uploads_bound_the_disk_they_hold(tmp_path: Path, monkeypatch) -> None:
    """Uploads in progress may reserve only what the disk has free (bytes declared and not
    yet written); a discarded upload frees its reservation, written bytes are on disk."""
    free = 400 / uploads_module.DISK_SHARE  # so the bound is 400 unwritten bytes
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(uploads_module.shutil, "disk_usage",
                        lambda path: usage._replace(free=free))  # fmt: skip
    uploads = Uploads(tmp_path / "up", max_model_bytes=100)
    held = [uploads.begin(f"t{i}", f"m{i}", 90, "a" * 64, False, None) for i in range(4)]
    with pytest.raises(Overloaded, match="free on disk"):
        uploads.begin("t9", "m9", 90, "a" * 64, False, None)
    uploads.discard(held[0])
    fifth = uploads.begin("t9", "m9", 90, "a" * 64, False, None)
    with pytest.raises(Overloaded):
        uploads.begin("t8", "m8", 90, "a" * 64, False, None)
    fifth.file.write(b"x" * 90)
    fifth.add_range(0, 90)  # written: no longer a reservation of free space
    uploads.begin("t8", "m8", 90, "a" * 64, False, None)
