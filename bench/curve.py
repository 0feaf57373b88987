"""`mtbench curve`: what CURVE authentication costs, plain and secure brokers side by side.

Two clusters run at once (one worker each, every core for ONNX Runtime), one started
`--insecure`, one with CURVE (the default); measurements alternate between them in
`rounds` slices so machine drift hits both alike. Figures: the tiny model's p50, one
request at a time; pipelined throughput of the tiny model (64 in flight); ResNet-18 p50,
one request at a time (a 602 KB input tensor each way to the worker, encrypted between
client and broker). Medians over the slices; the ratio is secure / plain.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench import zoo
from bench.runner import pipelined_throughput
from bench.scenarios import RESULTS
from mtcore.client import Client
from mtcore.cluster import LocalCluster

MODES = ("plain", "curve")


def one_at_a_time_ms(client: Client, model: str, n: int) -> float:
    inputs = zoo.sample_inputs(model, 1)
    times = []
    for _ in range(n):
        began = time.perf_counter()
        client.infer(model, inputs)
        times.append((time.perf_counter() - began) * 1e3)
    return statistics.median(times)


def measure(rounds: int, n_tiny: int, n_resnet: int, n_pipe: int) -> dict[str, Any]:
    figures: dict[str, dict[str, list[float]]] = {m: {} for m in MODES}
    with ExitStack() as stack:
        clients, keys, clusters = {}, {}, {}
        for mode in MODES:
            state = stack.enter_context(tempfile.TemporaryDirectory())
            cluster = LocalCluster(state, workers=1, broker_args=["--profile-batches", "1"],
                                   secure=mode == "curve")  # fmt: skip
            stack.enter_context(cluster)
            keys[mode] = cluster.add_principal("bench") if mode == "curve" else None
            client = stack.enter_context(
                Client(cluster.address, tenant="bench", key_file=keys[mode], timeout=120)
            )
            for model in ("tiny_add", "resnet18"):
                client.upload_model(model, zoo.model_bytes(model), max_batch=8)
                client.infer(model, zoo.sample_inputs(model, 1))  # warm
            clients[mode], clusters[mode] = client, cluster
        for _ in range(rounds):
            for mode in MODES:
                row = figures[mode]
                row.setdefault("tiny_p50_ms", []).append(
                    one_at_a_time_ms(clients[mode], "tiny_add", n_tiny)
                )
                row.setdefault("resnet18_p50_ms", []).append(
                    one_at_a_time_ms(clients[mode], "resnet18", n_resnet)
                )
                piped = pipelined_throughput(
                    clusters[mode].address, "tiny_add", zoo.sample_inputs("tiny_add", 1),
                    n=n_pipe, window=64, key_file=keys[mode])  # fmt: skip
                row.setdefault("pipelined_rps", []).append(piped["rps"])
    return {mode: {k: statistics.median(v) for k, v in row.items()} | {"runs": row}
            for mode, row in figures.items()}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mtbench curve", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tiny", type=int, default=1000, help="tiny requests per slice")
    p.add_argument("--resnet", type=int, default=60, help="ResNet-18 requests per slice")
    p.add_argument("--pipelined", type=int, default=5000, help="pipelined requests per slice")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    result = measure(args.rounds, args.tiny, args.resnet, args.pipelined)
    print(f"\n{'figure':<18} {'plain':>10} {'CURVE':>10} {'CURVE/plain':>12}")
    for key in ("tiny_p50_ms", "pipelined_rps", "resnet18_p50_ms"):
        plain, curve = result["plain"][key], result["curve"][key]
        print(f"{key:<18} {plain:>10.3f} {curve:>10.3f} {curve / plain:>12.3f}")
    path = Path(args.out) / "curve.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"goal: CURVE cost = reported (no target in the issue); wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
