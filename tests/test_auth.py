"""CURVE identities against a live secure cluster: each attack of the tenants issue fails.

Real processes, real keys: the broker's ZAP handler admits only registered keys, each on
the socket of its role; the tenant is whoever the key belongs to, never the header's
`tenant` field; keys removed or rotated stop working on connections opened before.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
import zmq

from bench import zoo
from broker.principals import broker_key
from mtcore import keys
from mtcore.client import Client
from mtcore.cluster import LocalCluster
from mtcore.errors import ModelNotFound, Unauthenticated
from mtcore.protocol import VERSION, WORKER_TAG, WCmd, build, decode_header
from tests.conftest import FP32_TOLERANCE

CLI = [sys.executable, "-m", "mtcore.cli", "--log-level", "warning"]
SILENCE = 2.0  # seconds a refused peer waits for the reply that never comes
TINY_SHA = hashlib.sha256(zoo.model_bytes("tiny_add")).hexdigest()


def admin_status(cluster: LocalCluster) -> dict:
    with Client(cluster.address, key_file=cluster.admin_key, timeout=30) as admin:
        return admin.status()


def tenant_cli(cluster: LocalCluster, *args: str) -> subprocess.CompletedProcess:
    cmd = [*CLI, "tenant", *args, "--state-dir", str(cluster.state_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc


def until_refused(client: Client, limit: float = 15.0) -> Unauthenticated:
    """Ping until the broker refuses the key (it notices a change within a tick)."""
    stop = time.monotonic() + limit
    while time.monotonic() < stop:
        try:
            client.ping()
        except Unauthenticated as exc:
            return exc
        time.sleep(0.05)
    pytest.fail(f"the key still worked {limit} s after it was revoked")


def stranger_key(cluster: LocalCluster, path, role: str = "tenant") -> keys.KeyFile:
    """A well-formed key for this broker that nobody registered."""
    key = keys.generate("eve", role, broker_key(cluster.state_dir).public_key)
    keys.write_secret(path, key)
    return key


def test_secret_key_files_are_private(secure: LocalCluster) -> None:
    path = secure.add_principal("private")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(secure.admin_key).st_mode) == 0o600
    key = keys.read(path)
    assert key.role == "tenant" and key.endpoint == secure.address
    assert key.server_key == keys.read(secure.state_dir / "keys" / "broker.key").public_key


def test_the_key_decides_the_tenant_not_the_header(secure: LocalCluster) -> None:
    """The issue's first attack: another client names itself alice in its header."""
    inputs = zoo.sample_inputs("tiny_add", 2)
    with secure.client("alice", timeout=120) as alice:
        alice.upload_model("m", zoo.model_bytes("tiny_add"))
        expected = alice.infer("m", inputs).outputs
    mallory_key = secure.add_principal("mallory")
    with Client(secure.address, key_file=mallory_key, tenant="alice", timeout=120) as mallory:
        assert mallory.list_models() == []
        for attempt in (lambda: mallory.model_info("m"), lambda: mallory.delete_model("m"),
                        lambda: mallory.infer("m", inputs)):  # fmt: skip
            with pytest.raises(ModelNotFound) as refused:
                attempt()
            assert "alice" not in str(refused.value)  # not even the owner's name leaks
        mallory.upload_model("m", zoo.model_bytes("mlp"), replace=True)  # its own "m"
        assert [m["name"] for m in mallory.list_models()] == ["m"]
    with secure.client("alice", timeout=120) as alice:
        again = alice.infer("m", inputs).outputs
        info = alice.model_info("m")
    assert info["sha256"] == TINY_SHA
    for name, array in expected.items():
        np.testing.assert_allclose(again[name], array, **FP32_TOLERANCE)


def test_unknown_keys_and_plain_peers_get_no_connection(secure: LocalCluster, tmp_path) -> None:
    before = admin_status(secure)["security"]["handshakes_refused"]
    stranger_key(secure, tmp_path / "eve.key_secret")
    eve = Client(secure.address, key_file=tmp_path / "eve.key_secret", timeout=SILENCE)
    with eve, pytest.raises(TimeoutError, match="wrong, revoked or for another broker"):
        eve.ping()
    plain = Client(secure.address, tenant="alice", timeout=SILENCE)
    with plain, pytest.raises(TimeoutError):
        plain.ping()
    assert admin_status(secure)["security"]["handshakes_refused"] > before


def test_roles_do_not_cross(secure: LocalCluster) -> None:
    """A worker key cannot act as a tenant; a tenant key cannot register as a worker."""
    worker_key = secure.add_principal("spare-worker", "worker")
    as_tenant = Client(secure.address, key_file=worker_key, timeout=SILENCE)
    with as_tenant, pytest.raises(TimeoutError):
        as_tenant.ping()
    workers = len(admin_status(secure)["workers"])
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, int(SILENCE * 1000))
    keys.read(secure.add_principal("alice")).apply_client(sock)
    sock.connect(secure.backend)
    try:
        ready = {"name": "worker-0", "kind": "cpu", "pid": 1, "incarnation": "x",
                 "memory_budget": 1 << 40, "version": VERSION}  # fmt: skip
        with contextlib.suppress(zmq.Again):  # the refused handshake can leave no pipe
            sock.send_multipart(build(WORKER_TAG, WCmd.READY, ready))
        assert not sock.poll(int(SILENCE * 1000))  # no READY back: never registered
    finally:
        sock.close()
        ctx.term()
    status = admin_status(secure)
    assert len(status["workers"]) == workers
    assert [w["name"] for w in status["workers"]] == ["worker-0"]


def test_a_removed_key_stops_at_once_even_on_an_open_connection(secure: LocalCluster) -> None:
    with secure.client("leaving", timeout=30) as leaving:
        leaving.ping()
        tenant_cli(secure, "remove", "leaving")
        refused = until_refused(leaving)
    assert refused.status == 20
    listed = tenant_cli(secure, "list").stdout
    assert "leaving" not in listed and "alice" in listed


def test_a_rotated_key_replaces_the_old_one(secure: LocalCluster, tmp_path) -> None:
    old = tmp_path / "old.key_secret"
    old.write_bytes(secure.add_principal("rotating").read_bytes())
    with Client(secure.address, key_file=old, timeout=30) as before:
        before.ping()
        tenant_cli(secure, "rotate", "rotating")
        until_refused(before)
    with secure.client("rotating", timeout=30) as after:  # the file now holds the new key
        assert after.ping().startswith("mtserve")


def test_status_shows_a_tenant_its_own_figures_and_the_admin_everything(
    secure: LocalCluster,
) -> None:
    with secure.client("alice", timeout=30) as alice:
        mine = alice.status()
    assert mine["tenant"] == "alice" and mine["tenant_models"] == 1
    assert not {"workers", "answers_by_status", "models", "queued"} & set(mine)
    everything = admin_status(secure)
    assert everything["secure"] is True and len(everything["workers"]) == 1
    assert everything["models"] >= 2  # alice's and mallory's


class RogueWorker:
    """A registered worker (a real worker key) that tries what it was not sent."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        keys.read(cluster.add_principal("rogue", "worker")).apply_client(self.sock)
        self.sock.connect(cluster.backend)
        ready = {
            "name": "rogue",
            "kind": "cpu",
            "pid": os.getpid(),
            "incarnation": "rogue-1",
            "memory_budget": 1,
            "version": VERSION,
        }  # fmt: skip; fits no model
        self.send(WCmd.READY, ready)
        assert self.reply_to(WCmd.READY) is not None, "the rogue's key was not accepted"

    def send(self, cmd: WCmd, header: dict) -> None:
        self.sock.send_multipart(build(WORKER_TAG, cmd, header))

    def reply_to(self, cmd: WCmd, timeout: float = 10.0) -> tuple[dict, list] | None:
        stop = time.monotonic() + timeout
        while self.sock.poll(max(1, int((stop - time.monotonic()) * 1000))):
            frames = self.sock.recv_multipart()
            if WCmd(frames[2]) is cmd:
                return decode_header(frames[3]), frames[4:]
        return None

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


def test_a_worker_gets_no_bytes_and_forges_no_result_it_was_not_sent(
    secure: LocalCluster,
) -> None:
    """A registered worker asks for a model's bytes it was sent no action for (refused),
    and sprays results for actions it never got (ids it cannot know: dropped); the
    tenant's answers stay the real worker's."""
    rogue = RogueWorker(secure)
    inputs = zoo.sample_inputs("tiny_add", 1)
    try:
        rogue.send(WCmd.FETCH_MODEL, {"sha256": TINY_SHA})
        header, payload = rogue.reply_to(WCmd.FETCH_MODEL)
        assert header["status"] == 62 and payload == []  # LOAD_FAILED, no bytes
        with secure.client("alice", timeout=120) as alice:
            expected = alice.infer("m", inputs).outputs
            for action in range(1, 200):  # results for actions it was never sent
                rogue.send(WCmd.INFER, {"action": action, "sha256": TINY_SHA,
                                        "status": 0, "results": []})  # fmt: skip
            got = alice.infer("m", inputs).outputs
        for name, array in expected.items():
            np.testing.assert_array_equal(got[name], array)
        assert admin_status(secure)["security"]["worker_fetch_refused"] >= 1
    finally:
        rogue.close()
