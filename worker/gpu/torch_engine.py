"""The GPU engine's core: an ONNX graph lowered to PyTorch ops, run over bound weights.

Why not ONNX Runtime's CUDA provider: the worker keeps weights in a device memory pool
and hands the engine torch views (DLPack) of the pool's pages; ONNX Runtime would copy
them into allocations of its own. `TorchModel` binds the views as they are, never
copying or re-allocating one, and runs on whatever device they live on (the CPU in
tests, CUDA on a GPU worker).

Lowering happens once, in `plan_model`, without torch (the plan lives in the host tier):

- Constants are the initializers and the Constant nodes. Those an op reads as values (a
  Reshape's shape, Clip's bounds, Slice's starts, Pad's pads, ...) become Python values
  in the plan: on a GPU, reading a device tensor's value would wait for the device.
  Every other constant is a weight, in `plan.weights`, bound by `TorchModel`.
- Shape arithmetic (Shape -> Gather -> Concat -> Reshape, as PyTorch exports
  `x.view(x.size(0), -1)`) runs in numpy on the host: folded at plan time where it is
  constant, else computed at run time from tensor shapes, which never waits for the
  device. An op whose value input (a Reshape's shape) comes from such arithmetic is
  lowered when each new value is first seen, and kept (a few per batch size).
- Every other node is one step: (callable, input slots, output slots) over a list of
  values, so `run` does no lookups by name and no parsing; a value is dropped after its
  last use, so a run holds no more activations than it needs.

A graph the engine cannot lower raises ModelInvalid naming what it lacks, and the
worker falls back to ONNX Runtime.

The operators live apart: torch_graph holds what they share with the lowering (`Node`,
`Op`, `Ctx`), torch_ops and torch_shape_ops the operators themselves and their table
(`OPS`). This module parses, lowers, binds and runs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from mtcore.errors import InputInvalid, ModelInvalid
from mtcore.modelcheck import load_onnx
from worker.gpu.torch_graph import DTYPES, Ctx, Node, Op
from worker.gpu.torch_ops import OPS

if TYPE_CHECKING:
    import torch

__all__ = ["TensorSpec", "TorchModel", "TorchPlan", "plan_model", "supported_ops"]

_STANDARD_DOMAINS = ("", "ai.onnx")
_LOWERED_PER_STEP = 64  # run-time lowerings kept per step (one per distinct shape value)
_SHAPES_KEPT = 64  # input shapes whose shape arithmetic a bound model keeps


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or a weight: what the caller must bind or feed."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]  # -1 for a dynamic dimension (inputs only)


@dataclass(eq=False)
class _Step:
    """One lowered node, as plain data (no torch): bound to a callable by TorchModel."""

    op: str  # key into OPS
    on_host: bool  # runs its numpy kernel (shape arithmetic), not its torch one
    params: dict[str, Any] | None  # the kernel's arguments; None: lowered at run time
    node: Node | None  # for run-time lowering: the node, with the statics known so far
    dynamic: tuple[int, ...]  # positions of static inputs that arrive at run time
    inputs: tuple[int, ...]  # slots: the dynamic statics first, then the data inputs
    outputs: tuple[int, ...]  # slots, one per output (several only for multi-output ops)


@dataclass(eq=False)  # compared by identity: it holds numpy arrays
class TorchPlan:
    """The lowered graph without its weights: kept in the host tier, bound per device."""

    inputs: list[TensorSpec]
    output_names: list[str]
    weights: list[TensorSpec]  # in the order plan_model returns the arrays
    batchable: bool  # every input has a dynamic leading dimension
    _steps: list[_Step] = field(default_factory=list, repr=False)
    _weight_slots: list[int] = field(default_factory=list, repr=False)
    _host_consts: dict[int, np.ndarray] = field(default_factory=dict, repr=False)
    _outputs: list[int] = field(default_factory=list, repr=False)
    _n_slots: int = 0


# -- parsing --------------------------------------------------------------------------------


def plan_model(data: bytes) -> tuple[TorchPlan, list[np.ndarray]]:
    """Parse ONNX bytes; return the plan and the weight arrays (in plan.weights order).

    The arrays may be read-only views of the parsed bytes: they are meant to be copied
    once, into the caller's pages. Raises ModelInvalid for bad bytes, inputs or weights
    of a dtype the engine does not take, or a graph it cannot lower (naming every
    unsupported operator).
    """
    model = _parse(data)
    graph = model.graph
    opset = _opset(model)
    _check_ops(graph)
    lowering = _Lowering(opset)
    initializers = lowering.add_initializers(graph)
    inputs = [_input_spec(v) for v in graph.input if v.name not in initializers]
    for i, spec in enumerate(inputs):
        lowering.slot[spec.name] = i
    lowering.n_slots = len(inputs)
    for proto in graph.node:
        lowering.add_node(proto)
    outputs = [lowering.device_slot(o.name, "the graph output") for o in graph.output]
    plan = TorchPlan(
        inputs=inputs,
        output_names=[o.name for o in graph.output],
        weights=lowering.weights,
        batchable=bool(inputs) and all(s.shape and s.shape[0] == -1 for s in inputs),
        _steps=lowering.steps,
        _weight_slots=lowering.weight_slots,
        _host_consts=lowering.host_consts,
        _outputs=outputs,
        _n_slots=lowering.n_slots,
    )
    return plan, lowering.arrays


def supported_ops() -> list[str]:
    """The ONNX operators (default domain) the engine lowers."""
    return sorted([*(op for op in OPS if not op.startswith("_")), "Constant"])


def _parse(data: bytes) -> onnx.ModelProto:
    model = load_onnx(data)
    if model.functions:
        raise ModelInvalid("the model defines local functions, which the GPU engine cannot run")
    if model.graph.sparse_initializer:
        raise ModelInvalid("the model has sparse initializers, which the GPU engine cannot run")
    return model


def _opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in _STANDARD_DOMAINS:
            return int(entry.version)
    raise ModelInvalid("the model imports no version of the standard ONNX operator set")


def _check_ops(graph: onnx.GraphProto) -> None:
    """Name every operator the engine lacks at once, so the log says all there is to do."""
    missing = set()
    for node in graph.node:
        standard = node.domain in _STANDARD_DOMAINS
        lowered = node.op_type in OPS and not node.op_type.startswith("_")
        if not standard or not (lowered or node.op_type == "Constant"):
            missing.add(node.op_type if standard else f"{node.domain}:{node.op_type}")
    if missing:
        raise ModelInvalid(
            "the model cannot be run by the GPU engine: unsupported operators "
            + ", ".join(sorted(missing))
        )


def _input_spec(value: onnx.ValueInfoProto) -> TensorSpec:
    ttype = value.type.tensor_type if value.type.HasField("tensor_type") else None
    if ttype is None or not ttype.HasField("shape"):
        raise ModelInvalid(f"input '{value.name}' is not a tensor of declared rank")
    dtype = DTYPES.get(ttype.elem_type)
    if dtype is None:
        raise ModelInvalid(
            f"input '{value.name}' has ONNX element type "
            f"{onnx.TensorProto.DataType.Name(ttype.elem_type)}, which the GPU engine does not take"
        )
    shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in ttype.shape.dim)
    return TensorSpec(value.name, dtype, shape)


def _attrs(proto: onnx.NodeProto) -> dict[str, Any]:
    out = {}
    for attr in proto.attribute:
        value = helper.get_attribute_value(attr)
        if isinstance(value, onnx.TensorProto):
            value = _array(value)
        elif isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        out[attr.name] = value
    return out


def _array(tensor: onnx.TensorProto) -> np.ndarray:
    """A tensor's values; never from an external file (that could be any path on disk)."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.external_data:
        raise ModelInvalid(f"tensor '{tensor.name}' uses external data; keep weights inline")
    try:
        return numpy_helper.to_array(tensor)
    except Exception as exc:
        raise ModelInvalid(f"tensor '{tensor.name}' cannot be read: {exc}") from None


def _constant(proto: onnx.NodeProto) -> np.ndarray:
    attrs = _attrs(proto)
    kinds = {
        "value": lambda v: v,
        "value_float": lambda v: np.array(v, np.float32),
        "value_floats": lambda v: np.array(v, np.float32),
        "value_int": lambda v: np.array(v, np.int64),
        "value_ints": lambda v: np.array(v, np.int64),
    }
    for key, convert in kinds.items():
        if key in attrs:
            return np.asarray(convert(attrs[key]))
    raise ModelInvalid(
        f"the model cannot be run by the GPU engine: Constant node '{proto.name}' "
        f"holds {', '.join(attrs) or 'nothing'}, not a numeric tensor"
    )


# -- lowering -------------------------------------------------------------------------------


class _Lowering:
    """Walks the graph once, in order, deciding where each value lives: a constant of the
    plan, a numpy value computed on the host at run time, or a tensor on the device."""

    def __init__(self, opset: int) -> None:
        self.opset = opset
        self.consts: dict[str, np.ndarray] = {}  # values known at plan time
        self.slot: dict[str, int] = {}  # run-time values (inputs, host and device)
        self.on_host: set[str] = set()  # run-time values that are numpy arrays
        self.weight_of: dict[str, int] = {}  # a constant -> the slot of its weight
        self.host_const_of: dict[str, int] = {}  # a constant -> its slot as a numpy array
        self.copy_of: dict[str, int] = {}  # a host value -> the slot of its device copy
        self.weights: list[TensorSpec] = []
        self.arrays: list[np.ndarray] = []
        self.weight_slots: list[int] = []
        self.host_consts: dict[int, np.ndarray] = {}
        self.steps: list[_Step] = []
        self.n_slots = 0
        self.none_slot = -1  # a slot that stays None: an absent input before a present one

    def new_slot(self) -> int:
        self.n_slots += 1
        return self.n_slots - 1

    def add_initializers(self, graph: onnx.GraphProto) -> set[str]:
        for tensor in graph.initializer:
            self.consts[tensor.name] = _array(tensor)
        return set(self.consts)

    def device_slot(self, name: str, user: str) -> int:
        """The slot of `name` as a tensor on the device (a weight for a constant)."""
        if name in self.consts:
            if name not in self.weight_of:
                self.weight_of[name] = self._add_weight(name, self.consts[name])
            return self.weight_of[name]
        if name in self.on_host:
            if name not in self.copy_of:
                slot = self.new_slot()
                self.steps.append(
                    _Step("_to_device", False, {}, None, (), (self.slot[name],), (slot,))
                )
                self.copy_of[name] = slot
            return self.copy_of[name]
        if name not in self.slot:
            raise ModelInvalid(f"{user} reads '{name}', which no node produces before it")
        return self.slot[name]

    def host_slot(self, name: str, user: str) -> int:
        """The slot of `name` as a numpy array (or, for Shape, whatever it is)."""
        if name in self.consts:
            if name not in self.host_const_of:
                slot = self.new_slot()
                self.host_consts[slot] = self.consts[name]
                self.host_const_of[name] = slot
            return self.host_const_of[name]
        if name not in self.slot:
            raise ModelInvalid(f"{user} reads '{name}', which no node produces before it")
        return self.slot[name]

    def _add_weight(self, name: str, array: np.ndarray) -> int:
        if array.dtype not in DTYPES.values():
            raise ModelInvalid(
                f"the model cannot be run by the GPU engine: weight '{name}' has dtype "
                f"{array.dtype}, which it does not take"
            )
        if not array.dtype.isnative:
            array = array.astype(array.dtype.newbyteorder("="))
        slot = self.new_slot()
        self.weights.append(TensorSpec(name, array.dtype, tuple(array.shape)))
        self.arrays.append(np.asarray(array, order="C"))  # keeps 0-d arrays 0-d
        self.weight_slots.append(slot)
        return slot

    def add_node(self, proto: onnx.NodeProto) -> None:
        """Fold the node (all inputs constant), or add its step on the host or the device."""
        if proto.op_type == "Constant":
            self.consts[proto.output[0]] = _constant(proto)
            return
        spec = OPS[proto.op_type]
        names = list(proto.input)
        node = Node(
            op=proto.op_type,
            name=proto.name or proto.output[0],
            opset=self.opset,
            attrs=_attrs(proto),
            consts={},
            n_outputs=len(proto.output),
        )
        self._check_outputs(spec, node, proto)
        static = self._static_positions(spec, names)
        dynamic = self._read_statics(node, names, static)
        last = max((i for i, n in enumerate(names) if n and i not in static), default=-1)
        data = [names[i] for i in range(last + 1) if i not in static]  # "": absent
        present = [n for n in data if n]
        if spec.host is not None and not dynamic and all(n in self.consts for n in present):
            self._fold(spec, node, proto, data)
            return
        on_host = spec.make is None or (
            spec.shape_op and all(n in self.consts or n in self.on_host for n in present)
        )
        self._step(spec, node, proto, names, dynamic, data, on_host)

    def _read_statics(self, node: Node, names: list[str], static: set[int]) -> list[int]:
        """Put the constant static inputs in `node.consts`; return the positions of those
        that shape arithmetic computes at run time."""
        dynamic = []
        for i in sorted(static):
            name = names[i] if i < len(names) else ""
            if not name:
                continue
            if name in self.consts:
                node.consts[i] = self.consts[name]
            elif name in self.on_host:
                dynamic.append(i)
            elif name not in self.slot:
                raise node.refuse(f"reads '{name}', which no node produces before it")
            else:
                raise node.refuse(
                    f"reads input {i} ('{name}') as a value, but it is a tensor on the device;"
                    " only constants and shape arithmetic can be read without waiting for it"
                )
        return dynamic

    def _static_positions(self, spec: Op, names: list[str]) -> set[int]:
        static = set(spec.static) if self.opset >= spec.static_since else set()
        for i in spec.scalar_static:
            value = self.consts.get(names[i]) if i < len(names) else None
            if value is not None and value.ndim == 0:
                static.add(i)
        return static

    def _check_outputs(self, spec: Op, node: Node, proto: onnx.NodeProto) -> None:
        if spec.multi:
            return
        for i, name in enumerate(proto.output[1:], 1):
            if name:
                raise node.refuse(f"has output {i} ('{name}'), which the GPU engine does not make")

    def _fold(self, spec: Op, node: Node, proto: onnx.NodeProto, data_names: list[str]) -> None:
        """Every input is a constant: compute the outputs now, in numpy."""
        kernel = _host_kernel(spec, spec.plan(node))
        try:
            result = kernel(*[self.consts[n] if n else None for n in data_names])
        except Exception as exc:
            raise node.refuse(f"fails on its constant inputs: {str(exc)[:200]}") from None
        for name, value in zip(proto.output, result if spec.multi else (result,), strict=False):
            if name:
                self.consts[name] = value

    def _step(
        self,
        spec: Op,
        node: Node,
        proto: onnx.NodeProto,
        names: list[str],
        dynamic: list[int],
        data_names: list[str],
        on_host: bool,
    ) -> None:
        user = f"{proto.op_type} node '{node.name}'"
        inputs = [self.host_slot(names[i], user) for i in dynamic]
        for name in data_names:
            if not name:
                inputs.append(self._none())
            elif on_host:
                inputs.append(self.host_slot(name, user))
            else:
                inputs.append(self.device_slot(name, user))
        outputs = []
        for name in proto.output if spec.multi else proto.output[:1]:
            outputs.append(self.new_slot())
            if name:
                self.slot[name] = outputs[-1]
                if on_host:
                    self.on_host.add(name)
        params = None if dynamic else spec.plan(node)
        self.steps.append(
            _Step(
                proto.op_type,
                on_host,
                params,
                node if dynamic else None,
                tuple(dynamic),
                tuple(inputs),
                tuple(outputs),
            )
        )

    def _none(self) -> int:
        if self.none_slot < 0:
            self.none_slot = self.new_slot()
        return self.none_slot


def _frees(steps: list[_Step], keep: set[int]) -> list[tuple[int, ...]]:
    """For each step, the slots to drop after it: those it uses last (`keep` excepted)."""
    last: dict[int, int] = {}
    for index, step in enumerate(steps):
        for slot in (*step.inputs, *step.outputs):
            last[slot] = index
    frees: list[list[int]] = [[] for _ in steps]
    for slot, index in last.items():
        if slot not in keep:
            frees[index].append(slot)
    return [tuple(f) for f in frees]


def _host_kernel(spec: Op, params: dict[str, Any]) -> Callable:
    """The numpy kernel, with results always arrays (numpy ops may give scalars)."""
    assert spec.host is not None
    fn = spec.host(**params)
    if spec.multi:
        return lambda *xs: tuple(np.asarray(r) for r in fn(*xs))
    return lambda *xs: np.asarray(fn(*xs))


# -- binding and running --------------------------------------------------------------------


class TorchModel:
    """A plan bound to weight tensors on one device: ready to run.

    Shape arithmetic depends on the input shapes alone (no lowered op makes a shape
    from tensor values), so its results are kept per input shapes: a run with shapes
    seen before starts from them and runs the device steps only.
    """

    def __init__(
        self, plan: TorchPlan, weights: Sequence[torch.Tensor], *, device: Any = None
    ) -> None:
        """Binds the plan to weight tensors (views; never copied). ModelInvalid if a
        tensor's dtype or shape disagrees with plan.weights, or they span devices.
        `device` is only needed for a plan without weights (default: the CPU)."""
        import torch

        self.plan = plan
        self.device: torch.device = _check_weights(plan, weights, device)
        self.weights = tuple(weights)  # the bound tensors, exactly as given
        self._inference_mode = torch.inference_mode
        template: list[Any] = [None] * plan._n_slots
        for slot, tensor in zip(plan._weight_slots, weights, strict=True):
            template[slot] = tensor
        for slot, array in plan._host_consts.items():
            template[slot] = array
        self._template = template  # each run's values start as a copy of it
        self._n_inputs = len(plan.inputs)
        self._outputs = plan._outputs
        ctx = Ctx(torch, torch.nn.functional, self.device)
        kernels = [_bind(step, ctx) for step in plan._steps]
        on_device = [i for i, step in enumerate(plan._steps) if not step.on_host]
        made_on_host = {slot for step in plan._steps if step.on_host for slot in step.outputs}
        # host values the device steps read: kept per input shapes
        self._shared = sorted(
            made_on_host & {slot for i in on_device for slot in plan._steps[i].inputs}
        )
        self._all = _program(plan._steps, kernels, set(self._outputs) | set(self._shared))
        device_steps = [plan._steps[i] for i in on_device]
        self._device_only = _program(
            device_steps, [kernels[i] for i in on_device], set(self._outputs)
        )
        self._by_shapes: dict[tuple, list[tuple[int, Any]]] = {}  # input shapes -> shared

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Run under torch.inference_mode(); inputs in plan.inputs order (on self.device),
        outputs in plan.output_names order, contiguous."""
        if len(inputs) != self._n_inputs:
            raise InputInvalid(f"the model takes {self._n_inputs} inputs; got {len(inputs)}")
        values = self._template.copy()
        values[: self._n_inputs] = inputs
        key = tuple(x.shape for x in inputs) if self._shared else ()
        known = self._by_shapes.get(key)
        with self._inference_mode():
            if known is None:
                _execute(self._all, values)
                if len(self._by_shapes) >= _SHAPES_KEPT:
                    self._by_shapes.clear()
                self._by_shapes[key] = [(slot, values[slot]) for slot in self._shared]
            else:
                for slot, value in known:
                    values[slot] = value
                _execute(self._device_only, values)
            return [values[i].contiguous() for i in self._outputs]


_Program = list[tuple[Callable, tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


def _program(steps: list[_Step], kernels: list[Callable], keep: set[int]) -> _Program:
    """(kernel, input slots, output slots, slots to drop after) per step."""
    frees = _frees(steps, keep)
    return [(k, s.inputs, s.outputs, f) for k, s, f in zip(kernels, steps, frees, strict=True)]


def _execute(program: _Program, values: list[Any]) -> None:
    for fn, ins, outs, frees in program:
        result = fn(*[values[i] for i in ins])
        if len(outs) == 1:
            values[outs[0]] = result
        else:
            for slot, value in zip(outs, result, strict=False):
                values[slot] = value
        for slot in frees:
            values[slot] = None


def _check_weights(plan: TorchPlan, weights: Sequence[Any], device: Any) -> Any:
    import torch

    if len(weights) != len(plan.weights):
        raise ModelInvalid(f"the plan binds {len(plan.weights)} weights; got {len(weights)}")
    devices = {t.device for t in weights}
    if len(devices) > 1:
        raise ModelInvalid(f"the weights lie on several devices: {sorted(map(str, devices))}")
    for spec, tensor in zip(plan.weights, weights, strict=True):
        want = getattr(torch, spec.dtype.name)
        if tensor.dtype != want or tuple(tensor.shape) != spec.shape:
            raise ModelInvalid(
                f"weight '{spec.name}' must be {spec.dtype.name} {list(spec.shape)}; "
                f"got {str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)}"
            )
    if devices:
        (found,) = devices
        if device is not None and torch.device(device) != found:
            raise ModelInvalid(f"the weights lie on {found}, not on {device}")
        return found
    return torch.device(device if device is not None else "cpu")


def _bind(step: _Step, ctx: Ctx) -> Callable:
    spec = OPS[step.op]
    if step.on_host:
        build: Callable[[dict[str, Any]], Callable] = functools.partial(_host_kernel, spec)
    else:
        assert spec.make is not None
        build = functools.partial(_make_device, spec.make, ctx)
    if step.params is not None:
        return build(step.params)
    assert step.node is not None
    return _LateLowered(spec, step.node, step.dynamic, build)


def _make_device(make: Callable[..., Callable], ctx: Ctx, params: dict[str, Any]) -> Callable:
    return make(ctx, **params)


class _LateLowered:
    """A step whose static inputs (a Reshape's shape from Shape -> Concat) arrive at run
    time as numpy arrays: lowered on the first sight of each value, then kept."""

    def __init__(
        self,
        spec: Op,
        node: Node,
        positions: tuple[int, ...],
        build: Callable[[dict[str, Any]], Callable],
    ) -> None:
        self._spec = spec
        self._node = node
        self._positions = positions
        self._n = len(positions)
        self._build = build
        self._kernels: dict[tuple, Callable] = {}

    def __call__(self, *args: Any) -> Any:
        statics = args[: self._n]
        key = tuple((a.dtype.str, a.shape, a.tobytes()) for a in statics)
        kernel = self._kernels.get(key)
        if kernel is None:
            consts = {**self._node.consts, **dict(zip(self._positions, statics, strict=True))}
            kernel = self._build(self._spec.plan(replace(self._node, consts=consts)))
            if len(self._kernels) >= _LOWERED_PER_STEP:
                self._kernels.clear()
            self._kernels[key] = kernel
        return kernel(*args[self._n :])
