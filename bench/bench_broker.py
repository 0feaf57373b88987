"""CPU cost of the broker per request, measured in one thread without models.

The broker, a tenant DEALER and a fake worker (answers LOAD at once, echoes INFER
inputs as outputs) share one thread over inproc sockets, so the figure is free of
scheduling noise: `time.thread_time()` spent inside `Broker.turn` per request. The
baseline is a bare ROUTER echo doing the least any broker must (receive the request,
send a reply), measured in the same run.

    python -m bench.bench_broker [--requests N] [--window W]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from broker.broker import Broker
from broker.registry import ModelRecord
from mtcore.actions import InferResult, LoadModelResult, RequestResult
from mtcore.config import BrokerConfig
from mtcore.protocol import (
    TAG,
    WORKER_TAG,
    Cmd,
    TensorDesc,
    WCmd,
    build,
    decode_header,
    encode_tensors,
    frame_buffer,
    parse_body,
    split_envelope,
)
from mtcore.transport import NOBLOCK, make_socket, recv_frames, send_frames

RESULTS = Path(__file__).parent / "results"
SIGNATURE = (TensorDesc("input", "float32", (-1, 4)),)


class FakeWorker:
    """Answers the broker's actions at once, echoing INFER inputs back as outputs."""

    def __init__(self, ctx: zmq.Context, address: str) -> None:
        self.sock = make_socket(ctx, zmq.DEALER)
        self.sock.connect(address)
        send_frames(
            self.sock, build(WORKER_TAG, WCmd.READY, {"name": "fake", "memory_budget": 1 << 30})
        )

    def serve(self) -> None:
        while True:
            try:
                frames = recv_frames(self.sock, NOBLOCK)
            except zmq.Again:
                return
            msg = parse_body(split_envelope(frames, hops=0)[1], WORKER_TAG, WCmd)
            h = msg.header
            if msg.cmd is WCmd.INFER:
                results = [
                    RequestResult(rid, 0, None, [["output", *d[1:]] for d in descs])
                    for rid, descs in h["requests"]
                ]
                result = InferResult(h["action"], h["sha256"], results=results)
                send_frames(self.sock, build(WORKER_TAG, WCmd.INFER, result.to_header(),
                                             msg.payload))  # fmt: skip
            elif msg.cmd is WCmd.LOAD_MODEL:
                loaded = LoadModelResult(h["action"], h["sha256"], tier="host")
                send_frames(self.sock, build(WORKER_TAG, WCmd.LOAD_MODEL, loaded.to_header()))


def measure_broker(requests: int, window: int, max_batch: int) -> dict[str, Any]:
    ctx = zmq.Context()
    with tempfile.TemporaryDirectory() as state:
        config = BrokerConfig(frontend="inproc://front", backend="inproc://back",
                              state_dir=Path(state), max_batch=max_batch)  # fmt: skip
        broker = Broker(config, ctx)
        broker.registry.put(
            ModelRecord("bench", "tiny", "0" * 64, 200, SIGNATURE, SIGNATURE, max_batch)
        )
        worker = FakeWorker(ctx, "inproc://back")
        client = make_socket(ctx, zmq.DEALER)
        client.connect("inproc://front")
        broker.turn(0)
        worker.serve()
        spent = drive(broker, worker, client, requests, window)
        broker.stop()
        broker.shutdown()
        client.close()
        worker.sock.close()
    ctx.term()
    return {"broker_cpu_us_per_request": spent * 1e6 / requests}


def run_load(client: zmq.Socket, n: int, window: int, serve: Callable[[], float]) -> float:
    """Send n identical INFERs, `window` in flight; `serve()` handles what is queued and
    returns the CPU seconds it counted. Both measurements share this, so their traffic is
    the same to the byte."""
    descs, frames = encode_tensors({"input": np.ones((1, 4), np.float32)})
    spent, answered, sent = 0.0, 0, 0
    while answered < n:
        while sent < n and sent - answered < window:
            header = {"id": sent, "tenant": "bench", "model": "tiny", "inputs": descs}
            send_frames(client, build(TAG, Cmd.INFER, header, frames))
            sent += 1
        spent += serve()
        answered += collect_replies(client)
    return spent


def collect_replies(client: zmq.Socket) -> int:
    """Read the replies waiting; each must be OK."""
    count = 0
    while True:
        try:
            reply = recv_frames(client, NOBLOCK)
        except zmq.Again:
            return count
        header = decode_header(frame_buffer(reply[3]))
        if header["status"] != 0:
            raise RuntimeError(f"answered {header}")
        count += 1


def drive(broker: Broker, worker: FakeWorker, client: zmq.Socket, n: int, window: int) -> float:
    """Send n requests, `window` at a time; return the CPU seconds spent in the broker."""

    def serve() -> float:
        start = time.thread_time()
        broker.turn(0)
        spent = time.thread_time() - start
        worker.serve()
        return spent

    return run_load(client, n, window, serve)


def measure_echo(requests: int, window: int) -> dict[str, Any]:
    """The floor: a ROUTER that receives each request and sends a reply of the same shape."""
    ctx = zmq.Context()
    router = make_socket(ctx, zmq.ROUTER)
    router.bind("inproc://echo")
    client = make_socket(ctx, zmq.DEALER)
    client.connect("inproc://echo")
    descs = [["output", "float32", [1, 4]]]

    def serve() -> float:
        start = time.thread_time()
        while True:
            try:
                got = recv_frames(router, NOBLOCK)
            except zmq.Again:
                return time.thread_time() - start
            envelope, body = split_envelope(got)
            msg = parse_body(body, TAG, Cmd)
            reply = {"id": msg.header["id"], "status": 0, "outputs": descs, "timing": {}}
            send_frames(router, [*envelope, *build(TAG, Cmd.INFER, reply, msg.payload)])

    spent = run_load(client, requests, window, serve)
    router.close()
    client.close()
    ctx.term()
    return {"echo_cpu_us_per_request": spent * 1e6 / requests}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    ours, base = [], []
    for _ in range(args.rounds):  # alternate so drift hits both alike
        ours.append(
            measure_broker(args.requests, args.window, args.max_batch)["broker_cpu_us_per_request"]
        )
        base.append(measure_echo(args.requests, args.window)["echo_cpu_us_per_request"])
    row = {
        "requests": args.requests,
        "window": args.window,
        "broker_cpu_us_per_request": round(statistics.median(ours), 2),
        "echo_cpu_us_per_request": round(statistics.median(base), 2),
    }
    row["ratio"] = round(row["broker_cpu_us_per_request"] / row["echo_cpu_us_per_request"], 2)
    row["broker_ceiling_rps"] = round(1e6 / row["broker_cpu_us_per_request"])
    print(f"{'':24} {'CPU us/request':>15}")
    print(f"{'broker (Broker.turn)':24} {row['broker_cpu_us_per_request']:>15.2f}")
    print(f"{'bare echo (floor)':24} {row['echo_cpu_us_per_request']:>15.2f}")
    print(
        f"ratio {row['ratio']:.2f}; one broker core saturates at {row['broker_ceiling_rps']} req/s"
    )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "broker_cpu.json"
    out.write_text(
        json.dumps({"benchmark": "broker_cpu", "rows": [row], "unix_time": time.time()}, indent=2)
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
