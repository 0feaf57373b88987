"""The shape, indexing and reduction operators (see torch_graph.Op), as the table entries
that torch_ops.OPS takes in.

Most have a numpy twin (`host`): PyTorch exports `x.view(x.size(0), -1)` as Shape ->
Gather -> Concat -> Reshape, arithmetic the engine folds at plan time or runs on the host
at run time, never waiting for the device.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from worker.gpu.torch_graph import DTYPES, Ctx, Node, Op, norm_axis, to_torch_pads

_BIG = 2**62  # Slice bounds are clamped to this: INT64_MAX means "to the end"


# -- helpers --------------------------------------------------------------------------------


def _reshape_dims(shape: Sequence[int], target: Sequence[int], allowzero: bool) -> tuple:
    if allowzero:
        return tuple(target)
    return tuple(shape[i] if d == 0 else d for i, d in enumerate(target))


def _static_or_attr(node: Node, pos: int, attr: str, since: int) -> tuple[int, ...] | None:
    """An int list that opsets before `since` gave as an attribute, later as an input."""
    if node.opset < since:
        value = node.attr(attr)
        return None if value is None else tuple(int(v) for v in value)
    return node.ints(pos)


# -- operators: shapes and indexing ----------------------------------------------------------


def _plan_axis(default: int) -> Callable[[Node], dict[str, Any]]:
    return lambda node: {"axis": int(node.attr("axis", default))}


def _make_flatten(ctx: Ctx, *, axis: int) -> Callable:
    def flatten(x: Any) -> Any:
        a = norm_axis(axis, x.dim())
        return x.reshape(math.prod(x.shape[:a]), math.prod(x.shape[a:]))

    return flatten


def _plan_reshape(node: Node) -> dict[str, Any]:
    shape = node.ints(1) if node.opset >= 5 else tuple(node.attr("shape") or ())
    if shape is None:
        raise node.refuse("has no shape")
    return {"shape": shape, "allowzero": bool(node.attr("allowzero", 0))}


def _make_reshape(ctx: Ctx, *, shape: tuple, allowzero: bool) -> Callable:
    if allowzero or 0 not in shape:
        return lambda x: x.reshape(shape)
    return lambda x: x.reshape(_reshape_dims(x.shape, shape, allowzero))


def _host_reshape(*, shape: tuple, allowzero: bool) -> Callable:
    return lambda x: x.reshape(_reshape_dims(x.shape, shape, allowzero))


def _plan_transpose(node: Node) -> dict[str, Any]:
    perm = node.attr("perm")
    return {"perm": None if perm is None else tuple(int(p) for p in perm)}


def _make_transpose(ctx: Ctx, *, perm: tuple | None) -> Callable:
    if perm is None:
        return lambda x: x.permute(*reversed(range(x.dim())))
    return lambda x: x.permute(perm)


def _host_transpose(*, perm: tuple | None) -> Callable:
    return lambda x: np.transpose(x, perm)


def _make_concat(ctx: Ctx, *, axis: int) -> Callable:
    cat = ctx.torch.cat
    return lambda *xs: cat(xs, axis)


def _host_concat(*, axis: int) -> Callable:
    return lambda *xs: np.concatenate(xs, axis)


def _plan_axes(pos: int, since: int) -> Callable[[Node], dict[str, Any]]:
    return lambda node: {"axes": _static_or_attr(node, pos, "axes", since)}


def _make_squeeze(ctx: Ctx, *, axes: tuple | None) -> Callable:
    if not axes:
        return lambda x: x.squeeze()
    return lambda x: x.squeeze(axes)


def _host_squeeze(*, axes: tuple | None) -> Callable:
    return lambda x: np.squeeze(x, axis=axes or None)


def _plan_unsqueeze(node: Node) -> dict[str, Any]:
    axes = _static_or_attr(node, 1, "axes", 13)
    if not axes:
        raise node.refuse("has no axes")
    return {"axes": axes}


def _make_unsqueeze(ctx: Ctx, *, axes: tuple) -> Callable:
    def unsqueeze(x: Any) -> Any:
        rank = x.dim() + len(axes)
        for a in sorted(norm_axis(a, rank) for a in axes):
            x = x.unsqueeze(a)
        return x

    return unsqueeze


def _host_unsqueeze(*, axes: tuple) -> Callable:
    return lambda x: np.expand_dims(x, axes)


def _plan_slice(node: Node) -> dict[str, Any]:
    if node.opset < 10:
        starts, ends = tuple(node.attr("starts") or ()), tuple(node.attr("ends") or ())
        axes, steps = node.attr("axes"), None
    else:
        starts, ends, axes, steps = node.ints(1), node.ints(2), node.ints(3), node.ints(4)
    if starts is None or ends is None or len(starts) != len(ends):
        raise node.refuse("has no matching starts and ends")
    axes = tuple(axes) if axes is not None else tuple(range(len(starts)))
    steps = steps if steps is not None else (1,) * len(starts)
    if any(s <= 0 for s in steps):
        raise node.refuse(f"has steps {list(steps)}; only positive steps are lowered")
    clamp = functools.partial(min, _BIG)
    items = tuple(
        (int(a), max(clamp(s), -_BIG), max(clamp(e), -_BIG), int(st))
        for a, s, e, st in zip(axes, starts, ends, steps, strict=True)
    )
    return {"items": items}


def _slicer(items: tuple) -> Callable:
    def sliced(x: Any) -> Any:
        index = [slice(None)] * x.ndim
        for axis, start, end, step in items:
            index[norm_axis(axis, x.ndim)] = slice(start, end, step)
        return x[tuple(index)]

    return sliced


def _make_slice(ctx: Ctx, *, items: tuple) -> Callable:
    return _slicer(items)


def _host_slice(*, items: tuple) -> Callable:
    return _slicer(items)


def _plan_gather(node: Node) -> dict[str, Any]:
    return {"axis": int(node.attr("axis", 0)), "index": node.scalar(1)}


def _make_gather(ctx: Ctx, *, axis: int, index: int | None) -> Callable:
    torch = ctx.torch
    if index is not None:  # a constant scalar: a view, no index tensor
        return lambda x: x.select(axis, index)

    def gather(x: Any, indices: Any) -> Any:
        a = norm_axis(axis, x.dim())
        indices = torch.where(indices < 0, indices + x.shape[a], indices)
        picked = x.index_select(a, indices.reshape(-1))
        return picked.reshape(*x.shape[:a], *indices.shape, *x.shape[a + 1 :])

    return gather


def _host_gather(*, axis: int, index: int | None) -> Callable:
    if index is not None:
        return lambda x: np.take(x, index, axis=axis)
    return lambda x, indices: np.take(x, indices, axis=axis)


def _plan_shape(node: Node) -> dict[str, Any]:
    return {"start": int(node.attr("start", 0)), "end": node.attr("end")}


def _host_shape(*, start: int, end: int | None) -> Callable:
    return lambda x: np.array(tuple(x.shape)[start:end], dtype=np.int64)


def _plan_split(node: Node) -> dict[str, Any]:
    sizes = _static_or_attr(node, 1, "split", 13)
    return {"axis": int(node.attr("axis", 0)), "sizes": sizes, "parts": node.n_outputs}


def _make_split(ctx: Ctx, *, axis: int, sizes: tuple | None, parts: int) -> Callable:
    split = ctx.torch.split
    if sizes:
        return lambda x: split(x, list(sizes), axis)
    return lambda x: split(x, math.ceil(x.shape[axis] / parts), axis)


def _plan_pad(node: Node) -> dict[str, Any]:
    mode = node.attr("mode", "constant")
    modes = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}
    if mode not in modes:
        raise node.refuse(f"has mode {mode!r}")
    if node.opset < 11:
        pads, value, axes = tuple(node.attr("pads") or ()), node.attr("value", 0.0), None
    else:
        pads, value, axes = node.ints(1), node.scalar(2), node.ints(3)
    if pads is None or len(pads) % 2:
        raise node.refuse("has no pads of even length")
    return {"pads": pads, "value": value or 0, "axes": axes, "mode": modes[mode]}


def _make_pad(ctx: Ctx, *, pads: tuple, value: Any, axes: tuple | None, mode: str) -> Callable:
    F = ctx.F
    half = len(pads) // 2

    def pad(x: Any) -> Any:
        begins, ends = [0] * x.dim(), [0] * x.dim()
        for i, a in enumerate(axes if axes is not None else range(half)):
            begins[norm_axis(a, x.dim())], ends[norm_axis(a, x.dim())] = pads[i], pads[i + half]
        torch_pads = list(to_torch_pads(begins, ends))
        while torch_pads[-2:] == [0, 0] and len(torch_pads) > 2:  # F.pad pads the last dims
            del torch_pads[-2:]
        if mode == "constant":
            return F.pad(x, torch_pads, value=value)
        return F.pad(x, torch_pads, mode=mode)

    return pad


def _plan_expand(node: Node) -> dict[str, Any]:
    shape = node.ints(1)
    if shape is None:
        raise node.refuse("has no shape")
    return {"shape": shape}


def _make_expand(ctx: Ctx, *, shape: tuple) -> Callable:
    broadcast = ctx.torch.broadcast_shapes
    return lambda x: x.expand(broadcast(x.shape, shape))


def _host_expand(*, shape: tuple) -> Callable:
    return lambda x: np.broadcast_to(x, np.broadcast_shapes(x.shape, shape)).copy()


def _plan_tile(node: Node) -> dict[str, Any]:
    repeats = node.ints(1)
    if repeats is None:
        raise node.refuse("has no repeats")
    return {"repeats": repeats}


def _make_tile(ctx: Ctx, *, repeats: tuple) -> Callable:
    return lambda x: x.repeat(repeats)


def _host_tile(*, repeats: tuple) -> Callable:
    return lambda x: np.tile(x, repeats)


def _plan_constant_of_shape(node: Node) -> dict[str, Any]:
    value = node.attr("value")
    value = np.zeros(1, np.float32) if value is None else np.asarray(value)
    if value.dtype not in DTYPES.values() or value.size != 1:
        raise node.refuse("has a value that is not one number of a type it takes")
    shape = node.ints(0)
    return {"shape": shape or (), "value": value.reshape(-1)[0].item(), "dtype": value.dtype.name}


def _make_constant_of_shape(ctx: Ctx, *, shape: tuple, value: Any, dtype: str) -> Callable:
    torch, device = ctx.torch, ctx.device
    return lambda: torch.full(shape, value, dtype=getattr(torch, dtype), device=device)


def _host_constant_of_shape(*, shape: tuple, value: Any, dtype: str) -> Callable:
    return lambda: np.full(shape, value, dtype=dtype)


def _plan_range(node: Node) -> dict[str, Any]:
    if any(i not in node.consts for i in range(3)):
        raise node.refuse("lacks start, limit or delta")
    return {
        "start": node.scalar(0),
        "limit": node.scalar(1),
        "delta": node.scalar(2),
        "dtype": node.consts[0].dtype.name,
    }


def _make_range(ctx: Ctx, *, start: Any, limit: Any, delta: Any, dtype: str) -> Callable:
    torch, device = ctx.torch, ctx.device
    return lambda: torch.arange(start, limit, delta, dtype=getattr(torch, dtype), device=device)


def _host_range(*, start: Any, limit: Any, delta: Any, dtype: str) -> Callable:
    return lambda: np.arange(start, limit, delta, dtype=dtype)


def _plan_resize(node: Node) -> dict[str, Any]:
    if node.opset < 11:
        raise node.refuse("is from before opset 11")
    unsupported = {"antialias": 0, "exclude_outside": 0, "axes": None,
                   "keep_aspect_ratio_policy": "stretch"}  # fmt: skip
    for attr, default in unsupported.items():
        if node.attr(attr, default) != default:
            raise node.refuse(f"sets {attr}")
    scales, sizes = node.consts.get(2), node.consts.get(3)
    scales = tuple(float(v) for v in scales.reshape(-1)) if scales is not None else ()
    sizes = tuple(int(v) for v in sizes.reshape(-1)) if sizes is not None else ()
    if bool(scales) == bool(sizes) or len(scales or sizes) < 3:
        raise node.refuse("needs scales or sizes for a batch, a channel and spatial dims")
    if scales and scales[:2] != (1.0, 1.0):
        raise node.refuse(f"scales the batch or channel dimension: {list(scales)}")
    mode, align_corners = _resize_mode(node, scales[2:])
    return {"mode": mode, "align_corners": align_corners, "scales": scales[2:] or None,
            "sizes": sizes[2:] or None}  # fmt: skip


def _resize_mode(node: Node, scales: tuple[float, ...]) -> tuple[str, bool | None]:
    """ONNX's (mode, coordinate transformation, rounding) as F.interpolate's mode."""
    mode = node.attr("mode", "nearest")
    coords = node.attr("coordinate_transformation_mode", "half_pixel")
    rounding = node.attr("nearest_mode", "round_prefer_floor")
    half = coords in ("half_pixel", "pytorch_half_pixel")
    if mode == "nearest":
        if coords == "asymmetric" and rounding == "floor":
            return "nearest", None
        # Half-pixel centres never tie when upscaling by whole numbers, so either rounding.
        whole = bool(scales) and all(s >= 1 and s == int(s) for s in scales)
        if half and (rounding == "round_prefer_ceil" or whole):
            return "nearest-exact", None
    elif mode in ("linear", "cubic") and (half or coords == "align_corners"):
        if mode == "cubic" and float(node.attr("cubic_coeff_a", -0.75)) != -0.75:
            raise node.refuse("has a cubic_coeff_a other than torch's -0.75")
        return mode, coords == "align_corners"
    how = f"{coords}, {rounding}" if mode == "nearest" else coords
    raise node.refuse(f"has mode {mode!r} ({how}), which F.interpolate lacks")


def _make_resize(
    ctx: Ctx, *, mode: str, align_corners: bool | None, scales: tuple | None, sizes: tuple | None
) -> Callable:
    interpolate = ctx.F.interpolate
    names = {"linear": {3: "linear", 4: "bilinear", 5: "trilinear"}, "cubic": {4: "bicubic"}}

    def resize(x: Any) -> Any:
        how = names[mode][x.dim()] if mode in names else mode
        if sizes is not None:
            return interpolate(x, size=sizes, mode=how, align_corners=align_corners)
        return interpolate(x, scale_factor=scales, mode=how, align_corners=align_corners,
                           recompute_scale_factor=False)  # fmt: skip

    return resize


# -- operators: reductions -------------------------------------------------------------------


def _plan_reduce(fn: str, since: int) -> Callable[[Node], dict[str, Any]]:
    def plan(node: Node) -> dict[str, Any]:
        return {
            "fn": fn,
            "axes": _static_or_attr(node, 1, "axes", since),
            "keep": bool(node.attr("keepdims", 1)),
            "noop": bool(node.attr("noop_with_empty_axes", 0)),
        }

    return plan


def _make_reduce(ctx: Ctx, *, fn: str, axes: tuple | None, keep: bool, noop: bool) -> Callable:
    f = getattr(ctx.torch, fn)
    if not axes and noop:
        return lambda x: x
    if axes:
        return lambda x: f(x, dim=axes, keepdim=keep)
    return lambda x: f(x, dim=tuple(range(x.dim())), keepdim=keep)


def _plan_arg(node: Node) -> dict[str, Any]:
    if node.attr("select_last_index", 0):
        raise node.refuse("has select_last_index 1")
    return {"axis": int(node.attr("axis", 0)), "keep": bool(node.attr("keepdims", 1))}


def _arg_maker(fn: str) -> Callable[..., Callable]:
    def make(ctx: Ctx, *, axis: int, keep: bool) -> Callable:
        f = getattr(ctx.torch, fn)
        return lambda x: f(x, dim=axis, keepdim=keep)

    return make


# -- the table ------------------------------------------------------------------------------


def shape_table() -> dict[str, Op]:
    return {
        # shapes and indexing
        "Flatten": Op(_make_flatten, _plan_axis(1)),
        "Reshape": Op(_make_reshape, _plan_reshape, static=(1,), host=_host_reshape, shape_op=True),
        "Transpose": Op(_make_transpose, _plan_transpose, host=_host_transpose, shape_op=True),
        "Concat": Op(_make_concat, _plan_axis(0), host=_host_concat, shape_op=True),
        "Squeeze": Op(
            _make_squeeze,
            _plan_axes(1, 13),
            static=(1,),
            static_since=13,
            host=_host_squeeze,
            shape_op=True,
        ),
        "Unsqueeze": Op(
            _make_unsqueeze,
            _plan_unsqueeze,
            static=(1,),
            static_since=13,
            host=_host_unsqueeze,
            shape_op=True,
        ),
        "Slice": Op(
            _make_slice,
            _plan_slice,
            static=(1, 2, 3, 4),
            static_since=10,
            host=_host_slice,
            shape_op=True,
        ),
        "Gather": Op(
            _make_gather, _plan_gather, host=_host_gather, shape_op=True, scalar_static=(1,)
        ),
        "Shape": Op(None, _plan_shape, host=_host_shape),
        "Split": Op(_make_split, _plan_split, static=(1,), static_since=13, multi=True),
        "Pad": Op(_make_pad, _plan_pad, static=(1, 2, 3), static_since=11),
        "Expand": Op(_make_expand, _plan_expand, static=(1,), host=_host_expand),
        "Tile": Op(_make_tile, _plan_tile, static=(1,), host=_host_tile),
        "ConstantOfShape": Op(
            _make_constant_of_shape,
            _plan_constant_of_shape,
            static=(0,),
            host=_host_constant_of_shape,
        ),
        "Range": Op(_make_range, _plan_range, static=(0, 1, 2), host=_host_range),
        "Resize": Op(_make_resize, _plan_resize, static=(1, 2, 3)),
        # reductions
        "ReduceMean": Op(_make_reduce, _plan_reduce("mean", 18), static=(1,), static_since=18),
        "ReduceSum": Op(_make_reduce, _plan_reduce("sum", 13), static=(1,), static_since=13),
        "ReduceMax": Op(_make_reduce, _plan_reduce("amax", 18), static=(1,), static_since=18),
        "ReduceMin": Op(_make_reduce, _plan_reduce("amin", 18), static=(1,), static_since=18),
        "ArgMax": Op(_arg_maker("argmax"), _plan_arg),
        "ArgMin": Op(_arg_maker("argmin"), _plan_arg),
    }
