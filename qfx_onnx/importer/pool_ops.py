"""Converters of pooling and reduction ops, and LRN.

Averages are exact sums (``sum_pool``, ``reduce_sum``; internal) times a synthesized reciprocal
constant ``"{node}::recip"``: a scalar, or a per-position map of 1/count when windows differ in
size (count_include_pad=0 with padding, or ceil_mode partial windows).
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np

from qfx_onnx.importer.context import NodeContext
from qfx_onnx.importer.linear_ops import read_window
from qfx_onnx.importer.registry import converter
from qfx_onnx.ir import ops


@converter("MaxPool", since=1)
def convert_max_pool(ctx: NodeContext) -> None:
    """MaxPool (single output, storage_order 0) with explicit pads."""
    kernel = list(ctx.attr("kernel_shape"))
    window = read_window(ctx, kernel)
    ceil_mode = ctx.attr("ceil_mode", 0, allowed=(0, 1))
    ctx.attr("storage_order", 0, allowed=(0,))
    if ctx.output_name(1):
        raise ctx.error("the Indices output is not supported")
    ctx.emit(ops.max_pool, ctx.input(0), kernel_shape=kernel, ceil_mode=ceil_mode, **window)


@converter("GlobalMaxPool", since=1)
def convert_global_max_pool(ctx: NodeContext) -> None:
    """GlobalMaxPool."""
    ctx.emit(ops.global_max_pool, ctx.input(0))


def window_counts(size: int, kernel: int, stride: int, pad_begin: int, pad_end: int, dilation: int, ceil_mode: int, include_pad: int) -> np.ndarray:
    """How many elements each output window of one axis averages over, as onnxruntime counts:
    positions inside the input, plus the explicit padding when ``include_pad``; never the part
    of a ceil_mode window hanging past the padding."""
    out = ops.pool_output_size(size, kernel, stride, pad_begin, pad_end, dilation, ceil_mode)
    positions = np.arange(out)[:, None] * stride - pad_begin + np.arange(kernel)[None, :] * dilation
    low, high = (-pad_begin, size + pad_end) if include_pad else (0, size)
    return ((positions >= low) & (positions < high)).sum(axis=1)


def _average_reciprocal(ctx: NodeContext, kernel: list[int], window: dict, ceil_mode: int, include_pad: int) -> np.ndarray:
    if not ceil_mode and (include_pad or not any(window["pads"])):
        return np.array(1.0 / math.prod(kernel))
    sizes = ctx.static_dims(0, "AveragePool with padding or ceil_mode", start=2)
    rank = len(kernel)
    per_axis = [
        window_counts(size, k, s, window["pads"][a], window["pads"][a + rank], d, ceil_mode, include_pad)
        for a, (size, k, s, d) in enumerate(zip(sizes, kernel, window["strides"], window["dilations"]))
    ]
    counts = functools.reduce(np.multiply.outer, per_axis)
    if np.all(counts == counts.flat[0]):
        return np.array(1.0 / counts.flat[0])
    return (1.0 / counts)[None, None]


@converter("AveragePool", since=7)
def convert_average_pool(ctx: NodeContext) -> None:
    """AveragePool as ``sum_pool`` (internal) times ``{node}::recip``."""
    kernel = list(ctx.attr("kernel_shape"))
    window = read_window(ctx, kernel)
    ceil_mode = ctx.attr("ceil_mode", 0, allowed=(0, 1))
    include_pad = ctx.attr("count_include_pad", 0, allowed=(0, 1))
    sums = ctx.internal(ops.sum_pool, ctx.input(0), kernel_shape=kernel, ceil_mode=ceil_mode, **window)
    recip = _average_reciprocal(ctx, kernel, window, ceil_mode, include_pad)
    ctx.emit(ops.mul, sums, ctx.synth("recip", recip, dtype=ctx.info(0).dtype))


def _mean(ctx: NodeContext, axes: list[int], keepdims: int) -> None:
    """``reduce_sum`` (internal) times the constant 1/count of the reduced elements."""
    dims = ctx.static_dims(0, f"{ctx.op_type} (its element count)", axes=axes)
    total = ctx.internal(ops.reduce_sum, ctx.input(0), axes=axes, keepdims=keepdims)
    recip = 1.0 / math.prod(dims)
    ctx.emit(ops.mul, total, ctx.synth("recip", recip, dtype=ctx.info(0).dtype))


@converter("GlobalAveragePool", since=1)
def convert_global_average_pool(ctx: NodeContext) -> None:
    """GlobalAveragePool as ``reduce_sum`` (internal) times 1/(spatial size)."""
    _mean(ctx, list(range(2, ctx.rank(0))), keepdims=1)


def _reduce(ctx: NodeContext, axes: Sequence[int] | None, kind: str) -> None:
    """ReduceSum/ReduceMean/ReduceMax (``kind`` "sum", "mean", "max"): no axes means all of them,
    or the identity with ``noop_with_empty_axes``."""
    keepdims = ctx.attr("keepdims", 1, allowed=(0, 1))
    noop = ctx.attr("noop_with_empty_axes", 0, allowed=(0, 1))
    rank = ctx.rank(0)
    if axes is None or len(axes) == 0:
        if noop:
            ctx.emit(ops.identity, ctx.input(0))
            return
        axes = range(rank)
    axes = sorted(set(ctx.axes(axes, rank)))
    if kind == "mean":
        _mean(ctx, axes, keepdims)
    else:
        ctx.emit(ops.reduce_max if kind == "max" else ops.reduce_sum, ctx.input(0), axes=axes, keepdims=keepdims)


def _axes_input(ctx: NodeContext) -> list[int] | None:
    axes = ctx.const(1, "axes")
    return None if axes is None else axes.tolist()


@converter("ReduceSum", since=1)
def convert_reduce_sum_1(ctx: NodeContext) -> None:
    """ReduceSum, ``axes`` an attribute (opsets 1-12)."""
    _reduce(ctx, ctx.attr("axes", None), "sum")


@converter("ReduceSum", since=13)
def convert_reduce_sum_13(ctx: NodeContext) -> None:
    """ReduceSum, ``axes`` an optional constant input (opset 13 on)."""
    _reduce(ctx, _axes_input(ctx), "sum")


@converter("ReduceMean", since=1)
def convert_reduce_mean_1(ctx: NodeContext) -> None:
    """ReduceMean, ``axes`` an attribute (opsets 1-17)."""
    _reduce(ctx, ctx.attr("axes", None), "mean")


@converter("ReduceMean", since=18)
def convert_reduce_mean_18(ctx: NodeContext) -> None:
    """ReduceMean, ``axes`` an optional constant input (opset 18 on)."""
    _reduce(ctx, _axes_input(ctx), "mean")


@converter("LRN", since=1)
def convert_lrn(ctx: NodeContext) -> None:
    """LRN across channels (nonlinear)."""
    ctx.emit(
        ops.lrn, ctx.input(0),
        size=ctx.attr("size"), alpha=ctx.attr("alpha", 1e-4), beta=ctx.attr("beta", 0.75), bias=ctx.attr("bias", 1.0),
    )


@converter("ReduceMax", since=1)
def convert_reduce_max_1(ctx: NodeContext) -> None:
    """ReduceMax, ``axes`` an attribute (opsets 1-17)."""
    _reduce(ctx, ctx.attr("axes", None), "max")


@converter("ReduceMax", since=18)
def convert_reduce_max_18(ctx: NodeContext) -> None:
    """ReduceMax, ``axes`` an optional constant input (opset 18 on)."""
    _reduce(ctx, _axes_input(ctx), "max")
