"""The compute operators, and the table of every operator the engine lowers (`OPS`).

Here: elementwise; convolution, pooling, normalization; linear algebra. Shapes, indexing
and reductions are in torch_shape_ops, whose entries `OPS` takes in. Each operator is a
`plan` (plan time, no torch), a `make` (the torch kernel, when a plan is bound) and, for
those shape arithmetic uses, a numpy `host` twin: see torch_graph.Op.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from worker.gpu.torch_graph import DTYPES, Ctx, Node, Op, norm_axis, to_torch_pads
from worker.gpu.torch_shape_ops import shape_table

# -- operators: elementwise -----------------------------------------------------------------


def _torch_fn(name: str) -> Callable[..., Callable]:
    return lambda ctx: getattr(ctx.torch, name)


def _np_fn(name: str) -> Callable[..., Callable]:
    return lambda: getattr(np, name)


def _elementwise(torch_name: str, np_name: str | None = None) -> Op:
    """A torch function of the same semantics; with numpy's name, shape arithmetic too."""
    if np_name is None:
        return Op(_torch_fn(torch_name))
    return Op(_torch_fn(torch_name), host=_np_fn(np_name), shape_op=True)


def _make_div(ctx: Ctx) -> Callable:
    torch = ctx.torch
    return lambda a, b: (
        torch.div(a, b) if a.is_floating_point() else torch.div(a, b, rounding_mode="trunc")
    )


def _host_div() -> Callable:
    def div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        if a.dtype.kind == "f":
            return a / b
        return np.trunc(a / b).astype(a.dtype)  # ONNX integer division truncates

    return div


def _plan_mod(node: Node) -> dict[str, Any]:
    return {"fmod": bool(node.attr("fmod", 0))}


def _make_mod(ctx: Ctx, *, fmod: bool) -> Callable:
    return ctx.torch.fmod if fmod else ctx.torch.remainder  # remainder: the divisor's sign


def _host_mod(*, fmod: bool) -> Callable:
    return np.fmod if fmod else np.mod


def _make_variadic(ctx: Ctx, *, fn: str) -> Callable:
    f = getattr(ctx.torch, fn)
    return lambda *xs: functools.reduce(f, xs)


def _host_variadic(*, fn: str) -> Callable:
    f = getattr(np, fn)  # the same names as torch's
    return lambda *xs: functools.reduce(f, xs)


def _plan_variadic(fn: str) -> Callable[[Node], dict[str, Any]]:
    return lambda node: {"fn": fn}


def _plan_alpha(default: float) -> Callable[[Node], dict[str, Any]]:
    return lambda node: {"alpha": float(node.attr("alpha", default))}


def _plan_clip(node: Node) -> dict[str, Any]:
    if node.opset < 11:
        return {"lo": node.attr("min"), "hi": node.attr("max")}
    return {"lo": node.scalar(1), "hi": node.scalar(2)}


def _make_clip(ctx: Ctx, *, lo: Any, hi: Any) -> Callable:
    if lo is None and hi is None:
        return lambda x: x
    clamp = ctx.torch.clamp
    return lambda x: clamp(x, lo, hi)


def _plan_hard_sigmoid(node: Node) -> dict[str, Any]:
    return {"alpha": float(node.attr("alpha", 0.2)), "beta": float(node.attr("beta", 0.5))}


def _make_hard_sigmoid(ctx: Ctx, *, alpha: float, beta: float) -> Callable:
    clamp = ctx.torch.clamp
    return lambda x: clamp(x * alpha + beta, 0.0, 1.0)


def _plan_gelu(node: Node) -> dict[str, Any]:
    approximate = node.attr("approximate", "none")
    if approximate not in ("none", "tanh"):
        raise node.refuse(f"has approximate {approximate!r}")
    return {"approximate": approximate}


def _make_prelu(ctx: Ctx) -> Callable:
    where = ctx.torch.where
    return lambda x, slope: where(x >= 0, x, x * slope)


def _plan_softmax(node: Node) -> dict[str, Any]:
    legacy = node.opset < 13  # before 13: the input is coerced to 2-D at `axis`
    return {"axis": int(node.attr("axis", 1 if legacy else -1)), "legacy": legacy}


def _softmax_maker(name: str) -> Callable[..., Callable]:
    def make(ctx: Ctx, *, axis: int, legacy: bool) -> Callable:
        fn = getattr(ctx.torch, name)
        if not legacy:
            return lambda x: fn(x, axis)

        def coerced(x: Any) -> Any:
            a = norm_axis(axis, x.dim())
            flat = x.reshape(math.prod(x.shape[:a]), math.prod(x.shape[a:]))
            return fn(flat, 1).reshape(x.shape)

        return coerced

    return make


def _plan_cast(node: Node) -> dict[str, Any]:
    dtype = DTYPES.get(int(node.attr("to", 0)))
    if dtype is None:
        raise node.refuse(f"casts to ONNX element type {node.attr('to')}, which it does not take")
    return {"dtype": dtype.name}


def _make_cast(ctx: Ctx, *, dtype: str) -> Callable:
    target = getattr(ctx.torch, dtype)
    return lambda x: x.to(target)


def _host_cast(*, dtype: str) -> Callable:
    return lambda x: x.astype(dtype)


def _make_identity(ctx: Ctx, **params: Any) -> Callable:
    return lambda x: x


def _host_identity(**params: Any) -> Callable:
    return lambda x: x


def _plan_dropout(node: Node) -> dict[str, Any]:
    if node.scalar(2):
        raise node.refuse("runs in training mode")
    return {}


def _make_to_device(ctx: Ctx) -> Callable:
    torch, device = ctx.torch, ctx.device
    # A copy: the value may be a read-only constant. Tiny (shapes), and from pageable
    # memory a non-blocking copy is staged at once, with no wait on the device.
    return lambda value: torch.tensor(value).to(device, non_blocking=True)


# -- operators: convolution, pooling, normalization ------------------------------------------


def _same_pads(
    sizes: Sequence[int], kernel: Sequence[int], strides: Any, dilations: Any, lower: bool
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """auto_pad SAME_UPPER / SAME_LOWER: the output is ceil(input / stride); the odd pad
    goes at the end (UPPER) or the start (LOWER)."""
    n = len(sizes)
    strides = strides if isinstance(strides, tuple) else (strides,) * n
    dilations = dilations if isinstance(dilations, tuple) else (dilations,) * n
    begins, ends = [], []
    for size, k, s, d in zip(sizes, kernel, strides, dilations, strict=True):
        total = max(0, (math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size)
        small, big = total // 2, total - total // 2
        begins.append(big if lower else small)
        ends.append(small if lower else big)
    return tuple(begins), tuple(ends)


def _window(node: Node, n: int | None) -> dict[str, Any]:
    """Strides, dilations and pads of a Conv or a pool; an int stands for every dim."""
    auto_pad = node.attr("auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
        raise node.refuse(f"has auto_pad {auto_pad!r}")
    strides = tuple(node.attr("strides") or ()) or 1
    dilations = tuple(node.attr("dilations") or ()) or 1
    pads = tuple(node.attr("pads") or ())
    if auto_pad != "NOTSET" or not pads:
        pads = (0,) * (2 * n) if n else ()
    if len(pads) % 2 or (n and len(pads) != 2 * n):
        raise node.refuse(f"has pads {list(pads)} for {n} spatial dimensions")
    half = len(pads) // 2
    return {
        "strides": strides,
        "dilations": dilations,
        "pads": (pads[:half], pads[half:]),
        "auto_pad": auto_pad,
    }


def _spatial_rank(node: Node) -> int | None:
    for key in ("kernel_shape", "strides", "dilations"):
        if node.attr(key):
            return len(node.attr(key))
    return len(node.attr("pads")) // 2 if node.attr("pads") else None


def _plan_conv(node: Node) -> dict[str, Any]:
    window = _window(node, _spatial_rank(node))
    return {**window, "groups": int(node.attr("group", 1))}


def _make_conv(
    ctx: Ctx, *, strides: Any, dilations: Any, pads: tuple, auto_pad: str, groups: int
) -> Callable:
    F = ctx.F
    convs = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}
    if auto_pad.startswith("SAME"):
        lower = auto_pad == "SAME_LOWER"

        def same(x: Any, w: Any, b: Any = None) -> Any:
            begins, ends = _same_pads(x.shape[2:], w.shape[2:], strides, dilations, lower)
            x = F.pad(x, to_torch_pads(begins, ends))
            return convs[x.dim()](x, w, b, strides, 0, dilations, groups)

        return same
    begins, ends = pads
    if begins == ends:
        padding = begins or 0

        def conv(x: Any, w: Any, b: Any = None) -> Any:
            return convs[x.dim()](x, w, b, strides, padding, dilations, groups)

        return conv
    pad = to_torch_pads(begins, ends)

    def padded(x: Any, w: Any, b: Any = None) -> Any:
        return convs[x.dim()](F.pad(x, pad), w, b, strides, 0, dilations, groups)

    return padded


def _plan_conv_transpose(node: Node) -> dict[str, Any]:
    if node.attr("output_shape"):
        raise node.refuse("sets output_shape")
    window = _window(node, _spatial_rank(node))
    if window["auto_pad"].startswith("SAME"):
        raise node.refuse(f"has auto_pad {window['auto_pad']}")
    output_padding = tuple(node.attr("output_padding") or ()) or 0
    return {**window, "groups": int(node.attr("group", 1)), "output_padding": output_padding}


def _make_conv_transpose(
    ctx: Ctx,
    *,
    strides: Any,
    dilations: Any,
    pads: tuple,
    auto_pad: str,
    groups: int,
    output_padding: Any,
) -> Callable:
    F = ctx.F
    convs = {3: F.conv_transpose1d, 4: F.conv_transpose2d, 5: F.conv_transpose3d}
    begins, ends = pads
    if begins == ends:
        padding = begins or 0
        return lambda x, w, b=None: convs[x.dim()](
            x, w, b, strides, padding, output_padding, groups, dilations
        )

    def cropped(x: Any, w: Any, b: Any = None) -> Any:
        y = convs[x.dim()](x, w, b, strides, 0, output_padding, groups, dilations)
        crop = tuple(
            slice(bg, size - e) for bg, e, size in zip(begins, ends, y.shape[2:], strict=True)
        )
        return y[(slice(None), slice(None), *crop)]

    return cropped


def _plan_pool(node: Node) -> dict[str, Any]:
    kernel = tuple(node.attr("kernel_shape") or ())
    if not kernel:
        raise node.refuse("has no kernel_shape")
    window = _window(node, len(kernel))
    n = len(kernel)
    window["strides"] = window["strides"] if window["strides"] != 1 else (1,) * n
    window["dilations"] = window["dilations"] if window["dilations"] != 1 else (1,) * n
    if node.op == "AveragePool" and any(d != 1 for d in window["dilations"]):
        raise node.refuse("has dilations, which torch's average pooling lacks")
    if node.op == "MaxPool" and node.attr("storage_order", 0):
        raise node.refuse("has storage_order 1")
    return {
        **window,
        "op": node.op,
        "kernel": kernel,
        "ceil_mode": bool(node.attr("ceil_mode", 0)),
        "include_pad": bool(node.attr("count_include_pad", 0)),
    }


def _make_pool(
    ctx: Ctx,
    *,
    op: str,
    kernel: tuple,
    strides: tuple,
    dilations: tuple,
    pads: tuple,
    auto_pad: str,
    ceil_mode: bool,
    include_pad: bool,
) -> Callable:
    maker = _max_pool if op == "MaxPool" else _avg_pool
    window = functools.partial(maker, ctx, kernel, strides, dilations, ceil_mode, include_pad)
    if auto_pad.startswith("SAME"):
        lower = auto_pad == "SAME_LOWER"
        return lambda x: window(*_same_pads(x.shape[2:], kernel, strides, dilations, lower))(x)
    return window(*pads)


def _fits_torch(kernel: tuple, begins: tuple, ends: tuple) -> bool:
    """torch pools pad symmetrically, by at most half the kernel."""
    return begins == ends and all(2 * p <= k for p, k in zip(begins, kernel, strict=True))


def _max_pool(
    ctx: Ctx,
    kernel: tuple,
    strides: tuple,
    dilations: tuple,
    ceil_mode: bool,
    include_pad: bool,
    begins: tuple,
    ends: tuple,
) -> Callable:
    F = ctx.F
    pool = getattr(F, f"max_pool{len(kernel)}d")
    if _fits_torch(kernel, begins, ends):
        return lambda x: pool(x, kernel, strides, begins, dilations, ceil_mode)
    pad = to_torch_pads(begins, ends)
    return lambda x: pool(F.pad(x, pad, value=-math.inf), kernel, strides, 0, dilations, ceil_mode)


def _avg_pool(
    ctx: Ctx,
    kernel: tuple,
    strides: tuple,
    dilations: tuple,
    ceil_mode: bool,
    include_pad: bool,
    begins: tuple,
    ends: tuple,
) -> Callable:
    F, torch = ctx.F, ctx.torch
    pool = functools.partial(
        getattr(F, f"avg_pool{len(kernel)}d"),
        kernel_size=kernel,
        stride=strides,
        ceil_mode=ceil_mode,
    )
    if _fits_torch(kernel, begins, ends) or not any(begins + ends):
        return lambda x: pool(x, padding=begins, count_include_pad=include_pad)
    pad = to_torch_pads(begins, ends)
    if include_pad:
        return lambda x: pool(F.pad(x, pad), padding=0, count_include_pad=True)

    def excluding(x: Any) -> Any:  # sums over the padded input, divided by the real counts
        ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
        sums = pool(F.pad(x, pad), padding=0, count_include_pad=True)
        return sums / pool(F.pad(ones, pad), padding=0, count_include_pad=True)

    return excluding


def _make_global_pool(ctx: Ctx, *, fn: str) -> Callable:
    f = getattr(ctx.torch, fn)
    return lambda x: f(x, dim=tuple(range(2, x.dim())), keepdim=True)


def _plan_batch_norm(node: Node) -> dict[str, Any]:
    if node.attr("training_mode", 0):
        raise node.refuse("runs in training mode")
    return {"eps": float(node.attr("epsilon", 1e-5))}


def _make_batch_norm(ctx: Ctx, *, eps: float) -> Callable:
    bn = ctx.F.batch_norm
    return lambda x, scale, bias, mean, var: bn(x, mean, var, scale, bias, False, 0.0, eps)


def _plan_eps(node: Node) -> dict[str, Any]:
    return {"eps": float(node.attr("epsilon", 1e-5))}


def _make_instance_norm(ctx: Ctx, *, eps: float) -> Callable:
    norm = ctx.F.instance_norm
    return lambda x, scale, bias: norm(x, weight=scale, bias=bias, eps=eps)


def _plan_layer_norm(node: Node) -> dict[str, Any]:
    return {"axis": int(node.attr("axis", -1)), "eps": float(node.attr("epsilon", 1e-5))}


def _make_layer_norm(ctx: Ctx, *, axis: int, eps: float) -> Callable:
    norm = ctx.F.layer_norm

    def layer_norm(x: Any, scale: Any, bias: Any = None) -> Any:
        shape = x.shape[norm_axis(axis, x.dim()) :]
        if scale.shape == shape and (bias is None or bias.shape == shape):
            return norm(x, shape, scale, bias, eps)
        y = norm(x, shape, None, None, eps) * scale  # scale/bias that only broadcast
        return y if bias is None else y + bias

    return layer_norm


# -- operators: linear algebra ---------------------------------------------------------------


def _plan_gemm(node: Node) -> dict[str, Any]:
    return {
        "alpha": float(node.attr("alpha", 1.0)),
        "beta": float(node.attr("beta", 1.0)),
        "trans_a": bool(node.attr("transA", 0)),
        "trans_b": bool(node.attr("transB", 0)),
    }


def _make_gemm(ctx: Ctx, *, alpha: float, beta: float, trans_a: bool, trans_b: bool) -> Callable:
    torch = ctx.torch

    def gemm(a: Any, b: Any, c: Any = None) -> Any:
        a = a.t() if trans_a else a
        b = b.t() if trans_b else b
        if c is not None:
            return torch.addmm(c, a, b, beta=beta, alpha=alpha)
        y = torch.mm(a, b)
        return y if alpha == 1.0 else y * alpha

    return gemm


# -- the table ------------------------------------------------------------------------------


def _table() -> dict[str, Op]:
    ops: dict[str, Op] = {
        # elementwise, with numpy twins for shape arithmetic
        "Add": _elementwise("add", "add"),
        "Sub": _elementwise("sub", "subtract"),
        "Mul": _elementwise("mul", "multiply"),
        "Div": Op(_make_div, host=_host_div, shape_op=True),
        "Mod": Op(_make_mod, _plan_mod, host=_host_mod, shape_op=True),
        "Equal": _elementwise("eq", "equal"),
        "Less": _elementwise("lt", "less"),
        "Greater": _elementwise("gt", "greater"),
        "LessOrEqual": _elementwise("le", "less_equal"),
        "GreaterOrEqual": _elementwise("ge", "greater_equal"),
        "Where": _elementwise("where", "where"),
        "Not": _elementwise("logical_not", "logical_not"),
        "And": _elementwise("logical_and", "logical_and"),
        "Or": _elementwise("logical_or", "logical_or"),
        "Neg": _elementwise("neg", "negative"),
        "Abs": _elementwise("abs", "abs"),
        # elementwise, device only
        "Pow": _elementwise("pow"),
        "Relu": _elementwise("relu"),
        "Sigmoid": _elementwise("sigmoid"),
        "Tanh": _elementwise("tanh"),
        "Exp": _elementwise("exp"),
        "Log": _elementwise("log"),
        "Sqrt": _elementwise("sqrt"),
        "Reciprocal": _elementwise("reciprocal"),
        "Floor": _elementwise("floor"),
        "Ceil": _elementwise("ceil"),
        "Erf": _elementwise("erf"),
        "Sin": _elementwise("sin"),
        "Cos": _elementwise("cos"),
        "Softplus": Op(lambda ctx: ctx.F.softplus),
        "HardSwish": Op(lambda ctx: ctx.F.hardswish),
        "LeakyRelu": Op(lambda ctx, alpha: lambda x: ctx.F.leaky_relu(x, alpha), _plan_alpha(0.01)),
        "Elu": Op(lambda ctx, alpha: lambda x: ctx.F.elu(x, alpha), _plan_alpha(1.0)),
        "HardSigmoid": Op(_make_hard_sigmoid, _plan_hard_sigmoid),
        "Gelu": Op(
            lambda ctx, approximate: lambda x: ctx.F.gelu(x, approximate=approximate), _plan_gelu
        ),
        "PRelu": Op(_make_prelu),
        "Clip": Op(_make_clip, _plan_clip, static=(1, 2), static_since=11),
        "Max": Op(_make_variadic, _plan_variadic("maximum"), host=_host_variadic, shape_op=True),
        "Min": Op(_make_variadic, _plan_variadic("minimum"), host=_host_variadic, shape_op=True),
        "Sum": Op(_make_variadic, _plan_variadic("add"), host=_host_variadic, shape_op=True),
        "Softmax": Op(_softmax_maker("softmax"), _plan_softmax),
        "LogSoftmax": Op(_softmax_maker("log_softmax"), _plan_softmax),
        "Identity": Op(_make_identity, host=_host_identity, shape_op=True),
        "Dropout": Op(_make_identity, _plan_dropout, static=(1, 2), static_since=12),
        "Cast": Op(_make_cast, _plan_cast, host=_host_cast, shape_op=True),
        # convolution, pooling, normalization, linear algebra
        "Conv": Op(_make_conv, _plan_conv),
        "ConvTranspose": Op(_make_conv_transpose, _plan_conv_transpose),
        "MaxPool": Op(_make_pool, _plan_pool),
        "AveragePool": Op(_make_pool, _plan_pool),
        "GlobalAveragePool": Op(_make_global_pool, lambda node: {"fn": "mean"}),
        "GlobalMaxPool": Op(_make_global_pool, lambda node: {"fn": "amax"}),
        "BatchNormalization": Op(_make_batch_norm, _plan_batch_norm),
        "InstanceNormalization": Op(_make_instance_norm, _plan_eps),
        "LayerNormalization": Op(_make_layer_norm, _plan_layer_norm),
        "Gemm": Op(_make_gemm, _plan_gemm),
        "MatMul": _elementwise("matmul"),
        # shapes and indexing, reductions
        **shape_table(),
        # internal: a host value (shape arithmetic) used as a tensor
        "_to_device": Op(_make_to_device),
    }
    return ops


OPS = _table()
