"""The torch engine's core (worker.gpu.torch_engine): ONNX graphs lowered to PyTorch.

Every model and operator is checked against ONNX Runtime on the same bytes (CPU, fp32):
the zoo at batch 1 and 3, then one small graph per operator and attribute variant. The
rest is about what the GPU worker relies on: weights bound as given (never copied),
static inputs as plan constants (no device reads), and clear refusals, so the worker
can fall back to ONNX Runtime.
"""

from __future__ import annotations

import functools
import pickle
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bench import zoo
from mtcore.errors import InputInvalid, ModelInvalid
from worker.gpu.torch_engine import TensorSpec, TorchModel, TorchPlan, plan_model, supported_ops

torch = pytest.importorskip("torch")

RTOL = 1e-4  # max|a - b| / max|b|: fp32 kernels summing in another order
F32 = TensorProto.FLOAT


# -- helpers --------------------------------------------------------------------------------


def rel_error(got: np.ndarray, want: np.ndarray) -> float:
    if want.size == 0:
        return 0.0
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64)).max()
    return float(diff / max(float(np.abs(want).max()), 1e-6))


@functools.cache
def ort_session(data: bytes) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def bind(data: bytes) -> tuple[TorchModel, list[torch.Tensor]]:
    """Plan and bind over writable copies of the weights (as pool pages would be)."""
    plan, arrays = plan_model(data)
    tensors = [torch.from_numpy(np.array(a)) for a in arrays]
    return TorchModel(plan, tensors), tensors


def run_both(data: bytes, feeds: dict[str, np.ndarray]) -> tuple[list, list]:
    model, _ = bind(data)
    names = [s.name for s in model.plan.inputs]
    got = [t.numpy() for t in model.run([torch.from_numpy(feeds[n]) for n in names])]
    return got, ort_session(data).run(model.plan.output_names, feeds)


def assert_matches(data: bytes, feeds: dict[str, np.ndarray]) -> None:
    got, want = run_both(data, feeds)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        assert g.dtype == w.dtype
        if w.dtype.kind == "f":
            assert rel_error(g, w) < RTOL
        else:
            np.testing.assert_array_equal(g, w)


def graph(
    nodes: list,
    inputs: dict[str, tuple],
    outputs: list[str] | dict[str, int],
    inits: dict[str, np.ndarray] | None = None,
    opset: int = 17,
) -> bytes:
    """A model of `nodes`; inputs name -> (elem type, shape); outputs float unless typed."""
    if not isinstance(outputs, dict):
        outputs = dict.fromkeys(outputs, F32)
    model = helper.make_model(
        helper.make_graph(
            nodes,
            "g",
            [helper.make_tensor_value_info(n, t, s) for n, (t, s) in inputs.items()],
            [helper.make_tensor_value_info(n, t, None) for n, t in outputs.items()],
            initializer=[numpy_helper.from_array(a, n) for n, a in (inits or {}).items()],
        ),
        opset_imports=[helper.make_opsetid("", opset)],
    )
    model.ir_version = 8
    return model.SerializeToString()


def i64(*values: int) -> np.ndarray:
    return np.array(values, np.int64)


def f32(*values: float) -> np.ndarray:
    return np.array(values, np.float32)


def rand(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# -- the zoo --------------------------------------------------------------------------------


ZOO = [
    *[(n, b) for n in ("tiny_add", "mlp", "mobilenetv2", "resnet18") for b in (1, 3)],
    pytest.param("resnet50", 1, marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("name", "batch"), ZOO)
def test_zoo_matches_onnxruntime(name: str, batch: int) -> None:
    data = zoo.model_bytes(name)
    got, want = run_both(data, zoo.sample_inputs(name, batch))
    assert got[0].shape == want[0].shape == (batch, *want[0].shape[1:])
    assert rel_error(got[0], want[0]) < RTOL


def test_zoo_plan() -> None:
    plan, arrays = plan_model(zoo.model_bytes("mobilenetv2"))
    assert plan.inputs == [TensorSpec("input", np.dtype(np.float32), (-1, 3, 224, 224))]
    assert plan.output_names == ["logits"]
    assert plan.batchable
    assert [(w.dtype, w.shape) for w in plan.weights] == [(a.dtype, a.shape) for a in arrays]
    # Clip's bounds (two shared scalars) are plan constants; every other one is a weight.
    names = {w.name for w in plan.weights}
    assert len(names) == len(plan.weights)
    model = zoo.build("mobilenetv2")
    assert names == {t.name for t in model.graph.initializer} - {"const_0", "const_1"}


# -- weights: bound, never copied -----------------------------------------------------------


def test_weights_are_views() -> None:
    data = zoo.model_bytes("tiny_add")
    plan, arrays = plan_model(data)
    bias = np.array(arrays[0])  # writable, as a pool page is
    weight = torch.from_numpy(bias)
    model = TorchModel(plan, [weight])
    assert model.weights[0] is weight
    assert model.weights[0].data_ptr() == weight.data_ptr() == bias.ctypes.data
    assert model.device == torch.device("cpu")
    x = torch.from_numpy(zoo.sample_inputs("tiny_add", 2)["input"])
    (before,) = model.run([x])
    bias += 1.0  # in place, under the bound model
    (after,) = model.run([x])
    np.testing.assert_allclose(after.numpy(), before.numpy() + 1.0, atol=1e-6)


def test_weights_are_views_mlp() -> None:
    model, tensors = bind(zoo.model_bytes("mlp"))
    x = torch.from_numpy(zoo.sample_inputs("mlp", 1)["input"])
    (before,) = model.run([x])
    last_bias = next(i for i, w in enumerate(model.plan.weights) if w.shape == (10,))
    tensors[last_bias].numpy()[3] += 5.0
    (after,) = model.run([x])
    delta = after.numpy() - before.numpy()
    assert delta[0, 3] == pytest.approx(5.0, rel=1e-5)
    assert np.abs(np.delete(delta, 3, axis=1)).max() == 0.0


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda ts: [ts[0].double(), *ts[1:]], "must be float32"),
        (lambda ts: [ts[0].reshape(1, -1), *ts[1:]], r"must be float32 \[512, 256\]"),
        (lambda ts: ts[:-1], "binds 6 weights; got 5"),
    ],
)
def test_weight_mismatch(change, match: str) -> None:
    plan, arrays = plan_model(zoo.model_bytes("mlp"))
    tensors = [torch.from_numpy(np.array(a)) for a in arrays]
    with pytest.raises(ModelInvalid, match=match):
        TorchModel(plan, change(tensors))


def test_wrong_input_count() -> None:
    model, _ = bind(zoo.model_bytes("tiny_add"))
    with pytest.raises(InputInvalid, match="takes 1 inputs; got 2"):
        model.run([torch.zeros(1, 4), torch.zeros(1, 4)])


def test_plan_is_plain_data() -> None:
    """The plan holds no callables or tensors: it pickles, and binds again after."""
    data = zoo.model_bytes("resnet18")
    plan, arrays = plan_model(data)
    again = pickle.loads(pickle.dumps(plan))
    assert isinstance(again, TorchPlan)
    model = TorchModel(again, [torch.from_numpy(np.array(a)) for a in arrays])
    x = zoo.sample_inputs("resnet18", 1)
    (got,) = model.run([torch.from_numpy(x["input"])])
    assert rel_error(got.numpy(), ort_session(data).run(None, x)[0]) < RTOL


def test_imports_and_plans_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from bench import zoo\n"
        "from worker.gpu.torch_engine import plan_model\n"
        "plan, arrays = plan_model(zoo.model_bytes('mlp'))\n"
        "print(len(arrays))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "6"


# -- refusals -------------------------------------------------------------------------------


def test_unsupported_ops_named() -> None:
    nodes = [
        helper.make_node("LSTM", ["x", "w", "r"], ["y"], hidden_size=2),
        helper.make_node("Frobnicate", ["x"], ["z"], domain="com.example"),
        helper.make_node("Relu", ["x"], ["r2"]),
    ]
    data = graph(
        nodes,
        {"x": (F32, [1, 1, 2])},
        ["y", "z"],
        {"w": rand(1, 8, 2), "r": rand(1, 8, 2)},
    )
    with pytest.raises(ModelInvalid, match="cannot be run by the GPU engine") as info:
        plan_model(data)
    assert "unsupported operators LSTM, com.example:Frobnicate" in str(info.value)


def test_internal_op_names_refused() -> None:
    data = graph([helper.make_node("_to_device", ["x"], ["y"])], {"x": (F32, [2])}, ["y"])
    with pytest.raises(ModelInvalid, match="unsupported operators _to_device"):
        plan_model(data)


@pytest.mark.parametrize("data", [b"", b"not an onnx model at all", b"\x08\x07\x12\xff\xff"])
def test_bad_bytes(data: bytes) -> None:
    with pytest.raises(ModelInvalid, match=r"not an ONNX model|no graph nodes"):
        plan_model(data)


def test_truncated_bytes() -> None:
    data = zoo.model_bytes("mlp")
    with pytest.raises(ModelInvalid):
        plan_model(data[: len(data) // 2])


@pytest.mark.parametrize("elem", [TensorProto.STRING, TensorProto.BFLOAT16, TensorProto.UINT32])
def test_unsupported_input_dtype(elem: int) -> None:
    data = graph([helper.make_node("Identity", ["x"], ["y"])], {"x": (elem, [2])}, {"y": elem})
    with pytest.raises(ModelInvalid, match="input 'x' has ONNX element type"):
        plan_model(data)


UNLOWERABLE = [
    (
        [helper.make_node("Slice", ["x", "s", "e", "a", "st"], ["y"])],
        {"s": i64(3), "e": i64(0), "a": i64(1), "st": i64(-1)},
        "only positive steps",
    ),
    (
        [helper.make_node("MaxPool", ["x"], ["y", "idx"], kernel_shape=[2, 2])],
        {},
        r"has output 1 \('idx'\)",
    ),
    (
        [helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="SIDEWAYS")],
        {"w": rand(2, 3, 1, 1)},
        "auto_pad 'SIDEWAYS'",
    ),
    (
        [helper.make_node("BatchNormalization", ["x", "c", "c", "c", "c"], ["y"], training_mode=1)],
        {"c": rand(3)},
        "runs in training mode",
    ),
    (  # nearest with half-pixel centres rounding down to sizes: torch has no such mode
        [helper.make_node("Resize", ["x", "", "", "sz"], ["y"])],
        {"sz": i64(1, 3, 3, 3)},
        "has mode 'nearest' \\(half_pixel, round_prefer_floor\\)",
    ),
    (  # a Reshape whose shape is computed from tensor values: reading it would sync
        [
            helper.make_node("Cast", ["x"], ["xi"], to=TensorProto.INT64),
            helper.make_node("ReduceMax", ["xi"], ["m"], axes=[1, 2, 3], keepdims=0),
            helper.make_node("Reshape", ["x", "m"], ["y"]),
        ],
        {},
        "is a tensor on the device",
    ),
]


@pytest.mark.parametrize(
    ("nodes", "inits", "match"), UNLOWERABLE, ids=[n[-1].op_type for n, _, _ in UNLOWERABLE]
)
def test_unlowerable_nodes(nodes: list, inits: dict, match: str) -> None:
    data = graph(nodes, {"x": (F32, [1, 3, 4, 4])}, ["y"], inits)
    with pytest.raises(ModelInvalid, match=match) as info:
        plan_model(data)
    assert f"{nodes[-1].op_type} node" in str(info.value)


# -- static inputs and shape arithmetic -----------------------------------------------------


def test_static_initializers_are_constants() -> None:
    shape = np.array([-1, 3, 4], np.int64)
    data = graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        {"x": (F32, ["batch", 12])},
        ["y"],
        {"shape": shape},
    )
    plan, arrays = plan_model(data)
    assert plan.weights == [] and arrays == []
    model = TorchModel(plan, [])
    x = rand(2, 12)
    (y,) = model.run([torch.from_numpy(x)])
    np.testing.assert_array_equal(y.numpy(), x.reshape(-1, 3, 4))


def test_constant_used_both_ways() -> None:
    """An initializer read as a value and as a tensor: a plan constant and one weight."""
    shape = np.array([2, 3], np.int64)
    data = graph(
        [
            helper.make_node("Reshape", ["x", "shape"], ["y"]),
            helper.make_node("Mul", ["n", "shape"], ["z"]),
            helper.make_node("Add", ["n", "shape"], ["z2"]),
        ],
        {"x": (F32, [6]), "n": (TensorProto.INT64, [2])},
        {"y": F32, "z": TensorProto.INT64, "z2": TensorProto.INT64},
        {"shape": shape},
    )
    plan, _ = plan_model(data)
    assert [w.name for w in plan.weights] == ["shape"]
    assert_matches(data, {"x": rand(6), "n": np.array([5, -7], np.int64)})


def test_constant_nodes() -> None:
    data = graph(
        [
            helper.make_node("Constant", [], ["k"], value_floats=[1.0, 2.0, 3.0]),
            helper.make_node("Constant", [], ["s"], value_ints=[3, 1]),
            helper.make_node("Mul", ["x", "k"], ["m"]),
            helper.make_node("Reshape", ["m", "s"], ["y"]),
        ],
        {"x": (F32, [3])},
        ["y"],
    )
    plan, _ = plan_model(data)
    assert [w.name for w in plan.weights] == ["k"]
    assert_matches(data, {"x": rand(3)})


def shape_arithmetic_model() -> bytes:
    """What PyTorch exports for `x.view(x.size(0), -1)`, plus shapes used as tensors."""
    i64 = TensorProto.INT64
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["b"], axis=0),
        helper.make_node("Unsqueeze", ["b", "axes0"], ["bu"]),
        helper.make_node("Concat", ["bu", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["flat"]),
        helper.make_node("Cast", ["b"], ["bf"], to=F32),
        helper.make_node("Mul", ["flat", "bf"], ["scaled"]),  # a host value as a tensor
        helper.make_node("ConstantOfShape", ["target2"], ["zeros"]),
        helper.make_node("Concat", ["bu", "four"], ["target2"], axis=0),
        helper.make_node("Slice", ["x", "zero1", "bu", "zero1"], ["head"]),
    ]
    # Topological order: ConstantOfShape reads target2, made by the node after it.
    nodes[7], nodes[8] = nodes[8], nodes[7]
    return graph(
        nodes,
        {"x": (F32, ["batch", 3, 4])},
        {"scaled": F32, "s": i64, "zeros": F32, "head": F32},
        {
            "zero": np.array(0, np.int64),
            "axes0": np.array([0], np.int64),
            "minus1": np.array([-1], np.int64),
            "four": np.array([4], np.int64),
            "zero1": np.array([0], np.int64),
        },
    )


def test_shape_arithmetic_runs_on_the_host() -> None:
    data = shape_arithmetic_model()
    plan, _ = plan_model(data)
    assert plan.weights == []  # every constant here is read as a value, on the host
    assert plan.batchable
    model, _ = bind(data)
    for batch in (2, 5, 2, 1):  # the Reshape is lowered per target shape, then kept
        x = rand(batch, 3, 4, seed=batch)
        got = [t.numpy() for t in model.run([torch.from_numpy(x)])]
        want = ort_session(data).run(plan.output_names, {"x": x})
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape and g.dtype == w.dtype
            np.testing.assert_allclose(g, w, rtol=1e-6)


def test_batchable_flag() -> None:
    fixed = graph([helper.make_node("Relu", ["x"], ["y"])], {"x": (F32, [2, 3])}, ["y"])
    assert not plan_model(fixed)[0].batchable
    two = graph(
        [helper.make_node("Add", ["a", "b"], ["y"])],
        {"a": (F32, ["n", 3]), "b": (F32, [1, 3])},
        ["y"],
    )
    assert not plan_model(two)[0].batchable
    dynamic = graph(
        [helper.make_node("Add", ["a", "b"], ["y"])],
        {"a": (F32, ["n", 3]), "b": (F32, ["m", 3])},
        ["y"],
    )
    assert plan_model(dynamic)[0].batchable


def test_multiple_outputs_in_order() -> None:
    data = graph(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Neg", ["r"], ["n"]),
            helper.make_node("Split", ["x"], ["a", "b"], axis=1, num_outputs=2),
        ],
        {"x": (F32, [2, 4])},
        ["n", "r", "b", "x"],
        opset=18,
    )
    assert plan_model(data)[0].output_names == ["n", "r", "b", "x"]
    assert_matches(data, {"x": rand(2, 4)})


def test_supported_ops_listed() -> None:
    ops = supported_ops()
    for op in ("Conv", "BatchNormalization", "Clip", "Gemm", "Softmax", "Reshape", "Constant"):
        assert op in ops
    assert not any(op.startswith("_") for op in ops)


# -- operators, one small graph each --------------------------------------------------------


def node(op: str, inputs: list[str], **attrs) -> object:
    return helper.make_node(op, inputs, ["y"], **attrs)


# (id, node, graph inputs {name: shape} (float32 unless (shape, dtype)), initializers, opset)
OPS = [
    # convolutions
    ("conv", node("Conv", ["x", "w", "b"], pads=[1, 1, 1, 1]), {"x": (2, 3, 8, 8)},
     {"w": rand(4, 3, 3, 3), "b": rand(4)}, 17),
    ("conv_strided_dilated", node("Conv", ["x", "w"], strides=[2, 1], dilations=[2, 2],
     pads=[2, 1, 2, 1]), {"x": (1, 3, 9, 9)}, {"w": rand(4, 3, 3, 3)}, 17),
    ("conv_grouped", node("Conv", ["x", "w", "b"], group=2, pads=[1, 1, 1, 1]),
     {"x": (1, 4, 6, 6)}, {"w": rand(6, 2, 3, 3), "b": rand(6)}, 17),
    ("conv_depthwise", node("Conv", ["x", "w"], group=4, strides=[2, 2], pads=[1, 1, 1, 1]),
     {"x": (2, 4, 7, 7)}, {"w": rand(4, 1, 3, 3)}, 17),
    ("conv_asymmetric", node("Conv", ["x", "w"], pads=[0, 1, 2, 0]), {"x": (1, 2, 6, 6)},
     {"w": rand(3, 2, 3, 3)}, 17),
    ("conv_same_upper", node("Conv", ["x", "w"], auto_pad="SAME_UPPER", strides=[2, 2]),
     {"x": (1, 2, 7, 8)}, {"w": rand(3, 2, 4, 4)}, 17),
    ("conv_same_lower", node("Conv", ["x", "w"], auto_pad="SAME_LOWER"), {"x": (1, 2, 6, 6)},
     {"w": rand(3, 2, 2, 2)}, 17),
    ("conv_valid", node("Conv", ["x", "w"], auto_pad="VALID"), {"x": (1, 2, 6, 6)},
     {"w": rand(3, 2, 3, 3)}, 17),
    ("conv1d", node("Conv", ["x", "w", "b"], pads=[1, 1]), {"x": (2, 3, 10)},
     {"w": rand(4, 3, 3), "b": rand(4)}, 17),
    ("conv_transpose", node("ConvTranspose", ["x", "w", "b"], strides=[2, 2], pads=[1, 1, 1, 1],
     output_padding=[1, 1]), {"x": (1, 3, 5, 5)}, {"w": rand(3, 2, 3, 3), "b": rand(2)}, 17),
    ("conv_transpose_asym", node("ConvTranspose", ["x", "w"], strides=[2, 2],
     pads=[0, 1, 1, 0]), {"x": (1, 3, 4, 4)}, {"w": rand(3, 4, 3, 3)}, 17),
    # pooling
    ("maxpool", node("MaxPool", ["x"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
     {"x": (2, 3, 9, 9)}, {}, 17),
    ("maxpool_asym", node("MaxPool", ["x"], kernel_shape=[2, 2], pads=[0, 0, 1, 1]),
     {"x": (1, 2, 5, 5)}, {}, 17),
    ("maxpool_ceil", node("MaxPool", ["x"], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
     {"x": (1, 2, 8, 8)}, {}, 17),
    ("maxpool_same", node("MaxPool", ["x"], kernel_shape=[3, 3], strides=[2, 2],
     auto_pad="SAME_UPPER"), {"x": (1, 2, 8, 8)}, {}, 17),
    ("maxpool_dilated", node("MaxPool", ["x"], kernel_shape=[2, 2], dilations=[2, 2]),
     {"x": (1, 2, 7, 7)}, {}, 17),
    ("avgpool", node("AveragePool", ["x"], kernel_shape=[3, 3], strides=[2, 2],
     pads=[1, 1, 1, 1]), {"x": (2, 3, 9, 9)}, {}, 17),
    ("avgpool_include_pad", node("AveragePool", ["x"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
     count_include_pad=1), {"x": (1, 2, 6, 6)}, {}, 17),
    ("avgpool_asym", node("AveragePool", ["x"], kernel_shape=[2, 2], pads=[1, 0, 0, 1]),
     {"x": (1, 2, 5, 5)}, {}, 17),
    ("avgpool_asym_include", node("AveragePool", ["x"], kernel_shape=[2, 2], pads=[1, 0, 0, 1],
     count_include_pad=1), {"x": (1, 2, 5, 5)}, {}, 17),
    ("avgpool_same_lower", node("AveragePool", ["x"], kernel_shape=[2, 2],
     auto_pad="SAME_LOWER"), {"x": (1, 2, 5, 5)}, {}, 17),
    ("global_avg", node("GlobalAveragePool", ["x"]), {"x": (2, 3, 5, 4)}, {}, 17),
    ("global_max", node("GlobalMaxPool", ["x"]), {"x": (2, 3, 5, 4)}, {}, 17),
    # normalization
    ("batchnorm", node("BatchNormalization", ["x", "s", "b", "m", "v"], epsilon=1e-3),
     {"x": (2, 3, 4, 4)}, {"s": rand(3), "b": rand(3), "m": rand(3),
                           "v": np.abs(rand(3)) + 0.5}, 15),
    ("batchnorm_2d", node("BatchNormalization", ["x", "s", "b", "m", "v"]), {"x": (4, 3)},
     {"s": rand(3), "b": rand(3), "m": rand(3), "v": np.abs(rand(3)) + 0.5}, 17),
    ("layernorm", node("LayerNormalization", ["x", "s", "b"], axis=-1), {"x": (2, 3, 8)},
     {"s": rand(8), "b": rand(8)}, 17),
    ("layernorm_axis1", node("LayerNormalization", ["x", "s"], axis=1), {"x": (2, 3, 4)},
     {"s": rand(3, 4)}, 17),
    ("instancenorm", node("InstanceNormalization", ["x", "s", "b"]), {"x": (2, 3, 4, 4)},
     {"s": rand(3), "b": rand(3)}, 17),
    # linear algebra
    ("gemm", node("Gemm", ["x", "w", "c"], transB=1), {"x": (3, 5)},
     {"w": rand(4, 5), "c": rand(4)}, 17),
    ("gemm_alpha_beta", node("Gemm", ["w", "x", "c"], alpha=0.5, beta=2.0, transA=1),
     {"x": (5, 4)}, {"w": rand(5, 3), "c": rand(3, 1)}, 17),
    ("gemm_no_c", node("Gemm", ["x", "w"], alpha=3.0, transA=1, transB=1), {"x": (5, 3)},
     {"w": rand(4, 5)}, 17),
    ("matmul", node("MatMul", ["x", "w"]), {"x": (2, 3, 5)}, {"w": rand(5, 4)}, 17),
    ("matmul_vec", node("MatMul", ["x", "w"]), {"x": (5,)}, {"w": rand(2, 5, 4)}, 17),
    # elementwise
    ("add_broadcast", node("Add", ["x", "c"]), {"x": (2, 3, 4)}, {"c": rand(3, 1)}, 17),
    ("sub", node("Sub", ["c", "x"]), {"x": (2, 3)}, {"c": rand(3)}, 17),
    ("mul", node("Mul", ["x", "x2"]), {"x": (2, 3), "x2": (2, 1)}, {}, 17),
    ("div", node("Div", ["x", "c"]), {"x": (2, 3)}, {"c": np.abs(rand(3)) + 1}, 17),
    ("div_int", node("Div", ["x", "c"]), {"x": ((4,), np.int64)}, {"c": i64(3, -2, 5, 7)}, 17),
    ("pow", node("Pow", ["x", "c"]), {"x": (2, 3)}, {"c": np.array(2.0, np.float32)}, 17),
    ("max", node("Max", ["x", "x2", "c"]), {"x": (2, 3), "x2": (2, 3)}, {"c": rand(3)}, 17),
    ("min", node("Min", ["x", "x2"]), {"x": (2, 3), "x2": (1, 3)}, {}, 17),
    ("sum", node("Sum", ["x", "x2", "c"]), {"x": (2, 3), "x2": (2, 3)}, {"c": rand(3)}, 17),
    *[(op.lower(), node(op, ["x"]), {"x": (3, 4)}, {}, 17)
      for op in ("Relu", "Sigmoid", "Tanh", "Exp", "Neg", "Abs", "Erf", "Floor", "Ceil", "Sin",
                 "Cos", "Softplus", "HardSwish", "Identity", "Dropout")],
    *[(op.lower(), node(op, ["x"]), {"x": (3, 4)}, {}, 17) for op in ("Sqrt", "Log", "Reciprocal")],
    ("leaky_relu", node("LeakyRelu", ["x"], alpha=0.2), {"x": (3, 4)}, {}, 17),
    ("elu", node("Elu", ["x"], alpha=0.7), {"x": (3, 4)}, {}, 17),
    ("hard_sigmoid", node("HardSigmoid", ["x"], alpha=0.3, beta=0.4), {"x": (3, 4)}, {}, 17),
    ("gelu", node("Gelu", ["x"]), {"x": (3, 4)}, {}, 20),
    ("gelu_tanh", node("Gelu", ["x"], approximate="tanh"), {"x": (3, 4)}, {}, 20),
    ("prelu", node("PRelu", ["x", "s"]), {"x": (2, 3, 4)}, {"s": rand(3, 1)}, 17),
    ("clip", node("Clip", ["x", "lo", "hi"]), {"x": (3, 4)},
     {"lo": np.array(-0.5, np.float32), "hi": np.array(0.5, np.float32)}, 17),
    ("clip_min_only", node("Clip", ["x", "lo"]), {"x": (3, 4)},
     {"lo": np.array(0.1, np.float32)}, 17),
    ("clip_max_only", node("Clip", ["x", "", "hi"]), {"x": (3, 4)},
     {"hi": np.array(0.1, np.float32)}, 17),
    ("clip_opset6", node("Clip", ["x"], min=-0.2, max=0.3), {"x": (3, 4)}, {}, 6),
    ("where", node("Where", ["cond", "x", "x2"]),
     {"cond": ((2, 3), np.bool_), "x": (2, 3), "x2": (3,)}, {}, 17),
    ("equal", node("Equal", ["x", "c"]), {"x": ((4,), np.int64)}, {"c": i64(0, 1, 0, 1)}, 17),
    ("greater", node("Greater", ["x", "x2"]), {"x": (2, 3), "x2": (2, 3)}, {}, 17),
    ("cast", node("Cast", ["x"], to=TensorProto.INT32), {"x": (3, 4)}, {}, 17),
    ("cast_half", node("Cast", ["x"], to=TensorProto.FLOAT16), {"x": (3, 4)}, {}, 17),
    # softmax
    ("softmax", node("Softmax", ["x"], axis=1), {"x": (2, 3, 4)}, {}, 13),
    ("softmax_default", node("Softmax", ["x"]), {"x": (2, 3, 4)}, {}, 17),
    ("softmax_opset11", node("Softmax", ["x"], axis=1), {"x": (2, 3, 4)}, {}, 11),
    ("log_softmax", node("LogSoftmax", ["x"], axis=-1), {"x": (2, 3, 4)}, {}, 17),
    # shapes and indexing
    ("flatten", node("Flatten", ["x"]), {"x": (2, 3, 4)}, {}, 17),
    ("flatten_axis0", node("Flatten", ["x"], axis=0), {"x": (2, 3, 4)}, {}, 17),
    ("flatten_neg", node("Flatten", ["x"], axis=-1), {"x": (2, 3, 4)}, {}, 17),
    ("reshape", node("Reshape", ["x", "s"]), {"x": (2, 3, 4)}, {"s": i64(0, -1, 2)}, 17),
    ("transpose", node("Transpose", ["x"], perm=[2, 0, 1]), {"x": (2, 3, 4)}, {}, 17),
    ("transpose_default", node("Transpose", ["x"]), {"x": (2, 3, 4)}, {}, 17),
    ("concat", node("Concat", ["x", "c", "x2"], axis=-1), {"x": (2, 3), "x2": (2, 1)},
     {"c": rand(2, 2)}, 17),
    ("squeeze", node("Squeeze", ["x", "a"]), {"x": (2, 1, 3, 1)}, {"a": i64(-1)}, 17),
    ("squeeze_all", node("Squeeze", ["x"]), {"x": (2, 1, 3, 1)}, {}, 17),
    ("squeeze_opset11", node("Squeeze", ["x"], axes=[1]), {"x": (2, 1, 3, 1)}, {}, 11),
    ("unsqueeze", node("Unsqueeze", ["x", "a"]), {"x": (2, 3)}, {"a": i64(0, -1)}, 17),
    ("unsqueeze_opset11", node("Unsqueeze", ["x"], axes=[1, 3]), {"x": (2, 3)}, {}, 11),
    ("slice", node("Slice", ["x", "s", "e", "a", "st"]), {"x": (4, 6, 5)},
     {"s": i64(1, -4), "e": i64(2**63 - 1, -1), "a": i64(0, -1), "st": i64(2, 1)}, 17),
    ("slice_default_axes", node("Slice", ["x", "s", "e"]), {"x": (4, 6)},
     {"s": i64(1, -100), "e": i64(3, 100)}, 17),
    ("slice_opset9", node("Slice", ["x"], starts=[1], ends=[3], axes=[1]), {"x": (4, 6)}, {}, 9),
    ("gather", node("Gather", ["x", "i"], axis=1), {"x": (2, 5, 3)}, {"i": i64(4, -1, 0)}, 17),
    ("gather_2d_indices", node("Gather", ["x", "i"]), {"x": (5, 3)},
     {"i": np.array([[0, 1], [4, -2]], np.int64)}, 17),
    ("gather_scalar", node("Gather", ["x", "i"], axis=-1), {"x": (2, 5)},
     {"i": np.array(-2, np.int64)}, 17),
    ("gather_embedding", node("Gather", ["e", "ids"]), {"ids": ((2, 3), np.int64)},
     {"e": rand(10, 4)}, 17),
    ("split", helper.make_node("Split", ["x", "s"], ["y", "z"], axis=1), {"x": (2, 5)},
     {"s": i64(2, 3)}, 17),
    ("split_equal", helper.make_node("Split", ["x"], ["y", "z", "w"], axis=-1),
     {"x": (2, 6)}, {}, 17),
    ("split_opset11", helper.make_node("Split", ["x"], ["y", "z"], axis=0, split=[1, 3]),
     {"x": (4, 2)}, {}, 11),
    ("pad", node("Pad", ["x", "p", "v"]), {"x": (1, 2, 3, 3)},
     {"p": i64(0, 0, 1, 2, 0, 0, 2, 0), "v": np.array(1.5, np.float32)}, 17),
    ("pad_reflect", node("Pad", ["x", "p"], mode="reflect"), {"x": (1, 2, 4, 4)},
     {"p": i64(0, 0, 1, 2, 0, 0, 2, 1)}, 17),
    ("pad_edge", node("Pad", ["x", "p"], mode="edge"), {"x": (1, 2, 4)},
     {"p": i64(0, 0, 2, 0, 0, 3)}, 17),
    ("pad_axes", node("Pad", ["x", "p", "", "a"]), {"x": (2, 3, 4)},
     {"p": i64(1, 2, 3, 0), "a": i64(-1, 0)}, 18),
    ("pad_opset2", node("Pad", ["x"], pads=[0, 1, 0, 2], value=0.5), {"x": (2, 3)}, {}, 2),
    ("expand", node("Expand", ["x", "s"]), {"x": (3, 1)}, {"s": i64(2, 1, 4)}, 17),
    ("tile", node("Tile", ["x", "r"]), {"x": (2, 3)}, {"r": i64(2, 3)}, 17),
    ("resize_nearest", node("Resize", ["x", "", "sc"], coordinate_transformation_mode="asymmetric",
     nearest_mode="floor"), {"x": (1, 2, 3, 4)}, {"sc": f32(1, 1, 2, 2)}, 17),
    ("resize_nearest_default", node("Resize", ["x", "", "sc"]), {"x": (1, 2, 3, 4)},
     {"sc": f32(1, 1, 2, 3)}, 17),
    ("resize_nearest_exact", node("Resize", ["x", "", "", "sz"], nearest_mode="round_prefer_ceil"),
     {"x": (1, 2, 6, 7)}, {"sz": i64(1, 2, 3, 4)}, 17),
    ("resize_linear", node("Resize", ["x", "r", "sc"], mode="linear"), {"x": (2, 2, 3, 4)},
     {"r": np.zeros(0, np.float32), "sc": f32(1, 1, 2, 2)}, 17),
    ("resize_linear_down", node("Resize", ["x", "", "", "sz"], mode="linear"),
     {"x": (1, 2, 6, 7)}, {"sz": i64(1, 2, 3, 5)}, 17),
    ("resize_linear_pytorch", node("Resize", ["x", "", "sc"], mode="linear",
     coordinate_transformation_mode="pytorch_half_pixel"), {"x": (1, 2, 3, 4)},
     {"sc": f32(1, 1, 2, 2)}, 17),
    ("resize_align_corners", node("Resize", ["x", "", "", "sz"], mode="linear",
     coordinate_transformation_mode="align_corners"), {"x": (1, 2, 3, 4)},
     {"sz": i64(1, 2, 7, 5)}, 17),
    ("resize_linear_1d", node("Resize", ["x", "", "sc"], mode="linear"), {"x": (1, 2, 5)},
     {"sc": f32(1, 1, 2)}, 17),
    ("resize_cubic", node("Resize", ["x", "", "sc"], mode="cubic"), {"x": (1, 2, 4, 4)},
     {"sc": f32(1, 1, 2, 2)}, 17),
    ("mod_int", node("Mod", ["x", "c"]), {"x": ((4,), np.int64)}, {"c": i64(3, -2, 5, -7)}, 17),
    ("fmod", node("Mod", ["x", "c"], fmod=1), {"x": (2, 4)}, {"c": f32(0.3, -0.7, 1.1, -2.0)},
     17),
    # reductions
    ("reduce_mean", node("ReduceMean", ["x"], axes=[1, -1], keepdims=0), {"x": (2, 3, 4)},
     {}, 17),
    ("reduce_mean_18", node("ReduceMean", ["x", "a"]), {"x": (2, 3, 4)}, {"a": i64(1)}, 18),
    ("reduce_sum", node("ReduceSum", ["x", "a"], keepdims=1), {"x": (2, 3, 4)},
     {"a": i64(0, 2)}, 17),
    ("reduce_sum_all", node("ReduceSum", ["x"], keepdims=0), {"x": (2, 3, 4)}, {}, 17),
    ("reduce_max", node("ReduceMax", ["x"], axes=[0]), {"x": (2, 3, 4)}, {}, 17),
    ("reduce_min", node("ReduceMin", ["x"]), {"x": (2, 3, 4)}, {}, 17),
    ("argmax", node("ArgMax", ["x"], axis=1, keepdims=0), {"x": (2, 5, 3)}, {}, 17),
    ("argmin", node("ArgMin", ["x"], axis=-1), {"x": (2, 5, 3)}, {}, 17),
]  # fmt: skip

_NP_TO_ONNX = {np.dtype(np.float32): F32, np.dtype(np.int64): TensorProto.INT64,
               np.dtype(np.bool_): TensorProto.BOOL}  # fmt: skip
_OUT_TYPES = {"cast": TensorProto.INT32, "cast_half": TensorProto.FLOAT16,
              "div_int": TensorProto.INT64, "equal": TensorProto.BOOL,
              "greater": TensorProto.BOOL, "argmax": TensorProto.INT64,
              "argmin": TensorProto.INT64, "mod_int": TensorProto.INT64}  # fmt: skip


def _feeds(inputs: dict) -> tuple[dict[str, tuple], dict[str, np.ndarray]]:
    specs, feeds = {}, {}
    for i, (name, spec) in enumerate(inputs.items()):
        shape, dtype = spec if isinstance(spec[0], tuple) else (spec, np.float32)
        dtype = np.dtype(dtype)
        rng = np.random.default_rng(i + 1)
        if dtype == np.bool_:
            value = rng.random(shape) < 0.5
        elif dtype.kind == "i":
            value = rng.integers(0, 4, shape).astype(dtype)
        else:
            value = rng.standard_normal(shape).astype(dtype)
        specs[name] = (_NP_TO_ONNX[dtype], list(shape))
        feeds[name] = value
    return specs, feeds


@pytest.mark.parametrize(
    ("case", "proto", "inputs", "inits", "opset"), OPS, ids=[c[0] for c in OPS]
)
def test_operator_matches_onnxruntime(case, proto, inputs, inits, opset) -> None:
    specs, feeds = _feeds(inputs)
    if case in ("sqrt", "log", "reciprocal"):
        feeds["x"] = np.abs(feeds["x"]) + 0.1
    out_type = _OUT_TYPES.get(case, F32)
    outputs = {name: out_type for name in proto.output}
    assert_matches(graph([proto], specs, outputs, inits, opset), feeds)


def test_operators_with_dynamic_batch() -> None:
    """The same plan at several batch sizes (a bound model is reused across runs)."""
    data = graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 0, 0, 1]),
            helper.make_node(
                "AveragePool", ["c"], ["p"], kernel_shape=[2, 2], auto_pad="SAME_UPPER"
            ),
            helper.make_node("Flatten", ["p"], ["f"]),
            helper.make_node("Softmax", ["f"], ["y"]),
        ],
        {"x": (F32, ["n", 2, 5, 5])},
        ["y"],
        {"w": rand(3, 2, 2, 2)},
    )
    model, _ = bind(data)
    for batch in (1, 4, 2):
        x = rand(batch, 2, 5, 5, seed=batch)
        (got,) = model.run([torch.from_numpy(x)])
        (want,) = ort_session(data).run(None, {"x": x})
        assert rel_error(got.numpy(), want) < RTOL


def run_on_meta(data: bytes, feeds: dict[str, np.ndarray]) -> list[torch.Tensor]:
    plan, arrays = plan_model(data)
    weights = [torch.from_numpy(np.array(a)).to("meta") for a in arrays]
    model = TorchModel(plan, weights, device="meta")
    assert model.device == torch.device("meta")
    return model.run([torch.from_numpy(feeds[s.name]).to("meta") for s in plan.inputs])


def test_runs_on_the_weights_device() -> None:
    """On the meta device (shapes only, no values), as a stand-in for CUDA: every tensor a
    step makes must be on the weights' device, and no step may read a device tensor's
    values (`.item()`, `.tolist()`, boolean masks fail on meta; on a GPU they would wait
    for the device)."""
    cases = [(zoo.model_bytes(n), zoo.sample_inputs(n, 2)) for n in ("mlp", "mobilenetv2")]
    cases.append((shape_arithmetic_model(), {"x": rand(3, 3, 4)}))
    for case, proto, inputs, inits, opset in OPS:
        specs, feeds = _feeds(inputs)
        outputs = dict.fromkeys(proto.output, _OUT_TYPES.get(case, F32))
        cases.append((graph([proto], specs, outputs, inits, opset), feeds))
    for data, feeds in cases:
        got = run_on_meta(data, feeds)
        want = ort_session(data).run(None, feeds)
        assert [(t.device.type, tuple(t.shape)) for t in got] == [("meta", w.shape) for w in want]


class _Exported(torch.nn.Module):
    """Layers whose PyTorch export does shape arithmetic (attention heads, `view`)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.norm = torch.nn.LayerNorm(8)
        self.attention = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = torch.nn.Linear(8 * 16, 5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.nn.functional.max_pool2d(torch.nn.functional.gelu(self.bn(self.conv(x))), 2)
        t = self.norm(y.flatten(2).transpose(1, 2))
        t = t + self.attention(t, t, t)[0]
        logits = self.fc(t.reshape(t.size(0), -1))
        return logits.softmax(-1), torch.nn.functional.interpolate(x, scale_factor=2.0)


def test_pytorch_export() -> None:
    import io
    import warnings

    torch.manual_seed(0)
    net = _Exported().eval()
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                net,
                (torch.randn(2, 3, 8, 8),),
                buffer,
                input_names=["x"],
                dynamic_axes={"x": {0: "n"}},
                opset_version=17,
                dynamo=False,
            )
    except Exception as exc:  # the TorchScript exporter is deprecated, and may go
        pytest.skip(f"torch.onnx.export cannot export here: {exc}")
    data = buffer.getvalue()
    plan, _ = plan_model(data)
    assert plan.batchable
    model, _ = bind(data)
    for batch in (1, 3, 1):
        x = rand(batch, 3, 8, 8, seed=batch)
        got = model.run([torch.from_numpy(x)])
        for g, w in zip(got, ort_session(data).run(None, {"x": x}), strict=True):
            assert rel_error(g.numpy(), w) < RTOL
