"""Converters of the linear ops: Conv, ConvTranspose, Gemm, MatMul.

Padding is normalized at import: ``auto_pad`` is resolved against the inferred input shape into
explicit ``pads`` (begins of every spatial dim, then ends).
"""

from __future__ import annotations

import numpy as np

from qfx_onnx.importer.context import NodeContext
from qfx_onnx.importer.registry import converter
from qfx_onnx.ir import ops

AUTO_PADS = ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")


def read_window(ctx: NodeContext, kernel: list[int]) -> dict[str, list[int]]:
    """``strides``, ``dilations`` and explicit ``pads`` of a sliding-window op (Conv, pools)."""
    rank = len(kernel)
    strides = ctx.attr("strides", [1] * rank)
    dilations = ctx.attr("dilations", [1] * rank)
    pads = ctx.attr("pads", [0] * 2 * rank)
    auto_pad = ctx.attr("auto_pad", "NOTSET", allowed=AUTO_PADS)
    if auto_pad == "VALID":
        pads = [0] * 2 * rank
    elif auto_pad != "NOTSET":
        sizes = ctx.static_dims(0, f"auto_pad={auto_pad}", start=2)
        begins, ends = [], []
        for size, k, s, d in zip(sizes, kernel, strides, dilations):
            total = max(0, (-(-size // s) - 1) * s + (k - 1) * d + 1 - size)
            begin = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
            begins.append(begin)
            ends.append(total - begin)
        pads = begins + ends
    return {"strides": list(strides), "pads": list(pads), "dilations": list(dilations)}


def _kernel(ctx: NodeContext) -> list[int]:
    """The kernel's spatial shape from the weight's shape, checked against ``kernel_shape``."""
    kernel = list(ctx.static_dims(1, "reading the kernel", start=2))
    ctx.attr("kernel_shape", kernel, allowed=[kernel])
    return kernel


@converter("Conv", since=1)
def convert_conv(ctx: NodeContext) -> None:
    """Conv of 1 to 3 spatial dims, any group count; ``auto_pad`` becomes explicit pads."""
    window = read_window(ctx, _kernel(ctx))
    x, w, b = ctx.input(0), ctx.input(1, role="weight"), ctx.input(2, role="bias")
    ctx.emit(ops.conv, x, w, b, group=ctx.attr("group", 1), **window)


@converter("ConvTranspose", since=1)
def convert_conv_transpose(ctx: NodeContext) -> None:
    """Explicit pads from ``pads``, or derived as onnxruntime does from ``output_shape`` or
    ``auto_pad`` SAME (output = input * stride): an odd total pads more at the start, except with
    SAME_UPPER which pads more at the end (the ONNX rule)."""
    kernel = _kernel(ctx)
    rank = len(kernel)
    strides = ctx.attr("strides", [1] * rank)
    dilations = ctx.attr("dilations", [1] * rank)
    output_padding = ctx.attr("output_padding", [0] * rank)
    output_shape = ctx.attr("output_shape", None)
    auto_pad = ctx.attr("auto_pad", "NOTSET", allowed=AUTO_PADS)
    pads = ctx.attr("pads", [0] * 2 * rank)
    if auto_pad == "VALID":
        pads = [0] * 2 * rank
    if output_shape is not None or auto_pad.startswith("SAME"):
        sizes = ctx.static_dims(0, "output_shape or auto_pad SAME", start=2)
        targets = output_shape[-rank:] if output_shape is not None else [n * s for n, s in zip(sizes, strides)]
        begins, ends = [], []
        for n, k, s, d, extra, target in zip(sizes, kernel, strides, dilations, output_padding, targets):
            total = (n - 1) * s + extra + (k - 1) * d + 1 - target
            begin = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
            begins.append(begin)
            ends.append(total - begin)
        pads = begins + ends
    x, w, b = ctx.input(0), ctx.input(1, role="weight"), ctx.input(2, role="bias")
    ctx.emit(
        ops.conv_transpose, x, w, b,
        strides=list(strides), pads=list(pads), dilations=list(dilations),
        group=ctx.attr("group", 1), output_padding=list(output_padding),
    )


def _scaled_operand(ctx: NodeContext, i: int, factor: float, names: tuple[str, str], role: str):
    """Input ``i`` times ``factor`` (named ``names = (operand, factor)``): folded into the
    constant ``"{node}::{operand}"`` when the input is one, else an internal mul by the constant
    ``"{node}::{factor}"``."""
    if factor == 1.0 or not ctx.has_input(i):
        return ctx.input(i, role=role)
    operand, factor_name = names
    if ctx.is_const(i):
        value = ctx.const(i)
        return ctx.synth(operand, value.astype(np.float64) * factor, role=role, dtype=value.dtype)
    return ctx.internal(ops.mul, ctx.input(i), ctx.synth(factor_name, factor))


@converter("Gemm", since=7)
def convert_gemm(ctx: NodeContext) -> None:
    """``alpha`` is folded into B (into A when only A is a constant), ``beta`` into C."""
    alpha, beta = ctx.attr("alpha", 1.0), ctx.attr("beta", 1.0)
    trans = {"transA": ctx.attr("transA", 0), "transB": ctx.attr("transB", 0)}
    if ctx.is_const(0) and not ctx.is_const(1):
        a, b = _scaled_operand(ctx, 0, alpha, ("A", "alpha"), "weight"), ctx.input(1)
    else:
        a, b = ctx.input(0), _scaled_operand(ctx, 1, alpha, ("B", "alpha"), "weight")
    c = _scaled_operand(ctx, 2, beta, ("C", "beta"), "bias")
    ctx.emit(ops.gemm, a, b, c, **trans)


@converter("MatMul", since=1)
def convert_matmul(ctx: NodeContext) -> None:
    """MatMul; a constant operand is a weight."""
    ctx.emit(ops.matmul, ctx.input(0, role="weight"), ctx.input(1, role="weight"))
