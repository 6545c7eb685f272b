"""Converters of elementwise ops, activations, BatchNormalization, Identity and Dropout.

Numbers that multiply or offset data become synthesized constants (``"{node}::alpha"`` ...).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from qfx_onnx.importer.context import NodeContext, is_float
from qfx_onnx.importer.registry import converter
from qfx_onnx.ir import ops


def _plain(fn: Callable, arity: int) -> Callable[[NodeContext], None]:
    """A converter that passes the node's ``arity`` inputs straight to ``fn``."""

    def convert(ctx: NodeContext) -> None:
        ctx.emit(fn, *(ctx.input(i) for i in range(arity)))

    convert.__name__ = f"convert_{fn.__name__}"
    return convert


for _op_type, _fn, _since in [
    ("Add", ops.add, 7),
    ("Sub", ops.sub, 7),
    ("Mul", ops.mul, 7),
]:
    converter(_op_type, since=_since)(_plain(_fn, 2))

for _op_type, _fn in [
    ("Neg", ops.neg),
    ("Relu", ops.relu),
    ("Sigmoid", ops.sigmoid),
    ("Tanh", ops.tanh),
    ("Identity", ops.identity),
]:
    converter(_op_type, since=1)(_plain(_fn, 1))


@converter("Div", since=7)
def convert_div(ctx: NodeContext) -> None:
    """Division by a float constant is a mul by its reciprocal (``"{node}::recip"``)."""
    if ctx.is_const(1) and is_float(ctx.info(1).dtype):
        divisor = ctx.const(1)
        recip = ctx.synth("recip", 1.0 / divisor.astype(np.float64), dtype=divisor.dtype)
        ctx.emit(ops.mul, ctx.input(0), recip)
    else:
        ctx.emit(ops.div, ctx.input(0), ctx.input(1))


@converter("Sum", since=6)
def convert_sum(ctx: NodeContext) -> None:
    """Sum of any number of broadcast inputs."""
    ctx.emit(ops.nary_sum, *(ctx.input(i) for i in range(len(ctx.node.input))))


@converter("LeakyRelu", since=6)
def convert_leaky_relu(ctx: NodeContext) -> None:
    """LeakyRelu with ``alpha`` as the constant ``{node}::alpha``."""
    ctx.emit(ops.leaky_relu, ctx.input(0), ctx.synth("alpha", ctx.attr("alpha", 0.01)))


@converter("PRelu", since=7)
def convert_prelu(ctx: NodeContext) -> None:
    """PRelu; the slope is a weight."""
    ctx.emit(ops.prelu, ctx.input(0), ctx.input(1, role="weight"))


@converter("Clip", since=6)
def convert_clip_6(ctx: NodeContext) -> None:
    """Bounds are attributes; an absent one is no bound."""
    low, high = ctx.attr("min", None), ctx.attr("max", None)
    ctx.emit(
        ops.clip,
        ctx.input(0),
        None if low is None else ctx.synth("min", low),
        None if high is None else ctx.synth("max", high),
    )


@converter("Clip", since=11)
def convert_clip_11(ctx: NodeContext) -> None:
    """Bounds are optional inputs; an absent one is no bound."""
    ctx.emit(ops.clip, ctx.input(0), ctx.input(1), ctx.input(2))


@converter("HardSigmoid", since=6)
def convert_hard_sigmoid(ctx: NodeContext) -> None:
    """HardSigmoid with ``alpha`` and ``beta`` as constants ``{node}::alpha``, ``{node}::beta``."""
    alpha, beta = ctx.attr("alpha", 0.2), ctx.attr("beta", 0.5)
    ctx.emit(ops.hard_sigmoid, ctx.input(0), ctx.synth("alpha", alpha), ctx.synth("beta", beta))


@converter("HardSwish", since=14)
def convert_hard_swish(ctx: NodeContext) -> None:
    """HardSwish: ONNX's fixed alpha = 1/6 and beta = 0.5 as constants."""
    ctx.emit(ops.hard_swish, ctx.input(0), ctx.synth("alpha", 1.0 / 6.0), ctx.synth("beta", 0.5))


def _softmax(fn: Callable, legacy: bool) -> Callable[[NodeContext], None]:
    """Softmax-like converters. Before opset 13 the input is coerced to 2-D at ``axis`` (default 1);
    unless that axis is the last, the import flattens, normalizes rows and restores the shape."""

    def convert(ctx: NodeContext) -> None:
        rank = ctx.rank(0)
        axis = ctx.axes([ctx.attr("axis", 1 if legacy else -1)], rank)[0]
        x = ctx.input(0)
        if not legacy or axis == rank - 1:
            ctx.emit(fn, x, axis=axis)
            return
        rows = ctx.internal(fn, ctx.internal(ops.flatten, x, axis=axis), axis=1)
        ctx.emit(ops.reshape, rows, ctx.internal(ops.shape_of, x))

    convert.__name__ = f"convert_{fn.__name__}_{'1' if legacy else '13'}"
    return convert


for _op_type, _fn in [("Softmax", ops.softmax), ("LogSoftmax", ops.log_softmax)]:
    converter(_op_type, since=1)(_softmax(_fn, legacy=True))
    converter(_op_type, since=13)(_softmax(_fn, legacy=False))


@converter("BatchNormalization", since=7)
def convert_batch_norm(ctx: NodeContext) -> None:
    """Inference BatchNormalization as ``mul(x, scale)`` (internal) then ``add(., shift)``, with
    ``scale = gamma / sqrt(var + eps)`` and ``shift = beta - mean * scale`` shaped (C, 1, ...)."""
    ctx.attr("spatial", 1, allowed=(1,))
    ctx.attr("training_mode", 0, allowed=(0,))
    ctx.attr("momentum", 0.9)  # training only
    eps = ctx.attr("epsilon", 1e-5)
    gamma, beta, mean, var = (ctx.const(i, what).astype(np.float64) for i, what in enumerate(["scale", "B", "input_mean", "input_var"], 1))
    scale = gamma / np.sqrt(var + eps)
    shift = beta - mean * scale
    shape = (-1,) + (1,) * (ctx.rank(0) - 2)
    dtype = ctx.info(0).dtype or np.float32
    scaled = ctx.internal(ops.mul, ctx.input(0), ctx.synth("scale", scale.reshape(shape), dtype=dtype))
    ctx.emit(ops.add, scaled, ctx.synth("shift", shift.reshape(shape), dtype=dtype))


@converter("Dropout", since=7)
def convert_dropout(ctx: NodeContext) -> None:
    """Inference Dropout is the identity. A training_mode that is true is refused, as is a mask
    output that the graph reads (one that nothing reads, as in old zoo files, is accepted)."""
    ctx.attr("ratio", 0.5)
    ctx.attr("seed", 0)
    ctx.const(1, "ratio")
    training = ctx.const(2, "training_mode")
    if training is not None and bool(training):
        raise ctx.error("training_mode=true is not supported (inference only)")
    if ctx.is_consumed(1):
        raise ctx.error(f"the mask output {ctx.output_name(1)!r} is read by the graph; only inference Dropout without a used mask is supported")
    ctx.emit(ops.identity, ctx.input(0))
