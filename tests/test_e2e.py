"""The whole request path with real processes on loopback: upload, infer, answers."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import numpy as np
import onnxruntime as ort
import pytest

from bench import zoo
from mtcore.client import AsyncClient, Client
from mtcore.errors import ModelNotFound, MTError, Status, WorkerLost
from tests.conftest import FP32_TOLERANCE, start_cluster


def reference(name: str, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(zoo.model_bytes(name), providers=["CPUExecutionProvider"])
    return session.run(None, inputs)


@pytest.mark.parametrize(
    "name", [*zoo.MODELS[:-1], pytest.param("resnet50", marks=pytest.mark.slow)]
)
def test_outputs_equal_in_process_onnxruntime(client: Client, name: str) -> None:
    info = client.upload_model(f"zoo-{name}", zoo.model_bytes(name))
    assert info["state"] == "ready" and info["profile"], info
    for batch in (1, 2):
        inputs = zoo.sample_inputs(name, batch, seed=batch)
        result = client.infer(f"zoo-{name}", inputs)
        expected = reference(name, inputs)
        assert [d[0] for d in info["outputs"]] == list(result.outputs)
        for got, want in zip(result.outputs.values(), expected, strict=True):
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, **FP32_TOLERANCE)
        assert {"queue", "exec", "total"} <= set(result.timing)


def test_three_tenants_upload_and_infer_concurrently(cluster) -> None:
    errors: list[BaseException] = []
    seen: dict[str, np.ndarray] = {}

    def tenant(idx: int) -> None:
        try:
            with Client(cluster.address, tenant=f"tenant{idx}") as c:
                c.upload_model("shared-name", zoo.model_bytes("mlp", seed=idx))
                x = zoo.sample_inputs("mlp", 3, seed=7)
                for _ in range(20):
                    out = c.infer("shared-name", x)["logits"]
                    np.testing.assert_allclose(out, reference_seeded(idx, x), **FP32_TOLERANCE)
                seen[f"tenant{idx}"] = out
                assert [m["name"] for m in c.list_models()] == ["shared-name"]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=tenant, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    # Same name, three tenants, three different models: isolation by tenant.
    assert not np.allclose(seen["tenant0"], seen["tenant1"])


def reference_seeded(seed: int, inputs: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(
        zoo.model_bytes("mlp", seed=seed), providers=["CPUExecutionProvider"]
    )
    return session.run(None, inputs)[0]


def test_thousand_concurrent_async_requests_all_answered(cluster, client: Client) -> None:
    client.upload_model("tiny-async", zoo.model_bytes("tiny_add"))
    rows = np.arange(4000, dtype=np.float32).reshape(1000, 1, 4)

    async def main() -> list:
        async with AsyncClient(cluster.address, tenant=client.tenant) as ac:
            tasks = [ac.infer("tiny-async", {"input": rows[i]}) for i in range(1000)]
            return await asyncio.gather(*tasks)

    results = asyncio.run(main())
    assert len(results) == 1000
    offset = reference("tiny_add", {"input": np.zeros((1, 4), np.float32)})[0]
    for i, result in enumerate(results):  # each answer is its own request's, not a neighbour's
        np.testing.assert_allclose(result["output"], rows[i] + offset, rtol=1e-6)
    assert max(r.batch for r in results) > 1  # concurrent requests were batched


def test_unknown_model_and_delete(client: Client) -> None:
    with pytest.raises(ModelNotFound) as exc:
        client.infer("never-uploaded", {"input": np.zeros((1, 4), np.float32)})
    assert exc.value.status == Status.MODEL_NOT_FOUND
    client.upload_model("to-delete", zoo.model_bytes("tiny_add"))
    assert "to-delete" in [m["name"] for m in client.list_models()]
    client.delete_model("to-delete")
    assert "to-delete" not in [m["name"] for m in client.list_models()]
    with pytest.raises(ModelNotFound):
        client.model_info("to-delete")


def test_status_reports_workers_and_models(client: Client) -> None:
    client.upload_model("status-model", zoo.model_bytes("tiny_add"))
    for _ in range(3):
        client.infer("status-model", zoo.sample_inputs("tiny_add"))
    status = client.status()
    assert len(status["workers"]) == 2
    assert status["tenant_models"] >= 1
    assert any(status["answers_by_status"].values())
    assert status["internal_errors"] == 0 and status["worker_malformed"] == 0
    # the upload profile seeded the predictor, so every run was compared with a prediction
    assert status["predicted_within"] is not None and 0.0 <= status["predicted_within"] <= 1.0
    assert sum(status["loads_by_tier"].values()) >= 1  # loads counted by where they came from
    assert any(w["host_models"] >= 1 for w in status["workers"])  # prepared when profiled
    assert all(w["executor_restarts"] == 0 for w in status["workers"])


def test_broker_restart_keeps_models(tmp_path) -> None:
    cluster = start_cluster(tmp_path, workers=1)
    try:
        x = zoo.sample_inputs("mlp", 2)
        with Client(cluster.address, tenant="keeper") as c:
            info = c.upload_model("persisted", zoo.model_bytes("mlp"))
            before = c.infer("persisted", x)["logits"].copy()
        cluster.restart_broker()
        cluster.wait_for_workers(1, timeout=30)
        with Client(cluster.address, tenant="keeper") as c:
            assert c.model_info("persisted")["sha256"] == info["sha256"]
            assert c.model_info("persisted")["profile"] == info["profile"]
            np.testing.assert_array_equal(c.infer("persisted", x)["logits"], before)
    finally:
        cluster.stop()


def test_lost_worker_requests_answered(tmp_path) -> None:
    """Kill a worker mid-load: every request is answered, by a retry or WORKER_LOST."""
    cluster = start_cluster(
        tmp_path, workers=2, broker_args=["--heartbeat-liveness", "1.5", "--profile-batches", "1"]
    )
    try:
        with Client(cluster.address, tenant="loss") as c:
            c.upload_model("r18", zoo.model_bytes("resnet18"), max_batch=1)
        x = zoo.sample_inputs("resnet18", 1)

        async def main() -> list:
            async with AsyncClient(cluster.address, tenant="loss", timeout=60) as ac:
                tasks = [asyncio.ensure_future(ac.infer("r18", x)) for _ in range(12)]
                await asyncio.sleep(0.3)
                cluster.workers[0].kill()
                return await asyncio.gather(*tasks, return_exceptions=True)

        results = asyncio.run(main())
        assert len(results) == 12
        for r in results:
            assert not isinstance(r, BaseException) or isinstance(r, WorkerLost), r
        assert any(not isinstance(r, BaseException) for r in results)
    finally:
        cluster.stop()


def test_model_churn_under_a_small_budget_answers_everything(tmp_path) -> None:
    """Six models, memory for two per worker: constant loads and evictions, no lost answer."""
    size = len(zoo.model_bytes("mlp"))
    memory_mb = max(1, (2 * size) >> 20) + 1
    cluster = start_cluster(tmp_path, workers=2, memory_mb=memory_mb)
    try:
        with Client(cluster.address, tenant="churn") as c:
            for i in range(6):
                c.upload_model(f"m{i}", zoo.model_bytes("mlp", seed=i))
        x = zoo.sample_inputs("mlp")
        expected = {i: reference_seeded(i, x) for i in range(6)}

        async def main() -> list:
            async with AsyncClient(cluster.address, tenant="churn", timeout=60) as ac:
                picks = [(i * 7) % 6 for i in range(300)]
                tasks = [ac.infer(f"m{m}", x, deadline_ms=None if k % 3 else 40.0)
                         for k, m in enumerate(picks)]  # fmt: skip
                results = await asyncio.gather(*tasks, return_exceptions=True)
                return list(zip(picks, results, strict=True))

        outcomes = asyncio.run(main())
        for model, result in outcomes:
            if isinstance(result, BaseException):  # only a short deadline may fail, and typed
                assert isinstance(result, MTError), result
                assert result.status in (Status.DEADLINE_EXPIRED, Status.DEADLINE_UNMEETABLE)
            else:
                np.testing.assert_allclose(result["logits"], expected[model], **FP32_TOLERANCE)
        with Client(cluster.address, tenant="churn") as c:
            status = c.status()
        assert status["in_flight"] == 0 and status["queued"] == 0
        assert status["loads"] > 6 and status["evictions"] > 0  # the budget forced swaps
        for worker in status["workers"]:
            assert worker["memory_used"] <= worker["memory_budget"]
    finally:
        cluster.stop()


def test_held_input_bytes_are_bounded(tmp_path) -> None:
    """No worker yet: requests wait, holding their inputs, until the byte cap says OVERLOADED."""
    cluster = start_cluster(tmp_path, workers=0, broker_args=["--max-pending-mb", "1"])
    try:
        with Client(cluster.address, tenant="big") as c:
            c.upload_model("mlp", zoo.model_bytes("mlp"))  # unprofiled: no worker to profile it
        x = {"input": np.zeros((600, 256), np.float32)}  # 614,400 bytes each

        async def main() -> list:
            async with AsyncClient(cluster.address, tenant="big", timeout=30) as ac:
                first = asyncio.ensure_future(ac.infer("mlp", x))
                await asyncio.sleep(0.5)
                with pytest.raises(MTError) as second:
                    await ac.infer("mlp", x)
                first.cancel()
                return [second.value.status]

        assert asyncio.run(main()) == [Status.OVERLOADED]
    finally:
        cluster.stop()


def test_model_uploaded_before_any_worker_is_profiled_when_one_joins(tmp_path) -> None:
    cluster = start_cluster(tmp_path, workers=0)
    try:
        with Client(cluster.address, tenant="early") as c:
            assert c.upload_model("mlp", zoo.model_bytes("mlp"))["profile"] == {}
            cluster.n_workers = 1
            cluster.start_worker("late")
            cluster.wait_for_workers(1, timeout=60)
            deadline = time.monotonic() + 60
            while not c.model_info("mlp")["profile"] and time.monotonic() < deadline:
                time.sleep(0.1)
            assert set(c.model_info("mlp")["profile"]) == {"1", "2"}  # conftest's batches
            out = c.infer("mlp", zoo.sample_inputs("mlp"))["logits"]
            assert out.shape == (1, 10)
    finally:
        cluster.stop()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used (from /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_busy_poll_answers_correctly_and_sleeps_when_idle(tmp_path) -> None:
    """--spin-us on broker and worker: same answers, and the spinning stops when idle."""
    spin = ["--spin-us", "20000"]
    c = start_cluster(tmp_path, broker_args=["--profile-batches", "1", *spin], worker_args=spin)
    try:
        with Client(c.address, tenant="spin", timeout=60) as client:
            client.upload_model("mlp", zoo.model_bytes("mlp"))
            session = ort.InferenceSession(
                zoo.model_bytes("mlp"), providers=["CPUExecutionProvider"]
            )
            for seed in range(20):
                inputs = zoo.sample_inputs("mlp", 1, seed=seed)
                got = client.infer("mlp", inputs)
                want = session.run(None, inputs)
                assert np.allclose(got["logits"], want[0], **FP32_TOLERANCE)
        time.sleep(0.5)  # well past the 20 ms window
        pids = [c.broker.pid, *(w.pid for w in c.workers)]
        before = [_cpu_seconds(pid) for pid in pids]
        time.sleep(2.0)
        used = [_cpu_seconds(pid) - b for pid, b in zip(pids, before, strict=True)]
        assert all(u < 0.5 for u in used), used  # spinning through 2 s would use ~2 s
    finally:
        c.stop()
