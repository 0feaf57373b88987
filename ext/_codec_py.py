"""Pure-Python twin of `ext._codec`, and its reference: msgpack headers through msgpack.

`decode_header` is the protocol's bounded decoding (section 3 of docs/PROTOCOL.md): a
map with string keys, no ext types, no string, byte string, array or map longer than
the header limit; anything else raises ProtocolError (TooLarge for an oversized header).
`encode_header` is `msgpack.packb` with `use_bin_type=True`. The C module hands every
shape it does not handle to these functions, so these define the semantics of both.
"""

from __future__ import annotations

from typing import Any

import msgpack

from mtcore.errors import ProtocolError, TooLarge

_STR_KEYS = frozenset({str})


def decode_header(data: Any, max_header_bytes: int) -> dict[str, Any]:
    """Decode a msgpack header with bounds; raise ProtocolError unless it is a str-keyed map."""
    size = len(memoryview(data))
    if size > max_header_bytes:
        raise TooLarge(f"header is {size} bytes; the limit is {max_header_bytes}")
    try:
        header = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_str_len=max_header_bytes,
            max_bin_len=max_header_bytes,
            max_array_len=max_header_bytes,
            max_map_len=max_header_bytes,
            max_ext_len=0,
            ext_hook=_no_ext,
        )
    except msgpack.exceptions.StackError:
        raise ProtocolError("header is nested too deeply to decode") from None
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        why = str(exc) or type(exc).__name__  # some carry no message at all
        raise ProtocolError(f"header is not valid msgpack: {why}") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"header must be a msgpack map, got {type(header).__name__}")
    if not _STR_KEYS.issuperset(map(type, header)):
        raise ProtocolError("header keys must be msgpack strings (str), not binary")
    return header


def _no_ext(code: int, data: bytes) -> None:
    raise ProtocolError(f"msgpack ext type {code} is not allowed in headers")


def encode_header(header: dict[str, Any]) -> bytes:
    return msgpack.packb(header, use_bin_type=True)
