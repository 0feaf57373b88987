"""Typed tenant requests (mtcore/messages.py): every field's bad value, its status and message.

Each case starts from a good header of its command, changes one field (or removes it,
written `MISSING`), and checks the exact error a tenant is answered with. The good
headers themselves decode to the expected structs, unknown keys are ignored, and every
command has a struct.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest

from mtcore.errors import BadArgument, InputInvalid, ModelInvalid, MTError, TooLarge
from mtcore.messages import (
    MESSAGES,
    DeleteModel,
    GetModelInfo,
    GetStatus,
    Identity,
    Infer,
    ListModels,
    Ping,
    ShareModel,
    TenantRequest,
    UploadBegin,
    UploadChunk,
    UploadCommit,
    decode,
    reply_id,
    tenant_of,
)
from mtcore.protocol import Cmd, Limits, TensorDesc

SHA = "ab" * 32
MISSING = object()  # a case that removes the field

GOOD: dict[Cmd, dict[str, Any]] = {
    Cmd.PING: {"id": 1},
    Cmd.UPLOAD_BEGIN: {"id": 2, "tenant": "t", "name": "m", "size": 10, "sha256": SHA},
    Cmd.UPLOAD_CHUNK: {"id": 3, "tenant": "t", "upload": "h", "offset": 0},
    Cmd.UPLOAD_COMMIT: {"id": 4, "tenant": "t", "upload": "h"},
    Cmd.INFER: {"id": 5, "tenant": "t", "model": "m", "inputs": [["x", "float32", [1, 4]]]},
    Cmd.LIST: {"id": 6, "tenant": "t"},
    Cmd.INFO: {"id": 7, "tenant": "t", "model": "m"},
    Cmd.DELETE: {"id": 8, "tenant": "t", "model": "m"},
    Cmd.STATUS: {"id": 9, "tenant": "t"},
    Cmd.SHARE: {"id": 10, "tenant": "t", "model": "m", "grant": ["u", "v", "u"]},
}


def header_with(cmd: Cmd, key: str, value: Any) -> dict[str, Any]:
    header = dict(GOOD[cmd])
    if value is MISSING:
        header.pop(key, None)
    else:
        header[key] = value
    return header


SHARE_NAMES = "header field '{}' must list tenant names (1-64 of ._- letters and digits)"


def refused(cmd: Cmd, key: str, value: Any) -> MTError:
    with pytest.raises(MTError) as info:
        decode(cmd, header_with(cmd, key, value))
    return info.value


def test_every_command_has_a_struct() -> None:
    assert set(MESSAGES) == set(Cmd)
    for cmd, cls in MESSAGES.items():
        assert issubclass(cls, TenantRequest)
        assert type(decode(cmd, GOOD[cmd])) is cls


def test_share_lists_decode_deduplicated() -> None:
    assert decode(Cmd.SHARE, GOOD[Cmd.SHARE]) == ShareModel(10, "t", "m", ("u", "v"), ())
    assert decode(Cmd.SHARE, header_with(Cmd.SHARE, "grant", MISSING)).grant == ()
    both = {**GOOD[Cmd.SHARE], "revoke": ["v"]}
    with pytest.raises(BadArgument, match="both 'grant' and 'revoke'"):
        decode(Cmd.SHARE, both)


def test_good_headers_decode() -> None:
    assert decode(Cmd.PING, GOOD[Cmd.PING]) == Ping(1, "default")
    assert decode(Cmd.UPLOAD_BEGIN, GOOD[Cmd.UPLOAD_BEGIN]) == UploadBegin(
        2, "t", "m", 10, SHA, "onnx", None, False
    )
    assert decode(Cmd.UPLOAD_CHUNK, GOOD[Cmd.UPLOAD_CHUNK]) == UploadChunk(3, "t", "h", 0)
    assert decode(Cmd.UPLOAD_COMMIT, GOOD[Cmd.UPLOAD_COMMIT]) == UploadCommit(4, "t", "h")
    infer = decode(Cmd.INFER, GOOD[Cmd.INFER])
    assert infer == Infer(5, "t", "m", (TensorDesc("x", "float32", (1, 4)),), None)
    assert decode(Cmd.LIST, GOOD[Cmd.LIST]) == ListModels(6, "t")
    assert decode(Cmd.INFO, GOOD[Cmd.INFO]) == GetModelInfo(7, "t", "m")
    assert decode(Cmd.DELETE, GOOD[Cmd.DELETE]) == DeleteModel(8, "t", "m")
    assert decode(Cmd.STATUS, GOOD[Cmd.STATUS]) == GetStatus(9, "t")


def test_optional_fields_when_given() -> None:
    header = {**GOOD[Cmd.UPLOAD_BEGIN], "sha256": SHA.upper(), "format": "onnx",
              "max_batch": 4096, "replace": True}  # fmt: skip
    begin = decode(Cmd.UPLOAD_BEGIN, header)
    assert (begin.sha256, begin.format, begin.max_batch, begin.replace) == (SHA, "onnx", 4096, True)
    assert decode(Cmd.UPLOAD_BEGIN, {**header, "max_batch": 1}).max_batch == 1
    infer = decode(Cmd.INFER, {**GOOD[Cmd.INFER], "deadline_ms": 250})
    assert infer.deadline_ms == 250.0 and isinstance(infer.deadline_ms, float)
    assert infer.deadline(10.0) == pytest.approx(10.25)
    assert decode(Cmd.INFER, GOOD[Cmd.INFER]).deadline(10.0) == math.inf
    # a negative offset is the upload's business (it discards the upload), not the decode's
    assert decode(Cmd.UPLOAD_CHUNK, {**GOOD[Cmd.UPLOAD_CHUNK], "offset": -1}).offset == -1


def test_unknown_keys_are_ignored() -> None:
    for cmd, header in GOOD.items():
        assert decode(cmd, {**header, "extra": [1, {"x": None}]}) == decode(cmd, header)


def test_structs_are_frozen() -> None:
    request = decode(Cmd.INFER, GOOD[Cmd.INFER])
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.model = "other"  # type: ignore[misc]


def test_descriptions_decode_under_the_limits_given() -> None:
    header = {**GOOD[Cmd.INFER], "inputs": [["x", "float32", [1, 4]]] * 3}
    assert len(decode(Cmd.INFER, header).inputs) == 3
    with pytest.raises(TooLarge) as info:
        decode(Cmd.INFER, header, Limits(max_tensors=2))
    assert info.value.message == "3 tensors; the limit is 2"
    deep = {**GOOD[Cmd.INFER], "inputs": [["x", "float32", [1, 1, 1]]]}
    with pytest.raises(BadArgument) as info:
        decode(Cmd.INFER, deep, Limits(max_rank=2))
    assert info.value.message == "tensor 'x': shape must be a list of at most 2 ints"


# ---------------------------------------------------------------- id and tenant, every command

ID_CASES = [
    pytest.param(MISSING, "header field 'id' is required", id="missing"),
    pytest.param("7", "header field 'id' must be int, got str", id="string"),
    pytest.param(1.5, "header field 'id' must be int, got float", id="float"),
    pytest.param(True, "header field 'id' must be int, got a boolean", id="bool"),
    pytest.param(None, "header field 'id' must be int, got NoneType", id="nil"),
    pytest.param(-1, "header field 'id' must be an unsigned 64-bit integer", id="negative"),
    pytest.param(1 << 64, "header field 'id' must be an unsigned 64-bit integer", id="2**64"),
]

TENANT_RULE = "header field 'tenant' must be 1-64 letters, digits or ._-"
TENANT_CASES = [
    pytest.param(5, "header field 'tenant' must be str, got int", id="int"),
    pytest.param(False, "header field 'tenant' must be str, got a boolean", id="bool"),
    pytest.param("", TENANT_RULE, id="empty"),
    pytest.param("no spaces/allowed", TENANT_RULE, id="slash-space"),
    pytest.param(".hidden", TENANT_RULE, id="leading-dot"),
    pytest.param("a" * 65, TENANT_RULE, id="65-chars"),
    pytest.param("é", TENANT_RULE, id="non-ascii"),
]


@pytest.mark.parametrize("cmd", list(Cmd), ids=lambda c: c.name)
@pytest.mark.parametrize(("value", "message"), ID_CASES)
def test_bad_id(cmd: Cmd, value: Any, message: str) -> None:
    error = refused(cmd, "id", value)
    assert (type(error), error.status, error.message) == (BadArgument, 14, message)


@pytest.mark.parametrize("cmd", list(Cmd), ids=lambda c: c.name)
@pytest.mark.parametrize(("value", "message"), TENANT_CASES)
def test_bad_tenant(cmd: Cmd, value: Any, message: str) -> None:
    error = refused(cmd, "tenant", value)
    assert (type(error), error.status, error.message) == (BadArgument, 14, message)


def test_tenant_default_and_limits() -> None:
    assert tenant_of({}) == "default"
    for name in ("a", "A-b_c.d", "0" * 64):
        assert tenant_of({"tenant": name}) == name


def test_id_is_checked_before_tenant_and_fields() -> None:
    error = refused(Cmd.INFER, "id", MISSING)
    assert "'id'" in error.message
    bad_all = {"tenant": "bad tenant", "model": 5}
    with pytest.raises(BadArgument) as info:
        decode(Cmd.INFER, {"id": 1, **bad_all})
    assert "'tenant'" in info.value.message


def test_reply_id() -> None:
    assert reply_id({"id": 7, "tenant": "bad tenant"}) == 7
    assert reply_id({"id": 0}) == 0
    for bad in ({}, {"id": True}, {"id": -1}, {"id": "7"}, {"id": 1 << 64}):
        assert reply_id(bad) is None


# ---------------------------------------------------------------- each command's own fields

NAME_RULE = (
    "is not valid: 1-128 characters of letters, digits and ._:- starting with a letter or digit"
)
POSITIVE_SIZE = "header field 'size' must be a positive byte count"
EMPTY_MODEL = "the model is empty (0 bytes): an ONNX model is never empty"
HEX_SHA = "header field 'sha256' must be 64 hex digits"
BATCH_RANGE = "header field 'max_batch' must be between 1 and 4096"
POSITIVE_DEADLINE = "header field 'deadline_ms' must be a positive number"
DTYPES = "bool, uint8, int8, int16, int32, int64, float16, float32, float64"
UB, UC, UM, INF = Cmd.UPLOAD_BEGIN, Cmd.UPLOAD_CHUNK, Cmd.UPLOAD_COMMIT, Cmd.INFER


def case(cmd: Cmd, key: str, value: Any, message: str, exc: type[MTError] = BadArgument) -> Any:
    shown = "missing" if value is MISSING else f"{value!r:.16}"
    return pytest.param(cmd, key, value, exc, message, id=f"{cmd.name}-{key}-{shown}")


FIELD_CASES = [
    case(UB, "name", MISSING, "header field 'name' is required"),
    case(UB, "name", 7, "header field 'name' must be str, got int"),
    case(UB, "name", "bad name!", f"model name 'bad name!' {NAME_RULE}"),
    case(UB, "name", "../etc", f"model name '../etc' {NAME_RULE}"),
    case(UB, "name", "", f"model name '' {NAME_RULE}"),
    case(UB, "name", "x" * 129, f"model name {'x' * 129!r:.80} {NAME_RULE}"),
    case(UB, "size", MISSING, "header field 'size' is required"),
    case(UB, "size", "12", "header field 'size' must be int, got str"),
    case(UB, "size", 1.0, "header field 'size' must be int, got float"),
    case(UB, "size", True, "header field 'size' must be int, got a boolean"),
    case(UB, "size", 0, EMPTY_MODEL, ModelInvalid),
    case(UB, "size", -5, POSITIVE_SIZE),
    case(UB, "sha256", MISSING, "header field 'sha256' is required"),
    case(UB, "sha256", 5, "header field 'sha256' must be str, got int"),
    case(UB, "sha256", "abc", HEX_SHA),
    case(UB, "sha256", "z" * 64, HEX_SHA),
    case(UB, "sha256", SHA + "0", HEX_SHA),
    case(UB, "format", "tensorflow", "format 'tensorflow' is not supported; use 'onnx'"),
    case(UB, "format", 1, "header field 'format' must be str, got int"),
    case(UB, "max_batch", 0, BATCH_RANGE),
    case(UB, "max_batch", 4097, BATCH_RANGE),
    case(UB, "max_batch", "4", "header field 'max_batch' must be int, got str"),
    case(UB, "max_batch", True, "header field 'max_batch' must be int, got a boolean"),
    case(UB, "replace", "yes", "header field 'replace' must be bool, got str"),
    case(UB, "replace", 1, "header field 'replace' must be bool, got int"),
    case(UC, "upload", MISSING, "header field 'upload' is required"),
    case(UC, "upload", 5, "header field 'upload' must be str, got int"),
    case(UC, "offset", MISSING, "header field 'offset' is required"),
    case(UC, "offset", "0", "header field 'offset' must be int, got str"),
    case(UC, "offset", 0.0, "header field 'offset' must be int, got float"),
    case(UC, "offset", False, "header field 'offset' must be int, got a boolean"),
    case(UM, "upload", MISSING, "header field 'upload' is required"),
    case(UM, "upload", b"h", "header field 'upload' must be str, got bytes"),
    case(INF, "model", MISSING, "header field 'model' is required"),
    case(INF, "model", 5, "header field 'model' must be str, got int"),
    case(INF, "inputs", MISSING, "header field 'inputs' is required"),
    case(INF, "inputs", "input", "header field 'inputs' must be list, got str"),
    case(INF, "inputs", {"x": [1, 4]}, "header field 'inputs' must be list, got dict"),
    case(INF, "inputs", None, "header field 'inputs' must be list, got NoneType"),
    case(INF, "inputs", [["x", "float32"]],
         "a tensor description is [name, dtype, shape], got ['x', 'float32']"),
    case(INF, "inputs", [["", "float32", [1]]], "a tensor name must be a non-empty string"),
    case(INF, "inputs", [["x", "complex64", [1]]],
         f"tensor 'x': dtype 'complex64' is not one of {DTYPES}", InputInvalid),
    case(INF, "inputs", [["x", "float32", "1x4"]],
         "tensor 'x': shape must be a list of at most 8 ints"),
    case(INF, "inputs", [["x", "float32", [1, -4]]],
         "tensor 'x': dimension -4 is not a valid size"),
    case(INF, "inputs", [["x", "float32", [True]]],
         "tensor 'x': dimension True is not a valid size"),
    case(INF, "inputs", [["x", "float32", [1]]] * 65, "65 tensors; the limit is 64", TooLarge),
    case(INF, "deadline_ms", "soon", "header field 'deadline_ms' must be int or float, got str"),
    case(INF, "deadline_ms", True,
         "header field 'deadline_ms' must be int or float, got a boolean"),
    *[case(INF, "deadline_ms", bad, POSITIVE_DEADLINE)
      for bad in (-5.0, 0, float("nan"), float("inf"), 1e9)],
    case(Cmd.INFO, "model", MISSING, "header field 'model' is required"),
    case(Cmd.INFO, "model", 5, "header field 'model' must be str, got int"),
    case(Cmd.DELETE, "model", MISSING, "header field 'model' is required"),
    case(Cmd.DELETE, "model", ["x"], "header field 'model' must be str, got list"),
    case(Cmd.SHARE, "model", MISSING, "header field 'model' is required"),
    case(Cmd.SHARE, "grant", "u", "header field 'grant' must be list, got str"),
    case(Cmd.SHARE, "grant", [1], SHARE_NAMES.format("grant")),
    case(Cmd.SHARE, "grant", ["a/b"], SHARE_NAMES.format("grant")),
    case(Cmd.SHARE, "grant", ["t"], "header field 'grant' names yourself; you own the model"),
    case(Cmd.SHARE, "grant", ["x"] * 257, "header field 'grant' names at most 256 tenants"),
    case(Cmd.SHARE, "revoke", {"u": 1}, "header field 'revoke' must be list, got dict"),
    case(Cmd.SHARE, "revoke", ["t"], "header field 'revoke' names yourself; you own the model"),
]  # fmt: skip


@pytest.mark.parametrize(("cmd", "key", "value", "exc_type", "message"), FIELD_CASES)
def test_bad_field(cmd: Cmd, key: str, value: Any, exc_type: type[MTError], message: str) -> None:
    error = refused(cmd, key, value)
    assert type(error) is exc_type
    assert error.status == exc_type.status
    assert error.message == message


def test_every_field_has_a_case() -> None:
    """Each struct's own fields (beyond who sent it: id, tenant, admin) have a bad-value
    case above, so a field added later cannot go untested."""
    covered = {(MESSAGES[p.values[0]], p.values[1]) for p in FIELD_CASES}
    for cls in set(MESSAGES.values()):
        for f in dataclasses.fields(cls):
            if f.name not in ("id", "tenant", "admin"):
                assert (cls, f.name) in covered, f"{cls.__name__}.{f.name} has no bad-value case"


def test_an_authenticated_identity_overrides_the_tenant_field() -> None:
    """A secure broker passes the key's principal: the header's `tenant` is ignored, even
    when it names someone else or is not a valid name at all."""
    forged = {**GOOD[Cmd.INFO], "tenant": "alice"}
    request = decode(Cmd.INFO, forged, identity=Identity("mallory", admin=False))
    assert request.tenant == "mallory" and request.admin is False
    bad = {**GOOD[Cmd.LIST], "tenant": 7}
    assert decode(Cmd.LIST, bad, identity=Identity("ops", admin=True)).admin is True
    with pytest.raises(BadArgument):
        decode(Cmd.LIST, bad)  # insecure mode reads the field, and it is invalid
    assert decode(Cmd.LIST, GOOD[Cmd.LIST]).admin is True  # insecure: everyone is trusted
