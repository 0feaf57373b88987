"""What `mtbench` drives: mtserve and its baselines behind one small `Target` protocol.

The runner (`bench/runner.py`) only knows this protocol, so one workload is replayed
against every system unchanged, and every system is timed by the same clock in the same
process: the runner measures latency, a target only says how the request ended.

- `MtserveTarget`: a `LocalCluster` (broker + workers) in a temporary state directory,
  models uploaded under each tenant, requests over `AsyncClient`.
- `ZmqTarget`: the bare ZeroMQ + ONNX Runtime server (`bench/baselines/zmq_server.py`),
  every model resident; the transport floor.
- `InProcessTarget`: ONNX Runtime sessions in this process, run on one executor thread
  (so the event loop keeps timing); the no-network floor.
- `RayTarget`: Ray Serve with model multiplexing (optional).

Every child process is started and stopped by PID (the cluster and the bare server do
that); `stop()` is idempotent and `start()` cleans up after itself when it fails. All
sockets are on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import logging
import math
import shutil
import tempfile
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from bench.report import TIMEOUT_STATUS, ServerSample
from mtcore.errors import MTError, Status
from mtcore.protocol import Cmd

MIB = 1 << 20
Inputs = dict[str, np.ndarray]


@runtime_checkable
class Target(Protocol):
    """A system under test. `infer` returns (status, batch); the caller measures latency."""

    name: str
    address: str | None  # an MTS1 endpoint for raw clients, or None (in-process, Ray)

    def start(self, models: dict[str, Path], tenants: Sequence[str] = ("bench",)) -> None: ...

    async def infer(
        self, model: str, inputs: Inputs, deadline_ms: float | None, tenant: str = "bench"
    ) -> tuple[int, int]: ...

    def sample(self, t: float = 0.0) -> ServerSample | None: ...

    def stop(self) -> None: ...


def memory_mb_for(models: int, model_bytes: int) -> int:
    """A worker budget (MiB) that holds `models` models of `model_bytes` and not one more.

    Rounded up to whole MiB (the worker flag's unit); for models under 1 MiB the rounding
    can admit more, which only matters for toy models.
    """
    return max(1, math.ceil(models * model_bytes / MIB))


def _status_of(exc: BaseException) -> int:
    """A client exception as the status the report files it under."""
    if isinstance(exc, MTError):
        return int(exc.status)
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return TIMEOUT_STATUS
    return int(Status.INTERNAL)


class _PerLoopClients:
    """AsyncClients keyed by tenant, rebuilt when the running event loop changes.

    zmq.asyncio sockets belong to the loop that first used them; scenarios call
    `asyncio.run` several times against one started target, so clients are per loop.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.address = ""
        self.key_files: dict[str | None, Path] = {}  # tenant -> CURVE key (secure targets)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._clients: dict[str | None, Any] = {}

    def get(self, tenant: str | None) -> Any:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self.close()
            self._loop = loop
        client = self._clients.get(tenant)
        if client is None:
            client = _status_client(self.address, tenant, self.timeout, self.key_files.get(tenant))
            self._clients[tenant] = client
        return client

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()
        self._loop = None


def _status_client(
    address: str, tenant: str | None, timeout: float, key_file: Path | None = None
) -> Any:
    """An AsyncClient; INFERs go through `call_raw`, which returns error replies as they are
    (one exception per rejection would cost more than the rejection on the hot path).
    With `key_file`, it authenticates with CURVE (a secure broker ignores `tenant`)."""
    from mtcore.client import AsyncClient

    return AsyncClient(address, tenant=tenant, timeout=timeout, key_file=key_file)


async def _client_infer(
    clients: _PerLoopClients,
    tenant: str | None,
    model: str,
    inputs: Inputs,
    deadline_ms: float | None,
) -> tuple[int, int]:
    from mtcore.client import infer_message

    try:
        reply = await clients.get(tenant).call_raw(
            Cmd.INFER, *infer_message(model, inputs, deadline_ms)
        )
    except Exception as exc:  # no reply at all (TimeoutError) or a transport error
        return _status_of(exc), 1
    return int(reply.header.get("status", 0)), int(reply.header.get("batch", 1))


class _RemoteTarget:
    """What the server targets share: a temp state directory and per-loop clients."""

    def __init__(self, timeout: float) -> None:
        self.address: str | None = None
        self._state: str | None = None  # temp directory of the server's state and logs
        self._clients = _PerLoopClients(timeout)

    def _new_state(self, prefix: str) -> str:
        self._state = tempfile.mkdtemp(prefix=prefix)
        return self._state

    def _release(self) -> None:
        """Close the clients and remove the state directory (the server is stopped)."""
        self._clients.close()
        if self._state is not None:
            shutil.rmtree(self._state, ignore_errors=True)
            self._state = None


# ---------------------------------------------------------------------------- mtserve


class MtserveTarget(_RemoteTarget):
    """mtserve as an operator would run it: `LocalCluster` on loopback, models uploaded."""

    name = "mtserve"

    def __init__(
        self,
        *,
        workers: int = 1,
        memory_mb: int = 1024,
        max_batch: int = 8,
        threads: int = 0,
        profile_batches: str = "1",
        timeout: float = 120.0,
        name: str = "mtserve",
        spin_us: int = 0,
        scheduler: str = "predictive",
        exec_threads: int = 1,
        secure: bool = False,
        broker_args: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.secure = secure  # CURVE, a key per tenant (plain like the baselines by default)
        self.broker_args = list(broker_args)  # more `mtserve broker` options
        self.exec_threads = exec_threads  # each worker's --exec-threads
        self.spin_us = spin_us  # busy-poll window of broker and workers (--spin-us)
        self.scheduler = scheduler  # the broker's --scheduler
        self.workers = workers
        self.memory_mb = memory_mb  # each worker's budget for live models
        self.max_batch = max_batch  # broker cap and the cap asked for at upload
        self.threads = threads  # ONNX Runtime threads per worker (0: cores / workers)
        self.profile_batches = profile_batches  # fewer batch sizes: faster uploads
        super().__init__(timeout)
        self.cluster: Any = None
        self._sampler: Any = None  # a sync Client used only under _sample_lock
        self._sample_lock = threading.Lock()

    def start(self, models: dict[str, Path], tenants: Sequence[str] = ("bench",)) -> None:
        """Start the cluster and upload every model under every tenant (names are per tenant)."""
        from mtcore.client import Client
        from mtcore.cluster import LocalCluster

        self._new_state("mtbench-mtserve-")
        broker_args = ["--profile-batches", self.profile_batches]
        broker_args += ["--max-batch", str(self.max_batch), "--spin-us", str(self.spin_us)]
        broker_args += ["--scheduler", self.scheduler, *self.broker_args]
        self.cluster = LocalCluster(
            self._state,
            workers=self.workers,
            memory_mb=self.memory_mb,
            threads=self.threads,
            broker_args=broker_args,
            worker_args=["--spin-us", str(self.spin_us), "--exec-threads", str(self.exec_threads)],
            secure=self.secure,
        )
        try:
            self.cluster.start()
            self.address = self.cluster.address
            if self.secure:
                self._clients.key_files = {t: self.cluster.add_principal(t) for t in tenants}
            for tenant in tenants:
                key = self._clients.key_files.get(tenant)
                with Client(self.address, tenant=tenant, key_file=key, timeout=300) as client:
                    for name, path in models.items():
                        client.upload_model(name, path, max_batch=self.max_batch)
            self._clients.address = self.address
        except BaseException:
            self.stop()
            raise

    async def infer(
        self, model: str, inputs: Inputs, deadline_ms: float | None, tenant: str = "bench"
    ) -> tuple[int, int]:
        return await _client_infer(self._clients, tenant, model, inputs, deadline_ms)

    def status(self) -> dict[str, Any]:
        """The broker's STATUS (thread-safe: one sync client behind a lock)."""
        from mtcore.client import Client

        with self._sample_lock:
            if self._sampler is None:
                admin = self.cluster.admin_key if self.secure else None
                self._sampler = Client(self.address, tenant="bench", key_file=admin, timeout=10)
            return self._sampler.status()

    def sample(self, t: float = 0.0) -> ServerSample | None:
        try:
            info = self.status()
        except (TimeoutError, MTError):
            return None  # a busy broker: skip this sample rather than stall the run
        return ServerSample(t, int(info["loads"]), int(info["evictions"]))

    def stop(self) -> None:
        with self._sample_lock:
            if self._sampler is not None:
                self._sampler.close()
                self._sampler = None
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None
        self._release()


# ---------------------------------------------------------------------------- bare ZeroMQ


class ZmqTarget(_RemoteTarget):
    """The bare ZeroMQ server: one process, one thread, every model resident, no batching."""

    name = "zmq"

    def __init__(self, *, threads: int = 1, timeout: float = 120.0, name: str = "zmq") -> None:
        self.name = name
        self.threads = threads
        super().__init__(timeout)
        self.server: Any = None

    def start(self, models: dict[str, Path], tenants: Sequence[str] = ("bench",)) -> None:
        """Tenants are ignored: the bare server shows every model to every peer."""
        from bench.baselines.zmq_server import ZmqServerProcess

        state = self._new_state("mtbench-zmq-")
        self.server = ZmqServerProcess()
        try:
            self.server.start(models, self.threads, state, timeout=300)
            self.address = self.server.address
            self._clients.address = self.address
        except BaseException:
            self.stop()
            raise

    async def infer(
        self, model: str, inputs: Inputs, deadline_ms: float | None, tenant: str = "bench"
    ) -> tuple[int, int]:
        return await _client_infer(self._clients, None, model, inputs, deadline_ms)

    def sample(self, t: float = 0.0) -> ServerSample | None:
        return None  # no model cache: nothing is ever loaded or evicted during a run

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
        self._release()


# ---------------------------------------------------------------------------- in-process


class InProcessTarget:
    """ONNX Runtime in this process: the floor, with no sockets and no scheduling.

    Sessions use the worker's own options (`worker.onnx_backend.make_session`), so the
    ratio to mtserve is serving overhead, not different graph optimisations. `infer`
    runs on a single executor thread, so concurrent requests queue as they would at a
    one-thread server, while the event loop stays free to send on time.
    """

    name = "inprocess"
    address = None

    def __init__(self, *, threads: int = 0, name: str = "inprocess") -> None:
        self.name = name
        self.threads = threads  # intra-op threads (0: ONNX Runtime's default, all cores)
        self.sessions: dict[str, Any] = {}
        self._outputs: dict[str, list[str]] = {}
        self._pool: ThreadPoolExecutor | None = None

    def start(self, models: dict[str, Path], tenants: Sequence[str] = ("bench",)) -> None:
        from worker.onnx_backend import make_session

        for name, path in models.items():
            session = make_session(Path(path).read_bytes(), self.threads)
            self.sessions[name] = session
            self._outputs[name] = [o.name for o in session.get_outputs()]
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="mtbench-inprocess")

    def run(self, model: str, inputs: Inputs) -> list[np.ndarray]:
        """One synchronous run: what the latency scenarios time directly."""
        return self.sessions[model].run(self._outputs[model], inputs)

    def _run_status(self, model: str, inputs: Inputs) -> int:
        if model not in self.sessions:
            return int(Status.MODEL_NOT_FOUND)
        try:
            self.run(model, inputs)
        except Exception:
            return int(Status.EXEC_FAILED)
        return 0

    async def infer(
        self, model: str, inputs: Inputs, deadline_ms: float | None, tenant: str = "bench"
    ) -> tuple[int, int]:
        if self._pool is None:
            raise RuntimeError("InProcessTarget is not started")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._run_status, model, inputs), 1

    def sample(self, t: float = 0.0) -> ServerSample | None:
        return None

    def stop(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self.sessions.clear()
        self._outputs.clear()


# ---------------------------------------------------------------------------- Ray Serve


def ray_available() -> tuple[bool, str]:
    from bench.baselines import ray_serve

    return ray_serve.available()


class RayTarget:
    """Ray Serve with model multiplexing; a missed deadline is a cancel (status -1)."""

    name = "ray"
    address = None

    def __init__(
        self,
        *,
        models_per_replica: int = 4,
        replicas: int = 1,
        threads: int = 1,
        timeout: float = 120.0,
        name: str = "ray",
    ) -> None:
        self.name = name
        self.models_per_replica = models_per_replica
        self.replicas = replicas
        self.threads = threads
        self.timeout = timeout
        self.inner: Any = None
        self._temp: str | None = None

    @staticmethod
    def available() -> tuple[bool, str]:
        return ray_available()

    def start(self, models: dict[str, Path], tenants: Sequence[str] = ("bench",)) -> None:
        from bench.baselines.ray_serve import RayServeTarget

        ok, why = ray_available()
        if not ok:
            raise RuntimeError(why)
        # Short path: Ray's AF_UNIX socket paths must fit in 107 bytes.
        self._temp = tempfile.mkdtemp(prefix="mtray-", dir="/tmp")
        self.inner = RayServeTarget(timeout=self.timeout, temp_dir=self._temp)
        try:
            self.inner.start(
                models,
                models_per_replica=self.models_per_replica,
                replicas=self.replicas,
                threads=self.threads,
            )
            # The driver-side router logs every cancelled request at INFO: thousands of lines.
            logging.getLogger("ray.serve").setLevel(logging.WARNING)
        except BaseException:
            self.stop()
            raise

    async def infer(
        self, model: str, inputs: Inputs, deadline_ms: float | None, tenant: str = "bench"
    ) -> tuple[int, int]:
        try:
            status, _ = await self.inner.infer(model, inputs, deadline_ms)
        except Exception as exc:
            return _status_of(exc), 1
        return status, 1

    def sample(self, t: float = 0.0) -> ServerSample | None:
        return None  # Serve does not count multiplexed loads where a client can read them

    def stop(self) -> None:
        if self.inner is not None:
            try:
                self.inner.stop()
            finally:
                self.inner = None
        if self._temp is not None:
            shutil.rmtree(self._temp, ignore_errors=True)
            self._temp = None


def make_target(kind: str, **kwargs: Any) -> Target:
    """A target by its CLI name."""
    classes = {
        "mtserve": MtserveTarget,
        "zmq": ZmqTarget,
        "inprocess": InProcessTarget,
        "ray": RayTarget,
    }
    if kind not in classes:
        raise ValueError(f"unknown target {kind!r}; choose from {', '.join(classes)}")
    return classes[kind](**kwargs)
