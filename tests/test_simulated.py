"""Simulated workers against a real broker: the controller cannot tell them apart."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import zmq

from bench import zoo
from mtcore.client import AsyncClient, Client
from mtcore.errors import MTError
from tests.conftest import start_cluster
from worker.simulated import SimConfig, SimulatedWorkers, profile_for

TINY = len(zoo.model_bytes("tiny_add"))  # room for three of them per simulated worker


@pytest.fixture(params=["fifo", "predictive"])
def sim_cluster(tmp_path, request) -> Iterator[tuple[object, SimulatedWorkers]]:
    args = ["--profile-batches", "1,2,4", "--scheduler", request.param]
    cluster = start_cluster(tmp_path, workers=0, broker_args=args)
    ctx = zmq.Context()
    sim = SimulatedWorkers(SimConfig(backend=cluster.backend, count=8, min_exec_us=200.0,
                                     max_exec_us=2_000.0,
                                     memory_budget=3 * TINY + 100), ctx)  # fmt: skip
    thread = threading.Thread(target=sim.run, kwargs={"until": time.monotonic() + 90})
    thread.start()
    try:
        yield cluster, sim
    finally:
        sim.stopping = True
        thread.join(10)
        sim.close()
        cluster.stop()
        ctx.term()


def test_profiles_are_drawn_from_the_sha_and_are_the_same_everywhere() -> None:
    a = profile_for("ab" * 32, 1 << 20, 100.0, 10_000.0)
    assert a == profile_for("ab" * 32, 1 << 20, 100.0, 10_000.0)
    assert a != profile_for("cd" * 32, 1 << 20, 100.0, 10_000.0)
    assert 100.0 <= a.exec_b1 <= 10_000.0 and a.exec_us(4) > a.exec_us(1)
    assert a.load_cold > a.load_host > 0


def test_simulated_workers_serve_every_request(sim_cluster) -> None:
    cluster, sim = sim_cluster
    names = [f"m{i}" for i in range(12)]  # 12 models, room for 3 per worker: churn
    with Client(cluster.address, tenant="sim", timeout=60) as client:
        for i, name in enumerate(names):
            info = client.upload_model(name, zoo.model_bytes("tiny_add", seed=i))
            assert info["profile"], info  # profiled by a simulated worker
        status = client.status()
    assert len(status["workers"]) == 8 and {w["kind"] for w in status["workers"]} == {"sim"}
    x = zoo.sample_inputs("tiny_add", 1)

    async def main() -> list:
        async with AsyncClient(cluster.address, tenant="sim", timeout=60) as ac:
            tasks = [ac.infer(names[(i * 7) % 12], x) for i in range(400)]
            return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(main())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    for result in results:  # outputs echo the inputs
        np.testing.assert_array_equal(result.outputs["output0"], x["input"])
    with Client(cluster.address, tenant="sim", timeout=60) as client:
        status = client.status()
    # 12 models, room for 3 on each simulated worker: models are evicted and loaded again
    assert status["loads"] > 12
    assert status["internal_errors"] == 0 and status["worker_malformed"] == 0
    assert status["predicted_within"] is not None
    # every PROFILE, LOAD and INFER batch (at most 8 requests each) answered by the sims
    assert sim.sent >= 12 + status["loads"] + 400 // 8


def test_a_deadline_no_simulated_worker_can_meet_is_refused(sim_cluster) -> None:
    cluster, _ = sim_cluster
    with Client(cluster.address, tenant="sim", timeout=60) as client:
        client.upload_model("slow", zoo.model_bytes("tiny_add", seed=99))
        with pytest.raises(MTError) as err:
            client.infer("slow", zoo.sample_inputs("tiny_add", 1), deadline_ms=0.01)
    assert int(err.value.status) in (50, 51)
