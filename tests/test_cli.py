"""The `mtserve` CLI as an operator uses it, and the client's light dependencies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bench import zoo

CLI = [sys.executable, "-m", "mtcore.cli", "--log-level", "warning"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def up(tmp_path: Path):
    """`mtserve up` on OS-chosen ports; yields (process, frontend address)."""
    proc = subprocess.Popen(
        [*CLI, "up", "--port", "0", "--workers", "1", "--state-dir", str(tmp_path / "state")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert "tenants connect to tcp://127.0.0.1:" in line, line
        yield proc, line.rsplit(" ", 1)[1].strip()
    finally:
        if proc.poll() is None:  # SIGTERM: `up` stops its broker and workers first
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)


def test_up_upload_infer_status_and_clean_stop(up, tmp_path: Path) -> None:
    """`mtserve up` is secure: its default tenant's key file is all the CLI needs."""
    proc, address = up
    keys = tmp_path / "state" / "keys"
    key = ["--key-file", str(keys / "default.key_secret")]
    model = zoo.save("mlp", tmp_path)
    uploaded = run("upload", "--address", address, *key, "m1", str(model))
    assert uploaded.returncode == 0, uploaded.stderr
    assert json.loads(uploaded.stdout)["name"] == "m1"

    inferred = run("infer", "--address", address, *key, "m1", "--batch", "3")
    assert inferred.returncode == 0, inferred.stderr
    assert "logits: float32[3, 10]" in inferred.stdout

    listed = run("list", *key)  # the key file names the broker's endpoint too
    assert listed.stdout.startswith("m1 "), listed.stderr

    admin = ["--key-file", str(keys / "cluster-admin.key_secret")]
    shared = run("share", *key, "m1", "--grant", "cluster-admin")
    assert shared.stdout.strip() == "'m1' is shared with: cluster-admin", shared.stderr
    assert "default/m1" in run("list", "--address", address, *admin).stdout
    borrowed = run("infer", "--address", address, *admin, "default/m1", "--batch", "2")
    assert "logits: float32[2, 10]" in borrowed.stdout, borrowed.stderr

    missing = run("infer", "--address", address, *key, "nope")
    assert missing.returncode == 2 and "[30 MODEL_NOT_FOUND]" in missing.stderr

    mine = json.loads(run("status", *key).stdout)
    assert mine["tenant"] == "default" and mine["tenant_models"] == 1 and "workers" not in mine
    status = json.loads(run("status", "--address", address, *admin).stdout)
    broker_pid = status["pid"]
    assert len(status["workers"]) == 1 and status["secure"] is True

    plain = run(
        "list", "--address", address, "--tenant", "default", "--key-file", "", "--timeout", "2"
    )
    assert plain.returncode == 1 and "no reply" in plain.stderr  # no key: no connection

    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0
    assert not pid_alive(broker_pid)


def test_client_needs_no_server_dependencies() -> None:
    """Embedders install pyzmq, msgpack and numpy only: the client must not pull onnx."""
    code = (
        "import sys; sys.modules['onnx'] = None; sys.modules['onnxruntime'] = None\n"
        "import mtcore.client, mtcore.errors, mtcore.protocol\n"
        "print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "ok", done.stderr
