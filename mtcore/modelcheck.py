"""Checks that uploaded bytes are an acceptable ONNX model, and reads its signature.

Uploaded models are untrusted: they must parse, pass `onnx.checker`, keep every weight
inline (an external-data path could point anywhere on the broker's disk), use only the
standard operator domains, and declare inputs and outputs whose dtypes can travel on
the wire. Server side only: imports `onnx`, which the client does not need.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from mtcore.errors import ModelInvalid
from mtcore.protocol import DEFAULT_LIMITS, TensorDesc

MAX_RANK = DEFAULT_LIMITS.max_rank

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


def check_model(data: bytes) -> ModelSignature:
    """Validate ONNX bytes and return the signature; raise ModelInvalid saying why not."""
    import onnx

    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:
        raise ModelInvalid(
            f"the bytes are not an ONNX model (protobuf parse failed: {exc})"
        ) from None
    if not model.HasField("graph") or not model.graph.node:
        raise ModelInvalid("the ONNX model has no graph nodes; is this really an exported model?")
    _check_external_data(model)
    _check_domains(model)
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ModelInvalid(f"onnx.checker rejected the model: {str(exc).strip()[:500]}") from None
    return read_signature(model)


def _graphs(model) -> Iterator:
    """The main graph, every subgraph nested in node attributes, and local functions."""
    stack = [model.graph]
    while stack:
        graph = stack.pop()
        yield graph
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("g"):
                    stack.append(attr.g)
                stack.extend(attr.graphs)
    yield from model.functions  # FunctionProto has .node like a graph (no subgraph weights)


def _tensors(model) -> Iterator:
    """Every tensor stored in the model: initializers, sparse ones, node attributes."""
    for graph in _graphs(model):
        yield from getattr(graph, "initializer", ())
        for sparse in getattr(graph, "sparse_initializer", ()):
            yield sparse.values
            yield sparse.indices
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("sparse_tensor"):
                    yield attr.sparse_tensor.values
                    yield attr.sparse_tensor.indices
                for sparse in attr.sparse_tensors:
                    yield sparse.values
                    yield sparse.indices


def _check_external_data(model) -> None:
    """No tensor anywhere may point at a file: it would be read from the server's disk."""
    import onnx

    for tensor in _tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.external_data:
            raise ModelInvalid(
                f"tensor '{tensor.name}' uses external data; re-export the model with all "
                "weights inline (onnx.save(..., save_as_external_data=False))"
            )


def _check_domains(model) -> None:
    """Standard operators only, in subgraphs and functions too (no contrib or custom ops)."""
    local = {(f.domain, f.name) for f in model.functions}
    for graph in _graphs(model):
        for node in graph.node:
            if node.domain in ALLOWED_DOMAINS or (node.domain, node.op_type) in local:
                continue
            raise ModelInvalid(
                f"node '{node.name or node.op_type}' uses operator domain '{node.domain}'; "
                f"only the standard domains are allowed ({', '.join(sorted(ALLOWED_DOMAINS))})"
            )


def read_signature(model) -> ModelSignature:
    initializers = {t.name for t in model.graph.initializer}
    inputs = tuple(_desc(v) for v in model.graph.input if v.name not in initializers)
    outputs = tuple(_desc(v) for v in model.graph.output)
    if not inputs:
        raise ModelInvalid("the model declares no inputs")
    if not outputs:
        raise ModelInvalid("the model declares no outputs")
    return ModelSignature(inputs, outputs)


def _desc(value) -> TensorDesc:
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
