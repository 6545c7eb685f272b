"""ONNX forms of the table units and kernels, bit-exact in onnxruntime.

Everything inside runs in float64 (``tensor(double)``), where each value of the emulation is
exact (the kernels keep every intermediate within 53 bits). A table lookup is

    code = Floor(x * 2**F_in)                       the input code, exact
    k    = Floor((Clip(code, lo, hi) - lo) * 2**-shift)  = (clamp(code) - lo) >> shift
    y    = Gather(table_values, Cast<int64>(k))     table_values: an initializer, float64

(a :class:`~qfx_onnx.fixed.tables.Log2Index` finds the leading one by comparing the code with
every power of two, and shifts by multiplying with a gathered power of two),

with ``Where`` for the ``"zero"``/``"identity"`` beyond-range modes. Casts between intermediate
types (:func:`emit_cast`) are the same float algorithm as :mod:`qfx_onnx.fixed.cast` for the modes
the kernels use (``AP_TRN``, ``AP_RND``, ``AP_RND_CONV`` with ``AP_SAT`` or ``AP_WRAP``);
other modes raise ``ExportError``.

Builders append nodes and initializers to an :class:`OnnxBuilder`; the ``*_model`` helpers wrap
one unit or kernel in a model whose input and output are float32 (exact for types of at most 24
bits; the annotated ONNX's tensors) or float64.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qfx_onnx.errors import ExportError
from qfx_onnx.fixed.cast import cast
from qfx_onnx.fixed.tables import Log2Index, LookupTable
from qfx_onnx.fixed.types import FixedType, OverflowMode as O, QuantMode as Q
from qfx_onnx.nonlinear.kernels import LayerNormConfig, SoftmaxConfig

OPSET = 18  # ReduceMax/ReduceSum with an axes input (18), Clip with inputs (11)
IR_VERSION = 10
DOUBLE = TensorProto.DOUBLE


class OnnxBuilder:
    """Nodes and initializers of a graph under construction, with fresh names under ``prefix``."""

    def __init__(self, prefix: str = "qfx") -> None:
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def fresh(self, stem: str) -> str:
        self._count += 1
        return f"{self.prefix}_{stem}{self._count}"

    def const(self, value, dtype=np.float64, stem: str = "c") -> str:
        name = self.fresh(stem)
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        out = self.fresh(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out


def emit_cast(b: OnnxBuilder, x: str, t: FixedType) -> str:
    """``T(x)`` on float64 ``x`` (values with at most 53 significant bits)."""
    if t.width > 53 or t.n or t.is_int or t.q not in (Q.TRN, Q.RND, Q.RND_CONV) or t.o not in (O.SAT, O.WRAP):
        raise ExportError(f"no float64 ONNX form for the intermediate cast to {t} "
                          "(supported: AP_TRN, AP_RND, AP_RND_CONV with AP_SAT or AP_WRAP, W <= 53)")
    y = b.op("Mul", x, b.const(math.ldexp(1.0, t.frac)))
    if t.q is Q.TRN:
        q = b.op("Floor", y)
    elif t.q is Q.RND:  # floor(y + 0.5) is exact: y has at most 53 significant bits and |y| < 2**52
        q = b.op("Floor", b.op("Add", y, b.const(0.5)))
    else:
        q = b.op("Round", y)  # ONNX Round is round-half-to-even
    if t.o is O.SAT:
        q = b.op("Clip", q, b.const(float(t.int_min)), b.const(float(t.int_max)))
    else:
        period = b.const(2.0**t.width)
        m = b.op("Mod", q, period, fmod=1)
        m = b.op("Where", b.op("Less", m, b.const(0.0)), b.op("Add", m, period), m)
        if t.signed:
            m = b.op("Where", b.op("Greater", m, b.const(float(t.int_max))), b.op("Sub", m, period), m)
        q = m
    return b.op("Mul", q, b.const(math.ldexp(1.0, -t.frac)))


def emit_table(b: OnnxBuilder, x: str, table: LookupTable) -> str:
    """``table(x)`` on float64 ``x`` holding values of ``table.in_type``."""
    idx, t = table.index, table.in_type
    code = b.op("Floor", b.op("Mul", x, b.const(math.ldexp(1.0, t.frac))))
    lo, hi = b.const(float(idx.code_lo)), b.const(float(idx.code_hi))
    c = b.op("Clip", code, lo, hi)
    if isinstance(idx, Log2Index):
        k = _log2_index(b, c, idx)
    else:
        k = b.op("Sub", c, lo)
        if idx.shift:
            k = b.op("Floor", b.op("Mul", k, b.const(math.ldexp(1.0, -idx.shift))))
    values = b.const(table.values, stem=f"{table.name}_table")
    y = b.op("Gather", values, b.op("Cast", k, to=TensorProto.INT64))
    for mode, cmp, bound in ((table.below, "Less", lo), (table.above, "Greater", hi)):
        if mode == "zero":
            y = b.op("Where", b.op(cmp, code, bound), b.const(0.0), y)
        elif mode == "identity":
            y = b.op("Where", b.op(cmp, code, bound), emit_cast(b, x, table.out_type), y)
    return y


def _log2_index(b: OnnxBuilder, c: str, idx: Log2Index) -> str:
    """``e * 2**mb + (c >> (e - mb)) - 2**mb - raw_lo`` on float64 codes ``c >= 2**mb``: the
    leading-one position ``e`` counts the powers of two at or below ``c`` (exact comparisons),
    ``c >> (e - mb)`` is ``Floor(c * 2**(mb - e))`` with the power gathered from a table."""
    mb, width = idx.mant_bits, idx.in_type.width
    powers = b.const(np.ldexp(1.0, np.arange(width)))
    above = b.op("GreaterOrEqual", b.op("Unsqueeze", c, b.const([-1], dtype=np.int64)), powers)
    count = b.op("ReduceSum", b.op("Cast", above, to=DOUBLE), b.const([-1], dtype=np.int64), keepdims=0)
    e = b.op("Sub", count, b.const(1.0))
    scales = b.const(np.ldexp(1.0, mb - np.arange(width)))
    top = b.op("Floor", b.op("Mul", c, b.op("Gather", scales, b.op("Cast", e, to=TensorProto.INT64))))
    k = b.op("Add", b.op("Mul", e, b.const(float(1 << mb))), top)
    return b.op("Sub", k, b.const(float((1 << mb) + idx.raw_lo)))


def emit_softmax(b: OnnxBuilder, x: str, cfg: SoftmaxConfig) -> str:
    """:func:`~qfx_onnx.nonlinear.kernels.softmax_exact` over the last axis of float64 ``x``."""
    axes = b.const([-1], dtype=np.int64)
    d = b.op("Sub", x, b.op("ReduceMax", x, axes, keepdims=1))
    e = emit_table(b, d, cfg.exp)
    r = emit_table(b, b.op("ReduceSum", e, axes, keepdims=1), cfg.reciprocal)
    return emit_cast(b, b.op("Mul", e, r), cfg.out_type)


def emit_layer_norm(b: OnnxBuilder, x: str, gamma: np.ndarray, beta: np.ndarray, cfg: LayerNormConfig) -> str:
    """:func:`~qfx_onnx.nonlinear.kernels.layer_norm_exact` over the last axis of float64 ``x``;
    ``gamma``/``beta`` become initializers holding their values cast to their types."""
    axes = b.const([-1], dtype=np.int64)
    inv_n = b.const(cfg.inv_n)
    mean = emit_cast(b, b.op("Mul", b.op("ReduceSum", x, axes, keepdims=1), inv_n), cfg.mean_type)
    c = b.op("Sub", x, mean)
    q = b.op("ReduceSum", b.op("Mul", c, c), axes, keepdims=1)
    var = emit_cast(b, b.op("Mul", q, inv_n), cfg.var_type)
    z = emit_cast(b, b.op("Mul", c, emit_table(b, var, cfg.rsqrt)), cfg.norm_type)
    g = b.const(cast(np.asarray(gamma, np.float64), cfg.gamma_type), stem="gamma")
    bt = b.const(cast(np.asarray(beta, np.float64), cfg.beta_type), stem="beta")
    return emit_cast(b, b.op("Add", b.op("Mul", z, g), bt), cfg.out_type)


def _model(b: OnnxBuilder, emit, shape: list, io_dtype: int) -> onnx.ModelProto:
    x = "x"
    inner = b.op("Cast", x, to=DOUBLE) if io_dtype != DOUBLE else x
    y = emit(inner)
    b.nodes.append(helper.make_node("Cast", [y], ["y"], to=io_dtype))
    graph = helper.make_graph(b.nodes, "qfx_nonlinear", [helper.make_tensor_value_info(x, io_dtype, shape)],
                              [helper.make_tensor_value_info("y", io_dtype, shape)], b.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model


def table_model(table: LookupTable, io_dtype: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """A model ``y = table(x)`` on a vector ``x``."""
    b = OnnxBuilder()
    return _model(b, lambda x: emit_table(b, x, table), ["n"], io_dtype)


def softmax_model(cfg: SoftmaxConfig, io_dtype: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """A model ``y = softmax(x)`` for ``x`` of shape ``[batch, n]``."""
    b = OnnxBuilder()
    return _model(b, lambda x: emit_softmax(b, x, cfg), ["batch", cfg.n], io_dtype)


def layer_norm_model(cfg: LayerNormConfig, gamma: np.ndarray, beta: np.ndarray,
                     io_dtype: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """A model ``y = layer_norm(x)`` for ``x`` of shape ``[batch, n]``."""
    b = OnnxBuilder()
    return _model(b, lambda x: emit_layer_norm(b, x, gamma, beta, cfg), ["batch", cfg.n], io_dtype)
