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
from qfx_onnx.ir.opdef import HlsForm, ir_op


@ir_op("nonlinear", "LayerNormalization")
def layer_norm(x, scale, bias=None, *, axis, epsilon):
    """ONNX LayerNormalization (opset 17): over the dims ``axis .. rank-1`` (``axis`` non-negative),
    ``(x - mean) / sqrt(var + epsilon) * scale + bias`` with ``var`` the biased (population)
    variance ``mean((x - mean)^2)``; ``scale`` and ``bias`` broadcast to those trailing dims.
    Computed in the input's precision (ONNX's ``stash_type`` float32 on float32 inputs)."""
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


@ir_op("nonlinear", "Gelu", emit=_emit_gelu)
def gelu(x, *, approximate="none"):
    """ONNX Gelu (opset 20): ``approximate="none"``: ``0.5 * x * (1 + erf(x / sqrt(2)))``;
    ``"tanh"``: ``0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))``."""
    return torch.nn.functional.gelu(x, approximate=approximate)


@ir_op("nonlinear", "Erf")
def erf(x):
    """The Gauss error function ``2 / sqrt(pi) * integral_0^x exp(-t^2) dt``."""
    return torch.erf(x)


@ir_op("nonlinear", "Exp")
def exp(x):
    """``e^x``."""
    return torch.exp(x)


@ir_op("nonlinear", "Sqrt")
def sqrt(x):
    """The square root (NaN below zero, as ONNX Sqrt)."""
    return torch.sqrt(x)


@ir_op("nonlinear", "Reciprocal")
def reciprocal(x):
    """``1 / x`` (infinite at zero, as ONNX Reciprocal)."""
    return torch.reciprocal(x)


@ir_op("arith", "ReduceMax", type_rule=_first, emit=_emit_reduce, hls=HlsForm.head("reduce", is_max=True))
def reduce_max(x, *, axes, keepdims=1):
    """ONNX ReduceMax over ``axes`` (a non-empty list of non-negative axes; the importer resolves
    "all axes"). Exact: the result is one of the inputs."""
    return torch.amax(x, dim=tuple(axes), keepdim=bool(keepdims))

