"""Fixtures that cannot hang: clusters stopped by PID, sockets closed with linger=0."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from mtcore.client import Client
from mtcore.cluster import LocalCluster
from mtcore.protocol import TAG, Cmd, build, decode_header
from worker.watchdog import Watchdog

# Workers run a graph optimized once, without prepacking, over weights shared from their
# host pool; kernels then sum in another order than a fresh session's: fp32 rounding only.
FP32_TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU tests run only where CuPy sees a device."""
    try:
        import cupy

        has_gpu = bool(cupy.cuda.is_available())
    except Exception:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="no CUDA device (cupy.cuda.is_available() is false)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def watchdog() -> Iterator[Watchdog]:
    dog = Watchdog()
    dog.start()
    yield dog
    dog.stop()


def start_cluster(state_dir: Path, **kwargs) -> LocalCluster:
    """A cluster for tests: insecure (the header names the tenant) unless `secure=True`;
    tests/test_auth.py and others that test identity ask for CURVE."""
    kwargs.setdefault("secure", False)
    kwargs.setdefault("memory_mb", 512)
    kwargs.setdefault("broker_args", ["--profile-batches", "1,2"])
    return LocalCluster(state_dir, **kwargs).start()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """One broker and two workers, shared by a test module."""
    c = start_cluster(tmp_path_factory.mktemp("cluster"), workers=2)
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """One secure (CURVE) broker and one worker, shared by a test module."""
    c = start_cluster(tmp_path_factory.mktemp("secure"), workers=1, secure=True)
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def client(cluster: LocalCluster) -> Iterator[Client]:
    with Client(cluster.address, tenant=f"t{os.getpid()}", timeout=60) as c:
        yield c


class RawSocket:
    """A DEALER speaking raw frames, for malformed-input tests."""

    def __init__(self, ctx: zmq.Context, address: str) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)

    def send(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def request(self, cmd: Cmd, header: dict, payload: list[bytes] = ()) -> None:
        self.send(build(TAG, cmd, header, payload))

    def recv(self, timeout: float = 30.0) -> tuple[bytes, dict, list[bytes]]:
        """(command byte, header, payload) of the next reply; fails the test on silence."""
        if not self.sock.poll(int(timeout * 1000)):
            pytest.fail(f"no reply within {timeout} s")
        frames = self.sock.recv_multipart()
        assert frames[0] == b"" and frames[1] == TAG, frames[:2]
        return frames[2], decode_header(frames[3]), frames[4:]

    def silent(self, timeout: float = 0.5) -> bool:
        return not self.sock.poll(int(timeout * 1000))

    def close(self) -> None:
        self.sock.close(linger=0)


@pytest.fixture
def raw(cluster: LocalCluster) -> Iterator[RawSocket]:
    ctx = zmq.Context.instance()
    sock = RawSocket(ctx, cluster.address)
    try:
        yield sock
    finally:
        sock.close()
