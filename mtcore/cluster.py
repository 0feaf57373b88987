"""A local cluster of real processes on loopback: one broker and N workers.

Used by `mtserve up`, `make demo`, the benchmarks and the integration tests. Each
process is started with `python -m mtcore.cli`, tracked by PID and stopped by PID
(SIGTERM, then SIGKILL after a grace period). The broker binds OS-chosen ports unless
told otherwise and writes them to `<state_dir>/endpoints.json`, which is how the
cluster learns where to point workers and clients.

A secure cluster (the default) runs the broker with CURVE: before the broker starts, the
cluster registers an admin key for itself (`cluster-admin`, to read STATUS) and one
worker key per worker, all under `<state_dir>/keys/`; `add_principal` registers more
(tenants), and the broker sees them at its next handshake. `secure=False` starts the
broker with `--insecure`, for tests and benchmarks that choose plain sockets.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ENDPOINTS_FILE = "endpoints.json"


class ClusterError(RuntimeError):
    pass


class LocalCluster:
    """Broker + workers as child processes; `address` is the tenant frontend."""

    def __init__(
        self,
        state_dir: str | Path,
        *,
        workers: int = 1,
        port: int = 0,
        memory_mb: int = 1024,
        host_memory_mb: int = 4096,
        threads: int = 0,
        broker_args: list[str] = (),
        worker_args: list[str] = (),
        log_dir: str | Path | None = None,
        secure: bool = True,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.n_workers = workers
        self.port = port  # 0: let the OS choose
        self.memory_mb = memory_mb  # each worker's device tier: runnable sessions
        self.host_memory_mb = host_memory_mb  # each worker's host tier: weights in pages
        self.threads = threads  # ONNX Runtime threads per session (0: cores / workers)
        self.broker_args = list(broker_args)
        self.worker_args = list(worker_args)  # extra `mtserve worker` options
        self.log_dir = Path(log_dir) if log_dir else self.state_dir / "logs"
        self.broker: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self.address = ""  # tenant frontend, known once the broker is up
        self.backend = ""  # worker backend
        self.secure = secure  # CURVE on both broker sockets
        self.admin_key: Path | None = None  # the cluster's own admin key file (secure)

    # -- lifecycle ----------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> LocalCluster:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / ENDPOINTS_FILE).unlink(missing_ok=True)
        try:
            if self.secure:
                self.admin_key = self.add_principal("cluster-admin", "admin")
            self.start_broker(timeout)
            for i in range(self.n_workers):
                self.start_worker(f"worker-{i}")
            self.wait_for_workers(self.n_workers, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def start_broker(self, timeout: float = 60.0, frontend: str = "", backend: str = "") -> None:
        frontend = frontend or f"tcp://127.0.0.1:{self.port or '*'}"
        backend = backend or f"tcp://127.0.0.1:{self.port + 1 if self.port else '*'}"
        args = [
            "broker",
            "--state-dir",
            str(self.state_dir),
            "--frontend",
            frontend,
            "--backend",
            backend,
            *([] if self.secure else ["--insecure"]),
            *self.broker_args,
        ]
        self.broker = self._spawn(args, "broker")
        endpoints = self._wait_endpoints(timeout)
        self.address, self.backend = endpoints["frontend"], endpoints["backend"]

    def start_worker(self, name: str) -> subprocess.Popen:
        threads = self.threads or max(1, (os.cpu_count() or 1) // max(1, self.n_workers))
        args = [
            "worker",
            "--backend",
            self.backend,
            "--name",
            name,
            "--memory-mb",
            str(self.memory_mb),
            "--host-memory-mb",
            str(self.host_memory_mb),
            "--threads",
            str(threads),
            *self.worker_args,
        ]
        if self.secure:
            args += ["--key-file", str(self.add_principal(name, "worker"))]
        proc = self._spawn(args, name)
        self.workers.append(proc)
        return proc

    def add_principal(self, name: str, role: str = "tenant", weight: float = 1.0) -> Path:
        """Register `name` (if new) and return its secret key file, for a secure cluster."""
        from broker.principals import Principals, key_path, provision, reissue

        principals = Principals.open(self.state_dir)
        try:
            path = key_path(self.state_dir, name)
            if name not in principals.by_name:
                return provision(principals, self.state_dir, name, role, weight=weight)
            if not path.exists():  # registered, but its file is gone: a new key
                return reissue(principals, self.state_dir, name)
            return path
        finally:
            principals.db.close()

    def client(self, tenant: str, **kwargs: Any):
        """A `Client` acting as `tenant`: by its key (secure) or its header (insecure)."""
        from mtcore.client import Client

        if self.secure:
            return Client(self.address, key_file=self.add_principal(tenant), **kwargs)
        return Client(self.address, tenant=tenant, **kwargs)

    def stop(self, grace: float = 10.0) -> None:
        """Stop every child by PID: workers first, then the broker."""
        for proc in [*self.workers, self.broker]:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in [*self.workers, self.broker]:
            if proc is not None:
                _reap(proc, grace)
        self.workers.clear()
        self.broker = None

    def restart_broker(self, timeout: float = 60.0) -> None:
        """Stop the broker alone and start a new one on the same endpoints and state."""
        if self.broker is not None:
            self.broker.send_signal(signal.SIGTERM)
            _reap(self.broker, 10.0)
        (self.state_dir / ENDPOINTS_FILE).unlink(missing_ok=True)
        self.start_broker(timeout, self.address, self.backend)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- waiting ------------------------------------------------------------------

    def wait_for_workers(self, count: int, timeout: float = 60.0) -> dict[str, Any]:
        from mtcore.client import Client

        deadline = time.monotonic() + timeout
        with Client(self.address, key_file=self.admin_key, timeout=5.0) as client:
            while time.monotonic() < deadline:
                self._check_alive()
                try:
                    status = client.status()
                except TimeoutError:
                    continue
                if len(status["workers"]) >= count:
                    return status
                time.sleep(0.05)
        raise ClusterError(
            f"{count} workers did not register within {timeout} s; see {self.log_dir}"
        )

    def _wait_endpoints(self, timeout: float) -> dict[str, str]:
        path = self.state_dir / ENDPOINTS_FILE
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            if path.exists():
                try:
                    return json.loads(path.read_text())
                except json.JSONDecodeError:
                    pass  # being written
            time.sleep(0.02)
        raise ClusterError(f"the broker did not start within {timeout} s; see {self.log_dir}")

    def _check_alive(self) -> None:
        for proc in [self.broker, *self.workers]:
            if proc is not None and proc.poll() is not None:
                raise ClusterError(
                    f"process {proc.args[3]} (pid {proc.pid}) exited with {proc.returncode}; "
                    f"see {self.log_dir}"
                )

    def _spawn(self, args: list[str], name: str) -> subprocess.Popen:
        log = (self.log_dir / f"{name}.log").open("ab")
        try:
            return subprocess.Popen(
                [sys.executable, "-m", "mtcore.cli", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        finally:
            log.close()


def _reap(proc: subprocess.Popen, grace: float) -> None:
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
