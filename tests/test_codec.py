"""ext._codec (C msgpack headers) against its twin, the reference: equal on every input."""

from __future__ import annotations

import importlib.util
import math

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ext import _codec_py
from mtcore.errors import MTError, ProtocolError, TooLarge

C_BUILT = importlib.util.find_spec("ext._codec") is not None
LIMIT = 64 * 1024

leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=40)
    | st.binary(max_size=40)
)
values = st.recursive(
    leaf,
    lambda inner: (
        st.lists(inner, max_size=8) | st.dictionaries(st.text(max_size=8), inner, max_size=8)
    ),
    max_leaves=20,
)
headers = st.dictionaries(st.text(max_size=20), values, max_size=10)


@pytest.fixture(params=["c", "py"])
def codec(request: pytest.FixtureRequest):
    if request.param == "py":
        return _codec_py
    if not C_BUILT:
        pytest.skip("ext._codec is not built: python setup.py build_ext --inplace")
    from ext import _codec

    return _codec


def _c():
    if not C_BUILT:
        pytest.skip("ext._codec is not built")
    from ext import _codec

    return _codec


def outcome(fn, *args):
    """What a call did, comparable across the two: its value's repr, or its error type."""
    try:
        return ("ok", repr(fn(*args)))
    except MTError as exc:
        return ("mterror", type(exc), exc.status)
    except Exception as exc:
        return ("error", type(exc))


@settings(max_examples=300, deadline=None)
@given(headers)
def test_encode_is_byte_identical_and_decodes_back(header) -> None:
    c = _c()
    assert outcome(c.encode_header, header) == outcome(_codec_py.encode_header, header)
    data = _codec_py.encode_header(header)
    assert outcome(c.decode_header, data, LIMIT) == outcome(_codec_py.decode_header, data, LIMIT)


@settings(max_examples=600, deadline=None)
@given(st.binary(max_size=100))
def test_random_bytes_decode_alike(data) -> None:
    c = _c()
    assert outcome(c.decode_header, data, LIMIT) == outcome(_codec_py.decode_header, data, LIMIT)


@settings(max_examples=300, deadline=None)
@given(headers, st.integers(0, 10_000), st.integers(0, 255))
def test_corrupted_headers_decode_alike(header, at, byte) -> None:
    c = _c()
    data = bytearray(_codec_py.encode_header(header))
    data[at % len(data)] = byte
    data = bytes(data)
    assert outcome(c.decode_header, data, LIMIT) == outcome(_codec_py.decode_header, data, LIMIT)


def test_a_typical_request_header_round_trips(codec) -> None:
    header = {"id": 7, "tenant": "t", "model": "m", "inputs": [["x", "float32", [1, 4]]],
              "deadline_ms": 12.5, "replace": False, "blob": b"\x00\x01", "none": None,
              "big": 2**64 - 1, "neg": -(2**63)}  # fmt: skip
    data = codec.encode_header(header)
    assert data == msgpack.packb(header, use_bin_type=True)
    assert codec.decode_header(data, LIMIT) == header
    assert codec.decode_header(memoryview(data), LIMIT) == header
    assert codec.decode_header(bytearray(data), LIMIT) == header


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (msgpack.packb([1, 2]), ProtocolError),  # not a map
        (msgpack.packb({b"k": 1}, use_bin_type=True), ProtocolError),  # binary key
        (msgpack.packb({1: 1}), ProtocolError),  # integer key
        (msgpack.packb({"k": 1}) + b"\x00", ProtocolError),  # trailing bytes
        (msgpack.packb({"k": "abc"})[:-1], ProtocolError),  # truncated
        (b"\x81\xa1k\xa2\xff\xfe", ProtocolError),  # invalid UTF-8
        (b"\x81\xa1k\xd4\x01\x00", ProtocolError),  # ext type
        (b"", ProtocolError),
        (msgpack.packb({"k": "x" * LIMIT}), TooLarge),
    ],
)
def test_bad_headers_raise_the_protocol_errors(codec, data, error) -> None:
    with pytest.raises(error):
        codec.decode_header(data, LIMIT)


@pytest.mark.parametrize("size", [0, 31, 32, 255, 256, 65535, 65536, 70000])
def test_length_boundaries_encode_and_decode_alike(codec, size) -> None:
    header = {
        "s": "é" * (size // 2) + "x" * (size % 2),
        "b": b"\x01" * size,
        "l": list(range(size % 40)),
        "t": (1, "two"),
        "m": {str(i): i for i in range(size % 20)},
        "i": [size, -size, 2**32 + size, -(2**31) - size, 2**16 - 1 + size % 3],
    }
    data = codec.encode_header(header)
    assert data == msgpack.packb(header, use_bin_type=True)
    assert codec.decode_header(data, 1 << 20) == msgpack.unpackb(data, raw=False)


def test_deep_nesting_is_left_to_the_reference(codec) -> None:
    value: object = 1
    for _ in range(100):
        value = [value]
    data = msgpack.packb({"deep": value})
    assert codec.decode_header(data, LIMIT) == {"deep": value}
    assert codec.encode_header({"deep": value}) == data


def test_unusual_python_types_encode_as_msgpack_does(codec) -> None:
    from collections import OrderedDict

    from mtcore.errors import Status

    header = {"status": Status.OK, "od": OrderedDict(a=1), "ba": bytearray(b"xy"), "f": math.inf}
    assert codec.encode_header(header) == msgpack.packb(header, use_bin_type=True)
    with pytest.raises(TypeError):
        codec.encode_header({"x": object()})


def test_fallbacks_do_not_leak(codec) -> None:
    """Headers the C path hands to the twin, over and over: memory stays flat."""
    import gc
    import tracemalloc

    def churn() -> None:
        for _ in range(2000):
            with pytest.raises(ProtocolError):
                codec.decode_header(b"\x81\x01\x01", LIMIT)  # integer key: the twin refuses
            codec.encode_header({"a": bytearray(b"x")})  # bytearray: the twin encodes

    churn()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        churn()
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 200_000, grown  # a leak of ~1 KB per fallback would be ~4 MB


def test_non_contiguous_buffers_decode_like_the_twin(codec) -> None:
    data = msgpack.packb({"k": 1})
    spread = bytes(b for pair in zip(data, b"\x00" * len(data), strict=True) for b in pair)
    view = memoryview(spread)[::2]  # the header's bytes, not contiguous
    assert codec.decode_header(view, LIMIT) == {"k": 1}
