"""A model that runs as long as its input says: stopped, answered, and the worker lives on."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mtcore.client import Client
from mtcore.errors import ExecFailed
from tests.conftest import start_cluster


def loop_model() -> bytes:
    """y = x + n, computed by a Loop of n iterations (n: an int64 scalar input)."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["v_in", "one"], ["v_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1, 4]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1, 4]),
        ],
        [numpy_helper.from_array(np.ones((1, 4), np.float32), "one")],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["t"], value=numpy_helper.from_array(np.array(True))),
            helper.make_node("Loop", ["n", "t", "x"], ["y"], body=body),
        ],
        "g",
        [
            helper.make_tensor_value_info("n", TensorProto.INT64, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


@pytest.mark.slow
def test_runaway_model_is_stopped_and_the_worker_keeps_serving(tmp_path) -> None:
    cluster = start_cluster(
        tmp_path,
        workers=1,
        broker_args=["--profile-batches", "1", "--heartbeat-liveness", "3"],
        worker_args=["--max-run-s", "1.5"],
    )
    try:
        with Client(cluster.address, tenant="loop", timeout=60) as c:
            c.upload_model("loop", loop_model())
            x = np.zeros((1, 4), np.float32)
            for _ in range(3):  # fast runs: the next one is eligible to run inline
                assert c.infer("loop", {"n": np.array(2, np.int64), "x": x})["y"][0, 0] == 2
            with pytest.raises(ExecFailed, match="ran longer than"):
                c.infer("loop", {"n": np.array(10**10, np.int64), "x": x})
            assert c.infer("loop", {"n": np.array(3, np.int64), "x": x})["y"][0, 0] == 3
            status = c.status()
        assert len(status["workers"]) == 1  # never declared lost: heartbeats kept flowing
        assert cluster.workers[0].poll() is None
    finally:
        cluster.stop()


def expand_model() -> bytes:
    """y = x broadcast to the shape given by the int64 input `shape`: a graph that asks
    at run time for as much memory as its caller says."""
    graph = helper.make_graph(
        [helper.make_node("Expand", ["x", "shape"], ["y"])],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1]),
            helper.make_tensor_value_info("shape", TensorProto.INT64, [2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", "cols"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


@pytest.mark.slow
def test_a_run_past_the_memory_wall_fails_alone(tmp_path) -> None:
    """The tenant's run_bytes (512 MiB) admits the worker's 256 MiB wall; a run that asks
    for 40 GB there fails alone."""
    cluster = start_cluster(
        tmp_path, workers=1,
        broker_args=["--profile-batches", "1", "--tenant-limit", f"run_bytes={512 << 20}"],
        worker_args=["--run-memory-mb", "256"],
    )  # fmt: skip
    try:
        with Client(cluster.address, tenant="hog", timeout=60) as c:
            c.upload_model("expand", expand_model())
            one = np.ones(1, np.float32)
            small = c.infer("expand", {"x": one, "shape": np.array([64, 64], np.int64)})
            assert small["y"].shape == (64, 64)
            with pytest.raises(ExecFailed, match="smaller than requested bytes"):
                c.infer("expand", {"x": one, "shape": np.array([100_000, 100_000], np.int64)})
            again = c.infer("expand", {"x": one, "shape": np.array([1000, 1000], np.int64)})
            assert again["y"].shape == (1000, 1000)
        assert cluster.workers[0].poll() is None
    finally:
        cluster.stop()
