"""Converters of Pad, Resize and Upsample (nearest mode only).

Resize/Upsample are imported as ``resize`` with opset-11 attribute names: Upsample and Resize-10
become ``asymmetric`` coordinates with ``floor`` rounding (``ceil`` when every scale shrinks), as
onnxruntime evaluates them.
"""

from __future__ import annotations

from typing import Sequence

from qfx_onnx.importer.context import NodeContext
from qfx_onnx.importer.registry import converter
from qfx_onnx.ir import ops

_PAD_MODES = ("constant", "reflect", "edge", "wrap")
# tf_half_pixel_for_nearest (opset 11 only) is left out: onnxruntime does not run it either.
_COORDINATE_MODES = ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric")
_NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")


def _pad(ctx: NodeContext, pads: Sequence[int], value: float | None, axes: Sequence[int] | None) -> None:
    """Zero padding, or reflect/edge/wrap of at most the last three axes (never the first)."""
    mode = ctx.attr("mode", "constant", allowed=_PAD_MODES)
    rank = ctx.rank(0)
    if value is not None and float(value) != 0.0:
        raise ctx.error(f"constant_value={float(value)} is not supported (only zero padding)")
    pads = [int(p) for p in pads]
    if axes is not None:
        axes = ctx.axes(axes, rank)
        full = [0] * 2 * rank
        for k, axis in enumerate(axes):
            full[axis], full[axis + rank] = pads[k], pads[k + len(axes)]
        pads = full
    if len(pads) != 2 * rank:
        raise ctx.error(f"{len(pads)} pads for a rank-{rank} input")
    if mode != "constant":
        padded = [a for a in range(rank) if pads[a] or pads[a + rank]]
        if padded and (padded[0] == 0 or padded[0] < rank - 3):
            raise ctx.error(f"mode={mode!r} pads axes {padded}; only the last three (and never the first) are supported")
    ctx.emit(ops.pad, ctx.input(0), pads=pads, mode=mode)


@converter("Pad", since=2)
def convert_pad_2(ctx: NodeContext) -> None:
    """Pad with ``pads``/``value`` attributes (opsets 2-10)."""
    _pad(ctx, ctx.attr("pads"), ctx.attr("value", 0.0), None)


@converter("Pad", since=11)
def convert_pad_11(ctx: NodeContext) -> None:
    """Pad with constant ``pads``/``constant_value``/``axes`` inputs (opset 11 on; axes from 18)."""
    value = ctx.const(2, "constant_value")
    axes = ctx.const(3, "axes")
    _pad(ctx, ctx.const(1, "pads").tolist(), None if value is None else value.item(), None if axes is None else axes.tolist())


def _nearest(ctx: NodeContext, **kwargs) -> None:
    ctx.emit(ops.resize, ctx.input(0), mode="nearest", **kwargs)


def _legacy_nearest(ctx: NodeContext, scales: Sequence[float]) -> None:
    """Upsample and Resize-10: asymmetric coordinates; floor when enlarging, ceil when shrinking."""
    ctx.attr("mode", "nearest", allowed=("nearest",))
    scales = [float(s) for s in scales]
    if len(scales) != ctx.rank(0):
        raise ctx.error(f"{len(scales)} scales for a rank-{ctx.rank(0)} input")
    if all(s >= 1 for s in scales):
        rounding = "floor"
    elif all(s <= 1 for s in scales):
        rounding = "ceil"
    else:
        raise ctx.error(f"scales {scales} both enlarge and shrink, which is not supported")
    _nearest(ctx, scales=scales, sizes=None, coordinate_transformation_mode="asymmetric", nearest_mode=rounding)


@converter("Upsample", since=7)
def convert_upsample_7(ctx: NodeContext) -> None:
    """Upsample with a ``scales`` attribute."""
    _legacy_nearest(ctx, ctx.attr("scales"))


@converter("Upsample", since=9)
def convert_upsample_9(ctx: NodeContext) -> None:
    """Upsample with a constant ``scales`` input."""
    _legacy_nearest(ctx, ctx.const(1, "scales").tolist())


@converter("Resize", since=10)
def convert_resize_10(ctx: NodeContext) -> None:
    """Resize-10: a constant ``scales`` input, Upsample semantics."""
    _legacy_nearest(ctx, ctx.const(1, "scales").tolist())


@converter("Resize", since=11)
def convert_resize_11(ctx: NodeContext) -> None:
    """Nearest mode with scales or sizes (optionally on ``axes``, opset 18). Attributes of other
    modes are read and must keep values that do not matter for nearest."""
    ctx.attr("mode", "nearest", allowed=("nearest",))
    modes = _COORDINATE_MODES + (("half_pixel_symmetric",) if ctx.opset >= 19 else ())
    coordinate_mode = ctx.attr("coordinate_transformation_mode", "half_pixel", allowed=modes)
    nearest_mode = ctx.attr("nearest_mode", "round_prefer_floor", allowed=_NEAREST_MODES)
    for name, default in [("cubic_coeff_a", -0.75), ("exclude_outside", 0), ("extrapolation_value", 0.0), ("antialias", 0)]:
        ctx.attr(name, default)  # cubic, tf_crop_and_resize or linear only
    ctx.attr("keep_aspect_ratio_policy", "stretch", allowed=("stretch",))
    ctx.const(1, "roi")  # tf_crop_and_resize only
    scales, sizes = ctx.const(2, "scales"), ctx.const(3, "sizes")
    scales = None if scales is None or scales.size == 0 else [float(s) for s in scales]
    sizes = None if sizes is None or sizes.size == 0 else [int(s) for s in sizes]
    if (scales is None) == (sizes is None):
        raise ctx.error("exactly one of the scales and sizes inputs must be given")
    rank = ctx.rank(0)
    axes = ctx.axes(ctx.attr("axes", range(rank)), rank)
    given = scales if scales is not None else sizes
    if len(given) != len(axes):
        raise ctx.error(f"{len(given)} scales/sizes for {len(axes)} axes")
    full: list = [1.0 if scales is not None else None] * rank
    for axis, value in zip(axes, given):
        full[axis] = value
    _nearest(
        ctx,
        scales=full if scales is not None else None,
        sizes=full if sizes is not None else None,
        coordinate_transformation_mode=coordinate_mode,
        nearest_mode=nearest_mode,
    )
