"""The floor of a two-hop design: a round trip through a relay that does nothing.

mtserve's request path is tenant -> broker -> worker and back, where a bare server is
tenant -> server and back. This measures both shapes with processes that do no work
at all (an echo behind a forwarding relay, against the same echo reached directly), in
the same run and rounds, so the ratio is what the extra process hop alone costs on this
machine: a lower bound for `mtbench compare tiny-latency`'s mtserve / bare ZeroMQ ratio.

    python -m bench.bench_hops [--requests N] [--rounds R]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time
from pathlib import Path
from typing import Any

import zmq

from mtcore.transport import make_socket, recv_frames, send_frames

RESULTS = Path(__file__).parent / "results"


LOOPBACK = "tcp://127.0.0.1:*"  # each process binds a free port and reports it


def echo(bound: Any) -> None:
    """A ROUTER that sends every message straight back; b'stop' ends it."""
    ctx = zmq.Context()
    sock = make_socket(ctx, zmq.ROUTER)
    sock.bind(LOOPBACK)
    bound.put(sock.getsockopt_string(zmq.LAST_ENDPOINT))
    while True:
        frames = recv_frames(sock)
        send_frames(sock, frames)
        if frames[-1] == b"stop":
            break
    sock.close()
    ctx.term()


def relay(bound: Any, back: str) -> None:
    """Forwards tenant messages to the echo behind it and the answers back."""
    ctx = zmq.Context()
    tenants = make_socket(ctx, zmq.ROUTER)
    tenants.bind(LOOPBACK)
    bound.put(tenants.getsockopt_string(zmq.LAST_ENDPOINT))
    server = make_socket(ctx, zmq.DEALER)
    server.connect(back)
    poller = zmq.Poller()
    poller.register(tenants, zmq.POLLIN)
    poller.register(server, zmq.POLLIN)
    while True:
        events = dict(poller.poll())
        if tenants in events:
            frames = recv_frames(tenants)
            send_frames(server, frames)
            if frames[-1] == b"stop":
                break
        if server in events:
            send_frames(tenants, recv_frames(server))
    tenants.close()
    server.close()
    ctx.term()


def round_trips(sock: zmq.Socket, n: int, payload: bytes) -> float:
    """Median round trip in microseconds of n requests, one in flight."""
    times = []
    for _ in range(n):
        start = time.perf_counter()
        send_frames(sock, [payload])
        recv_frames(sock)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def measure(requests: int, rounds: int, payload_bytes: int = 64) -> dict[str, Any]:
    payload = b"x" * payload_bytes  # sent both ways: request and echo
    bound: Any = mp.Queue()
    procs: list[mp.Process] = []

    def start(target: Any, *args: Any) -> str:
        """Start a process; the endpoint it bound."""
        procs.append(mp.Process(target=target, args=(bound, *args)))
        procs[-1].start()
        return bound.get(timeout=30)

    ports = {"direct": start(echo)}
    ports["relayed"] = start(relay, start(echo))  # the relay, and the echo behind it
    ctx = zmq.Context()
    socks = {}
    for name in ("direct", "relayed"):
        socks[name] = make_socket(ctx, zmq.DEALER)
        socks[name].connect(ports[name])
    try:
        for sock in socks.values():
            round_trips(sock, 100, payload)  # connect and warm up
        medians: dict[str, list[float]] = {"direct": [], "relayed": []}
        for r in range(rounds):
            order = ("direct", "relayed") if r % 2 == 0 else ("relayed", "direct")
            for name in order:
                medians[name].append(round_trips(socks[name], requests, payload))
        for sock in socks.values():
            send_frames(sock, [b"stop"])
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
        for sock in socks.values():
            sock.close()
        ctx.term()
    direct = statistics.median(medians["direct"])
    relayed = statistics.median(medians["relayed"])
    return {
        "requests": requests,
        "rounds": rounds,
        "payload_bytes": payload_bytes,
        "direct_p50_us": round(direct, 1),
        "relayed_p50_us": round(relayed, 1),
        "ratio": round(relayed / direct, 2),
        "rounds_direct_us": [round(m, 1) for m in medians["direct"]],
        "rounds_relayed_us": [round(m, 1) for m in medians["relayed"]],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--payload-bytes", type=int, default=64, help="602112: a ResNet-18 input")
    args = p.parse_args(argv)
    row = measure(args.requests, args.rounds, args.payload_bytes)
    print(f"{'':34} {'p50 us':>8}")
    print(f"{'direct (client -> echo)':34} {row['direct_p50_us']:>8.1f}")
    print(f"{'relayed (client -> relay -> echo)':34} {row['relayed_p50_us']:>8.1f}")
    print(f"ratio {row['ratio']:.2f}: the floor of mtserve / bare ZeroMQ in tiny-latency")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "hops.json"
    doc = {"benchmark": "hops", "rows": [row], "unix_time": time.time()}
    out.write_text(json.dumps(doc, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
