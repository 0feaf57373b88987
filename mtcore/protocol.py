"""The wire protocol: tags, commands, frame layout, headers and tensors. No I/O.

Two protocols share this module:

- the tenant protocol (tag `MTS1`, `Cmd`), the public contract of shared/PROTOCOL.md,
  spoken by the Python client, the C client and embedding services;
- the worker protocol (tag `MTW1`, `WCmd`), internal between broker and workers.

Both use one frame layout: `[empty][tag][cmd][msgpack header][payload frames...]`
(a ROUTER prepends the peer's routing id on receive). Headers are msgpack maps with
string keys, decoded with bounds; tensors travel as raw frames described in the header
by `[name, dtype, shape]`. Everything here raises `ProtocolError`/`BadArgument`/
`InputInvalid`/`TooLarge` on bad input and never asserts on it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, NamedTuple

import numpy as np

from ext import decode_header as _decode_header
from ext import encode_header as _encode_header
from mtcore.errors import (
    BadArgument,
    InputInvalid,
    ModelInvalid,
    ProtocolError,
    TooLarge,
    UnknownCommand,
    UnsupportedVersion,
)

VERSION = "0.1.0"
TAG = b"MTS1"  # tenant protocol, version 1
WORKER_TAG = b"MTW1"  # broker <-> worker protocol, version 1
DELIMITER = b""


class Cmd(bytes, Enum):
    """Tenant commands (one byte each); a reply carries its request's byte."""

    PING = b"\x01"
    UPLOAD_BEGIN = b"\x02"
    UPLOAD_CHUNK = b"\x03"
    UPLOAD_COMMIT = b"\x04"
    INFER = b"\x05"
    LIST = b"\x06"
    INFO = b"\x07"
    DELETE = b"\x08"
    STATUS = b"\x09"
    SHARE = b"\x0a"


class WCmd(bytes, Enum):
    """Broker <-> worker commands. Requests and their results share the byte."""

    READY = b"\x01"  # worker -> broker: register (name, budget, kind)
    HEARTBEAT = b"\x02"  # both ways, when nothing else was sent for a while
    FETCH_MODEL = b"\x03"  # worker -> broker: send me these model bytes (cold tier)
    LOAD_MODEL = b"\x04"  # broker -> worker: make a model runnable; result: LoadModelResult
    UNLOAD_MODEL = b"\x05"  # broker -> worker: drop a live model
    INFER = b"\x06"  # broker -> worker: run a batch; result: InferResult
    PROFILE_MODEL = b"\x07"  # broker -> worker: measure a model; result: ProfileModelResult
    DISCONNECT = b"\x08"  # either way: I am going away


_BY_BYTE: dict[type, dict[bytes, Any]] = {
    enum: {member.value: member for member in enum} for enum in (Cmd, WCmd)
}  # command byte -> member, without Enum.__call__ on the hot path

# Tensor dtypes on the wire; all multi-byte types little-endian.
DTYPES: dict[str, np.dtype] = {
    name: np.dtype(code)
    for name, code in (
        ("bool", "?"),
        ("uint8", "u1"),
        ("int8", "i1"),
        ("int16", "<i2"),
        ("int32", "<i4"),
        ("int64", "<i8"),
        ("float16", "<f2"),
        ("float32", "<f4"),
        ("float64", "<f8"),
    )
}
_DTYPE_NAMES: dict[np.dtype, str] = {dt.newbyteorder("="): name for name, dt in DTYPES.items()}
# dtypes whose bytes are already the wire's (native order equals little-endian here)
_WIRE_NAMES: dict[np.dtype, str] = {dt: name for name, dt in DTYPES.items() if dt.isnative}
SMALL_TENSOR_BYTES = 64 * 1024  # below this a tensor is copied into a bytes frame


@dataclass(frozen=True)
class Limits:
    """Size bounds applied to every decoded message (configuration sets them)."""

    max_header_bytes: int = 64 * 1024  # a msgpack header frame
    max_frame_bytes: int = 64 * 1024 * 1024  # any one payload frame
    max_message_bytes: int = 256 * 1024 * 1024  # all payload frames together
    max_tensors: int = 64  # tensor descriptions in one message
    max_rank: int = 8  # dimensions of one tensor
    max_frames: int = 4096  # payload frames in one message (worker batches carry many)


DEFAULT_LIMITS = Limits()


class Message(NamedTuple):
    """A decoded message: command, header map, raw payload frames (zmq.Frame or bytes)."""

    cmd: Cmd | WCmd
    header: dict[str, Any]
    payload: list[Any]


class TensorDesc(NamedTuple):
    """`[name, dtype, shape]`; shape uses -1 for a dynamic dimension in model signatures."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize

    def to_wire(self) -> list[Any]:
        return [self.name, self.dtype, list(self.shape)]


# ---------------------------------------------------------------- headers


def encode_header(header: dict[str, Any]) -> bytes:
    """msgpack bytes of a header map (`ext`'s codec: msgpack.packb, faster)."""
    return _encode_header(header)


def decode_header(data: Any, limits: Limits = DEFAULT_LIMITS) -> dict[str, Any]:
    """Decode a msgpack header with bounds; raise ProtocolError unless it is a str-keyed map.

    TooLarge if it is over `limits.max_header_bytes`. `ext`'s codec decodes the common
    shapes in C and leaves the rest, and every error, to msgpack itself.
    """
    return _decode_header(data, limits.max_header_bytes)


# ---------------------------------------------------------------- frames


def frame_bytes(frame: Any) -> bytes:
    """A received frame's bytes: small frames already are bytes, large ones zmq.Frames."""
    if type(frame) is bytes:
        return frame
    return frame.bytes if hasattr(frame, "bytes") else bytes(frame)


def frame_buffer(frame: Any) -> memoryview | bytes:
    """A received frame's contents without a copy (bytes are their own buffer)."""
    if type(frame) is bytes:
        return frame
    return frame.buffer if hasattr(frame, "buffer") else memoryview(frame)


def frame_size(frame: Any) -> int:
    """Bytes in a frame: zmq.Frame and bytes know their length; a memoryview its nbytes."""
    return frame.nbytes if isinstance(frame, memoryview) else len(frame)


def split_envelope(frames: list[Any], hops: int = 1) -> tuple[list[Any], list[Any]]:
    """Split received frames into (routing envelope, body after the empty delimiter).

    `hops` is the number of routing frames in front: 1 on a ROUTER whose peers connect
    directly (the broker), 0 on a DEALER (the client, the worker).
    """
    if len(frames) <= hops or frame_size(frames[hops]) != 0:
        raise ProtocolError("no empty delimiter frame: a DEALER must send one before the tag")
    return frames[:hops], frames[hops + 1 :]


def parse_body(
    body: list[Any], tag: bytes, commands: type[Cmd] | type[WCmd], limits: Limits = DEFAULT_LIMITS
) -> Message:
    """Parse `[tag][cmd][header][payload...]` (the part after the delimiter)."""
    if len(body) < 3:
        raise ProtocolError(f"a message needs tag, command and header frames; got {len(body)}")
    got_tag = frame_bytes(body[0])
    if got_tag != tag:
        raise UnsupportedVersion(f"protocol tag {got_tag[:8]!r} is not {tag!r}")
    cmd_bytes = frame_bytes(body[1])
    cmd = _BY_BYTE[commands].get(cmd_bytes)
    if cmd is None:
        raise UnknownCommand(f"unknown command byte {cmd_bytes[:4]!r}")
    payload = body[3:]
    check_payload_size(payload, limits)
    return Message(cmd, decode_header(frame_buffer(body[2]), limits), payload)


def check_payload_size(payload: Sequence[Any], limits: Limits) -> None:
    if len(payload) > limits.max_frames:
        raise TooLarge(f"{len(payload)} payload frames; the limit is {limits.max_frames}")
    total = 0
    for frame in payload:
        size = frame_size(frame)
        if size > limits.max_frame_bytes:
            raise TooLarge(
                f"a payload frame is {size} bytes; the limit is {limits.max_frame_bytes}"
            )
        total += size
    if total > limits.max_message_bytes:
        raise TooLarge(f"message payload is {total} bytes; the limit is {limits.max_message_bytes}")


def build(
    tag: bytes, cmd: Cmd | WCmd, header: dict[str, Any], payload: Sequence[Any] = ()
) -> list[Any]:
    """Frames of one message, starting at the delimiter (prepend a routing id to route it)."""
    return [DELIMITER, tag, cmd.value, encode_header(header), *payload]


def peek_id(body: list[Any]) -> Any:
    """Best-effort `id` of a message that failed to parse, so its error reply can echo it."""
    if len(body) < 3:
        return None
    try:
        header = decode_header(frame_buffer(body[2]))
    except Exception:
        return None
    value = header.get("id")
    return value if type(value) is int and value >= 0 else None  # a bool is no id


def peek_cmd(body: list[Any]) -> bytes:
    """Command byte to echo in an error reply (PING's when the frame is unusable)."""
    if len(body) >= 2:
        raw = frame_bytes(body[1])
        if len(raw) == 1:
            return raw
    return Cmd.PING.value


# ---------------------------------------------------------------- header fields


def field(
    header: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = ...
) -> Any:
    """A typed header field; BadArgument names the key when it is missing or mistyped."""
    if key not in header:
        if default is ...:
            raise BadArgument(f"header field '{key}' is required")
        return default
    value = header[key]
    # bool is an int in Python; a field typed int must not accept true/false.
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise BadArgument(f"header field '{key}' must be {_kind_name(kind)}, got a boolean")
    if not isinstance(value, kind):
        raise BadArgument(
            f"header field '{key}' must be {_kind_name(kind)}, got {type(value).__name__}"
        )
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def request_id(header: dict[str, Any]) -> int:
    rid = field(header, "id", int)
    if rid < 0 or rid >= 1 << 64:
        raise BadArgument("header field 'id' must be an unsigned 64-bit integer")
    return rid


SHA256_HEX = re.compile(r"[0-9a-f]{64}")  # a model's content address, as the store names it
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def check_model_name(name: str) -> str:
    """A model name a tenant may give: 1-128 of letters, digits and ._:- (no paths)."""
    if not _MODEL_NAME.fullmatch(name):
        raise BadArgument(
            f"model name {name!r:.80} is not valid: 1-128 characters of letters, digits and "
            "._:- starting with a letter or digit"
        )
    return name


def check_sha256(value: str) -> str:
    """A declared sha256 in the store's spelling (lowercase); BadArgument unless 64 hex."""
    sha256 = value.lower()
    if not SHA256_HEX.fullmatch(sha256):
        raise BadArgument("header field 'sha256' must be 64 hex digits")
    return sha256


def check_size(size: int) -> int:
    """A declared upload size: a positive byte count (an empty file is no model)."""
    if size == 0:
        raise ModelInvalid("the model is empty (0 bytes): an ONNX model is never empty")
    if size < 0:
        raise BadArgument("header field 'size' must be a positive byte count")
    return size


# ---------------------------------------------------------------- tensors


def parse_desc(obj: Any, limits: Limits = DEFAULT_LIMITS, *, signature: bool = False) -> TensorDesc:
    """Validate one `[name, dtype, shape]`; `signature` allows -1 for dynamic dimensions."""
    if not isinstance(obj, (list, tuple)) or len(obj) != 3:
        raise BadArgument(f"a tensor description is [name, dtype, shape], got {obj!r:.80}")
    name, dtype, shape = obj
    if not isinstance(name, str) or not name:
        raise BadArgument("a tensor name must be a non-empty string")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise InputInvalid(
            f"tensor '{name}': dtype {dtype!r:.40} is not one of {', '.join(DTYPES)}"
        )
    if not isinstance(shape, (list, tuple)) or len(shape) > limits.max_rank:
        raise BadArgument(
            f"tensor '{name}': shape must be a list of at most {limits.max_rank} ints"
        )
    low = -1 if signature else 0
    for dim in shape:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < low or dim >= 1 << 40:
            raise BadArgument(f"tensor '{name}': dimension {dim!r:.40} is not a valid size")
    return TensorDesc(name, dtype, tuple(shape))


def parse_descs(
    obj: Any, limits: Limits = DEFAULT_LIMITS, *, signature: bool = False
) -> list[TensorDesc]:
    if not isinstance(obj, (list, tuple)):
        raise BadArgument("tensor descriptions must be a list")
    if len(obj) > limits.max_tensors:
        raise TooLarge(f"{len(obj)} tensors; the limit is {limits.max_tensors}")
    return [parse_desc(item, limits, signature=signature) for item in obj]


def check_frames(descs: Sequence[TensorDesc], frames: Sequence[Any]) -> None:
    """Each description has exactly one frame of exactly its byte size."""
    if len(descs) != len(frames):
        raise InputInvalid(f"{len(descs)} tensors described but {len(frames)} payload frames sent")
    for desc, frame in zip(descs, frames, strict=True):
        size = frame_size(frame)
        if size != desc.nbytes():
            raise InputInvalid(
                f"tensor '{desc.name}' {desc.dtype}{list(desc.shape)} needs {desc.nbytes()} "
                f"bytes, its frame has {size}"
            )


def dtype_name(dtype: np.dtype) -> str:
    name = _DTYPE_NAMES.get(np.dtype(dtype).newbyteorder("="))
    if name is None:
        raise InputInvalid(f"dtype {dtype} cannot travel on the wire ({', '.join(DTYPES)})")
    return name


def encode_tensor(name: str, array: np.ndarray) -> tuple[list[Any], Any]:
    """(wire description, frame buffer) of an array; copies only if not C-contiguous LE.

    Small tensors travel as bytes (one cheap copy, the fastest to send); large ones as a
    view of the array, sent without a copy.
    """
    wire_name = _WIRE_NAMES.get(array.dtype)  # exact little-endian/native wire dtypes only
    if wire_name is None or not array.flags.c_contiguous:
        wire_name = dtype_name(array.dtype)
        array = np.asarray(array, dtype=DTYPES[wire_name], order="C")  # keeps 0-d 0-d
    if array.nbytes < SMALL_TENSOR_BYTES or not array.ndim:
        buf: Any = array.tobytes()
    else:
        buf = memoryview(array).cast("B")
    return [name, wire_name, list(array.shape)], buf


def decode_tensor(desc: TensorDesc, frame: Any) -> np.ndarray:
    """A read-only array over a frame's bytes (no copy)."""
    return np.frombuffer(frame_buffer(frame), dtype=DTYPES[desc.dtype]).reshape(desc.shape)


def encode_tensors(tensors: dict[str, np.ndarray]) -> tuple[list[list[Any]], list[Any]]:
    descs, frames = [], []
    for name, array in tensors.items():
        desc, buf = encode_tensor(name, np.asarray(array))
        descs.append(desc)
        frames.append(buf)
    return descs, frames


def decode_tensors(descs: Sequence[TensorDesc], frames: Sequence[Any]) -> dict[str, np.ndarray]:
    check_frames(descs, frames)
    return {d.name: decode_tensor(d, f) for d, f in zip(descs, frames, strict=True)}
