"""Converters of data-movement and shape ops: Flatten, Reshape, Transpose, Squeeze, Unsqueeze,
Concat, Split, Slice, Gather, Shape, Cast, ConstantOfShape.

Values that newer opsets pass as inputs (axes, split sizes, slice bounds) must be constants and
become keyword lists. On integer tensors (shape arithmetic) ``NodeContext.emit`` picks the
"shape"-kind twin of each op.
"""

from __future__ import annotations

import operator
from typing import Sequence

import onnx

from qfx_onnx.importer.context import NodeContext
from qfx_onnx.importer.registry import converter
from qfx_onnx.ir import ops


def _ints(values) -> list[int] | None:
    return None if values is None else [int(v) for v in values]


@converter("Flatten", since=1)
def convert_flatten(ctx: NodeContext) -> None:
    """Flatten at ``axis`` (negative from opset 11), made non-negative."""
    rank = ctx.rank(0)
    axis = ctx.attr("axis", 1)
    if not -rank <= axis <= rank:
        raise ctx.error(f"axis {axis} is out of range for rank {rank}")
    ctx.emit(ops.flatten, ctx.input(0), axis=axis + rank if axis < 0 else axis)


@converter("Reshape", since=5)
def convert_reshape(ctx: NodeContext) -> None:
    """A constant target shape becomes a tuple of ints, as does one that shape folding knows but for
    the input's own dims (``x.view(x.size(0), -1)``: 0, copy) and one other (the batch of
    ``x.view(b, g, c // g, h, w)`` computed by arithmetic: -1); any other target stays a node."""
    allowzero = ctx.attr("allowzero", 0, allowed=(0, 1))
    partial = ctx.partial(1)
    target = partial.reshape_target(ctx.info(0).dim_params, allowzero) if partial is not None else None
    if ctx.is_const(1):
        shape = tuple(_ints(ctx.const(1)))
    elif target is not None:
        shape = target
    else:
        shape = ctx.input(1)
    ctx.emit(ops.reshape, ctx.input(0), shape, allowzero=allowzero)


@converter("Transpose", since=1)
def convert_transpose(ctx: NodeContext) -> None:
    """Transpose; no ``perm`` reverses the axes."""
    rank = ctx.rank(0)
    perm = ctx.attr("perm", list(reversed(range(rank))))
    if sorted(perm) != list(range(rank)):
        raise ctx.error(f"perm {perm} is not a permutation of {rank} axes")
    ctx.emit(ops.transpose, ctx.input(0), perm=list(perm))


def _squeeze(ctx: NodeContext, axes: Sequence[int] | None) -> None:
    axes = None if axes is None else ctx.axes(axes, ctx.rank(0))
    ctx.emit(ops.squeeze, ctx.input(0), axes=axes)


@converter("Squeeze", since=1)
def convert_squeeze_1(ctx: NodeContext) -> None:
    """Squeeze, ``axes`` an attribute (opsets 1-12); none squeezes every size-1 dim."""
    _squeeze(ctx, ctx.attr("axes", None))


@converter("Squeeze", since=13)
def convert_squeeze_13(ctx: NodeContext) -> None:
    """Squeeze, ``axes`` an optional constant input (opset 13 on)."""
    _squeeze(ctx, _ints(ctx.const(1, "axes")))


def _unsqueeze(ctx: NodeContext, axes: Sequence[int]) -> None:
    ctx.emit(ops.unsqueeze, ctx.input(0), axes=ctx.axes(axes, ctx.rank(0) + len(axes)))


@converter("Unsqueeze", since=1)
def convert_unsqueeze_1(ctx: NodeContext) -> None:
    """Unsqueeze, ``axes`` an attribute (opsets 1-12)."""
    _unsqueeze(ctx, ctx.attr("axes"))


@converter("Unsqueeze", since=13)
def convert_unsqueeze_13(ctx: NodeContext) -> None:
    """Unsqueeze, ``axes`` a constant input (opset 13 on)."""
    axes = _ints(ctx.const(1, "axes"))
    if axes is None:
        raise ctx.error("the axes input is missing")
    _unsqueeze(ctx, axes)


@converter("Concat", since=4)
def convert_concat(ctx: NodeContext) -> None:
    """Concat of every input (constants become get_attr nodes)."""
    axis = ctx.axes([ctx.attr("axis")], ctx.rank(0))[0]
    ctx.emit(ops.concat, [ctx.input(i) for i in range(len(ctx.node.input))], axis=axis)


def _split(ctx: NodeContext, sizes: list[int] | None, num_outputs: int | None) -> None:
    """One internal ``split`` node (a tuple) and a getitem per ONNX output."""
    outputs = len(ctx.node.output)
    if sizes is not None and len(sizes) != outputs:
        raise ctx.error(f"{len(sizes)} split sizes for {outputs} outputs")
    if num_outputs is not None and num_outputs != outputs:
        raise ctx.error(f"num_outputs={num_outputs} but the node has {outputs} outputs")
    axis = ctx.axes([ctx.attr("axis", 0)], ctx.rank(0))[0]
    parts = ctx.internal(ops.split, ctx.input(0), axis=axis, split=sizes, num_outputs=None if sizes else outputs)
    for k in range(outputs):
        ctx.emit(operator.getitem, parts, k, out=k)


@converter("Split", since=2)
def convert_split_2(ctx: NodeContext) -> None:
    """Split, sizes from the optional ``split`` attribute, else equal parts."""
    _split(ctx, _ints(ctx.attr("split", None)), None)


@converter("Split", since=13)
def convert_split_13(ctx: NodeContext) -> None:
    """Split, sizes from the optional constant ``split`` input, else equal parts."""
    _split(ctx, _ints(ctx.const(1, "split")), None)


@converter("Split", since=18)
def convert_split_18(ctx: NodeContext) -> None:
    """Split by the ``split`` input or into ``num_outputs`` parts (the last may be smaller)."""
    sizes, num_outputs = _ints(ctx.const(1, "split")), ctx.attr("num_outputs", None)
    if (sizes is None) == (num_outputs is None):
        raise ctx.error("exactly one of the split input and the num_outputs attribute must be given")
    _split(ctx, sizes, num_outputs)


def _slice(ctx: NodeContext, starts, ends, axes, steps) -> None:
    starts, ends = _ints(starts), _ints(ends)
    if starts is None or ends is None or len(starts) != len(ends):
        raise ctx.error("starts and ends must be given, of equal length")
    axes = ctx.axes(range(len(starts)) if axes is None else _ints(axes), ctx.rank(0))
    steps = [1] * len(starts) if steps is None else _ints(steps)
    if 0 in steps:
        raise ctx.error("a slice step of 0 is invalid")
    ctx.emit(ops.slice_axes, ctx.input(0), starts=starts, ends=ends, axes=axes, steps=steps)


@converter("Slice", since=1)
def convert_slice_1(ctx: NodeContext) -> None:
    """Slice with ``starts``/``ends``/``axes`` attributes (opsets 1-9)."""
    _slice(ctx, ctx.attr("starts"), ctx.attr("ends"), ctx.attr("axes", None), None)


@converter("Slice", since=10)
def convert_slice_10(ctx: NodeContext) -> None:
    """Slice with constant ``starts``/``ends``/``axes``/``steps`` inputs (opset 10 on)."""
    _slice(ctx, *(ctx.const(i, what) for i, what in enumerate(["starts", "ends", "axes", "steps"], 1)))


@converter("Gather", since=1)
def convert_gather(ctx: NodeContext) -> None:
    """Gather along ``axis``; a constant table is a weight, constant indices an int buffer."""
    axis = ctx.axes([ctx.attr("axis", 0)], ctx.rank(0))[0]
    ctx.emit(ops.gather, ctx.input(0, role="weight"), ctx.input(1), axis=axis)


@converter("Shape", since=1)
def convert_shape(ctx: NodeContext) -> None:
    """A runtime Shape (some dim is dynamic; static shapes are folded)."""
    ctx.emit(ops.shape_of, ctx.input(0), start=ctx.attr("start", 0), end=ctx.attr("end", None))


_CAST_TYPES = (
    onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BOOL,
    onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT8,
)


@converter("Cast", since=6)
def convert_cast(ctx: NodeContext) -> None:
    """``saturate`` and ``round_mode`` only concern float8 targets, which are refused."""
    to = ctx.attr("to", allowed=_CAST_TYPES)
    ctx.attr("saturate", 1)
    ctx.attr("round_mode", "up")
    ctx.emit(ops.cast, ctx.input(0), to=to)


@converter("ConstantOfShape", since=9)
def convert_constant_of_shape(ctx: NodeContext) -> None:
    """Only reached for a runtime shape (a constant one is folded)."""
    raise ctx.error("a ConstantOfShape whose shape is known only at run time is not supported")
