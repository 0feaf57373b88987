"""The model zoo: valid, deterministic, runnable ONNX models of the advertised shapes."""

from __future__ import annotations

import functools
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from bench import zoo

# (output name, per-sample output shape)
OUTPUTS: dict[str, tuple[str, tuple[int, ...]]] = {
    "tiny_add": ("output", (4,)),
    "mlp": ("logits", (10,)),
    "mobilenetv2": ("logits", (1000,)),
    "resnet18": ("logits", (1000,)),
    "resnet50": ("logits", (1000,)),
}
# Tests on these take over ~2 s on a 2-core box (resnet18 and mobilenetv2 stay under 1 s).
HEAVY = {"resnet50"}


def _models(names: tuple[str, ...] = zoo.MODELS) -> list[object]:
    return [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in names]


@functools.cache
def _session(name: str) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(zoo.model_bytes(name), opts, providers=["CPUExecutionProvider"])


def _run(name: str, batch: int, seed: int = 0) -> np.ndarray:
    (out,) = _session(name).run(None, zoo.sample_inputs(name, batch, seed=seed))
    return out


def test_models_listed() -> None:
    assert zoo.MODELS == ("tiny_add", "mlp", "mobilenetv2", "resnet18", "resnet50")
    assert set(OUTPUTS) == set(zoo.MODELS)


@pytest.mark.parametrize("fn", [zoo.build, zoo.model_bytes, zoo.input_specs, zoo.sample_inputs])
def test_unknown_name(fn: object) -> None:
    with pytest.raises(ValueError, match="unknown model"):
        fn("resnet1000")  # type: ignore[operator]


@pytest.mark.parametrize("name", _models())
def test_valid_model(name: str) -> None:
    model = onnx.load_from_string(zoo.model_bytes(name))
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == zoo.IR_VERSION
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]

    (inp,) = model.graph.input
    spec_name, spec_dtype, spec_shape = zoo.input_specs(name)[0]
    assert inp.name == spec_name == "input"
    assert spec_dtype == "float32"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch"
    assert [d.dim_value for d in dims[1:]] == spec_shape[1:]
    assert spec_shape[0] == -1

    out_name, out_shape = OUTPUTS[name]
    (out,) = model.graph.output
    assert out.name == out_name
    dims = out.type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch"
    assert tuple(d.dim_value for d in dims[1:]) == out_shape


@pytest.mark.parametrize("name", _models())
def test_deterministic(name: str) -> None:
    data = zoo.model_bytes(name)
    assert zoo.model_bytes(name) is data  # cached
    assert zoo.build(name, seed=0).SerializeToString() == data
    assert zoo.build(name, seed=1).SerializeToString() != data


def test_param_counts() -> None:
    def count(name: str) -> int:
        model = onnx.load_from_string(zoo.model_bytes(name))
        return sum(int(np.prod(t.dims)) for t in model.graph.initializer)

    assert count("tiny_add") == 4
    assert count("mlp") == 256 * 512 + 512 + 512 * 512 + 512 + 512 * 10 + 10


@pytest.mark.parametrize(
    ("name", "lo", "hi"),
    [
        ("mobilenetv2", 3.4e6, 3.7e6),
        ("resnet18", 11.5e6, 11.9e6),
        pytest.param("resnet50", 25.4e6, 25.8e6, marks=pytest.mark.slow),
    ],
)
def test_param_counts_cnn(name: str, lo: float, hi: float) -> None:
    model = onnx.load_from_string(zoo.model_bytes(name))
    assert lo < sum(int(np.prod(t.dims)) for t in model.graph.initializer) < hi


@pytest.mark.parametrize(
    ("name", "batch"),
    [
        pytest.param(n, b, marks=pytest.mark.slow) if n in HEAVY else (n, b)
        for n in zoo.MODELS
        for b in (1, 3)
        if not (n == "resnet50" and b == 3)
    ],
)
def test_runs(name: str, batch: int) -> None:
    out = _run(name, batch)
    assert out.dtype == np.float32
    assert out.shape == (batch, *OUTPUTS[name][1])
    assert np.isfinite(out).all()
    # Not collapsed to zero and not blown up: weights keep activations of order one.
    assert 0.1 < float(out.std()) < 100.0
    assert float(np.abs(out).max()) < 1e3


@pytest.mark.parametrize("name", _models(("tiny_add", "mlp", "resnet18")))
def test_batch_independent(name: str) -> None:
    both = zoo.sample_inputs(name, 2, seed=7)
    sess = _session(name)
    (together,) = sess.run(None, both)
    singles = [sess.run(None, {k: v[i : i + 1] for k, v in both.items()})[0] for i in range(2)]
    np.testing.assert_allclose(together, np.concatenate(singles), rtol=1e-4, atol=1e-5)
    assert not np.allclose(singles[0], singles[1])


def test_sample_inputs() -> None:
    for name in zoo.MODELS:
        ((spec_name, dtype, shape),) = zoo.input_specs(name)
        x = zoo.sample_inputs(name, 5)
        assert list(x) == [spec_name]
        assert x[spec_name].dtype == np.dtype(dtype)
        assert x[spec_name].shape == (5, *shape[1:])
    a, b = zoo.sample_inputs("mlp", 2), zoo.sample_inputs("mlp", 2)
    np.testing.assert_array_equal(a["input"], b["input"])
    assert not np.array_equal(a["input"], zoo.sample_inputs("mlp", 2, seed=1)["input"])
    with pytest.raises(ValueError):
        zoo.sample_inputs("mlp", 0)


def test_save(tmp_path: object) -> None:
    directory = tmp_path / "models"  # type: ignore[operator]
    path = zoo.save("tiny_add", directory)
    assert path == directory / "tiny_add.onnx"
    assert path.read_bytes() == zoo.model_bytes("tiny_add")
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = zoo.sample_inputs("tiny_add", 2)
    np.testing.assert_allclose(sess.run(None, x)[0], _run("tiny_add", 2))

    # Same bytes: the file is reused untouched.
    before = os.stat(path)
    assert zoo.save("tiny_add", directory) == path
    after = os.stat(path)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)

    # Different bytes (another seed, or a stale file) get replaced.
    zoo.save("tiny_add", directory, seed=1)
    assert path.read_bytes() == zoo.model_bytes("tiny_add", seed=1)
    path.write_bytes(b"stale")
    zoo.save("tiny_add", str(directory))
    assert path.read_bytes() == zoo.model_bytes("tiny_add")
    assert sorted(p.name for p in directory.iterdir()) == ["tiny_add.onnx"]  # no temp files


def test_save_large(tmp_path: object) -> None:
    path = zoo.save("resnet18", tmp_path)  # type: ignore[arg-type]
    model = onnx.load(str(path))
    assert model.SerializeToString() == zoo.model_bytes("resnet18")
    assert path.stat().st_size > 40e6
