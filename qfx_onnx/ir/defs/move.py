"""Data-movement IR ops (value preserving) and their rules: the output has its input's type
(concat: the union of its inputs', and a cast of its own). In HLS a move is an alias of its input
array (reshape-like), an index table (``remap``: transpose, slice, pad, resize, gather), a
concat's scatters, or the parts of a split."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx

from qfx_onnx.errors import ExportError
from qfx_onnx.fixed.cast import cast as fixed_point_cast
from qfx_onnx.fixed.types import union_type
from qfx_onnx.ir.geometry import clamp_index, nearest_indices, resize_output_length, spatial_pads, torch_dtype, torch_pads
from qfx_onnx.ir.opdef import HlsForm, NoHls, TypeQuery, ir_op, op_of


def _concat_type(q: TypeQuery):
    inputs = [q.type(a) for a in q.args[0]]
    return (union_type(*inputs) if all(t is not None for t in inputs) else None), 1


# ------------------------------------------------------------------------------------ ONNX emission
# At opset 18 these ops take their axes, shapes, bounds and sizes as int64 inputs.


def _ints(values) -> np.ndarray:
    return np.asarray(list(values), dtype=np.int64)


def _emit_reshape(w, node: fx.Node, out: str, name: str) -> None:
    x, shape = node.args[0], node.args[1]
    target = w.arg(shape) if isinstance(shape, fx.Node) else w.const(f"{name}::shape", _ints(shape))
    w.node("Reshape", [w.arg(x), target], [out], name, allowzero=int(node.kwargs.get("allowzero", 0)))


def _emit_squeeze(w, node: fx.Node, out: str, name: str) -> None:
    axes = node.kwargs.get("axes")
    given = "" if axes is None else w.const(f"{name}::axes", _ints(axes))
    w.node(op_of(node.target).onnx_op, [w.arg(node.args[0]), given], [out], name)


def _emit_concat(w, node: fx.Node, out: str, name: str) -> None:
    w.node("Concat", [w.arg(a) for a in node.args[0]], [out], name, axis=int(node.kwargs["axis"]))


def _emit_split(w, node: fx.Node, out: None, name: str) -> None:
    """One Split node whose outputs are named after the getitem nodes reading the parts."""
    import operator

    kw = node.kwargs
    parts = {u.args[1]: u for u in node.users if u.target is operator.getitem}
    count = len(kw["split"]) if kw.get("split") is not None else kw["num_outputs"]
    outputs = []
    for k in range(count):
        if k in parts:
            w.names[parts[k]] = w.output_name(parts[k])
            outputs.append(w.names[parts[k]])
        else:
            outputs.append(w.fresh(f"{name}::{k}"))
    sizes = "" if kw.get("split") is None else w.const(f"{name}::split", _ints(kw["split"]))
    attrs = {"axis": int(kw["axis"])}
    if kw.get("split") is None:
        attrs["num_outputs"] = int(kw["num_outputs"])
    w.node("Split", [w.arg(node.args[0]), sizes], outputs, name, **attrs)


def _emit_slice(w, node: fx.Node, out: str, name: str) -> None:
    kw = node.kwargs
    bounds = [w.const(f"{name}::{key}", _ints(kw[key])) for key in ("starts", "ends", "axes", "steps")]
    w.node("Slice", [w.arg(node.args[0]), *bounds], [out], name)


def _emit_pad(w, node: fx.Node, out: str, name: str) -> None:
    pads = w.const(f"{name}::pads", _ints(node.kwargs["pads"]))
    w.node("Pad", [w.arg(node.args[0]), pads], [out], name, mode=node.kwargs.get("mode", "constant"))


def _emit_cast(w, node: fx.Node, out: str, name: str) -> None:
    """A float-to-float cast keeps the working precision (Identity), as the IR op does."""
    to = int(node.kwargs["to"])
    source_float = (node.args[0].meta.get("onnx_dtype") or "float32").startswith(("float", "bfloat"))
    if source_float and torch_dtype(to).is_floating_point:
        w.node("Identity", [w.arg(node.args[0])], [out], name)
    else:
        w.node("Cast", [w.arg(node.args[0])], [out], name, to=to)


def _emit_resize(w, node: fx.Node, out: str, name: str) -> None:
    kw = node.kwargs
    attrs = {"mode": "nearest", "coordinate_transformation_mode": kw["coordinate_transformation_mode"],
             "nearest_mode": kw["nearest_mode"]}
    if kw.get("sizes") is not None:
        axes = [a for a, s in enumerate(kw["sizes"]) if s is not None]
        sizes = w.const(f"{name}::sizes", _ints([kw["sizes"][a] for a in axes]))
        if len(axes) != len(kw["sizes"]):
            attrs["axes"] = axes
        w.node("Resize", [w.arg(node.args[0]), "", "", sizes], [out], name, **attrs)
    else:
        scales = w.const(f"{name}::scales", np.asarray(kw["scales"], dtype=np.float32))
        w.node("Resize", [w.arg(node.args[0]), "", scales], [out], name, **attrs)


# ------------------------------------------------------------------------------------ the ops

@ir_op("move", "Identity", hls=HlsForm.alias())
def identity(x):
    """``x`` itself (ONNX Identity, inference Dropout)."""
    return x


@ir_op("move", "Reshape", emit=_emit_reshape, hls=HlsForm.alias())
def reshape(x, shape, *, allowzero=0):
    """ONNX Reshape; ``shape`` is a tuple of ints or a runtime int64 tensor (0 copies a dim unless allowzero)."""
    dims = shape.tolist() if isinstance(shape, torch.Tensor) else list(shape)
    if not allowzero:
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


@ir_op("move", "Flatten", hls=HlsForm.alias())
def flatten(x, *, axis=1):
    """ONNX Flatten: a 2-D view splitting the dims at ``axis`` (non-negative)."""
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


@ir_op("move", "Transpose", hls=HlsForm.remap())
def transpose(x, *, perm):
    """ONNX Transpose by the full permutation ``perm``."""
    return x.permute(tuple(perm))


@ir_op("move", "Squeeze", emit=_emit_squeeze, hls=HlsForm.alias())
def squeeze(x, *, axes=None):
    """ONNX Squeeze; ``axes`` None drops every dim of size 1."""
    if axes is None:
        return x.squeeze()
    return x.squeeze(tuple(axes)) if axes else x


@ir_op("move", "Unsqueeze", emit=_emit_squeeze, hls=HlsForm.alias())
def unsqueeze(x, *, axes):
    """ONNX Unsqueeze; ``axes`` index the output (negative ones count from its end)."""
    out_rank = x.dim() + len(axes)
    for axis in sorted(a + out_rank if a < 0 else a for a in axes):
        x = x.unsqueeze(axis)
    return x


@ir_op("move", "Concat", type_rule=_concat_type, cast_role="elementwise", emit=_emit_concat,
       hls=HlsForm.head("concat"))
def concat(inputs, *, axis):
    """ONNX Concat of the list ``inputs`` along ``axis``."""
    return torch.cat(list(inputs), dim=axis)


@ir_op("move", "Split", emit=_emit_split, multi_output=True, hls=HlsForm("split"))
def split(x, *, axis, split=None, num_outputs=None):  # noqa: A002 - ONNX attribute name
    """ONNX Split into a tuple: by the sizes ``split``, else into ``num_outputs`` pieces of
    ``ceil(n / num_outputs)`` (the last one smaller). The importer reads the parts with getitem."""
    if split is None:
        split = -(-x.shape[axis] // num_outputs)
    return tuple(torch.split(x, split, dim=axis))


@ir_op("move", "Slice", emit=_emit_slice, hls=HlsForm.remap())
def slice_axes(x, *, starts, ends, axes, steps):
    """ONNX Slice with its clamping rules (out-of-range starts/ends, negative steps)."""
    for start, end, axis, step in zip(starts, ends, axes, steps):
        n = x.shape[axis]
        if step > 0:
            begin, stop = clamp_index(start, n, 0, n), clamp_index(end, n, 0, n)
        else:
            begin, stop = clamp_index(start, n, 0, n - 1), clamp_index(end, n, -1, n - 1)
        index = torch.arange(begin, stop, step, device=x.device)
        x = torch.index_select(x, axis, index)
    return x


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}


@ir_op("move", "Pad", emit=_emit_pad, hls=HlsForm.remap())
def pad(x, *, pads, mode="constant"):
    """ONNX Pad with zero padding (constant), reflect, edge or wrap; negative pads crop.

    ``pads`` covers every axis (begins, then ends). Non-constant modes pad at most the last three
    axes and never the first (the importer checks).
    """
    begins, ends = spatial_pads(pads)
    widths = torch_pads(begins, ends)
    while widths and widths[-1] == 0 and widths[-2] == 0:
        widths = widths[:-2]
    if not widths:
        return x
    return F.pad(x, widths, mode=_PAD_MODES[mode])


@ir_op("move", "Gather", hls=HlsForm.remap())
def gather(data, indices, *, axis=0):
    """ONNX Gather: ``indices`` (any shape, negative allowed) select along ``axis``."""
    n = data.shape[axis]
    flat = indices.reshape(-1).long()
    flat = torch.where(flat < 0, flat + n, flat)
    picked = torch.index_select(data, axis, flat)
    return picked.reshape(data.shape[:axis] + indices.shape + data.shape[axis + 1:])


@ir_op("move", "Cast", emit=_emit_cast, hls=HlsForm.alias())
def cast(x, *, to):
    """ONNX Cast to the ONNX element type ``to``. A float-to-float cast keeps the working float
    precision, so a float64 run of the graph stays float64."""
    dtype = torch_dtype(to)
    if x.is_floating_point() and dtype.is_floating_point:
        return x
    return x.to(dtype)


def _emit_fixed_cast(w, node: fx.Node, out: str, name: str) -> None:
    raise ExportError(f"node {name}: an imported quantizer (fixed_cast) must become a cast module before export "
                      "(qfx_onnx.quant.quantize.insert_quantizers does this)")


@ir_op("move", None, emit=_emit_fixed_cast, hls=NoHls("an imported quantizer becomes a cast before export"))
def fixed_cast(x, *, types, axis=None):
    """The ``ap_fixed`` cast an imported quantizer fixes (QONNX ``Quant``, a QDQ pair): ``types``
    is a type's text, or a tuple of per-channel types along ``axis``.

    Only imported float graphs hold it: inserting the quantizers turns it into ``identity``
    followed by a cast module of the same type (``qfx_onnx.quant.quantize.insert_quantizers``),
    so no back end sees it."""
    if axis is None:
        return fixed_point_cast(x, types)
    parts = [fixed_point_cast(x.select(axis, c), t) for c, t in enumerate(types)]
    return torch.stack(parts, dim=axis)


@ir_op("move", "Resize", emit=_emit_resize, hls=HlsForm.remap())
def resize(x, *, mode="nearest", scales=None, sizes=None, coordinate_transformation_mode, nearest_mode):
    """ONNX Resize, nearest mode only, given for every axis: output length ``sizes[i]`` when
    ``sizes`` is given and ``sizes[i]`` is not None (the scale is then ``sizes[i] / in_len``),
    else ``int(in_len * scales[i])``; an axis with neither keeps its length."""
    if mode != "nearest":
        raise ValueError(f"resize mode {mode!r} is not supported")
    for axis in range(x.dim()):
        in_len = x.shape[axis]
        if sizes is not None and sizes[axis] is not None:
            out_len = sizes[axis]
            scale = float(np.float32(out_len) / np.float32(in_len))
        else:
            scale = 1.0 if scales is None else scales[axis]
            out_len = resize_output_length(in_len, scale)
        if out_len == in_len and scale == 1.0:
            continue
        index = nearest_indices(in_len, out_len, scale, coordinate_transformation_mode, nearest_mode)
        x = torch.index_select(x, axis, torch.tensor(index, dtype=torch.long, device=x.device))
    return x
