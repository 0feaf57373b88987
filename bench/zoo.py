"""Model zoo: real DNN architectures with random weights, built with ``onnx.helper``.

The test machines, CI and the demo cannot download pretrained models (no network, no
torch), yet the scheduler, the batcher and the memory accounting only mean something on
models with realistic compute and realistic sizes.  So this module writes the standard
architectures (MobileNetV2, ResNet-18, ResNet-50) layer by layer with seeded random
weights, plus two toys (``tiny_add``, ``mlp``) for fast unit tests.  Accuracy is
meaningless; FLOPs, parameter bytes, graph shape and batch behaviour are the real thing.

Weights use He (Kaiming) normal initialisation and BatchNormalization runs with
mean ~ 0, var ~ 1, gamma ~ 1, beta ~ 0 (plus a little noise), so activations stay finite
and of order one through the whole network.  The one departure: the last BN of every
residual branch gets a gamma of about ``_RESIDUAL_GAMMA`` (in the spirit of torchvision's
``zero_init_residual``), otherwise each residual Add doubles the variance and ResNet-50's
logits would end up in the hundreds.

Every model has opset 17, one float32 input named ``input`` whose leading dim is the
symbolic ``batch``, and outputs with that same batch dim.
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["MODELS", "build", "input_specs", "model_bytes", "sample_inputs", "save"]

MODELS: tuple[str, ...] = ("tiny_add", "mlp", "mobilenetv2", "resnet18", "resnet50")

OPSET = 17
# IR 9 is what onnx 1.14 wrote; every onnxruntime since 1.15 loads it, and opset 17 needs >= 8.
IR_VERSION = 9
BATCH_DIM = "batch"
INPUT_NAME = "input"

_RESIDUAL_GAMMA = 0.2
_BN_EPS = 1e-5

# Per-sample input shape; the symbolic batch dim is prepended.
_INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "tiny_add": (4,),
    "mlp": (256,),
    "mobilenetv2": (3, 224, 224),
    "resnet18": (3, 224, 224),
    "resnet50": (3, 224, 224),
}


class _Builder:
    """Accumulates nodes and initializers; each method adds one layer and returns its output."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._counts: dict[str, int] = {}
        self._consts: dict[str, str] = {}

    # -- plumbing ---------------------------------------------------------------------------

    def _uid(self, prefix: str) -> str:
        n = self._counts.get(prefix, 0)
        self._counts[prefix] = n + 1
        return f"{prefix}_{n}"

    def param(self, prefix: str, array: np.ndarray) -> str:
        name = self._uid(prefix)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def scalar(self, value: float) -> str:
        """A shared float32 scalar initializer (e.g. Clip bounds)."""
        key = repr(float(value))
        if key not in self._consts:
            self._consts[key] = self.param("const", np.array(value, dtype=np.float32))
        return self._consts[key]

    def op(self, op_type: str, inputs: Sequence[str], **attrs: object) -> str:
        name = self._uid(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], name=name, **attrs))
        return name

    def normal(self, shape: Sequence[int], std: float) -> np.ndarray:
        return self.rng.standard_normal(tuple(shape), dtype=np.float32) * np.float32(std)

    # -- layers -----------------------------------------------------------------------------

    def conv(self, x: str, cin: int, cout: int, k: int, *, stride: int = 1, group: int = 1) -> str:
        """Bias-free ``k x k`` conv with 'same'-style padding ``k // 2`` and He-normal weights."""
        fan_in = (cin // group) * k * k
        w = self.param("conv_w", self.normal((cout, cin // group, k, k), np.sqrt(2.0 / fan_in)))
        p = k // 2
        return self.op(
            "Conv",
            [x, w],
            kernel_shape=[k, k],
            strides=[stride, stride],
            pads=[p, p, p, p],
            group=group,
        )

    def bn(self, x: str, c: int, *, gamma: float = 1.0) -> str:
        noise = 0.02
        scale = self.param("bn_gamma", gamma * (1.0 + self.normal((c,), noise)))
        bias = self.param("bn_beta", self.normal((c,), noise))
        mean = self.param("bn_mean", self.normal((c,), noise))
        var = self.param("bn_var", (1.0 + np.abs(self.normal((c,), noise))).astype(np.float32))
        return self.op("BatchNormalization", [x, scale, bias, mean, var], epsilon=_BN_EPS)

    def relu(self, x: str) -> str:
        return self.op("Relu", [x])

    def relu6(self, x: str) -> str:
        return self.op("Clip", [x, self.scalar(0.0), self.scalar(6.0)])

    def conv_bn(
        self,
        x: str,
        cin: int,
        cout: int,
        k: int,
        *,
        stride: int = 1,
        group: int = 1,
        act: Callable[[str], str] | None = None,
        gamma: float = 1.0,
    ) -> str:
        y = self.bn(self.conv(x, cin, cout, k, stride=stride, group=group), cout, gamma=gamma)
        return act(y) if act is not None else y

    def add(self, a: str, b: str) -> str:
        return self.op("Add", [a, b])

    def max_pool(self, x: str, k: int, stride: int) -> str:
        p = k // 2
        return self.op(
            "MaxPool", [x], kernel_shape=[k, k], strides=[stride, stride], pads=[p, p, p, p]
        )

    def head(self, x: str, cin: int, classes: int) -> str:
        """GlobalAveragePool -> Flatten -> Gemm: the classifier of every CNN here."""
        y = self.op("Flatten", [self.op("GlobalAveragePool", [x])], axis=1)
        return self.gemm(y, cin, classes, std=np.sqrt(1.0 / cin))

    def gemm(self, x: str, cin: int, cout: int, *, std: float | None = None) -> str:
        """``x @ W.T + b`` with ``W`` stored ``[out, in]`` as torch does; He-normal by default."""
        w = self.param("fc_w", self.normal((cout, cin), np.sqrt(2.0 / cin) if std is None else std))
        b = self.param("fc_b", self.normal((cout,), 0.01))
        return self.op("Gemm", [x, w, b], transB=1)

    # -- model ------------------------------------------------------------------------------

    def finish(
        self, name: str, output: str, out_name: str, out_shape: Sequence[int]
    ) -> onnx.ModelProto:
        if not self.nodes or self.nodes[-1].output[0] != output:
            raise AssertionError("the graph output must be the last node's output")
        self.nodes[-1].output[0] = out_name
        graph = helper.make_graph(
            self.nodes,
            name,
            [
                helper.make_tensor_value_info(
                    INPUT_NAME, TensorProto.FLOAT, [BATCH_DIM, *_INPUT_SHAPES[name]]
                )
            ],
            [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, [BATCH_DIM, *out_shape])],
            initializer=self.initializers,
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            producer_name="mtserve.bench.zoo",
            doc_string=f"{name}: random weights, for benchmarking only",
        )
        model.ir_version = IR_VERSION
        return model


# -- architectures --------------------------------------------------------------------------


def _tiny_add(b: _Builder) -> onnx.ModelProto:
    y = b.op("Add", [INPUT_NAME, b.param("bias", b.normal((4,), 1.0))])
    return b.finish("tiny_add", y, "output", [4])


def _mlp(b: _Builder) -> onnx.ModelProto:
    x = b.relu(b.gemm(INPUT_NAME, 256, 512))
    x = b.relu(b.gemm(x, 512, 512))
    x = b.gemm(x, 512, 10, std=np.sqrt(1.0 / 512))
    return b.finish("mlp", x, "logits", [10])


# (expansion t, out channels c, repeats n, first stride s), from the MobileNetV2 paper, table 2.
_MOBILENETV2_CFG = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))  # fmt: skip


def _mobilenetv2(b: _Builder) -> onnx.ModelProto:
    x = b.conv_bn(INPUT_NAME, 3, 32, 3, stride=2, act=b.relu6)
    cin = 32
    for t, c, n, s in _MOBILENETV2_CFG:
        for i in range(n):
            stride = s if i == 0 else 1
            residual = stride == 1 and cin == c
            hidden = cin * t
            y = x if t == 1 else b.conv_bn(x, cin, hidden, 1, act=b.relu6)
            y = b.conv_bn(y, hidden, hidden, 3, stride=stride, group=hidden, act=b.relu6)
            # Linear bottleneck: no activation after the projection.
            y = b.conv_bn(y, hidden, c, 1, gamma=_RESIDUAL_GAMMA if residual else 1.0)
            x = b.add(x, y) if residual else y
            cin = c
    x = b.conv_bn(x, cin, 1280, 1, act=b.relu6)
    return b.finish("mobilenetv2", b.head(x, 1280, 1000), "logits", [1000])


def _basic_block(b: _Builder, x: str, cin: int, planes: int, stride: int) -> tuple[str, int]:
    y = b.conv_bn(x, cin, planes, 3, stride=stride, act=b.relu)
    y = b.conv_bn(y, planes, planes, 3, gamma=_RESIDUAL_GAMMA)
    if stride != 1 or cin != planes:
        x = b.conv_bn(x, cin, planes, 1, stride=stride)
    return b.relu(b.add(y, x)), planes


def _bottleneck(b: _Builder, x: str, cin: int, planes: int, stride: int) -> tuple[str, int]:
    cout = planes * 4
    y = b.conv_bn(x, cin, planes, 1, act=b.relu)
    y = b.conv_bn(y, planes, planes, 3, stride=stride, act=b.relu)  # ResNet v1.5: stride here
    y = b.conv_bn(y, planes, cout, 1, gamma=_RESIDUAL_GAMMA)
    if stride != 1 or cin != cout:
        x = b.conv_bn(x, cin, cout, 1, stride=stride)
    return b.relu(b.add(y, x)), cout


def _resnet(
    b: _Builder,
    name: str,
    block: Callable[[_Builder, str, int, int, int], tuple[str, int]],
    layers: Sequence[int],
) -> onnx.ModelProto:
    x = b.conv_bn(INPUT_NAME, 3, 64, 7, stride=2, act=b.relu)
    x = b.max_pool(x, 3, 2)
    cin = 64
    for stage, n in enumerate(layers):
        planes = 64 * 2**stage
        for i in range(n):
            x, cin = block(b, x, cin, planes, 2 if stage > 0 and i == 0 else 1)
    return b.finish(name, b.head(x, cin, 1000), "logits", [1000])


_ARCHS: dict[str, Callable[[_Builder], onnx.ModelProto]] = {
    "tiny_add": _tiny_add,
    "mlp": _mlp,
    "mobilenetv2": _mobilenetv2,
    "resnet18": lambda b: _resnet(b, "resnet18", _basic_block, (2, 2, 2, 2)),
    "resnet50": lambda b: _resnet(b, "resnet50", _bottleneck, (3, 4, 6, 3)),
}


# -- public API -----------------------------------------------------------------------------


def _check_name(name: str) -> None:
    if name not in _ARCHS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def build(name: str, *, seed: int = 0) -> onnx.ModelProto:
    """Build a fresh ``ModelProto`` for ``name``; the same seed gives the same weights."""
    _check_name(name)
    return _ARCHS[name](_Builder(seed))


@functools.lru_cache(maxsize=8)  # bounded: resnet50 is ~100 MB a seed
def model_bytes(name: str, *, seed: int = 0) -> bytes:
    """The serialized model, built once per (name, seed) in this process."""
    return build(name, seed=seed).SerializeToString()


def save(name: str, directory: str | Path, *, seed: int = 0) -> Path:
    """Write ``<directory>/<name>.onnx`` atomically and return its path.

    An existing file with identical bytes is left alone (its mtime too).
    """
    data = model_bytes(name, seed=seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.onnx"
    try:
        if path.stat().st_size == len(data) and path.read_bytes() == data:
            return path
    except FileNotFoundError:
        pass
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".onnx.tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def input_specs(name: str) -> list[tuple[str, str, list[int]]]:
    """``[(input name, dtype, shape)]`` with ``-1`` for the dynamic batch dim."""
    _check_name(name)
    return [(INPUT_NAME, "float32", [-1, *_INPUT_SHAPES[name]])]


def sample_inputs(name: str, batch: int = 1, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Standard-normal inputs (think: normalized images) for a batch of ``batch``."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    rng = np.random.default_rng(seed)
    return {
        n: rng.standard_normal((batch, *shape[1:])).astype(dtype)
        for n, dtype, shape in input_specs(name)
    }
