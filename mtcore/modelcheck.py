"""Checks that uploaded bytes are an acceptable ONNX model, and reads its signature.

Uploaded models are untrusted: they must parse, pass `onnx.checker`, keep every weight
inline (an external-data path could point anywhere on the broker's disk), use only the
standard operator domains, and declare inputs and outputs whose dtypes can travel on
the wire. Server side only: imports `onnx`, which the client does not need.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from mtcore.errors import ModelInvalid
from mtcore.protocol import DEFAULT_LIMITS, TensorDesc

MAX_RANK = DEFAULT_LIMITS.max_rank
MAX_TENSORS = DEFAULT_LIMITS.max_tensors
MAX_NAME = 256  # characters in an input or output name: results stay small

ALLOWED_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})

# onnx.TensorProto element types that the wire protocol can carry.
_ELEM_TYPES = {
    1: "float32",
    2: "uint8",
    3: "int8",
    5: "int16",
    6: "int32",
    7: "int64",
    9: "bool",
    10: "float16",
    11: "float64",
}


@dataclass(frozen=True)
class ModelSignature:
    """What a model takes and gives; a dynamic dimension is -1."""

    inputs: tuple[TensorDesc, ...]
    outputs: tuple[TensorDesc, ...]

    @property
    def batchable(self) -> bool:
        """True when every input and output has a dynamic leading (batch) dimension."""
        return all(d.shape and d.shape[0] == -1 for d in (*self.inputs, *self.outputs))

    def fixed_batch_reason(self) -> str:
        for d in (*self.inputs, *self.outputs):
            if not d.shape or d.shape[0] != -1:
                return f"tensor '{d.name}' has shape {list(d.shape)}, not a dynamic first dimension"
        return ""


def load_onnx(data: bytes) -> Any:
    """The parsed ModelProto of ONNX bytes with a graph; ModelInvalid saying why not."""
    import onnx

    try:
        model = onnx.load_model_from_string(bytes(data))
    except Exception as exc:
        raise ModelInvalid(
            f"the bytes are not an ONNX model (protobuf parse failed: {exc})"
        ) from None
    if not model.HasField("graph") or not model.graph.node:
        raise ModelInvalid("the ONNX model has no graph nodes; is this really an exported model?")
    return model


def check_model(data: bytes) -> ModelSignature:
    """Validate ONNX bytes and return the signature; raise ModelInvalid saying why not."""
    import onnx

    model = load_onnx(data)
    _check_external_data(model)
    _check_domains(model)
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ModelInvalid(f"onnx.checker rejected the model: {str(exc).strip()[:500]}") from None
    return read_signature(model)


def _messages(root) -> Iterator:
    """Every protobuf message inside `root`, itself included, found generically.

    Walking the message tree by descriptor, not by the fields we know of, means no
    tensor or node can hide where the checks do not look (a function's subgraph, a
    sparse tensor inside an attribute, training info, fields added by future opsets).
    """
    stack = [root]
    while stack:
        message = stack.pop()
        yield message
        for fd, value in message.ListFields():
            if fd.type != fd.TYPE_MESSAGE:
                continue
            if hasattr(value, "DESCRIPTOR"):  # one message
                stack.append(value)
            else:  # a repeated field of messages
                stack.extend(value)


def _of_type(model, full_name: str) -> Iterator:
    return (m for m in _messages(model) if m.DESCRIPTOR.full_name == full_name)


def _check_external_data(model) -> None:
    """No tensor anywhere may point at a file: it would be read from the server's disk."""
    import onnx

    for tensor in _of_type(model, "onnx.TensorProto"):
        if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.external_data:
            raise ModelInvalid(
                f"tensor '{tensor.name}' uses external data; re-export the model with all "
                "weights inline (onnx.save(..., save_as_external_data=False))"
            )


def _check_domains(model) -> None:
    """Standard operators only, anywhere in the model; no model-local functions.

    A local function may carry the name of a runtime's built-in operator (ONNX Runtime
    then runs its own kernel, not the function body), so functions are refused outright.
    """
    if model.functions:
        raise ModelInvalid(
            f"the model defines local functions ({model.functions[0].domain}:"
            f"{model.functions[0].name}, ...); export with functions inlined"
        )
    for node in _of_type(model, "onnx.NodeProto"):
        if node.domain not in ALLOWED_DOMAINS:
            raise ModelInvalid(
                f"node '{node.name or node.op_type}' uses operator domain '{node.domain}'; "
                f"only the standard domains are allowed ({', '.join(sorted(ALLOWED_DOMAINS))})"
            )


def read_signature(model) -> ModelSignature:
    initializers = {t.name for t in model.graph.initializer}
    inputs = tuple(_desc(v) for v in model.graph.input if v.name not in initializers)
    outputs = tuple(_desc(v) for v in model.graph.output)
    if len(inputs) > MAX_TENSORS or len(outputs) > MAX_TENSORS:
        raise ModelInvalid(f"a model may declare at most {MAX_TENSORS} inputs and outputs each")
    if not inputs:
        raise ModelInvalid("the model declares no inputs")
    if not outputs:
        raise ModelInvalid("the model declares no outputs")
    return ModelSignature(inputs, outputs)


def _desc(value) -> TensorDesc:
    if not 0 < len(value.name) <= MAX_NAME:
        raise ModelInvalid(f"tensor name {value.name[:40]!r}... must be 1-{MAX_NAME} characters")
    ttype = value.type.tensor_type if value.type.HasField("tensor_type") else None
    if ttype is None:
        raise ModelInvalid(f"'{value.name}' is not a tensor; only tensor inputs/outputs are served")
    dtype = _ELEM_TYPES.get(ttype.elem_type)
    if dtype is None:
        raise ModelInvalid(
            f"'{value.name}' has ONNX element type {ttype.elem_type}, which the wire protocol "
            f"cannot carry (allowed: {', '.join(sorted(set(_ELEM_TYPES.values())))})"
        )
    if not ttype.HasField("shape"):
        raise ModelInvalid(f"'{value.name}' has no declared shape; export with static rank")
    shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in ttype.shape.dim)
    if len(shape) > MAX_RANK:
        raise ModelInvalid(
            f"'{value.name}' has {len(shape)} dimensions; wire tensors have at most {MAX_RANK}"
        )
    if any(d < 0 and d != -1 for d in shape) or any(
        d.HasField("dim_value") and d.dim_value < 0 for d in ttype.shape.dim
    ):
        raise ModelInvalid(
            f"'{value.name}' declares shape {list(shape)}; a dimension must be a size or "
            "symbolic (dim_param), never negative"
        )
    return TensorDesc(value.name, dtype, shape)
