"""The bare transport: a minimal ZeroMQ request/reply server around ONNX Runtime.

This is the server a user would write by hand, and the floor that `mtbench compare`
holds mtserve against: one process, one ROUTER socket, one thread; receive, decode the
header, run the session, reply. No batching, no scheduling, no deadlines (`deadline_ms`
is ignored), no uploads: every model given at start stays loaded for the whole run.

It speaks the tenant protocol subset that the benchmarks need (`MTS1` PING and INFER,
with the same error replies as the broker: 10/11/12 for malformed frames, 14 for bad
header fields, 30 for an unknown model, 40 for inputs that do not match, 61 when ONNX
Runtime fails), so `mtcore.client.Client` and `AsyncClient` drive it unchanged. Any
other command is answered 12. The `tenant` field is ignored: every model is visible to
every peer.

    python -m bench.baselines.zmq_server --bind tcp://127.0.0.1:0 \\
        --model tiny_add=/tmp/zoo/tiny_add.onnx --threads 1 --endpoint-file ep.json

writes `{"frontend": "tcp://127.0.0.1:PORT"}` to the endpoint file (atomically) once it
serves; SIGTERM or SIGINT stop it cleanly. `ZmqServerProcess` runs it as a child
process, the way `mtcore.cluster.LocalCluster` runs the broker.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from broker.registry import ModelRecord
from broker.validate import order_inputs
from mtcore.errors import ExecFailed, InternalError, ModelNotFound, MTError, UnknownCommand
from mtcore.modelcheck import check_model
from mtcore.protocol import (
    TAG,
    VERSION,
    Cmd,
    build,
    check_frames,
    decode_tensor,
    encode_tensor,
    field,
    parse_body,
    parse_descs,
    peek_cmd,
    peek_id,
    request_id,
    split_envelope,
)
from worker.onnx_backend import make_session

log = logging.getLogger("bench.baselines.zmq_server")

SERVER_NAME = f"bare-zmq-onnxruntime {VERSION}"
ZMQ_LAST_ENDPOINT = 32
_POLL_MS = 100  # how often the loop looks at the stop flag when idle


@dataclass
class _Model:
    """A resident model: its session, its signature record and its output names."""

    record: ModelRecord  # the signature, as mtserve's INFER validation wants it
    session: Any  # onnxruntime.InferenceSession
    output_names: list[str]


def load_models(models: dict[str, Path], threads: int = 1) -> dict[str, _Model]:
    """Check and load every model (mtserve's own checks and session options)."""
    loaded = {}
    for name, path in models.items():
        data = Path(path).read_bytes()
        sig = check_model(data)
        record = ModelRecord(
            tenant="default",
            name=name,
            sha256=hashlib.sha256(data).hexdigest(),
            size=len(data),
            inputs=sig.inputs,
            outputs=sig.outputs,
            max_batch=8 if sig.batchable else 1,  # only decides the batch-rows checks
        )
        session = make_session(data, threads)
        loaded[name] = _Model(record, session, [o.name for o in session.get_outputs()])
    return loaded


class BareServer:
    """One ROUTER socket, one thread, requests answered strictly one after another."""

    def __init__(
        self,
        models: dict[str, Path],
        *,
        bind: str = "tcp://127.0.0.1:0",
        threads: int = 1,
        ctx: zmq.Context | None = None,
    ) -> None:
        self.models = load_models(models, threads)
        self.ctx = ctx or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.bind(bind)
        self.address = self.sock.getsockopt_string(ZMQ_LAST_ENDPOINT)
        self.stopping = False
        self.served = 0

    def stop(self, *_: object) -> None:
        self.stopping = True

    def serve(self) -> None:
        """Serve until `stop()` (a signal handler may call it)."""
        while not self.stopping:
            if not self.sock.poll(_POLL_MS, zmq.POLLIN):
                continue
            frames = self.sock.recv_multipart(copy=False)
            self.sock.send_multipart(self.handle(frames), copy=False)
            self.served += 1

    def close(self) -> None:
        self.sock.close(linger=0)

    # ------------------------------------------------------------------ requests

    def handle(self, frames: list[Any]) -> list[Any]:
        """The reply frames (routing id first) for one received message."""
        start = time.perf_counter()
        try:
            envelope, body = split_envelope(frames)
        except MTError as exc:  # no delimiter: still routable by the first frame
            return _error(frames[:1], Cmd.PING.value, None, exc)
        try:
            msg = parse_body(body, TAG, Cmd)
        except MTError as exc:
            return _error(envelope, peek_cmd(body), peek_id(body), exc)
        rid = None
        try:
            rid = request_id(msg.header)
            if msg.cmd is Cmd.PING:
                return _reply(envelope, Cmd.PING, {"id": rid, "status": 0, "server": SERVER_NAME})
            if msg.cmd is Cmd.INFER:
                return self.infer(envelope, rid, msg.header, msg.payload, start)
            raise UnknownCommand(
                f"{msg.cmd.name} is not served here: this baseline answers only PING and INFER"
            )
        except MTError as exc:
            return _error(envelope, msg.cmd.value, rid, exc)
        except Exception as exc:  # a bug here must not stop the server
            log.exception("bug while handling %s", msg.cmd.name)
            where = f"{type(exc).__name__} in {msg.cmd.name}: {exc}"
            return _error(envelope, msg.cmd.value, rid, InternalError(where))

    def infer(
        self,
        envelope: list[Any],
        rid: int,
        header: dict[str, Any],
        payload: list[Any],
        start: float,
    ) -> list[Any]:
        name = field(header, "model", str)
        model = self.models.get(name)
        if model is None:
            raise ModelNotFound(f"no model '{name}' here; this server has {sorted(self.models)}")
        descs = parse_descs(field(header, "inputs", (list, tuple)))
        check_frames(descs, payload)  # counts and byte lengths, once
        descs, frames, _ = order_inputs(model.record, descs, payload)
        feeds = {d.name: decode_tensor(d, f) for d, f in zip(descs, frames, strict=True)}
        exec_start = time.perf_counter()
        try:
            results = model.session.run(model.output_names, feeds)
        except Exception as exc:
            raise ExecFailed(f"ONNX Runtime failed: {str(exc).strip()[:400]}") from None
        exec_us = int((time.perf_counter() - exec_start) * 1e6)
        outputs, out_frames = [], []
        for out_name, array in zip(model.output_names, results, strict=True):
            desc, buf = encode_tensor(out_name, array)
            outputs.append(desc)
            out_frames.append(buf)
        timing = {"queue": 0, "exec": exec_us, "total": int((time.perf_counter() - start) * 1e6)}
        reply = {"id": rid, "status": 0, "outputs": outputs, "timing": timing, "batch": 1}
        return _reply(envelope, Cmd.INFER, reply, out_frames)


def _reply(
    envelope: list[Any], cmd: Cmd | bytes, header: dict[str, Any], payload: list[Any] = ()
) -> list[Any]:
    frames = build(TAG, Cmd.PING, header, payload)
    frames[2] = cmd.value if isinstance(cmd, Cmd) else cmd  # echo even an unknown byte
    return [*envelope, *frames]


def _error(envelope: list[Any], cmd: bytes, rid: int | None, exc: MTError) -> list[Any]:
    header: dict[str, Any] = {"status": int(exc.status), "error": exc.message}
    if rid is not None:
        header["id"] = rid
    return _reply(envelope, cmd, header)


def write_endpoint_file(path: Path, address: str) -> None:
    """Write `{"frontend": address}` so that a reader never sees a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"frontend": address}))
    tmp.replace(path)


# ---------------------------------------------------------------------- command line


def _model_arg(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--model wants NAME=PATH.onnx, got {text!r}")
    return name, Path(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.baselines.zmq_server",
        description="Bare ZeroMQ + ONNX Runtime server (the mtbench compare baseline).",
    )
    parser.add_argument("--bind", default="tcp://127.0.0.1:0", help="ROUTER endpoint (:0 = any)")
    parser.add_argument(
        "--model", type=_model_arg, action="append", required=True, metavar="NAME=PATH"
    )
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument("--endpoint-file", type=Path, help='write {"frontend": ADDRESS} here')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    server = BareServer(dict(args.model), bind=args.bind, threads=args.threads)
    signal.signal(signal.SIGTERM, server.stop)
    signal.signal(signal.SIGINT, server.stop)
    try:
        if args.endpoint_file:
            write_endpoint_file(args.endpoint_file, server.address)
        log.info("serving %s on %s", sorted(server.models), server.address)
        server.serve()
    finally:
        server.close()
    log.info("stopped after %d requests", server.served)
    return 0


# ---------------------------------------------------------------------- child process


class ZmqServerError(RuntimeError):
    pass


class ZmqServerProcess:
    """The bare server as a child process, started with `sys.executable -m` and stopped by PID.

    with ZmqServerProcess().start({"tiny_add": path}, threads=1, state_dir=d) as srv:
        Client(srv.address).infer(...)
    """

    def __init__(self, name: str = "zmq_server") -> None:
        self.name = name  # names the log and endpoint files under state_dir
        self.proc: subprocess.Popen | None = None
        self.address = ""
        self.log_path: Path | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(
        self,
        models: dict[str, Path],
        threads: int = 1,
        state_dir: str | Path = ".",
        *,
        bind: str = "tcp://127.0.0.1:0",
        timeout: float = 60.0,
    ) -> ZmqServerProcess:
        if self.proc is not None:
            raise ZmqServerError("already started")
        state_dir = Path(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        endpoint_file = state_dir / f"{self.name}.endpoint.json"
        endpoint_file.unlink(missing_ok=True)
        self.log_path = state_dir / f"{self.name}.log"
        args = [sys.executable, "-m", "bench.baselines.zmq_server", "--bind", bind]
        for name, path in models.items():
            args += ["--model", f"{name}={Path(path).resolve()}"]
        args += ["--threads", str(threads), "--endpoint-file", str(endpoint_file)]
        with self.log_path.open("ab") as log_file:
            self.proc = subprocess.Popen(
                args, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        try:
            self.address = self._wait_endpoint(endpoint_file, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_endpoint(self, path: Path, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ZmqServerError(
                    f"the bare server (pid {self.proc.pid}) exited with {self.proc.returncode}; "
                    f"see {self.log_path}"
                )
            if path.exists():
                try:
                    return json.loads(path.read_text())["frontend"]
                except (json.JSONDecodeError, KeyError):
                    pass
            time.sleep(0.02)
        raise ZmqServerError(
            f"the bare server did not start within {timeout} s; see {self.log_path}"
        )

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds; always reaps the child."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def __enter__(self) -> ZmqServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    sys.exit(main())
