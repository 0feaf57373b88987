"""The C client (examples/c/mtclient.c) against a real cluster.

It is written from docs/PROTOCOL.md alone (libzmq, its own msgpack and SHA-256), so these
tests check that the documented protocol is enough: what it uploads, the Python client
sees; what it infers, ONNX Runtime computes; its errors carry the broker's statuses.
Skipped where there is no C compiler or no libzmq headers.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from bench import zoo
from mtcore import keys
from mtcore.client import Client
from mtcore.cluster import LocalCluster
from mtcore.protocol import VERSION
from tests.conftest import start_cluster

SOURCE = Path(__file__).resolve().parent.parent / "examples" / "c" / "mtclient.c"
TENANT = "c-client"
MODEL = "c_tiny_add"
RUN_TIMEOUT = 120  # seconds for one client run (the client itself waits 30 s per reply)


class Built:
    def __init__(self, exe: Path, warnings: str) -> None:
        self.exe = exe
        self.warnings = warnings


def _pkg_config(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["pkg-config", *args, "libzmq"], capture_output=True, text=True, timeout=30
    )


@pytest.fixture(scope="module")
def mtclient(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """Compile the client the way the README says; skip if the toolchain is missing."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler: `cc` is not on PATH")
    if shutil.which("pkg-config") is None or _pkg_config("--exists").returncode != 0:
        pytest.skip(
            "libzmq headers not found (`pkg-config --exists libzmq` failed); "
            "install them with `apt-get install -y libzmq3-dev pkg-config`"
        )
    flags = _pkg_config("--cflags", "--libs").stdout.split()
    exe = tmp_path_factory.mktemp("cclient") / "mtclient"
    args = ["cc", "-O2", "-std=c99", "-Wall", "-Wextra", "-o", str(exe), str(SOURCE), *flags]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"compiling {SOURCE} failed:\n{proc.stderr}"
    return Built(exe, proc.stderr)


@pytest.fixture(scope="module")
def c_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = start_cluster(tmp_path_factory.mktemp("ccluster"), workers=1)
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return zoo.save("tiny_add", tmp_path_factory.mktemp("zoo"))


def run(
    mtclient: Built, cluster: LocalCluster, *args: str, tenant: str | None = TENANT
) -> subprocess.CompletedProcess:
    argv = [str(mtclient.exe), cluster.address]
    if tenant is not None:
        argv += ["--tenant", tenant]
    argv += args
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=RUN_TIMEOUT, stdin=subprocess.DEVNULL
    )


@pytest.fixture(scope="module")
def uploaded(
    mtclient: Built, c_cluster: LocalCluster, model_path: Path
) -> subprocess.CompletedProcess:
    """The C client uploads tiny_add once for the whole module."""
    return run(mtclient, c_cluster, "upload", MODEL, str(model_path))


def test_compiles_without_warnings(mtclient: Built) -> None:
    assert mtclient.warnings.strip() == ""


def test_ping_prints_server_version(mtclient: Built, c_cluster: LocalCluster) -> None:
    proc = run(mtclient, c_cluster, "ping", tenant=None)
    assert proc.returncode == 0, proc.stderr
    assert f"mtserve {VERSION}" in proc.stdout


def test_upload_is_seen_by_python_client(
    uploaded: subprocess.CompletedProcess, c_cluster: LocalCluster, model_path: Path
) -> None:
    assert uploaded.returncode == 0, uploaded.stderr
    # "model NAME sha256 HEX size N max_batch B"
    words = uploaded.stdout.split()
    assert words[:2] == ["model", MODEL]
    sha = words[words.index("sha256") + 1]
    assert sha == hashlib.sha256(model_path.read_bytes()).hexdigest()
    with Client(c_cluster.address, tenant=TENANT, timeout=60) as client:
        info = client.model_info(MODEL)
    assert info["sha256"] == sha
    assert info["size"] == model_path.stat().st_size


def test_list_prints_model_info_as_json(
    mtclient: Built, c_cluster: LocalCluster, uploaded: subprocess.CompletedProcess
) -> None:
    assert uploaded.returncode == 0, uploaded.stderr
    proc = run(mtclient, c_cluster, "list")
    assert proc.returncode == 0, proc.stderr
    models = {m["name"]: m for m in map(json.loads, proc.stdout.splitlines())}
    assert models[MODEL]["inputs"] == [["input", "float32", [-1, 4]]]
    assert models[MODEL]["state"] == "ready"


def test_infer_matches_onnxruntime(
    mtclient: Built,
    c_cluster: LocalCluster,
    uploaded: subprocess.CompletedProcess,
    model_path: Path,
) -> None:
    assert uploaded.returncode == 0, uploaded.stderr
    proc = run(mtclient, c_cluster, "infer", MODEL, "2,4", "1.0")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    # "output NAME DTYPE [D0,D1] values: v0 v1 ..." (floats printed round-trippably)
    head, values = lines[0].split(" values:")
    assert head.split() == ["output", "output", "float32", "[2,4]"]
    got = np.array(values.split(), dtype=np.float32).reshape(2, 4)
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"input": np.ones((2, 4), np.float32)})[0]
    np.testing.assert_array_equal(got, expected)
    timing_line = next(line for line in lines if line.startswith("timing: "))
    timing = json.loads(timing_line.removeprefix("timing: "))
    assert {"queue", "exec", "total"} <= timing.keys()


def test_unknown_model_exits_2(mtclient: Built, c_cluster: LocalCluster) -> None:
    proc = run(mtclient, c_cluster, "infer", "no_such_model", "1,4", "1.0")
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "[status 30 MODEL_NOT_FOUND]" in proc.stderr


def test_wrong_shape_exits_2(
    mtclient: Built, c_cluster: LocalCluster, uploaded: subprocess.CompletedProcess
) -> None:
    assert uploaded.returncode == 0, uploaded.stderr
    proc = run(mtclient, c_cluster, "infer", MODEL, "2,5", "1.0")
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "[status 40 INPUT_INVALID]" in proc.stderr


def test_usage_and_transport_errors_exit_1(mtclient: Built, tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(mtclient.exe), "tcp://127.0.0.1:1"], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 1 and "usage" in proc.stderr
    proc = subprocess.run(  # nothing listens there: the receive times out, no hang
        [str(mtclient.exe), "tcp://127.0.0.1:1", "--timeout", "0.5", "ping"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 1 and "no reply" in proc.stderr


def test_pipelined_load(
    mtclient: Built, c_cluster: LocalCluster, uploaded: subprocess.CompletedProcess
) -> None:
    assert uploaded.returncode == 0, uploaded.stderr
    proc = run(mtclient, c_cluster, "load", MODEL, "1,4", "2000", "200")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["requests"] == 2000
    assert report["ok"] == 2000
    assert report["errors"] == {}
    assert report["seconds"] > 0 and report["rps"] > 0


# ---------------------------------------------------------------- CURVE (--key FILE)

SECURE_TENANT = "c-curve"
SECURE_MODEL = "c_curve_add"


def _has_secure_api() -> bool:
    """LocalCluster(state_dir, secure=True) and add_principal(), with the CURVE work."""
    params = inspect.signature(LocalCluster.__init__).parameters
    return "secure" in params and hasattr(LocalCluster, "add_principal")


@pytest.fixture(scope="module")
def secure_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    if not _has_secure_api():
        pytest.skip("no secure cluster API yet (LocalCluster(secure=True), add_principal)")
    c = start_cluster(tmp_path_factory.mktemp("csecure"), secure=True, workers=1)
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def tenant_key(secure_cluster: LocalCluster) -> Path:
    """The secret key file of a tenant the broker knows."""
    return secure_cluster.add_principal(SECURE_TENANT, role="tenant")


def run_keyed(mtclient: Built, address: str, key: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(mtclient.exe), address, "--key", str(key), *args],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )


def test_key_ping_upload_infer_seen_by_python_client(
    mtclient: Built, secure_cluster: LocalCluster, tenant_key: Path, model_path: Path
) -> None:
    address = secure_cluster.address
    proc = run_keyed(mtclient, address, tenant_key, "ping")
    assert proc.returncode == 0, proc.stderr
    assert f"mtserve {VERSION}" in proc.stdout
    if keys.read(tenant_key).endpoint:  # ADDRESS "-": the key file's endpoint
        proc = run_keyed(mtclient, "-", tenant_key, "ping")
        assert proc.returncode == 0, proc.stderr

    # --tenant is accepted, and ignored by a secure broker: the key names the tenant.
    proc = run_keyed(
        mtclient,
        address,
        tenant_key,
        "--tenant",
        "decoy",
        "upload",
        SECURE_MODEL,
        str(model_path),
    )
    assert proc.returncode == 0, proc.stderr
    words = proc.stdout.split()
    assert words[:2] == ["model", SECURE_MODEL]
    sha = words[words.index("sha256") + 1]
    assert sha == hashlib.sha256(model_path.read_bytes()).hexdigest()

    proc = run_keyed(mtclient, address, tenant_key, "infer", SECURE_MODEL, "2,4", "1.0")
    assert proc.returncode == 0, proc.stderr
    head, values = proc.stdout.splitlines()[0].split(" values:")
    assert head.split() == ["output", "output", "float32", "[2,4]"]
    got = np.array(values.split(), dtype=np.float32).reshape(2, 4)
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"input": np.ones((2, 4), np.float32)})[0]
    np.testing.assert_array_equal(got, expected)

    with Client(address, key_file=tenant_key, timeout=60) as client:
        info = client.model_info(SECURE_MODEL)
    assert info["sha256"] == sha


def test_unregistered_key_gets_no_reply(
    mtclient: Built, secure_cluster: LocalCluster, tenant_key: Path, tmp_path: Path
) -> None:
    """A fresh pair the broker never registered: the handshake fails, silently."""
    known = keys.read(tenant_key)
    stranger = keys.generate(SECURE_TENANT, "tenant", known.server_key, known.endpoint)
    path = keys.write_secret(tmp_path / "stranger.key_secret", stranger)
    proc = run_keyed(mtclient, secure_cluster.address, path, "--timeout", "2", "ping")
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "no reply" in proc.stderr
    assert str(path) in proc.stderr and "key may be wrong" in proc.stderr


def _malformed_key(kind: str) -> str:
    """A key file's text, spoiled in one way."""
    broker = keys.generate("broker", "broker")
    key = keys.generate("c-bad", "tenant", broker.public_key, "tcp://127.0.0.1:1")
    text = keys.render(key, secret=True)
    if kind == "39-char-public-key":
        return text.replace(key.public_key, key.public_key[:39])
    if kind == "public-file":  # no secret-key line
        return keys.render(key, secret=False)
    if kind == "bad-line":
        return text.replace("server-key = ", "server-key ")
    assert kind == "too-big"
    return text + "#" * (64 * 1024) + "\n"


@pytest.mark.parametrize(
    "kind, message",
    [
        ("39-char-public-key", "public-key is not a CURVE key"),
        ("public-file", "no secret-key"),
        ("bad-line", 'not a `name = "value"` line'),
        ("too-big", "larger than 64 KiB"),
    ],
)
def test_malformed_key_file_exits_1_without_connecting(
    mtclient: Built, tmp_path: Path, kind: str, message: str
) -> None:
    path = tmp_path / "bad.key_secret"
    path.write_text(_malformed_key(kind))
    # "-" would use the file's endpoint: the file is refused before that.
    proc = run_keyed(mtclient, "-", path, "--timeout", "30", "ping")
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert message in proc.stderr and str(path) in proc.stderr
    assert "no reply" not in proc.stderr
