"""Tenant requests as typed messages, decoded and validated once at the frontend. No I/O.

`decode(cmd, header, limits, identity)` turns a request's header map into the frozen
struct of its command (`Cmd.INFER` -> `Infer`, ...). Who sends it comes first: on a
secure broker the `identity` its CURVE key authenticated (the header's `tenant` field is
then ignored, as the protocol says); in insecure mode the `tenant` field. Every field is
read, type-checked and range-checked here, once, in a fixed order (`id`, `tenant`, then
the command's own fields), raising the
`MTError` a tenant should see (`BadArgument` 14 for a missing or mistyped field,
`TooLarge` 13 and `InputInvalid` 40 from tensor descriptions); handlers receive the
struct and never read the raw header. What needs the broker's state (does the model
exist, is the name taken, is the size under the configured limit, do the inputs match the
model) is checked by the handler afterwards. Unknown header keys are ignored, as the
protocol says. Replies are still plain header maps: the wire does not change.

Names follow the commands (`UploadBegin` for UPLOAD_BEGIN); where a command's name
alone would clash (`Status`, the status codes) or say little (`Info`), the struct is named
`<Verb><Noun>`: `GetStatus`, `GetModelInfo`, `ListModels`, `DeleteModel`. `Infer` is the
tenant's request; `mtcore.actions.Infer` is the worker action that carries it on.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from dataclasses import field as _field
from typing import Any, NamedTuple, TypeVar

from mtcore.errors import BadArgument, MTError
from mtcore.protocol import (
    DEFAULT_LIMITS,
    Cmd,
    Limits,
    TensorDesc,
    check_model_name,
    check_sha256,
    check_size,
    field,
    parse_descs,
    request_id,
)

_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
FORMATS = ("onnx",)  # model formats an upload may declare
MAX_BATCH_CAP = 4096  # the largest `max_batch` an upload may ask for
MAX_DEADLINE_MS = 1e9  # `deadline_ms` must lie in (0, this)

_R = TypeVar("_R", bound="TenantRequest")


class Sender(NamedTuple):
    """Who a request is from, as the frontend resolved it before decoding the rest."""

    id: int  # the request's `id`
    tenant: str  # the authenticated principal, or (insecure mode) the `tenant` field
    admin: bool  # may see every tenant's figures (an admin key; everyone in insecure mode)


class Identity(NamedTuple):
    """An authenticated principal allowed on the tenant socket (tenant or admin)."""

    name: str
    admin: bool


def tenant_of(header: dict[str, Any]) -> str:
    """Insecure mode: the tenant named in the header."""
    tenant = field(header, "tenant", str, "default")
    if not _TENANT.fullmatch(tenant):
        raise BadArgument("header field 'tenant' must be 1-64 letters, digits or ._-")
    return tenant


def reply_id(header: dict[str, Any]) -> int | None:
    """The id an error reply echoes: the header's own if it is valid, else none."""
    try:
        return request_id(header)
    except MTError:
        return None


@dataclass(frozen=True, slots=True)
class TenantRequest:
    """What every tenant request carries. PING, LIST and STATUS carry nothing more."""

    id: int  # the client's request id (unsigned 64-bit), echoed in the reply
    tenant: str  # whose request: 1-64 of letters, digits and ._- ("default" if unnamed)
    admin: bool = _field(default=False, kw_only=True, compare=False)  # see `Sender.admin`

    @classmethod
    def from_header(
        cls: type[_R], header: dict[str, Any], limits: Limits = DEFAULT_LIMITS, by: Sender = None
    ) -> _R:
        by = by or sender(header)
        return cls(by.id, by.tenant, admin=by.admin)


@dataclass(frozen=True, slots=True)
class Ping(TenantRequest):
    """PING: is the broker there; the reply names the server's version."""


@dataclass(frozen=True, slots=True)
class ListModels(TenantRequest):
    """LIST: the tenant's models."""


@dataclass(frozen=True, slots=True)
class GetStatus(TenantRequest):
    """STATUS: the broker's `status_info`, as far as this tenant may see it."""


@dataclass(frozen=True, slots=True)
class UploadBegin(TenantRequest):
    """UPLOAD_BEGIN: open an upload of `size` bytes that must hash to `sha256`."""

    name: str  # model name: 1-128 of letters, digits and ._:-, starting with one of the first two
    size: int  # declared bytes, > 0 (the broker's configured maximum is checked by Uploads)
    sha256: str  # declared digest, 64 lowercase hex digits
    format: str  # one of FORMATS
    max_batch: int | None  # batch cap asked for, 1-MAX_BATCH_CAP; None: the broker's default
    replace: bool  # may overwrite a model of the same name

    @classmethod
    def from_header(
        cls, header: dict[str, Any], limits: Limits = DEFAULT_LIMITS, by: Sender = None
    ) -> UploadBegin:
        by = by or sender(header)
        name = check_model_name(field(header, "name", str))
        size = check_size(field(header, "size", int))
        sha256 = check_sha256(field(header, "sha256", str))
        fmt = field(header, "format", str, "onnx")
        if fmt not in FORMATS:
            raise BadArgument(f"format {fmt!r:.20} is not supported; use 'onnx'")
        max_batch = field(header, "max_batch", int, None)
        if max_batch is not None and not 1 <= max_batch <= MAX_BATCH_CAP:
            raise BadArgument(f"header field 'max_batch' must be between 1 and {MAX_BATCH_CAP}")
        replace = field(header, "replace", bool, False)
        return cls(by.id, by.tenant, name, size, sha256, fmt, max_batch, replace, admin=by.admin)


@dataclass(frozen=True, slots=True)
class UploadChunk(TenantRequest):
    """UPLOAD_CHUNK: bytes at `offset` of an upload (in the one payload frame)."""

    upload: str  # the handle UPLOAD_BEGIN answered
    offset: int  # where the chunk starts (checked against the upload's size by Uploads)

    @classmethod
    def from_header(
        cls, header: dict[str, Any], limits: Limits = DEFAULT_LIMITS, by: Sender = None
    ) -> UploadChunk:
        by = by or sender(header)
        upload, offset = field(header, "upload", str), field(header, "offset", int)
        return cls(by.id, by.tenant, upload, offset, admin=by.admin)


@dataclass(frozen=True, slots=True)
class UploadCommit(TenantRequest):
    """UPLOAD_COMMIT: check, validate, profile and publish an upload."""

    upload: str  # the handle UPLOAD_BEGIN answered

    @classmethod
    def from_header(
        cls, header: dict[str, Any], limits: Limits = DEFAULT_LIMITS, by: Sender = None
    ) -> UploadCommit:
        by = by or sender(header)
        return cls(by.id, by.tenant, field(header, "upload", str), admin=by.admin)


@dataclass(frozen=True, slots=True)
class Infer(TenantRequest):
    """INFER: run a model on the tensors in the payload, one frame per input."""

    model: str  # the tenant's model name (looked up by the handler)
    inputs: tuple[TensorDesc, ...]  # descriptions of the payload frames, in their order
    deadline_ms: float | None  # budget from receipt, in (0, MAX_DEADLINE_MS); None: no deadline

    @classmethod
    def from_header(
        cls, header: dict[str, Any], limits: Limits = DEFAULT_LIMITS, by: Sender = None
    ) -> Infer:
        by = by or sender(header)
        model = field(header, "model", str)
        inputs = tuple(parse_descs(field(header, "inputs", list), limits))
        budget = field(header, "deadline_ms", (int, float), None)
        if budget is not None:
            if not 0 < budget < MAX_DEADLINE_MS:  # also refuses NaN
                raise BadArgument("header field 'deadline_ms' must be a positive number")
            budget = float(budget)
        return cls(by.id, by.tenant, model, inputs, budget, admin=by.admin)

    def deadline(self, now: float) -> float:
        """The monotonic time by which the answer is due (inf without a deadline)."""
        return math.inf if self.deadline_ms is None else now + self.deadline_ms / 1e3


@dataclass(frozen=True, slots=True)
class _ModelRequest(TenantRequest):
    """A request about one of the tenant's models, by name."""

    model: str  # the tenant's model name (looked up by the handler)

    @classmethod
    def from_header(
        cls: type[_R], header: dict[str, Any], limits: Limits = DEFAULT_LIMITS, by: Sender = None
    ) -> _R:
        by = by or sender(header)
        return cls(by.id, by.tenant, field(header, "model", str), admin=by.admin)


@dataclass(frozen=True, slots=True)
class GetModelInfo(_ModelRequest):
    """INFO: one model's info."""


@dataclass(frozen=True, slots=True)
class DeleteModel(_ModelRequest):
    """DELETE: remove a model; its bytes go once nothing uses them."""


@dataclass(frozen=True, slots=True)
class ShareModel(_ModelRequest):
    """SHARE: let other tenants run and inspect one of the tenant's models, read-only;
    or stop letting them. The reply lists every tenant it is shared with after."""

    grant: tuple[str, ...] = ()  # tenants that may use it from now on
    revoke: tuple[str, ...] = ()  # tenants that may no longer use it

    @classmethod
    def from_header(
        cls, header: dict[str, Any], limits: Limits = DEFAULT_LIMITS, by: Sender = None
    ) -> ShareModel:
        by = by or sender(header)
        model = field(header, "model", str)
        grant, revoke = _tenants(header, "grant", by.tenant), _tenants(header, "revoke", by.tenant)
        if set(grant) & set(revoke):
            raise BadArgument("a tenant cannot be in both 'grant' and 'revoke'")
        return cls(by.id, by.tenant, model, grant, revoke, admin=by.admin)


MAX_SHARE_NAMES = 256  # tenants one SHARE may name in each of grant and revoke


def _tenants(header: dict[str, Any], key: str, me: str) -> tuple[str, ...]:
    names = field(header, key, list, [])
    if len(names) > MAX_SHARE_NAMES:
        raise BadArgument(f"header field '{key}' names at most {MAX_SHARE_NAMES} tenants")
    for name in names:
        if not isinstance(name, str) or not _TENANT.fullmatch(name):
            raise BadArgument(f"header field '{key}' must list tenant names (1-64 of ._- "
                              "letters and digits)")  # fmt: skip
        if name == me:
            raise BadArgument(f"header field '{key}' names yourself; you own the model")
    return tuple(dict.fromkeys(names))


MESSAGES: dict[Cmd, type[TenantRequest]] = {
    Cmd.PING: Ping,
    Cmd.UPLOAD_BEGIN: UploadBegin,
    Cmd.UPLOAD_CHUNK: UploadChunk,
    Cmd.UPLOAD_COMMIT: UploadCommit,
    Cmd.INFER: Infer,
    Cmd.LIST: ListModels,
    Cmd.INFO: GetModelInfo,
    Cmd.DELETE: DeleteModel,
    Cmd.STATUS: GetStatus,
    Cmd.SHARE: ShareModel,
}  # command -> the struct its request decodes into


def sender(header: dict[str, Any], identity: Identity | None = None) -> Sender:
    """Who sent `header`: its authenticated `identity`, else (insecure) its `tenant` field."""
    rid = request_id(header)
    if identity is not None:
        return Sender(rid, identity.name, identity.admin)
    return Sender(rid, tenant_of(header), True)


def decode(
    cmd: Cmd,
    header: dict[str, Any],
    limits: Limits = DEFAULT_LIMITS,
    identity: Identity | None = None,
) -> TenantRequest:
    """The typed request of a decoded header; raises the MTError its tenant is answered.

    `identity`: the principal the connection's CURVE key belongs to (a secure broker);
    None in insecure mode, where the header's `tenant` field names the tenant.
    """
    return MESSAGES[cmd].from_header(header, limits, sender(header, identity))
