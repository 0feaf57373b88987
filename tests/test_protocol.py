"""The wire codec and the error hierarchy: round trips, bounds, and status codes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mtcore import errors
from mtcore.errors import (
    BadArgument,
    InputInvalid,
    ModelInvalid,
    MTError,
    ProtocolError,
    Status,
    TooLarge,
    UnknownCommand,
    UnsupportedVersion,
    error_for,
)
from mtcore.protocol import (
    DELIMITER,
    DTYPES,
    TAG,
    WORKER_TAG,
    Cmd,
    Limits,
    Message,
    TensorDesc,
    WCmd,
    build,
    check_frames,
    check_model_name,
    check_sha256,
    check_size,
    decode_header,
    decode_tensor,
    decode_tensors,
    dtype_name,
    encode_header,
    encode_tensor,
    encode_tensors,
    field,
    parse_body,
    parse_desc,
    parse_descs,
    peek_cmd,
    peek_id,
    request_id,
    split_envelope,
)

FAST = settings(max_examples=60, deadline=None)
PER_DTYPE = settings(max_examples=25, deadline=None)  # x9 dtypes


@contextmanager
def raises_status(exc_type: type[MTError], status: Status) -> Iterator[pytest.ExceptionInfo]:
    """pytest.raises that also checks the status code the exception carries."""
    with pytest.raises(exc_type) as info:
        yield info
    assert info.value.status == status, str(info.value)


# ---------------------------------------------------------------- headers

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
_headers = st.dictionaries(st.text(max_size=16), _values, max_size=8)


@FAST
@given(_headers)
def test_header_round_trip(header: dict) -> None:
    data = encode_header(header)
    assert decode_header(data) == header
    assert decode_header(memoryview(data)) == header
    assert decode_header(zmq.Frame(data).buffer) == header


@pytest.mark.parametrize(
    "value", [[1, 2], "text", 5, None, True, b"bin", 1.5], ids=lambda v: type(v).__name__
)
def test_header_must_be_a_map(value: object) -> None:
    with raises_status(ProtocolError, Status.MALFORMED):
        decode_header(msgpack.packb(value, use_bin_type=True))


@pytest.mark.parametrize(
    "data",
    [
        b"",  # nothing at all
        b"\xc1",  # never-used msgpack byte
        b"\x82\xa1a\x01",  # map of 2 with only one pair
        msgpack.packb({"a": 1}) + b"\x00",  # trailing bytes
        b"\xdf\xff\xff\xff\xff",  # map32 claiming 4 billion pairs
        b"\x91" * 5000,  # nesting deeper than the decoder allows
    ],
    ids=["empty", "reserved", "truncated", "trailing", "huge-count", "deep"],
)
def test_header_not_msgpack(data: bytes) -> None:
    with raises_status(ProtocolError, Status.MALFORMED) as info:
        decode_header(data)
    assert type(info.value) is ProtocolError
    reason = info.value.message
    assert reason and not reason.rstrip().endswith(":"), reason  # a reason one can act on


def test_header_too_large() -> None:
    limits = Limits(max_header_bytes=32)
    data = encode_header({"k": "x" * 40})
    with raises_status(TooLarge, Status.TOO_LARGE):
        decode_header(data, limits)
    # exactly at the limit is fine
    small = encode_header({"k": "x" * (32 - len(encode_header({"k": ""})))})
    assert len(small) == 32
    assert decode_header(small, limits) == {"k": "x" * (32 - 4)}


def test_header_too_large_by_default() -> None:
    with raises_status(TooLarge, Status.TOO_LARGE):
        decode_header(encode_header({"k": b"\0" * (64 * 1024)}))


@pytest.mark.parametrize(
    "header",
    [{1: "int key"}, {"ok": {2: "nested int key"}}, {1.5: "float key"}, {None: 1}],
    ids=["int", "nested-int", "float", "nil"],
)
def test_header_keys_must_be_strings(header: dict) -> None:
    data = msgpack.packb(header, use_bin_type=True, strict_types=False)
    with raises_status(ProtocolError, Status.MALFORMED):
        decode_header(data)


def test_header_binary_keys_rejected() -> None:
    """decode_header promises a *str*-keyed map; msgpack's strict_map_key lets bin keys in."""
    data = msgpack.packb({b"id": 1}, use_bin_type=True)
    with raises_status(ProtocolError, Status.MALFORMED):
        decode_header(data)


@pytest.mark.parametrize(
    "ext",
    [
        msgpack.ExtType(5, b"payload"),
        msgpack.ExtType(5, b"\x01"),  # fixext 1
        msgpack.Timestamp(1, 0),  # ext type -1
        msgpack.ExtType(5, b""),  # ext 8 with zero length
    ],
    ids=["ext", "fixext1", "timestamp", "ext-empty"],
)
def test_header_ext_types_rejected(ext: object) -> None:
    data = msgpack.packb({"a": ext}, use_bin_type=True)
    with raises_status(ProtocolError, Status.MALFORMED):
        decode_header(data)


# ---------------------------------------------------------------- frames


def _body(cmd: bytes = Cmd.PING.value, header: dict | None = None, *payload: bytes) -> list:
    return [TAG, cmd, encode_header({"id": 1} if header is None else header), *payload]


def test_build_layout() -> None:
    frames = build(TAG, Cmd.INFER, {"id": 7}, [b"abc"])
    assert frames[0] == DELIMITER == b""
    assert frames[1] == TAG == b"MTS1"
    assert frames[2] == b"\x05"
    assert decode_header(frames[3]) == {"id": 7}
    assert frames[4:] == [b"abc"]


@pytest.mark.parametrize("cmd", list(Cmd))
def test_parse_body_every_tenant_command(cmd: Cmd) -> None:
    frames = build(TAG, cmd, {"id": 3, "x": [1, 2]}, [b"p1", b""])
    msg = parse_body(frames[1:], TAG, Cmd)
    assert msg == Message(cmd, {"id": 3, "x": [1, 2]}, [b"p1", b""])
    assert msg.cmd is cmd


@pytest.mark.parametrize("cmd", list(WCmd))
def test_parse_body_every_worker_command(cmd: WCmd) -> None:
    msg = parse_body(build(WORKER_TAG, cmd, {"a": 1})[1:], WORKER_TAG, WCmd)
    assert msg.cmd is cmd and msg.header == {"a": 1} and msg.payload == []


def test_parse_body_zmq_frames() -> None:
    frames = [zmq.Frame(f) for f in build(TAG, Cmd.INFER, {"id": 9}, [b"\x00" * 16])[1:]]
    msg = parse_body(frames, TAG, Cmd)
    assert msg.cmd is Cmd.INFER and msg.header == {"id": 9}
    assert bytes(msg.payload[0].buffer) == b"\x00" * 16


@pytest.mark.parametrize("tag", [b"MTS2", b"MTW1", b"", b"MTS1\x00", b"HTTP/1.1 GET"])
def test_parse_body_wrong_tag(tag: bytes) -> None:
    body = _body()
    body[0] = tag
    with raises_status(UnsupportedVersion, Status.UNSUPPORTED_VERSION):
        parse_body(body, TAG, Cmd)


def test_parse_body_tenant_tag_on_worker_socket() -> None:
    with raises_status(UnsupportedVersion, Status.UNSUPPORTED_VERSION):
        parse_body(_body(), WORKER_TAG, WCmd)


@pytest.mark.parametrize("cmd", [b"\x00", b"\x0b", b"\x7f", b"\xff", b"", b"\x01\x01", b"PING"])
def test_parse_body_unknown_command(cmd: bytes) -> None:
    with raises_status(UnknownCommand, Status.UNKNOWN_COMMAND):
        parse_body(_body(cmd), TAG, Cmd)


def test_parse_body_worker_command_unknown_to_worker_protocol() -> None:
    with raises_status(UnknownCommand, Status.UNKNOWN_COMMAND):
        parse_body([WORKER_TAG, Cmd.STATUS.value, encode_header({})], WORKER_TAG, WCmd)


@pytest.mark.parametrize("n", [0, 1, 2])
def test_parse_body_too_few_frames(n: int) -> None:
    with raises_status(ProtocolError, Status.MALFORMED) as info:
        parse_body(_body()[:n], TAG, Cmd)
    assert type(info.value) is ProtocolError


def test_parse_body_bad_header() -> None:
    with raises_status(ProtocolError, Status.MALFORMED):
        parse_body([TAG, Cmd.PING.value, b"\xc1"], TAG, Cmd)
    with raises_status(ProtocolError, Status.MALFORMED):
        parse_body([TAG, Cmd.PING.value, msgpack.packb([1, 2])], TAG, Cmd)
    with raises_status(TooLarge, Status.TOO_LARGE):
        parse_body(_body(header={"k": "x" * 100}), TAG, Cmd, Limits(max_header_bytes=50))


def test_parse_body_payload_limits() -> None:
    limits = Limits(max_frame_bytes=10, max_message_bytes=25, max_frames=3)
    # at the limits: accepted
    ok = parse_body(_body(Cmd.INFER.value, None, b"a" * 10, b"b" * 10, b"c" * 5), TAG, Cmd, limits)
    assert [len(p) for p in ok.payload] == [10, 10, 5]
    with raises_status(TooLarge, Status.TOO_LARGE):  # one frame too big
        parse_body(_body(Cmd.INFER.value, None, b"a" * 11), TAG, Cmd, limits)
    with raises_status(TooLarge, Status.TOO_LARGE):  # the sum too big
        parse_body(_body(Cmd.INFER.value, None, b"a" * 10, b"b" * 10, b"c" * 6), TAG, Cmd, limits)
    with raises_status(TooLarge, Status.TOO_LARGE):  # too many frames
        parse_body(_body(Cmd.INFER.value, None, b"", b"", b"", b""), TAG, Cmd, limits)


@FAST
@given(
    ids=st.lists(st.binary(min_size=1, max_size=8), max_size=3),
    body=st.lists(st.binary(max_size=8), max_size=5),
)
def test_split_envelope_round_trip(ids: list[bytes], body: list[bytes]) -> None:
    assert split_envelope([*ids, b"", *body], hops=len(ids)) == (ids, body)


def test_split_envelope_router_and_dealer() -> None:
    # a ROUTER (the broker) has one routing frame in front; empty payload frames stay payload
    assert split_envelope([b"id", b"", TAG, b"\x05", b"h", b""]) == (
        [b"id"],
        [TAG, b"\x05", b"h", b""],
    )
    # a DEALER (client, worker) has none
    assert split_envelope([b"", TAG, b"\x01", b"h"], hops=0) == ([], [TAG, b"\x01", b"h"])
    envelope, body = split_envelope([zmq.Frame(b"id"), zmq.Frame(b""), zmq.Frame(TAG)])
    assert envelope[0].bytes == b"id" and body[0].bytes == TAG


@pytest.mark.parametrize(
    ("frames", "hops"),
    [
        ([], 1),
        ([b"id"], 1),
        ([b"id", TAG, b"\x01", b"h"], 1),  # a DEALER that sent no delimiter
        ([b"id1", b"id2", b"", TAG], 1),  # the delimiter is not where it must be
        ([b"", TAG], 1),  # no routing id in front
        ([], 0),
        ([TAG, b"\x01", b"h"], 0),
        ([b"x", b"", TAG], 0),
    ],
)
def test_split_envelope_no_delimiter(frames: list[bytes], hops: int) -> None:
    with raises_status(ProtocolError, Status.MALFORMED):
        split_envelope(frames, hops=hops)


def test_peek_id_and_cmd() -> None:
    assert peek_id(_body(header={"id": 42})) == 42
    assert peek_id(_body(header={"id": -1})) is None
    assert peek_id(_body(header={"id": "x"})) is None
    assert peek_id([TAG, b"\x01", b"\xc1"]) is None
    assert peek_id([TAG]) is None
    assert peek_cmd(_body(Cmd.INFO.value)) == Cmd.INFO.value
    assert peek_cmd(_body(b"\x01\x02")) == Cmd.PING.value
    assert peek_cmd([TAG]) == Cmd.PING.value


# ---------------------------------------------------------------- header fields


def test_field_present_missing_default() -> None:
    header = {"name": "m", "n": 3, "f": 1.5, "flag": True, "none": None}
    assert field(header, "name", str) == "m"
    assert field(header, "n", int) == 3
    assert field(header, "f", (int, float)) == 1.5
    assert field(header, "n", (int, float)) == 3
    assert field(header, "flag", bool) is True
    assert field(header, "missing", int, 7) == 7
    assert field(header, "missing", int, None) is None
    with raises_status(BadArgument, Status.BAD_ARGUMENT) as info:
        field(header, "missing", int)
    assert "missing" in info.value.message


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ("3", int),
        (3.0, int),
        (None, int),
        ([1], str),
        (b"m", str),
        ({"a": 1}, list),
        (1, bool),
        ("1.5", (int, float)),
    ],
)
def test_field_wrong_type(value: object, kind: type) -> None:
    with raises_status(BadArgument, Status.BAD_ARGUMENT) as info:
        field({"k": value}, "k", kind)
    assert "'k'" in info.value.message


@pytest.mark.parametrize("kind", [int, (int, float), float])
@pytest.mark.parametrize("value", [True, False])
def test_field_bool_is_not_int(value: bool, kind: type) -> None:
    with raises_status(BadArgument, Status.BAD_ARGUMENT) as info:
        field({"k": value}, "k", kind)
    assert "boolean" in info.value.message


def test_field_bool_allowed_when_asked() -> None:
    assert field({"k": False}, "k", (bool, int)) is False


def test_request_id() -> None:
    assert request_id({"id": 0}) == 0
    assert request_id({"id": 2**64 - 1}) == 2**64 - 1
    for bad in (-1, 2**64, True, "1", 1.0):
        with raises_status(BadArgument, Status.BAD_ARGUMENT):
            request_id({"id": bad})
    with raises_status(BadArgument, Status.BAD_ARGUMENT):
        request_id({})


def test_upload_field_checks() -> None:
    """The checks UPLOAD_BEGIN's decode and the upload store share."""
    assert check_model_name("m.v2:prod-1_x") == "m.v2:prod-1_x"
    assert check_sha256("AB" * 32) == "ab" * 32
    assert check_size(1) == 1
    for bad_call in (
        lambda: check_model_name("a/b"),
        lambda: check_sha256("ab" * 31),
        lambda: check_sha256("g" * 64),
        lambda: check_size(-1),
    ):
        with raises_status(BadArgument, Status.BAD_ARGUMENT):
            bad_call()
    with raises_status(ModelInvalid, Status.MODEL_INVALID):
        check_size(0)  # an empty file is a bad model, not a bad field


# ---------------------------------------------------------------- tensors


# rank >= 1 here; scalars have their own test below
_shapes = hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5)


def _arrays(dtype: np.dtype):
    return hnp.arrays(dtype, _shapes)


@pytest.mark.parametrize("name", list(DTYPES))
@PER_DTYPE
@given(data=st.data())
def test_tensor_round_trip(name: str, data: st.DataObject) -> None:
    array = data.draw(_arrays(DTYPES[name]))
    desc_wire, frame = encode_tensor("x", array)
    assert desc_wire == ["x", name, list(array.shape)]
    desc = parse_desc(desc_wire)
    assert len(memoryview(frame).cast("B")) == desc.nbytes() == array.size * array.itemsize
    check_frames([desc], [frame])
    out = decode_tensor(desc, bytes(frame))
    assert out.dtype == DTYPES[name] and out.shape == array.shape
    np.testing.assert_array_equal(out, array)
    assert not out.flags.writeable  # a view over the received bytes


@pytest.mark.parametrize("name", [n for n in DTYPES if DTYPES[n].itemsize > 1])
@PER_DTYPE
@given(data=st.data())
def test_tensor_big_endian_is_converted(name: str, data: st.DataObject) -> None:
    big = DTYPES[name].newbyteorder(">")
    array = data.draw(hnp.arrays(big, _shapes))
    desc_wire, frame = encode_tensor("x", array)
    assert desc_wire[1] == name
    expected = np.ascontiguousarray(array, dtype=DTYPES[name]).tobytes()
    assert bytes(memoryview(frame).cast("B")) == expected
    np.testing.assert_array_equal(decode_tensor(parse_desc(desc_wire), bytes(frame)), array)


@pytest.mark.parametrize("name", list(DTYPES))
@PER_DTYPE
@given(data=st.data())
def test_tensor_non_contiguous_is_converted(name: str, data: st.DataObject) -> None:
    base = data.draw(
        hnp.arrays(DTYPES[name], hnp.array_shapes(min_dims=2, max_dims=3, min_side=0, max_side=6))
    )
    view = data.draw(st.sampled_from(["transpose", "stride", "reverse"]))
    array = {"transpose": base.T, "stride": base[..., ::2], "reverse": base[::-1]}[view]
    desc_wire, frame = encode_tensor("x", array)
    assert desc_wire == ["x", name, list(array.shape)]
    assert bytes(memoryview(frame).cast("B")) == np.ascontiguousarray(array).tobytes()
    np.testing.assert_array_equal(decode_tensor(parse_desc(desc_wire), bytes(frame)), array)


def test_tensor_scalar_round_trip() -> None:
    """A 0-d array travels as shape [] (one element), for every wire dtype."""
    for name, dtype in DTYPES.items():
        array = np.asarray(np.ones((), dtype=dtype))
        desc_wire, frame = encode_tensor("s", array)
        assert desc_wire == ["s", name, []], name
        desc = parse_desc(desc_wire)
        assert len(memoryview(frame).cast("B")) == desc.nbytes() == dtype.itemsize
        out = decode_tensor(desc, frame)
        assert out.shape == () and out == array


def test_tensor_empty() -> None:
    for shape in ((0,), (0, 3), (2, 0, 5)):
        desc_wire, frame = encode_tensor("e", np.zeros(shape, np.float16))
        assert desc_wire == ["e", "float16", list(shape)]
        desc = parse_desc(desc_wire)
        assert desc.nbytes() == 0 and len(memoryview(frame).cast("B")) == 0
        assert decode_tensor(desc, frame).shape == shape


@FAST
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=8),
        st.sampled_from(list(DTYPES)).flatmap(lambda n: _arrays(DTYPES[n])),
        max_size=4,
    )
)
def test_tensors_round_trip(tensors: dict[str, np.ndarray]) -> None:
    wire, frames = encode_tensors(tensors)
    descs = parse_descs(wire)
    out = decode_tensors(descs, [bytes(f) for f in frames])
    assert list(out) == list(tensors)
    for name, array in tensors.items():
        np.testing.assert_array_equal(out[name], array)
        assert out[name].dtype == array.dtype


@pytest.mark.parametrize(
    "dtype", ["complex64", "uint16", "uint32", "uint64", "object", "U3", "datetime64[s]"]
)
def test_dtype_not_on_the_wire(dtype: str) -> None:
    with raises_status(InputInvalid, Status.INPUT_INVALID):
        dtype_name(np.dtype(dtype))
    with raises_status(InputInvalid, Status.INPUT_INVALID):
        encode_tensor("x", np.zeros(2, dtype=dtype))


def test_dtype_name_ignores_byte_order() -> None:
    for name, dt in DTYPES.items():
        assert dtype_name(dt) == name
        assert dtype_name(dt.newbyteorder(">")) == name


def test_check_frames_errors() -> None:
    desc = TensorDesc("x", "float32", (2, 3))
    check_frames([desc], [b"\0" * 24])
    check_frames([], [])
    with raises_status(InputInvalid, Status.INPUT_INVALID):
        check_frames([desc], [])
    with raises_status(InputInvalid, Status.INPUT_INVALID):
        check_frames([desc], [b"\0" * 24, b""])
    with raises_status(InputInvalid, Status.INPUT_INVALID):
        check_frames([], [b""])
    for size in (0, 23, 25, 48):
        with raises_status(InputInvalid, Status.INPUT_INVALID) as info:
            check_frames([desc], [b"\0" * size])
        assert "'x'" in info.value.message
    with raises_status(InputInvalid, Status.INPUT_INVALID):
        decode_tensors([desc], [b"\0" * 12])


def test_parse_desc_valid() -> None:
    assert parse_desc(["x", "int8", [1, 0, 3]]) == TensorDesc("x", "int8", (1, 0, 3))
    assert parse_desc(("x", "bool", ())) == TensorDesc("x", "bool", ())
    assert parse_desc(["x", "float32", [-1, 4]], signature=True).shape == (-1, 4)
    assert parse_desc(["x", "float32", [1] * 8]).shape == (1,) * 8


@pytest.mark.parametrize(
    ("obj", "exc"),
    [
        ("x", BadArgument),
        ({"name": "x"}, BadArgument),
        (["x", "float32"], BadArgument),
        (["x", "float32", [1], 0], BadArgument),
        (["", "float32", [1]], BadArgument),
        ([3, "float32", [1]], BadArgument),
        (["x", "float128", [1]], InputInvalid),
        (["x", "uint16", [1]], InputInvalid),
        (["x", 5, [1]], InputInvalid),
        (["x", "float32", 4], BadArgument),
        (["x", "float32", "4"], BadArgument),
        (["x", "float32", [1] * 9], BadArgument),
        (["x", "float32", [-1]], BadArgument),
        (["x", "float32", [-2]], BadArgument),
        (["x", "float32", [True]], BadArgument),
        (["x", "float32", [1.0]], BadArgument),
        (["x", "float32", ["1"]], BadArgument),
        (["x", "float32", [None]], BadArgument),
        (["x", "float32", [1 << 40]], BadArgument),
    ],
)
def test_parse_desc_errors(obj: object, exc: type[MTError]) -> None:
    with raises_status(exc, exc.status):
        parse_desc(obj)


@pytest.mark.parametrize("dtype", [["float32"], {"float32": 1}], ids=["list", "map"])
def test_parse_desc_unhashable_dtype(dtype: object) -> None:
    """A hostile dtype field must fail that request with 14/40, not escape as TypeError."""
    with pytest.raises(MTError) as info:
        parse_desc(["x", dtype, [1]])
    assert info.value.status in (Status.BAD_ARGUMENT, Status.INPUT_INVALID)


def test_parse_desc_signature_allows_only_minus_one() -> None:
    with raises_status(BadArgument, Status.BAD_ARGUMENT):
        parse_desc(["x", "float32", [-2, 4]], signature=True)


def test_parse_desc_respects_limits() -> None:
    with raises_status(BadArgument, Status.BAD_ARGUMENT):
        parse_desc(["x", "float32", [1, 1, 1]], Limits(max_rank=2))


def test_parse_descs_errors() -> None:
    with raises_status(BadArgument, Status.BAD_ARGUMENT):
        parse_descs({"x": 1})
    with raises_status(TooLarge, Status.TOO_LARGE):
        parse_descs([["x", "int8", [1]]] * 3, Limits(max_tensors=2))
    assert parse_descs([["x", "int8", [1]]] * 2, Limits(max_tensors=2))[1].name == "x"


def test_tensor_desc_nbytes_and_wire() -> None:
    assert TensorDesc("x", "float64", (2, 3)).nbytes() == 48
    assert TensorDesc("x", "bool", ()).nbytes() == 1
    assert TensorDesc("x", "int16", (5, 0)).nbytes() == 0
    assert TensorDesc("x", "int16", (2,)).to_wire() == ["x", "int16", [2]]


# ---------------------------------------------------------------- errors


def test_mterror_formats_status() -> None:
    exc = TooLarge("frame too big")
    assert exc.status == Status.TOO_LARGE == 13
    assert exc.message == "frame too big"
    assert str(exc) == "[13 TOO_LARGE] frame too big"
    assert MTError("x", 52).status is Status.OVERLOADED
    assert MTError("x").status is Status.INTERNAL
    unknown = MTError("peer said so", 77)  # a code this side does not know
    assert unknown.status is Status.INTERNAL and "77" in unknown.message


@pytest.mark.parametrize("status", [s for s in Status if s is not Status.OK])
def test_error_for_every_status(status: Status) -> None:
    exc = error_for(int(status), "boom")
    assert isinstance(exc, MTError)
    assert exc.status is status
    assert type(exc).status is status  # a dedicated class, not a relabelled MTError
    assert exc.message == "boom"


def test_error_for_ok() -> None:
    exc = error_for(0, "odd")
    assert isinstance(exc, MTError) and exc.status is Status.OK


@FAST
@given(st.integers(min_value=-(2**31), max_value=2**31).filter(lambda n: n not in set(Status)))
def test_error_for_unknown_code_keeps_number(code: int) -> None:
    exc = error_for(code, "from the future")
    assert type(exc) is MTError
    assert str(code) in exc.message
    assert "from the future" in exc.message


# each class and the builtin its module docs say it also is (None: MTError only)
BUILTINS: dict[type[MTError], type[Exception] | None] = {
    errors.ProtocolError: ValueError,
    errors.UnsupportedVersion: ValueError,
    errors.UnknownCommand: ValueError,
    errors.TooLarge: ValueError,
    errors.BadArgument: ValueError,
    errors.Unauthenticated: PermissionError,
    errors.Forbidden: PermissionError,
    errors.QuotaExceeded: None,
    errors.RateLimited: None,
    errors.ModelNotFound: LookupError,
    errors.ModelInvalid: ValueError,
    errors.ModelExists: None,
    errors.UploadCorrupt: ValueError,
    errors.InputInvalid: ValueError,
    errors.DeadlineUnmeetable: TimeoutError,
    errors.DeadlineExpired: TimeoutError,
    errors.Overloaded: None,
    errors.WorkerLost: None,
    errors.ExecFailed: None,
    errors.LoadFailed: None,
    errors.InternalError: None,
    errors.ShuttingDown: None,
}
# Raised inside a worker and reported under a status of their parent's: a tenant sees
# the parent's code, so they are not in the one-class-per-status table.
WORKER_SIDE: dict[type[MTError], type[Exception]] = {errors.PoolExhausted: MemoryError}


def test_every_error_class_is_listed() -> None:
    defined = {
        obj
        for obj in vars(errors).values()
        if isinstance(obj, type) and issubclass(obj, MTError) and obj is not MTError
    }
    assert defined == set(BUILTINS) | set(WORKER_SIDE)
    for cls, builtin in WORKER_SIDE.items():
        assert isinstance(cls("msg"), builtin)
        assert cls.__mro__[1] in BUILTINS and cls.status == cls.__mro__[1].status
    # one class per status, and every non-OK status has one
    assert sorted(cls.status for cls in BUILTINS) == sorted(s for s in Status if s)


@pytest.mark.parametrize("cls", list(BUILTINS), ids=lambda c: c.__name__)
def test_error_inherits_builtin(cls: type[MTError]) -> None:
    exc = cls("msg")
    assert isinstance(exc, MTError)
    builtin = BUILTINS[cls]
    if builtin is not None:
        assert isinstance(exc, builtin)
        with pytest.raises(builtin):
            raise exc
    assert error_for(int(cls.status), "msg").__class__ is cls


def test_status_codes_match_the_protocol_table() -> None:
    table = {
        "OK": 0, "MALFORMED": 10, "UNSUPPORTED_VERSION": 11, "UNKNOWN_COMMAND": 12,
        "TOO_LARGE": 13, "BAD_ARGUMENT": 14, "UNAUTHENTICATED": 20, "FORBIDDEN": 21,
        "QUOTA_EXCEEDED": 22, "RATE_LIMITED": 23, "MODEL_NOT_FOUND": 30, "MODEL_INVALID": 31,
        "MODEL_EXISTS": 32, "UPLOAD_CORRUPT": 33, "INPUT_INVALID": 40,
        "DEADLINE_UNMEETABLE": 50, "DEADLINE_EXPIRED": 51, "OVERLOADED": 52,
        "WORKER_LOST": 60, "EXEC_FAILED": 61, "LOAD_FAILED": 62, "INTERNAL": 90,
        "SHUTTING_DOWN": 91,
    }  # fmt: skip
    assert {s.name: int(s) for s in Status} == table


def test_command_bytes_match_the_protocol_table() -> None:
    assert {c.name: c.value for c in Cmd} == {
        "PING": b"\x01",
        "UPLOAD_BEGIN": b"\x02",
        "UPLOAD_CHUNK": b"\x03",
        "UPLOAD_COMMIT": b"\x04",
        "INFER": b"\x05",
        "LIST": b"\x06",
        "INFO": b"\x07",
        "DELETE": b"\x08",
        "STATUS": b"\x09",
        "SHARE": b"\x0a",
    }
