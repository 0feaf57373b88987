"""The tenant client: a thin layer over one ZeroMQ DEALER socket.

`Client` sends one request at a time; `AsyncClient` keeps many in flight over one
socket, matching replies to requests by `id`. Both raise the typed exceptions of
`mtcore.errors` from a reply's status. Needs only pyzmq, msgpack and numpy.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zmq
import zmq.asyncio

from mtcore import keys
from mtcore.errors import error_for
from mtcore.protocol import (
    TAG,
    Cmd,
    Limits,
    build,
    decode_tensors,
    parse_body,
    parse_descs,
    split_envelope,
)
from mtcore.transport import make_socket, recv_frames, send_frames

DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"
CHUNK_BYTES = 4 * 1024 * 1024  # upload chunk size: well under the broker's frame limit
_REPLY_LIMITS = Limits(
    max_frame_bytes=1 << 40, max_message_bytes=1 << 40, max_header_bytes=1 << 26, max_frames=1 << 16
)


@dataclass
class InferResult:
    """Outputs by name, and the per-stage timings (microseconds) the service measured."""

    outputs: dict[str, np.ndarray]
    timing: dict[str, int]
    batch: int = 1

    def __getitem__(self, name: str) -> np.ndarray:
        return self.outputs[name]


@dataclass
class Reply:
    cmd: Cmd
    header: dict[str, Any]
    payload: list[Any]


def model_bytes(model: bytes | str | Path) -> bytes:
    if isinstance(model, (bytes, bytearray, memoryview)):
        return bytes(model)
    return Path(model).read_bytes()


def upload_messages(name: str, data: bytes, replace: bool, max_batch: int | None) -> dict[str, Any]:
    header: dict[str, Any] = {
        "name": name,
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    if replace:
        header["replace"] = True
    if max_batch is not None:
        header["max_batch"] = max_batch
    return header


def chunks(data: bytes, size: int) -> Iterator[tuple[int, memoryview]]:
    view = memoryview(data)
    for offset in range(0, len(data), size):
        yield offset, view[offset : offset + size]


def infer_message(
    model: str, inputs: dict[str, np.ndarray], deadline_ms: float | None
) -> tuple[dict[str, Any], list[Any]]:
    from mtcore.protocol import encode_tensors

    descs, frames = encode_tensors(inputs)
    header: dict[str, Any] = {"model": model, "inputs": descs}
    if deadline_ms is not None:
        header["deadline_ms"] = float(deadline_ms)
    return header, frames


def decode_reply(frames: list[Any]) -> Reply:
    """Parse a reply; raise the typed error if its status is not OK."""
    _, body = split_envelope(frames, hops=0)
    msg = parse_body(body, TAG, Cmd, _REPLY_LIMITS)
    return Reply(msg.cmd, msg.header, msg.payload)


def check(reply: Reply) -> Reply:
    status = reply.header.get("status", 0)
    if status:
        raise error_for(status, str(reply.header.get("error", "")))
    return reply


def infer_result(reply: Reply) -> InferResult:
    descs = parse_descs(reply.header.get("outputs", []), _REPLY_LIMITS)
    return InferResult(
        decode_tensors(descs, reply.payload),
        reply.header.get("timing", {}),
        reply.header.get("batch", 1),
    )


class _Base:
    def __init__(
        self, address: str | None, tenant: str | None, key_file: str | Path | None
    ) -> None:
        self.tenant = tenant  # insecure brokers only: a secure one takes the key's name
        self.key = keys.read(key_file) if key_file else None
        self.address = address or (self.key and self.key.endpoint) or DEFAULT_ADDRESS
        self._ids = itertools.count(1)

    def _connect(self, sock: zmq.Socket) -> zmq.Socket:
        if self.key is not None:
            self.key.apply_client(sock)  # KeyFileError without secret and server keys
        sock.connect(self.address)
        return sock

    def _silence(self, timeout: float) -> TimeoutError:
        why = f"no reply from {self.address} within {timeout} s"
        if self.key is not None:
            why += (
                f" (with CURVE key '{self.key.name}': a key that is wrong, revoked or for"
                " another broker gets no reply at all)"
            )
        return TimeoutError(why)

    def _frames(
        self, cmd: Cmd, header: dict[str, Any], payload: list[Any] = ()
    ) -> tuple[int, list[Any]]:
        rid = next(self._ids)
        header = {**header, "id": rid}
        if self.tenant is not None:
            header["tenant"] = self.tenant
        return rid, build(TAG, cmd, header, payload)


class Client(_Base):
    """Synchronous client: one request in flight at a time."""

    def __init__(
        self,
        address: str | None = None,
        *,
        tenant: str | None = None,
        key_file: str | Path | None = None,
        timeout: float = 60.0,
        ctx: zmq.Context | None = None,
    ) -> None:
        """`key_file`: this tenant's secret key file (`mtserve tenant add` writes one); it
        names the broker's key and, when `address` is None, the broker's endpoint."""
        super().__init__(address, tenant, key_file)
        self.timeout = timeout  # seconds to wait for each reply
        self.ctx = ctx or zmq.Context.instance()
        self.sock = self._connect(make_socket(self.ctx, zmq.DEALER))

    def call(
        self, cmd: Cmd, header: dict[str, Any] | None = None, payload: list[Any] = ()
    ) -> Reply:
        """Send one request and wait for its reply (replies to abandoned requests are skipped)."""
        rid, frames = self._frames(cmd, header or {}, payload)
        send_frames(self.sock, frames)
        deadline_ms = int(self.timeout * 1000)
        while self.sock.poll(deadline_ms, zmq.POLLIN):
            reply = decode_reply(recv_frames(self.sock))
            if reply.header.get("id") in (rid, None):
                return check(reply)
        raise self._silence(self.timeout)

    def ping(self) -> str:
        return self.call(Cmd.PING).header.get("server", "")

    def upload_model(
        self,
        name: str,
        model: bytes | str | Path,
        *,
        replace: bool = False,
        max_batch: int | None = None,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> dict[str, Any]:
        data = model_bytes(model)
        begin = self.call(Cmd.UPLOAD_BEGIN, upload_messages(name, data, replace, max_batch))
        handle = begin.header["upload"]
        for offset, chunk in chunks(data, chunk_bytes):
            self.call(Cmd.UPLOAD_CHUNK, {"upload": handle, "offset": offset}, [chunk])
        return self.call(Cmd.UPLOAD_COMMIT, {"upload": handle}).header["model"]

    def infer(
        self, model: str, inputs: dict[str, np.ndarray], *, deadline_ms: float | None = None
    ) -> InferResult:
        header, frames = infer_message(model, inputs, deadline_ms)
        return infer_result(self.call(Cmd.INFER, header, frames))

    def list_models(self) -> list[dict[str, Any]]:
        return self.call(Cmd.LIST).header["models"]

    def model_info(self, name: str) -> dict[str, Any]:
        return self.call(Cmd.INFO, {"model": name}).header["model"]

    def delete_model(self, name: str) -> None:
        self.call(Cmd.DELETE, {"model": name})

    def shared_models(self) -> list[dict[str, Any]]:
        """Other tenants' models shared with this one, named `owner/name`."""
        return self.call(Cmd.LIST).header.get("shared", [])

    def share_model(
        self, name: str, grant: Sequence[str] = (), revoke: Sequence[str] = ()
    ) -> list[str]:
        """Let `grant` run and inspect the model read-only, stop `revoke`; the tenants it
        is shared with after."""
        header = {"model": name, "grant": list(grant), "revoke": list(revoke)}
        return self.call(Cmd.SHARE, header).header["shared_with"]

    def status(self) -> dict[str, Any]:
        return self.call(Cmd.STATUS).header["status_info"]

    def close(self) -> None:
        self.sock.close(linger=0)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Base):
    """asyncio client: many requests in flight over one socket, matched by `id`."""

    def __init__(
        self,
        address: str | None = None,
        *,
        tenant: str | None = None,
        key_file: str | Path | None = None,
        timeout: float = 60.0,
        ctx: zmq.asyncio.Context | None = None,
    ) -> None:
        super().__init__(address, tenant, key_file)
        self.timeout = timeout
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self.sock = self._connect(make_socket(self.ctx, zmq.DEALER))
        self._waiting: dict[int, asyncio.Future[Reply]] = {}  # id -> future of its reply
        self._reader: asyncio.Task[None] | None = None

    async def call(
        self, cmd: Cmd, header: dict[str, Any] | None = None, payload: list[Any] = ()
    ) -> Reply:
        """Send one request and await its reply; a non-zero status raises its typed error."""
        return check(await self.call_raw(cmd, header, payload))

    async def call_raw(
        self, cmd: Cmd, header: dict[str, Any] | None = None, payload: list[Any] = ()
    ) -> Reply:
        """Like `call`, but returns error replies too (load generators count statuses)."""
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read())
        rid, frames = self._frames(cmd, header or {}, payload)
        future = asyncio.get_running_loop().create_future()
        self._waiting[rid] = future
        try:
            await self.sock.send_multipart(frames, copy=False)
            reply = await asyncio.wait_for(future, self.timeout)
        except asyncio.TimeoutError:  # only the wait: DeadlineExpired is a TimeoutError too
            raise self._silence(self.timeout) from None
        finally:
            self._waiting.pop(rid, None)
        return reply

    async def _read(self) -> None:
        while True:
            frames = await self.sock.recv_multipart(copy=False)
            try:
                reply = decode_reply(frames)
            except Exception:
                continue  # not a reply we can match to anything
            future = self._waiting.get(reply.header.get("id"))
            if future is not None and not future.done():
                future.set_result(reply)

    async def ping(self) -> str:
        return (await self.call(Cmd.PING)).header.get("server", "")

    async def upload_model(
        self,
        name: str,
        model: bytes | str | Path,
        *,
        replace: bool = False,
        max_batch: int | None = None,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> dict[str, Any]:
        data = model_bytes(model)
        begin = await self.call(Cmd.UPLOAD_BEGIN, upload_messages(name, data, replace, max_batch))
        handle = begin.header["upload"]
        for offset, chunk in chunks(data, chunk_bytes):
            await self.call(Cmd.UPLOAD_CHUNK, {"upload": handle, "offset": offset}, [chunk])
        return (await self.call(Cmd.UPLOAD_COMMIT, {"upload": handle})).header["model"]

    async def infer(
        self, model: str, inputs: dict[str, np.ndarray], *, deadline_ms: float | None = None
    ) -> InferResult:
        header, frames = infer_message(model, inputs, deadline_ms)
        return infer_result(await self.call(Cmd.INFER, header, frames))

    infer_async = infer

    async def list_models(self) -> list[dict[str, Any]]:
        return (await self.call(Cmd.LIST)).header["models"]

    async def model_info(self, name: str) -> dict[str, Any]:
        return (await self.call(Cmd.INFO, {"model": name})).header["model"]

    async def delete_model(self, name: str) -> None:
        await self.call(Cmd.DELETE, {"model": name})

    async def shared_models(self) -> list[dict[str, Any]]:
        return (await self.call(Cmd.LIST)).header.get("shared", [])

    async def share_model(
        self, name: str, grant: Sequence[str] = (), revoke: Sequence[str] = ()
    ) -> list[str]:
        header = {"model": name, "grant": list(grant), "revoke": list(revoke)}
        return (await self.call(Cmd.SHARE, header)).header["shared_with"]

    async def status(self) -> dict[str, Any]:
        return (await self.call(Cmd.STATUS)).header["status_info"]

    def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        self.sock.close(linger=0)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        self.close()
