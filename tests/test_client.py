"""The client against a scripted server: typed errors, id matching, stale replies."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import numpy as np
import pytest
import zmq

from mtcore.client import AsyncClient, Client
from mtcore.errors import DeadlineExpired, ExecFailed, ModelNotFound, Status
from mtcore.protocol import decode_header, encode_header


@pytest.fixture
def scripted() -> Iterator[tuple[str, list[dict]]]:
    """A ROUTER that answers each request with the next scripted header (id echoed)."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    script: list[dict] = []
    stop = threading.Event()

    def serve() -> None:
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        while not stop.is_set():
            if not poller.poll(50):
                continue
            ident, _, tag, cmd, header, *_ = sock.recv_multipart()
            reply = {**script.pop(0), "id": decode_header(header)["id"]}
            sock.send_multipart([ident, b"", tag, cmd, encode_header(reply)])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"tcp://127.0.0.1:{port}", script
    finally:
        stop.set()
        thread.join(timeout=5)
        sock.close(linger=0)


def test_async_client_raises_typed_deadline_error(scripted) -> None:
    """DeadlineExpired is a TimeoutError too: it must not be mistaken for 'no reply'."""
    address, script = scripted
    script.append({"status": int(Status.DEADLINE_EXPIRED), "error": "passed while queued"})

    async def main() -> None:
        async with AsyncClient(address, timeout=10) as client:
            with pytest.raises(DeadlineExpired) as info:
                await client.infer("m", {"x": np.zeros(1, "float32")})
            assert info.value.status == Status.DEADLINE_EXPIRED
            assert "passed while queued" in str(info.value)

    asyncio.run(main())


def test_sync_client_typed_errors_and_unknown_status(scripted) -> None:
    address, script = scripted
    script += [
        {"status": int(Status.MODEL_NOT_FOUND), "error": "no model"},
        {"status": int(Status.EXEC_FAILED), "error": "boom"},
        {"status": 77, "error": "from the future"},
        {"status": 0, "server": "scripted"},
    ]
    with Client(address, timeout=10) as client:
        with pytest.raises(ModelNotFound):
            client.model_info("x")
        with pytest.raises(ExecFailed):
            client.model_info("x")
        with pytest.raises(Exception, match="unknown status 77"):
            client.model_info("x")
        assert client.ping() == "scripted"


def test_sync_client_times_out_without_a_reply() -> None:
    ctx = zmq.Context.instance()
    silent = ctx.socket(zmq.ROUTER)
    silent.setsockopt(zmq.LINGER, 0)
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    try:
        with Client(f"tcp://127.0.0.1:{port}", timeout=0.2) as client, pytest.raises(TimeoutError):
            client.ping()
    finally:
        silent.close(linger=0)
