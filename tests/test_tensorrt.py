"""The TensorRT engine (worker/gpu/tensorrt_backend.py), where TensorRT imports and a GPU
is visible. No machine this project has reached could install TensorRT, so these tests
have never run; they are here so the first machine that has it checks the engine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from bench import zoo
from tests.conftest import FP32_TOLERANCE
from worker.onnx_backend import RequestInputs
from worker.tiers import HostTier

pytest.importorskip("tensorrt", reason="TensorRT is not installed here (never has been)")
pytestmark = pytest.mark.gpu
MIB = 1 << 20


@pytest.mark.parametrize("name", ["mlp", "mobilenetv2"])
def test_tensorrt_outputs_equal_onnx_runtime_and_unload_frees_the_pages(
    tmp_path: Path, watchdog, name: str
) -> None:
    from worker.gpu.tensorrt_backend import TensorRTEngine

    engine = TensorRTEngine(device_bytes=1 << 30, page_size=2 * MIB)
    tier = HostTier(engine.host_pool(512 * MIB, 2 * MIB), tmp_path / "t")
    try:
        host = engine.prepare(tier, name.ljust(64, "0"), zoo.model_bytes(name))
        live = engine.build(host)
        assert engine.pool.bytes_reserved > 0  # the engine's weights took pool pages
        x = zoo.sample_inputs(name, 2, seed=1)["input"]
        ((_, outputs, error),) = engine.run_batch(live, [RequestInputs(0, [x])], None)
        assert error is None
        session = ort.InferenceSession(zoo.model_bytes(name), providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(outputs[0], session.run(None, {"input": x})[0], **FP32_TOLERANCE)
        engine.release(live)
        del live
        assert engine.pool.bytes_reserved == 0
    finally:
        tier.close()
        engine.close()
        tier.pool.close()
