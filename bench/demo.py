"""`make demo`: a local cluster, four zoo models, a short mixed load, and what it saw.

Bounded in both count and time; every process it starts is stopped by PID on exit.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from bench import zoo
from mtcore.client import AsyncClient, Client
from mtcore.cluster import LocalCluster
from mtcore.errors import MTError

STATE = Path("state/demo")
MIX = {"tiny_add": 0.45, "mlp": 0.30, "mobilenetv2": 0.17, "resnet18": 0.08}  # request shares
MAX_REQUESTS = 4000
MAX_SECONDS = 15.0
CONCURRENCY = 16


class Tally:
    """Latencies and errors per model, plus a live progress line."""

    def __init__(self) -> None:
        self.latency: dict[str, list[float]] = defaultdict(list)  # model -> ms of OK answers
        self.errors: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        self.batches: dict[str, list[int]] = defaultdict(list)
        self.started = time.monotonic()

    def done(self) -> int:
        return sum(map(len, self.latency.values())) + self.n_errors()

    def n_errors(self) -> int:
        return sum(sum(e.values()) for e in self.errors.values())

    def progress(self) -> str:
        elapsed = time.monotonic() - self.started
        every = [v for vals in self.latency.values() for v in vals[-500:]]
        p99 = np.percentile(every, 99) if every else 0.0
        return (
            f"\r  {elapsed:5.1f} s  {self.done():5d} answered  "
            f"{self.done() / max(elapsed, 1e-9):7.0f} req/s  p99 {p99:7.1f} ms  "
            f"errors {self.n_errors()}"
        )


async def run_load(address: str, key: Path, tally: Tally) -> None:
    rng = random.Random(0)
    names, weights = list(MIX), list(MIX.values())
    inputs = {n: zoo.sample_inputs(n, 1) for n in names}
    budget = iter(range(MAX_REQUESTS))
    stop_at = time.monotonic() + MAX_SECONDS

    async def one_client(ac: AsyncClient) -> None:
        for _ in budget:
            if time.monotonic() > stop_at:
                return
            name = rng.choices(names, weights)[0]
            start = time.perf_counter()
            try:
                result = await ac.infer(name, inputs[name])
            except MTError as exc:
                tally.errors[name][int(exc.status)] += 1
                continue
            tally.latency[name].append((time.perf_counter() - start) * 1e3)
            tally.batches[name].append(result.batch)

    async def show() -> None:
        while True:
            sys.stdout.write(tally.progress())
            sys.stdout.flush()
            await asyncio.sleep(0.5)

    async with AsyncClient(address, key_file=key, timeout=60) as ac:
        ticker = asyncio.ensure_future(show())
        await asyncio.gather(*(one_client(ac) for _ in range(CONCURRENCY)))
        ticker.cancel()
    print(tally.progress())


def print_table(tally: Tally) -> None:
    print(
        f"\n{'model':<12} {'requests':>8} {'ok':>6} {'errors':>6} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'mean batch':>10}"
    )
    for name in MIX:
        lat, errs = tally.latency[name], sum(tally.errors[name].values())
        p50 = np.percentile(lat, 50) if lat else float("nan")
        p99 = np.percentile(lat, 99) if lat else float("nan")
        batch = np.mean(tally.batches[name]) if lat else float("nan")
        print(
            f"{name:<12} {len(lat) + errs:>8} {len(lat):>6} {errs:>6} {p50:>8.2f} {p99:>8.2f} "
            f"{batch:>10.2f}"
        )
    every = [v for vals in tally.latency.values() for v in vals]
    print(
        f"{'all':<12} {tally.done():>8} {len(every):>6} {tally.n_errors():>6} "
        f"{np.percentile(every, 50):>8.2f} {np.percentile(every, 99):>8.2f}"
    )
    for name, errs in tally.errors.items():
        for status, count in errs.items():
            print(f"  {name}: {count} errors with status {status}")


def main() -> int:
    shutil.rmtree(STATE, ignore_errors=True)
    print("mtserve demo: starting a broker and 2 workers on loopback ...")
    with LocalCluster(STATE, workers=2, memory_mb=512) as cluster:
        print(f"  tenants connect to {cluster.address}; logs in {cluster.log_dir}")
        key = cluster.add_principal("demo")  # CURVE: the tenant is whoever holds this key
        print(f"  tenant 'demo' authenticates with CURVE key {key}")
        with Client(cluster.address, key_file=key) as client:
            for name in MIX:
                start = time.perf_counter()
                info = client.upload_model(name, zoo.model_bytes(name))
                profile = ", ".join(f"b{b}={us / 1e3:.2f}ms" for b, us in info["profile"].items())
                print(
                    f"  uploaded {name:<12} {info['size'] / 1e6:7.2f} MB in "
                    f"{time.perf_counter() - start:5.2f} s  profile: {profile}"
                )
        print(
            f"load: {CONCURRENCY} requests in flight, at most {MAX_REQUESTS} requests "
            f"or {MAX_SECONDS:.0f} s, mix {MIX}"
        )
        tally = Tally()
        asyncio.run(run_load(cluster.address, key, tally))
        print_table(tally)
        with Client(cluster.address, key_file=cluster.admin_key) as client:  # operator view
            for w in client.status()["workers"]:
                print(
                    f"  {w['name']}: {w['models_live']} models live, "
                    f"{w['memory_used'] / 1e6:.1f} of {w['memory_budget'] / 1e6:.0f} MB"
                )
    print("cluster stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
