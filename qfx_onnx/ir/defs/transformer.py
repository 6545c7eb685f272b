"""IR ops of transformer encoders: the nonlinear units and the reductions attention needs.

Same contract as :mod:`qfx_onnx.ir.ops` (plain torch functions with ONNX semantics, keyword
attributes named as in ONNX, float32 or float64 of any batch). Every op here but ``reduce_max`` is
``"nonlinear"``: float64 cannot reproduce a hardware evaluation of it, so the fixed-point graph
will evaluate it by table (issue 11). Nonlinear ops keep their scalar parameters (LayerNorm's
``epsilon``, Gelu's ``approximate``) as keywords; LayerNorm's scale and bias are tensor inputs
(weights).

Attention itself needs no op of its own: Q/K/V projections are ``matmul``/``gemm`` by weights,
scores and context are ``matmul`` of two activations, the head split/merge is ``reshape`` and
``transpose``, and the scale is a ``mul`` by a constant (all in :mod:`qfx_onnx.ir.ops`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from qfx_onnx.ir.defs.arith import _emit_reduce, _first
from qfx_onnx.ir.defs.nonlinear import emit_nonlinear, spec_table
from qfx_onnx.ir.opdef import HlsForm, ir_op
from qfx_onnx.nonlinear.wiring import evaluate


@ir_op("nonlinear", "LayerNormalization", emit=emit_nonlinear(), hls=HlsForm.head("layer_norm"))
def layer_norm(x, scale, bias=None, *, axis, epsilon, fixed=None):
    """ONNX LayerNormalization (opset 17): over the dims ``axis .. rank-1`` (``axis`` non-negative),
    ``(x - mean) / sqrt(var + epsilon) * scale + bias`` with ``var`` the biased (population)
    variance ``mean((x - mean)^2)``; ``scale`` and ``bias`` broadcast to those trailing dims.
    Computed in the input's precision (ONNX's ``stash_type`` float32 on float32 inputs). With
    ``fixed`` (last axis only), :func:`~qfx_onnx.nonlinear.kernels.layer_norm_exact`."""
    if fixed:
        return evaluate("layer_norm", fixed, x, scale, bias)
    dims = tuple(range(axis, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    centred = x - mean
    var = (centred * centred).mean(dim=dims, keepdim=True)
    y = centred / torch.sqrt(var + epsilon) * scale
    return y if bias is None else y + bias


def _emit_gelu(w, node, out: str, name: str) -> None:
    """Gelu has no ONNX op before opset 20: written as its decomposition, ``x * 0.5 * (1 +
    erf(x / sqrt 2))`` or the tanh form, which the importer fuses back into ``gelu`` on read-back
    (:mod:`qfx_onnx.importer.fuse`)."""
    x = w.arg(node.args[0])

    def const(label, value):
        return w.const(f"{name}::{label}", np.asarray(value, dtype=np.float32))

    def step(op, inputs, label):
        t = w.fresh(f"{name}::{label}")
        w.node(op, inputs, [t], t)
        return t

    if node.kwargs.get("approximate", "none") == "tanh":
        cube = step("Mul", [step("Mul", [x, x], "square"), x], "cube")
        inner = step("Add", [x, step("Mul", [cube, const("c", 0.044715)], "scaled_cube")], "inner")
        core = step("Tanh", [step("Mul", [inner, const("k", math.sqrt(2.0 / math.pi))], "arg")], "tanh")
    else:
        core = step("Erf", [step("Div", [x, const("sqrt2", math.sqrt(2.0))], "arg")], "erf")
    gate = step("Mul", [step("Add", [core, const("one", 1.0)], "one_plus"), const("half", 0.5)], "gate")
    w.node("Mul", [x, gate], [out], name)


@ir_op("nonlinear", "Gelu", emit=emit_nonlinear(_emit_gelu), hls=HlsForm.table_of(compact=spec_table))
def gelu(x, *, approximate="none", fixed=None):
    """ONNX Gelu (opset 20): ``approximate="none"``: ``0.5 * x * (1 + erf(x / sqrt(2)))``;
    ``"tanh"``: ``0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))``. With ``fixed``,
    its table (zero below -4, the input above 4)."""
    if fixed:
        return evaluate("gelu", fixed, x, approximate=approximate)
    return torch.nn.functional.gelu(x, approximate=approximate)


@ir_op("nonlinear", "Erf", emit=emit_nonlinear(), hls=HlsForm.table_of(compact=spec_table))
def erf(x, *, fixed=None):
    """The Gauss error function ``2 / sqrt(pi) * integral_0^x exp(-t^2) dt``; with ``fixed``, its table."""
    return evaluate("erf", fixed, x) if fixed else torch.erf(x)


@ir_op("nonlinear", "Exp", emit=emit_nonlinear(), hls=HlsForm.table_of(compact=spec_table))
def exp(x, *, fixed=None):
    """``e^x``; with ``fixed``, its table (clamped at the ends of the input type)."""
    return evaluate("exp", fixed, x) if fixed else torch.exp(x)


@ir_op("nonlinear", "Sqrt", emit=emit_nonlinear(), hls=HlsForm.table_of(compact=spec_table))
def sqrt(x, *, fixed=None):
    """The square root (NaN below zero, as ONNX Sqrt); with ``fixed``, its log2-indexed table of
    positive inputs (inputs below the smallest positive code read its entry)."""
    return evaluate("sqrt", fixed, x) if fixed else torch.sqrt(x)


@ir_op("nonlinear", "Reciprocal", emit=emit_nonlinear(), hls=HlsForm.table_of(compact=spec_table))
def reciprocal(x, *, fixed=None):
    """``1 / x`` (infinite at zero, as ONNX Reciprocal); with ``fixed``, its log2-indexed table of
    positive inputs."""
    return evaluate("reciprocal", fixed, x) if fixed else torch.reciprocal(x)


@ir_op("arith", "ReduceMax", type_rule=_first, emit=_emit_reduce, hls=HlsForm.head("reduce", is_max=True))
def reduce_max(x, *, axes, keepdims=1):
    """ONNX ReduceMax over ``axes`` (a non-empty list of non-negative axes; the importer resolves
    "all axes"). Exact: the result is one of the inputs."""
    return torch.amax(x, dim=tuple(axes), keepdim=bool(keepdims))

