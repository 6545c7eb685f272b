"""Linear IR ops (sums of products) and their rules: the type is the lossless accumulator of the
products, ``accum_type(a*b, terms)`` plus the bias (HLS derives ``a*b`` and ``a+b``; the number
of terms bounds the carry bits). HLS heads: dense (gemm, matmul by a constant), matmul_act (matmul of
two activations) and conv."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import fx

from qfx_onnx.fixed.types import accum_type, add_type, mul_type
from qfx_onnx.ir.geometry import CONV, CONV_T, spatial_pads, spatial_rank, torch_pads
from qfx_onnx.ir.opdef import HlsForm, NoHls, TypeQuery, ir_op


def _with_bias(q: TypeQuery, acc, bias_index: int = 2):
    bias = q.args[bias_index] if len(q.args) > bias_index else None
    if isinstance(bias, fx.Node) and q.type(bias) is not None:
        return add_type(acc, q.type(bias))
    return acc


def _conv_type(q: TypeQuery):
    terms = math.prod(q.shape(q.args[1])[1:])
    return _with_bias(q, accum_type(mul_type(q.types[0], q.types[1]), terms)), terms


def _conv_transpose_type(q: TypeQuery):
    w_shape = q.shape(q.args[1])
    terms = math.prod(w_shape[2:]) * w_shape[0] // q.kwargs["group"]
    return _with_bias(q, accum_type(mul_type(q.types[0], q.types[1]), terms)), terms


def _gemm_type(q: TypeQuery):
    a_shape = q.shape(q.args[0])
    terms = a_shape[0] if q.kwargs.get("transA", 0) else a_shape[-1]
    return _with_bias(q, accum_type(mul_type(q.types[0], q.types[1]), terms)), terms


def _matmul_type(q: TypeQuery):
    terms = q.shape(q.args[0])[-1]
    return accum_type(mul_type(q.types[0], q.types[1]), terms), terms


@ir_op("linear", "Conv", type_rule=_conv_type, weight_axis=lambda kw: 0, hls=HlsForm.head("conv"))
def conv(x, w, b=None, *, strides, pads, dilations, group):
    """ONNX Conv with explicit (possibly asymmetric) ``pads``: begins for each spatial dim, then ends."""
    rank = spatial_rank(x, "conv")
    begins, ends = spatial_pads(pads)
    padding: Sequence[int] = begins
    if begins != ends:
        x = F.pad(x, torch_pads(begins, ends))
        padding = [0] * rank
    return CONV[rank](x, w, b, tuple(strides), tuple(padding), tuple(dilations), group)


@ir_op("linear", "ConvTranspose", type_rule=_conv_transpose_type, weight_axis=lambda kw: 1,
       hls=NoHls("ConvTranspose has no HLS layer template"))
def conv_transpose(x, w, b=None, *, strides, pads, dilations, group, output_padding):
    """ONNX ConvTranspose with explicit ``pads`` (negative pads grow the output with zeros).

    The full transposed convolution is cropped by ``pads`` and extended by ``output_padding``
    before the bias is added, so asymmetric pads and any output_padding are exact.
    """
    rank = spatial_rank(x, "conv_transpose")
    full = CONV_T[rank](x, w, None, tuple(strides), 0, 0, group, tuple(dilations))
    begins, ends = spatial_pads(pads)
    ends = [e - extra for e, extra in zip(ends, output_padding)]
    y = F.pad(full, [-p for p in torch_pads(begins, ends)])
    if b is not None:
        y = y + b.reshape((1, -1) + (1,) * rank)
    return y


@ir_op("linear", "Gemm", type_rule=_gemm_type, weight_axis=lambda kw: 0 if kw.get("transB", 0) else 1,
       hls=HlsForm.head("dense"))
def gemm(a, b, c=None, *, transA=0, transB=0):
    """ONNX Gemm with alpha = beta = 1 (the importer folds them into constants)."""
    y = (a.t() if transA else a) @ (b.t() if transB else b)
    return y if c is None else y + c


def _matmul_layer(builder, node, data) -> str:
    """A product of the data by a constant weight is a dense layer (K-hot capable); any other,
    such as attention's ``Q K^T`` and ``P V`` (two activations), a ``matmul_act`` layer."""
    return "dense" if len(data) == 1 and node.args[0] is data[0] and node.args[1] in builder.const else "matmul_act"


_matmul_layer.kinds = ("dense", "matmul_act")  # what the chooser may return (the op-definition walk)


@ir_op("linear", "MatMul", type_rule=_matmul_type, weight_axis=lambda kw: -1, hls=HlsForm.head(_matmul_layer))
def matmul(a, b):
    """ONNX MatMul (numpy matmul semantics)."""
    return torch.matmul(a, b)
