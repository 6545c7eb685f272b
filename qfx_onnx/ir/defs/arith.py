"""Arithmetic IR ops (exact in float64 on exact inputs) and their rules.

Types are HLS's: ``a+b``, ``a-b`` and ``a*b`` grow to hold every result; max-like ops keep the
union of their inputs; window and axis sums get their accumulator. In C++ each element-wise op is
one expression on ``ap_fixed`` operands assigned to its lossless type, so it is exact.
"""

from __future__ import annotations

import functools
import math
import operator

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx

from qfx_onnx.errors import ExportError
from qfx_onnx.fixed.types import FixedType, accum_type, add_type, mul_type, neg_type, sub_type, union_type
from qfx_onnx.ir.defs import linear
from qfx_onnx.ir.geometry import CONV, MAX_POOL, pool_padding, spatial_rank, torch_pads
from qfx_onnx.ir.opdef import HlsForm, TypeQuery, ir_op, op_of

BIT = FixedType(1, 1, signed=False)  # holds 0 and 1: hard_sigmoid's clamp bounds


# ------------------------------------------------------------------------------------ type rules
def _binary(fn):
    return lambda q: (fn(*q.types), 1)


def _nary_sum_type(q: TypeQuery):
    return functools.reduce(add_type, q.types), len(q.types)


def _first(q: TypeQuery):
    return q.types[0], 1


def _gated_type(q: TypeQuery):
    """leaky_relu/prelu: either x or x * slope."""
    return union_type(q.types[0], mul_type(q.types[0], q.types[1])), 1


def _hard_sigmoid_of(types) -> FixedType:
    return union_type(add_type(mul_type(types[0], types[1]), types[2]), BIT)


def _sum_pool_type(q: TypeQuery):
    terms = math.prod(q.kwargs["kernel_shape"])
    return accum_type(q.types[0], terms), terms


def _reduce_sum_type(q: TypeQuery):
    in_shape = q.shape(q.args[0])
    axes = q.kwargs.get("axes") or range(len(in_shape))
    terms = math.prod(in_shape[a] for a in axes)
    return accum_type(q.types[0], terms), terms


# ------------------------------------------------------------------------------------ C++ (HLS steps)
def _infix(sym: str):
    return lambda T, v, a, t: [f"{T} {v} = {a[0]} {sym} {a[1]};"]


def _clip_cpp(T, v, a, t):
    out = [f"{T} {v} = {a[0]};"]
    if len(a) > 1 and a[1] is not None:
        out.append(f"if ({v} < {a[1]}) {v} = {a[1]};")
    if len(a) > 2 and a[2] is not None:
        out.append(f"if ({v} > {a[2]}) {v} = {a[2]};")
    return out


def _hard_sigmoid_cpp(T, v, a, t):
    return [f"{T} {v} = {a[0]} * {a[1]} + {a[2]};", f"if ({v} < 0) {v} = 0;", f"if ({v} > 1) {v} = 1;"]


def _hard_swish_cpp(T, v, a, t):
    H, h = t["hsig"], f"{v}_h"
    return [f"{H} {h} = {a[0]} * {a[1]} + {a[2]};", f"if ({h} < 0) {h} = 0;", f"if ({h} > 1) {h} = 1;",
            f"{T} {v} = {a[0]} * {h};"]


# ------------------------------------------------------------------------------------ ONNX emission
def _emit_prelu(w, node: fx.Node, out: str, name: str) -> None:
    """``where(x < 0, x * alpha, x)`` with a tensor alpha is exactly PRelu."""
    w.node("PRelu", [w.arg(node.args[0]), w.arg(node.args[1])], [out], name)


def _emit_clip(w, node: fx.Node, out: str, name: str) -> None:
    """Clip with its bounds as inputs; opset 18 wants one-element bounds."""
    x, low, high = (list(node.args) + [None, None])[:3]
    for bound in (low, high):
        if bound is not None and math.prod(w.shape(bound, f"{node.name!r} (clip)")) != 1:
            raise ExportError(f"{node.name!r}: Clip bounds must be single values, got shape {w.values[bound].shape}")
    w.node("Clip", [w.arg(x), w.arg(low), w.arg(high)], [out], name)


def _hard_sigmoid_nodes(w, node: fx.Node, out: str, name: str, ir_op: str | None) -> None:
    x, alpha, beta = (w.arg(a) for a in node.args[:3])
    scaled = w.fresh(f"{name}::mul")
    w.node("Mul", [x, alpha], [scaled], scaled)
    shifted = w.fresh(f"{name}::add")
    w.node("Add", [scaled, beta], [shifted], shifted)
    zero = w.const(f"{name}::zero", np.array(0.0, dtype=np.float32))
    one = w.const(f"{name}::one", np.array(1.0, dtype=np.float32))
    w.node("Clip", [shifted, zero, one], [out], name, ir_op=ir_op)


def _emit_hard_sigmoid(w, node: fx.Node, out: str, name: str) -> None:
    """``clip(x * alpha + beta, 0, 1)`` as Mul, Add, Clip (ONNX HardSigmoid takes float attributes)."""
    _hard_sigmoid_nodes(w, node, out, name, "hard_sigmoid")


def _emit_hard_swish(w, node: fx.Node, out: str, name: str) -> None:
    """``x * hard_sigmoid(x, alpha, beta)``."""
    gate = w.fresh(f"{name}::hard_sigmoid")
    _hard_sigmoid_nodes(w, node, gate, gate, None)
    w.node("Mul", [w.arg(node.args[0]), gate], [out], name, ir_op="hard_swish")


def _emit_sum_pool(w, node: fx.Node, out: str, name: str) -> None:
    """A depthwise Conv with an all-ones kernel (exact); ceil_mode becomes grown end pads."""
    x = node.args[0]
    shape = w.shape(x, f"{node.name!r} (sum_pool)")
    kw = node.kwargs
    begins, ends = pool_padding(shape[2:], kw["kernel_shape"], kw["strides"], kw["pads"], kw["dilations"], kw.get("ceil_mode", 0))
    channels = shape[1]
    ones = w.const(f"{name}::ones", np.ones((channels, 1, *kw["kernel_shape"]), dtype=np.float32))
    w.node("Conv", [w.arg(x), ones], [out], name, ir_op="sum_pool", group=channels, strides=list(kw["strides"]),
           pads=list(begins) + list(ends), dilations=list(kw["dilations"]))


def _emit_reduce(w, node: fx.Node, out: str, name: str) -> None:
    """ReduceSum/ReduceMax at opset 18 take ``axes`` as an input, not an attribute."""
    axes = w.const(f"{name}::axes", np.asarray(list(node.kwargs["axes"]), dtype=np.int64))
    w.node(op_of(node.target).onnx_op, [w.arg(node.args[0]), axes], [out], name, keepdims=int(node.kwargs.get("keepdims", 1)))


# ------------------------------------------------------------------------------------ read-back
def _is(node, fn) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and op_of(node.target) is op_of(fn)


def _restore_sum_pool(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``conv(x, ones)`` (grouped, the all-ones kernel) -> ``sum_pool(x)`` with the conv's window."""
    if not _is(node, linear.conv) or len(node.args) > 2 and node.args[2] is not None or node.args[1].op != "get_attr":
        return False
    kernel = operator.attrgetter(node.args[1].target)(gm)
    if not bool((kernel == 1).all()) or kernel.shape[1] != 1:
        return False
    kw = node.kwargs
    node.target = sum_pool
    node.args = (node.args[0],)
    node.kwargs = dict(kernel_shape=list(kernel.shape[2:]), ceil_mode=0, strides=kw["strides"], pads=kw["pads"], dilations=kw["dilations"])
    return True


def _hard_sigmoid_args(node: fx.Node) -> tuple | None:
    """``(x, alpha, beta)`` of ``clip(add(mul(x, alpha), beta), 0, 1)``, or None."""
    if not _is(node, clip) or not _is(node.args[0], add) or not _is(node.args[0].args[0], mul):
        return None
    (x, alpha), beta = node.args[0].args[0].args, node.args[0].args[1]
    return x, alpha, beta


def _restore_hard_sigmoid(gm: fx.GraphModule, node: fx.Node) -> bool:
    args = _hard_sigmoid_args(node)
    if args is None:
        return False
    node.target, node.args, node.kwargs = hard_sigmoid, args, {}
    return True


def _restore_hard_swish(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``mul(x, hard_sigmoid-as-clip(x, alpha, beta))`` -> ``hard_swish(x, alpha, beta)``."""
    if not _is(node, mul):
        return False
    args = _hard_sigmoid_args(node.args[1])
    if args is None or args[0] is not node.args[0]:
        return False
    node.target, node.args, node.kwargs = hard_swish, args, {}
    return True


# ------------------------------------------------------------------------------------ the ops
@ir_op("arith", "Add", type_rule=_binary(add_type), hls=HlsForm.step(_infix("+")))
def add(a, b):
    """Broadcast ``a + b``."""
    return a + b


@ir_op("arith", "Sub", type_rule=_binary(sub_type), hls=HlsForm.step(_infix("-")))
def sub(a, b):
    """Broadcast ``a - b``."""
    return a - b


@ir_op("arith", "Mul", type_rule=_binary(mul_type), hls=HlsForm.step(_infix("*"), products=1))
def mul(a, b):
    """Broadcast ``a * b``."""
    return a * b


@ir_op("arith", "Sum", type_rule=_nary_sum_type,
       hls=HlsForm.step(lambda T, v, a, t: [f"{T} {v} = {' + '.join(a)};"]))
def nary_sum(*inputs):
    """ONNX Sum: the broadcast sum of all inputs, added left to right."""
    return functools.reduce(torch.add, inputs)


@ir_op("arith", "Neg", type_rule=lambda q: (neg_type(q.types[0]), 1),
       hls=HlsForm.step(lambda T, v, a, t: [f"{T} {v} = -{a[0]};"]))
def neg(x):
    """``-x``."""
    return -x


@ir_op("arith", "Relu", type_rule=_first, cast_role="act",
       hls=HlsForm.step(lambda T, v, a, t: [f"{T} {v} = {a[0]} > 0 ? {T}({a[0]}) : {T}(0);"]))
def relu(x):
    """``max(x, 0)``."""
    return torch.relu(x)


_GATED_CPP = HlsForm.step(lambda T, v, a, t: [f"{T} {v} = {a[0]} < 0 ? {T}({a[0]} * {a[1]}) : {T}({a[0]});"],
                          products=1)


@ir_op("arith", "LeakyRelu", type_rule=_gated_type, cast_role="act", emit=_emit_prelu, hls=_GATED_CPP)
def leaky_relu(x, alpha):
    """``where(x < 0, x * alpha, x)`` with ``alpha`` a constant tensor."""
    return torch.where(x < 0, x * alpha, x)


@ir_op("arith", "PRelu", type_rule=_gated_type, cast_role="act", hls=_GATED_CPP)
def prelu(x, slope):
    """``where(x < 0, x * slope, x)``; ``slope`` broadcasts to ``x`` (a learned weight)."""
    return torch.where(x < 0, x * slope, x)


@ir_op("arith", "Clip", type_rule=lambda q: (union_type(*q.types), 1), cast_role="act", emit=_emit_clip,
       hls=HlsForm.step(_clip_cpp))
def clip(x, min=None, max=None):  # noqa: A002 - ONNX input names
    """ONNX Clip; a missing bound (None) is no bound."""
    if min is not None:
        x = torch.maximum(x, min)
    if max is not None:
        x = torch.minimum(x, max)
    return x


@ir_op("arith", "HardSigmoid", type_rule=lambda q: (_hard_sigmoid_of(q.types), 1), cast_role="act",
       emit=_emit_hard_sigmoid, restore=_restore_hard_sigmoid, hls=HlsForm.step(_hard_sigmoid_cpp, products=1))
def hard_sigmoid(x, alpha, beta):
    """``clip(x * alpha + beta, 0, 1)`` with ``alpha``, ``beta`` constant tensors."""
    return torch.clamp(x * alpha + beta, 0, 1)


@ir_op("arith", "HardSwish", type_rule=lambda q: (mul_type(q.types[0], _hard_sigmoid_of(q.types)), 1),
       cast_role="act", emit=_emit_hard_swish, restore=_restore_hard_swish,
       hls=HlsForm.step(_hard_swish_cpp, products=2, temps=lambda types: {"hsig": _hard_sigmoid_of(types)}))
def hard_swish(x, alpha, beta):
    """``x * hard_sigmoid(x, alpha, beta)``; ONNX fixes alpha = 1/6, beta = 0.5."""
    return x * hard_sigmoid(x, alpha, beta)


@ir_op("arith", "MaxPool", type_rule=_first, hls=HlsForm.head("pool", is_max=True))
def max_pool(x, *, kernel_shape, strides, pads, dilations, ceil_mode=0):
    """ONNX MaxPool (single output): padding is -inf, ``ceil_mode`` keeps partial windows."""
    rank = spatial_rank(x, "max_pool")
    begins, ends = pool_padding(x.shape[2:], kernel_shape, strides, pads, dilations, ceil_mode)
    x = F.pad(x, torch_pads(begins, ends), value=-math.inf)
    return MAX_POOL[rank](x, tuple(kernel_shape), tuple(strides), 0, tuple(dilations))


@ir_op("arith", "GlobalMaxPool", type_rule=_first, hls=HlsForm.head("reduce", is_max=True))
def global_max_pool(x):
    """The max over every spatial dim, kept as size-1 dims."""
    return torch.amax(x, dim=tuple(range(2, x.dim())), keepdim=True)


@ir_op("arith", None, type_rule=_sum_pool_type, emit=_emit_sum_pool, restore=_restore_sum_pool,
       hls=HlsForm.head("pool"))
def sum_pool(x, *, kernel_shape, strides, pads, dilations, ceil_mode=0):
    """Window sums with zero padding (AveragePool before its reciprocal); exact in float64.
    Same keywords and window geometry as ``max_pool``."""
    rank = spatial_rank(x, "sum_pool")
    begins, ends = pool_padding(x.shape[2:], kernel_shape, strides, pads, dilations, ceil_mode)
    x = F.pad(x, torch_pads(begins, ends))
    channels = x.shape[1]
    ones = x.new_ones((channels, 1, *kernel_shape))
    return CONV[rank](x, ones, None, tuple(strides), 0, tuple(dilations), channels)


@ir_op("arith", "ReduceSum", type_rule=_reduce_sum_type, emit=_emit_reduce, hls=HlsForm.head("reduce"))
def reduce_sum(x, *, axes, keepdims=1):
    """ONNX ReduceSum over ``axes`` (a non-empty list; the importer resolves "all axes")."""
    return torch.sum(x, dim=tuple(axes), keepdim=bool(keepdims))
