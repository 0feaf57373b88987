"""What the lowering (torch_engine) and the operators (torch_ops, torch_shape_ops) share.

An ONNX operator lowers as an `Op`: at plan time, without torch, `plan` turns a `Node`
(the node's attributes and constant inputs) into plain keyword arguments; when a plan is
bound to a device, `make(ctx, **params)` builds the torch kernel, torch and the device
coming in the `Ctx` (so none of these modules imports torch); `host(**params)` builds the numpy
twin that runs shape arithmetic on the host. Also here: the ONNX element types the engine
takes, and the axis and padding helpers both operator modules use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from mtcore.errors import ModelInvalid

# ONNX element types the engine takes (inputs, weights, Cast targets), as numpy dtypes:
# the wire protocol's types, all of which torch has. The rest are left to ONNX Runtime.
DTYPES: dict[int, np.dtype] = {
    onnx.TensorProto.FLOAT: np.dtype(np.float32),
    onnx.TensorProto.UINT8: np.dtype(np.uint8),
    onnx.TensorProto.INT8: np.dtype(np.int8),
    onnx.TensorProto.INT16: np.dtype(np.int16),
    onnx.TensorProto.INT32: np.dtype(np.int32),
    onnx.TensorProto.INT64: np.dtype(np.int64),
    onnx.TensorProto.BOOL: np.dtype(np.bool_),
    onnx.TensorProto.FLOAT16: np.dtype(np.float16),
    onnx.TensorProto.DOUBLE: np.dtype(np.float64),
}


@dataclass(frozen=True)
class Node:
    """One ONNX node as an op's planner sees it: attributes and static input values."""

    op: str
    name: str
    opset: int
    attrs: dict[str, Any]
    consts: dict[int, np.ndarray]  # static inputs by position; absent ones are missing
    n_outputs: int  # output positions, named or not (Split needs it)

    def attr(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)

    def refuse(self, why: str) -> ModelInvalid:
        return ModelInvalid(
            f"the model cannot be run by the GPU engine: {self.op} node '{self.name}' {why}"
        )

    def ints(self, pos: int) -> tuple[int, ...] | None:
        value = self.consts.get(pos)
        return None if value is None else tuple(int(v) for v in value.reshape(-1))

    def scalar(self, pos: int) -> Any:
        """A static input as a Python number (None when absent)."""
        value = self.consts.get(pos)
        if value is None:
            return None
        if value.size != 1:
            raise self.refuse(f"needs a single value at input {pos}, not shape {value.shape}")
        return value.reshape(-1)[0].item()


@dataclass(frozen=True)
class Ctx:
    """What a torch kernel factory gets: the modules and the device (for new tensors)."""

    torch: Any
    F: Any
    device: Any


@dataclass(frozen=True)
class Op:
    """How one ONNX operator lowers."""

    make: Callable[..., Callable] | None  # torch kernel: make(ctx, **params); None: host only
    plan: Callable[[Node], dict[str, Any]] = lambda node: {}
    static: tuple[int, ...] = ()  # input positions read as values, not as tensors
    static_since: int = 1  # the opset from which those are inputs (before: attributes)
    host: Callable[..., Callable] | None = None  # numpy kernel: host(**params)
    shape_op: bool = False  # may run on the host at run time (shape arithmetic)
    multi: bool = False  # returns a tuple, one value per output position
    scalar_static: tuple[int, ...] = ()  # read as a value when a constant scalar (Gather)


# -- shared helpers -------------------------------------------------------------------------


def norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def to_torch_pads(begins: Sequence[int], ends: Sequence[int]) -> tuple[int, ...]:
    """ONNX's [b1, b2, ..., e1, e2, ...] as F.pad's (last dim first) pairs."""
    out: list[int] = []
    for b, e in zip(reversed(begins), reversed(ends), strict=True):
        out += [b, e]
    return tuple(out)
