"""The broker's tenant side: a message in, decoded once, to the handler of its verb.

`Frontend` is mixed into `broker.broker.Broker` (see its docstring for why mixins).
`on_client_message` splits the envelope, parses tag, command and header with the
configured bounds, and decodes the header into its command's typed request
(`mtcore.messages`); each `on_<verb>` gets that struct and the payload frames, never the
raw header. A handler either replies at once (PING, UPLOAD_BEGIN, UPLOAD_CHUNK, LIST,
INFO, DELETE, STATUS) or hands the request on and the answer comes later: INFER to the
scheduler (`submit`, answered through `Broker.answer`), UPLOAD_COMMIT to the commit state
machine (`begin_commit`). Any MTError a handler raises becomes that request's one error
reply; any other exception an INTERNAL reply, and the loop keeps serving.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from broker.quotas import TenantBook, TenantLimits
from broker.registry import MAX_GRANTEES, SHARE_SEP, ModelRecord
from broker.state import PendingRequest
from broker.validate import plan_inputs
from mtcore import messages
from mtcore.errors import (
    BadArgument,
    Forbidden,
    InternalError,
    ModelExists,
    ModelNotFound,
    MTError,
    Overloaded,
    QuotaExceeded,
    Unauthenticated,
)
from mtcore.protocol import (
    TAG,
    VERSION,
    Cmd,
    frame_buffer,
    frame_size,
    parse_body,
    peek_cmd,
    peek_id,
    split_envelope,
)

if TYPE_CHECKING:
    from broker.broker import Broker

log = logging.getLogger("mtserve.broker")


class Frontend:
    """Tenant requests: decode and the verb handlers (a `Broker` mixin)."""

    def init_frontend(self: Broker) -> None:
        # Each handler gets the routing envelope, the decoded request and the payload frames.
        self.handlers: dict[Cmd, Callable[[list[Any], Any, list[Any]], None]] = {
            Cmd.PING: self.on_ping,
            Cmd.UPLOAD_BEGIN: self.on_upload_begin,
            Cmd.UPLOAD_CHUNK: self.on_upload_chunk,
            Cmd.UPLOAD_COMMIT: self.on_upload_commit,
            Cmd.INFER: self.on_infer,
            Cmd.LIST: self.on_list,
            Cmd.INFO: self.on_info,
            Cmd.DELETE: self.on_delete,
            Cmd.STATUS: self.on_status,
            Cmd.SHARE: self.on_share,
        }
        self.by_command: Counter[Cmd] = Counter()  # tenant requests by command
        self._rids = itertools.count(secrets.randbits(40) << 16)  # request ids (random start)
        self.books: dict[str, TenantBook] = {}  # tenant -> its live counts against its limits

    def on_client_message(self: Broker, frames: list[Any], user_id: str | None = None) -> None:
        self.counters["messages"] += 1
        try:
            envelope, body = split_envelope(frames)
        except MTError as exc:  # no delimiter: still routable by the first frame
            self.reply_error(frames[:1], Cmd.PING.value, None, exc)
            return
        try:
            msg = parse_body(body, TAG, Cmd, self.limits)
        except MTError as exc:
            self.reply_error(envelope, peek_cmd(body), peek_id(body), exc)
            return
        request = None
        try:
            identity = self.identify(user_id)
            request = messages.decode(msg.cmd, msg.header, self.limits, identity)  # once
            self.by_command[msg.cmd] += 1
            self.handlers[msg.cmd](envelope, request, msg.payload)
        except Exception as exc:
            if not isinstance(exc, MTError):
                log.exception("bug while handling %s", msg.cmd.name)
                exc = InternalError(f"{type(exc).__name__} in {msg.cmd.name} handler: {exc}")
            client_id = request.id if request is not None else messages.reply_id(msg.header)
            self.reply_error(envelope, msg.cmd, client_id, exc)

    def identify(self: Broker, user_id: str | None) -> messages.Identity | None:
        """The principal behind a message's key; None in insecure mode (the header names
        the tenant). A key removed or rotated since its connection's handshake no longer
        acts: UNAUTHENTICATED."""
        if self.principals is None:
            return None
        principal = self.principals.by_key.get(user_id) if user_id else None
        if principal is None or principal.role == "worker":
            self.counters["unauthenticated"] += 1
            raise Unauthenticated(
                "this connection's key is not registered (removed or rotated since it "
                "connected); reconnect with a current key file"
            )
        return messages.Identity(principal.name, principal.admin)

    def on_ping(
        self: Broker, envelope: list[Any], request: messages.Ping, payload: list[Any]
    ) -> None:
        self.reply(envelope, Cmd.PING, {"id": request.id, "server": f"mtserve {VERSION}"})

    def on_upload_begin(
        self: Broker, envelope: list[Any], request: messages.UploadBegin, payload: list[Any]
    ) -> None:
        name = request.name
        exists = self.registry.get(request.tenant, name) is not None
        if not request.replace and exists:
            raise ModelExists(f"model '{name}' exists; upload with replace=true to overwrite it")
        mine = self.registry.list(request.tenant)
        uploads, reserved = self.uploads.reserved(request.tenant)
        upload = self.uploads.begin(  # its own checks first: size, digest, disk
            request.tenant, name, request.size, request.sha256, request.replace, request.max_batch
        )
        try:
            self.book_of(request.tenant).check_upload(
                len(mine), sum(m.size for m in mine), uploads, reserved, request.size, exists
            )
        except MTError:
            self.uploads.discard(upload)
            raise
        self.reply(envelope, Cmd.UPLOAD_BEGIN, {"id": request.id, "upload": upload.handle})

    def on_upload_chunk(
        self: Broker, envelope: list[Any], request: messages.UploadChunk, payload: list[Any]
    ) -> None:
        upload = self.uploads.get(request.tenant, request.upload)
        if len(payload) != 1:
            raise BadArgument(f"UPLOAD_CHUNK carries exactly 1 payload frame, got {len(payload)}")
        received = self.uploads.write_chunk(upload, request.offset, frame_buffer(payload[0]))
        self.reply(envelope, Cmd.UPLOAD_CHUNK, {"id": request.id, "received": received})

    def on_upload_commit(
        self: Broker, envelope: list[Any], request: messages.UploadCommit, payload: list[Any]
    ) -> None:
        upload = self.uploads.get(request.tenant, request.upload)
        path = self.uploads.finish(upload)  # checks coverage; the hash runs off the loop
        self.begin_commit(envelope, request.id, upload, path)

    def on_infer(
        self: Broker, envelope: list[Any], request: messages.Infer, payload: list[Any]
    ) -> None:
        model = self._model(request.tenant, request.model)
        plan = plan_inputs(model, request.inputs)
        frames = plan.frames(payload)
        now = time.monotonic()
        deadline = request.deadline(now)
        nbytes = sum(frame_size(f) for f in frames)
        if self.pending_bytes + nbytes > self.config.max_pending_bytes:
            raise Overloaded(
                f"{self.pending_bytes} bytes of inputs already wait for answers; retry later"
            )
        book = self.book_of(request.tenant)
        reply_bytes = model.reply_bytes(plan.batch)
        book.admit_infer(now, reply_bytes)  # RATE_LIMITED / QUOTA_EXCEEDED before anything
        rid = next(self._rids)
        pending = PendingRequest(
            rid, envelope, request.id, model, plan.descs, frames, plan.batch, now, deadline
        )
        pending.nbytes = nbytes
        pending.wire_inputs = plan.wire
        pending.tenant, pending.book, pending.reply_bytes = request.tenant, book, reply_bytes
        try:
            self.submit(pending, now)
        except BaseException:
            book.answered(reply_bytes)  # refused: it holds nothing
            raise
        self.pending_bytes += nbytes
        give_up = min(deadline + self.config.answer_grace, now + self.config.max_request_time)
        self.pending.insert(pending.rid, give_up, pending)

    def on_list(
        self: Broker, envelope: list[Any], request: messages.ListModels, payload: list[Any]
    ) -> None:
        models = [m.to_info() for m in self.registry.list(request.tenant)]
        shared = [shared_info(m) for m in self.registry.shared_with(request.tenant)]
        self.reply(envelope, Cmd.LIST, {"id": request.id, "models": models, "shared": shared})

    def on_info(
        self: Broker, envelope: list[Any], request: messages.GetModelInfo, payload: list[Any]
    ) -> None:
        model = self._model(request.tenant, request.model)
        info = model.to_info() if model.tenant == request.tenant else shared_info(model)
        self.reply(envelope, Cmd.INFO, {"id": request.id, "model": info})

    def on_delete(
        self: Broker, envelope: list[Any], request: messages.DeleteModel, payload: list[Any]
    ) -> None:
        model = self._own_model(request.tenant, request.model)
        self.registry.delete(request.tenant, model.name)
        self.release_blob(model.sha256)
        self.reply(envelope, Cmd.DELETE, {"id": request.id})

    def on_share(
        self: Broker, envelope: list[Any], request: messages.ShareModel, payload: list[Any]
    ) -> None:
        model = self._own_model(request.tenant, request.model)
        for grantee in request.grant:
            self._check_grantee(grantee)
        now = set(self.registry.grantees(model.tenant, model.name))
        after = (now | set(request.grant)) - set(request.revoke)
        if len(after) > MAX_GRANTEES:
            raise QuotaExceeded(
                f"model '{model.name}' may be shared with at most {MAX_GRANTEES} tenants"
            )
        shared = self.registry.share(model.tenant, model.name, list(request.grant),
                                     list(request.revoke))  # fmt: skip
        reply = {"id": request.id, "model": model.name, "shared_with": shared}
        self.reply(envelope, Cmd.SHARE, reply)

    def _check_grantee(self: Broker, name: str) -> None:
        """A secure broker shares only with tenants it knows (workers are not tenants)."""
        if self.principals is None:
            return
        if name not in self.principals.by_name:
            self.refresh_principals()  # added a moment ago, before the next tick?
        principal = self.principals.by_name.get(name)
        if principal is None or principal.role == "worker":
            raise BadArgument(f"no tenant '{name}' to share with; `mtserve tenant list` names them")

    def on_status(
        self: Broker, envelope: list[Any], request: messages.GetStatus, payload: list[Any]
    ) -> None:
        info = self.status_info(request.tenant, request.admin)
        self.reply(envelope, Cmd.STATUS, {"id": request.id, "status_info": info})

    def book_of(self: Broker, tenant: str) -> TenantBook:
        book = self.books.get(tenant)
        if book is None:
            book = self.books[tenant] = TenantBook(tenant, self.limits_of(tenant))
        return book

    def limits_of(self: Broker, tenant: str) -> TenantLimits:
        """The broker's default limits with the operator's overrides for this tenant."""
        principal = self.principals.by_name.get(tenant) if self.principals else None
        if principal is None:
            return self.config.tenant_limits
        try:
            limits = self.config.tenant_limits.with_overrides(principal.limits)
        except MTError as exc:
            log.warning("ignoring the limits of '%s': %s", tenant, exc)
            limits = self.config.tenant_limits
        return replace(limits, weight=principal.weight)

    def refresh_books(self: Broker) -> None:
        """The principals changed: every tenant's limits and weight are read again."""
        for tenant, book in self.books.items():
            book.limits = self.limits_of(tenant)

    def tenant_weight(self: Broker, tenant: str) -> float:
        principal = self.principals.by_name.get(tenant) if self.principals else None
        return principal.weight if principal is not None else 1.0

    def _model(self: Broker, tenant: str, ref: str) -> ModelRecord:
        """A model the tenant may run and inspect: its own, or `owner/name` shared with it.
        Not found reads the same whether or not another tenant has such a model."""
        model = self.registry.resolve(tenant, ref)
        if model is None:
            raise ModelNotFound(
                f"no model '{ref}' for tenant '{tenant}'; `list` shows yours and those "
                "shared with you"
            )
        return model

    def _own_model(self: Broker, tenant: str, ref: str) -> ModelRecord:
        """A model the tenant may change (delete, share): only its own."""
        model = self._model(tenant, ref)
        if model.tenant != tenant:
            raise Forbidden(f"model '{ref}' is shared with you read-only; only its owner "
                            "may delete or share it")  # fmt: skip
        return model


def shared_info(model: ModelRecord) -> dict[str, Any]:
    """A model's info as a tenant it is shared with sees it: named `owner/name`."""
    info = model.to_info()
    info["name"] = f"{model.tenant}{SHARE_SEP}{model.name}"
    info["owner"] = model.tenant
    return info
