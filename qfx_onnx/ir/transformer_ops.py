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

import torch

from qfx_onnx.ir.ops import ir_op


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


@ir_op("nonlinear", "Gelu")
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


@ir_op("arith", "ReduceMax")
def reduce_max(x, *, axes, keepdims=1):
    """ONNX ReduceMax over ``axes`` (a non-empty list of non-negative axes; the importer resolves
    "all axes"). Exact: the result is one of the inputs."""
    return torch.amax(x, dim=tuple(axes), keepdim=bool(keepdims))

