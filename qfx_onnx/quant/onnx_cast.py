"""An ``ap_fixed`` cast as an ONNX local function built from standard ops, for onnxruntime.

One ``FunctionProto`` per fixed-point type, in the domain :data:`DOMAIN`, named after the type
(:func:`function_name`). The body repeats the exact float algorithm of :mod:`qfx_onnx.fixed.cast`
in float32: scale by ``2**F``, ``Floor``, compare with the midpoint ``floor + 0.5``, then resolve
overflow with ``Clip``/``Where``/``Mod`` arithmetic. Bit-level overflow modes (``AP_WRAP`` with N
saturation bits, signed ``AP_WRAP_SM``) are written as the equivalent arithmetic on the W-bit code.
Every intermediate is an integer below 2**25 or a power-of-two scaling, so float32 evaluation is
exact for types of at most 24 bits with ``2**±F`` a normal float32; :func:`check_onnx_castable`
refuses anything else.

Per-channel types (one binary point per channel, the same width, sign and modes) share one
function, :func:`cast_function_per_channel`, whose scales ``2**F`` and ``2**-F`` are inputs that
broadcast along the channel axis (:func:`channel_scales`); nothing else in the body depends on F.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from qfx_onnx.errors import ExportError
from qfx_onnx.fixed.types import FixedType, OverflowMode as O, QuantMode as Q

DOMAIN = "qfx.onnx"
OPSET = 18  # body ops need: Clip with inputs (11), GreaterOrEqual (12), IsInf (10)
PREFIX = "ApFixed_"
IR_VERSION = 10  # what onnxruntime >= 1.17 reads; onnx.helper would write the newest


def function_name(t: FixedType) -> str:
    return PREFIX + t.c_name()


def check_onnx_castable(t: FixedType, where: str) -> None:
    """Raise ExportError unless float32 can run the cast of ``t`` exactly."""
    if t.is_int:
        raise ExportError(f"{where}: {t} is an ap_int; annotate tensors with ap_fixed types")
    if t.width > 24:
        raise ExportError(f"{where}: {t} is wider than float32's 24-bit significand")
    if not -126 <= t.frac <= 126 or not -126 <= t.frac - t.width:
        raise ExportError(f"{where}: {t} scales by 2**{t.frac}, beyond float32's normal range")


class _Body:
    """Accumulates the nodes of one function body with fresh value names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self._count = 0

    def const(self, value: float) -> str:
        name = self._fresh("c")
        self.nodes.append(helper.make_node(
            "Constant", [], [name], value=helper.make_tensor(name, TensorProto.FLOAT, [], [float(np.float32(value))])))
        return name

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        out = self._fresh(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def where(self, cond: str, a: str, b: str) -> str:
        return self.op("Where", cond, a, b)

    def _fresh(self, stem: str) -> str:
        self._count += 1
        return f"{stem}{self._count}"


def _round(b: _Body, y: str, q: Q) -> tuple[str, str]:
    fl = b.op("Floor", y)
    if q is Q.TRN:
        return fl, fl
    if q is Q.TRN_ZERO:
        return b.where(b.op("Less", y, b.const(0.0)), b.op("Ceil", y), fl), fl
    if q is Q.RND_CONV:
        return b.op("Round", y), fl  # ONNX Round is round-half-to-even
    mid = b.op("Add", fl, b.const(0.5))
    not_int = b.op("Not", b.op("Equal", y, fl))
    if q is Q.RND:
        up = b.op("And", b.op("GreaterOrEqual", y, mid), not_int)
    elif q is Q.RND_MIN_INF:
        up = b.op("Greater", y, mid)
    else:
        tie = b.op("And", b.op("Equal", y, mid), not_int)
        side = b.op("Less", y, b.const(0.0)) if q is Q.RND_ZERO else b.op("Greater", y, b.const(0.0))
        up = b.op("Or", b.op("Greater", y, mid), b.op("And", tie, side))
    return b.op("Add", fl, b.op("Cast", up, to=TensorProto.FLOAT)), fl


def _wrap(b: _Body, v: str, bits: int) -> str:
    """``v mod 2**bits`` in [0, 2**bits) for integer-valued v; infinities give 0."""
    period = b.const(2.0**bits)
    v = b.where(b.op("IsInf", v), b.const(0.0), v)
    m = b.op("Mod", v, period, fmod=1)  # C fmod: exact, sign of v
    return b.where(b.op("Less", m, b.const(0.0)), b.op("Add", m, period), m)


def _overflow(b: _Body, qv: str, fl: str, t: FixedType) -> str:
    w, n = t.width, t.n
    lo, hi = float(t.int_min), float(t.int_max)
    o = t.o if t.signed or t.o is not O.WRAP_SM else O.SAT  # header: unsigned WRAP_SM saturates
    if o is O.SAT:
        return b.op("Clip", qv, b.const(lo), b.const(hi))
    if o is O.SAT_SYM:
        return b.op("Clip", qv, b.const(float(t.sat_min_code)), b.const(hi))
    out_of_range = b.op("Or", b.op("Less", qv, b.const(lo)), b.op("Greater", qv, b.const(hi)))
    if o is O.SAT_ZERO:
        return b.where(out_of_range, b.const(0.0), qv)
    wrapped = _wrap(b, qv, w)
    if t.signed:
        wrapped = b.where(b.op("Greater", wrapped, b.const(hi)), b.op("Sub", wrapped, b.const(2.0**w)), wrapped)
    if o is O.WRAP and n == 0:
        return wrapped
    neg = b.op("Less", qv, b.const(0.0))
    if o is O.WRAP and not t.signed:  # top N bits forced to one
        low = _wrap(b, qv, w - n)
        adjusted = b.op("Add", low, b.const(2.0**w - 2.0 ** (w - n)))
    elif o is O.WRAP_SM and n <= 1:
        # flipping every bit of a W-bit two's complement word v gives -v - 1
        flipped = b.op("Sub", b.op("Neg", wrapped), b.const(1.0))
        if n == 0:  # lD, bit W of floor(x * 2**F), decides against the result's sign bit
            ld = b.op("Equal", _wrap(b, b.op("Floor", b.op("Mul", fl, b.const(2.0**-w))), 1), b.const(1.0))
        else:
            ld = neg
        adjusted = b.where(b.op("Xor", ld, b.op("Less", wrapped, b.const(0.0))), flipped, wrapped)
    else:
        # signed AP_WRAP with N >= 1 or AP_WRAP_SM with N >= 2: MSB := sign, bits W-N..W-2 := !sign,
        # low W-N bits kept (AP_WRAP_SM inverts them when bit W-N equals the sign).
        low = _wrap(b, qv, w - n)
        if o is O.WRAP_SM:
            bit = b.op("Equal", _wrap(b, b.op("Floor", b.op("Mul", qv, b.const(2.0 ** -(w - n)))), 1), b.const(1.0))
            inverted = b.op("Sub", b.const(2.0 ** (w - n) - 1), low)
            low = b.where(b.op("Equal", bit, neg), inverted, low)
        top = b.where(neg, b.const(-(2.0 ** (w - 1))), b.const(2.0 ** (w - 1) - 2.0 ** (w - n)))
        adjusted = b.op("Add", top, low)
    return b.where(out_of_range, adjusted, wrapped)


def _cast_body(t: FixedType, scale: str | None, inv_scale: str | None) -> list[onnx.NodeProto]:
    """Nodes computing ``y = T(x)``; the scales ``2**F`` and ``2**-F`` are the named values, or
    constants from ``t`` when None. Nothing else in the body depends on the binary point."""
    b = _Body()
    y = b.op("Mul", "x", scale or b.const(2.0**t.frac))
    qv, fl = _round(b, y, t.q)
    code = _overflow(b, qv, fl, t)
    scaled = b.op("Mul", code, inv_scale or b.const(2.0**-t.frac))
    b.nodes.append(helper.make_node("Add", [scaled, b.const(0.0)], ["y"]))  # -0.0 becomes +0.0
    return b.nodes


def cast_function(t: FixedType) -> onnx.FunctionProto:
    """The local function ``DOMAIN::function_name(t)``: float32 ``x`` -> float32 ``T(x)``."""
    check_onnx_castable(t, str(t))
    return helper.make_function(
        DOMAIN, function_name(t), ["x"], ["y"], _cast_body(t, None, None),
        opset_imports=[helper.make_opsetid("", OPSET)], doc_string=f"{t}: exact in float32",
    )


def channel_function_name(t: FixedType) -> str:
    """The per-channel cast's name: ``t``'s name without the integer bits (they vary by channel)."""
    head = f"{'fx' if t.signed else 'ufx'}{t.width}_{t.integer}".replace("-", "m")
    return f"{PREFIX}ch_{'fx' if t.signed else 'ufx'}{t.width}{t.c_name()[len(head):]}"


def check_channel_types(types: Sequence[FixedType], where: str) -> None:
    """Raise ExportError unless ``types`` share width, sign and modes and float32 runs each exactly."""
    first = types[0]
    for t in types:
        if (t.width, t.signed, t.q, t.o, t.n, t.is_int) != (first.width, first.signed, first.q, first.o, first.n, first.is_int):
            raise ExportError(f"{where}: per-channel types must share width, sign and modes ({first} vs {t})")
        check_onnx_castable(t, where)


def cast_function_per_channel(t: FixedType) -> onnx.FunctionProto:
    """The local function ``DOMAIN::channel_function_name(t)``: ``(x, scale, inv_scale) -> T_c(x)``.

    ``scale`` holds ``2**F_c`` and ``inv_scale`` ``2**-F_c`` per channel, shaped to broadcast along
    the channel axis of ``x`` (see :func:`channel_scales`); the code bounds depend only on the
    width, sign and modes that every channel type shares with ``t``.
    """
    check_onnx_castable(t, str(t))
    return helper.make_function(
        DOMAIN, channel_function_name(t), ["x", "scale", "inv_scale"], ["y"], _cast_body(t, "scale", "inv_scale"),
        opset_imports=[helper.make_opsetid("", OPSET)],
        doc_string=f"per-channel {channel_function_name(t)[len(PREFIX) + 3:]}: exact in float32",
    )


def channel_scales(types: Sequence[FixedType], axis: int, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 ``2**F_c`` and ``2**-F_c`` shaped ``[1, ..., C (at axis), ..., 1]`` for a rank-``rank`` tensor."""
    shape = [1] * rank
    shape[axis] = len(types)
    fracs = np.array([t.frac for t in types])
    return np.ldexp(1.0, fracs).astype(np.float32).reshape(shape), np.ldexp(1.0, -fracs).astype(np.float32).reshape(shape)


def cast_model(t: FixedType) -> onnx.ModelProto:
    """A one-node model applying the cast to a float32 vector ``x`` (tests, debugging)."""
    node = helper.make_node(function_name(t), ["x"], ["y"], domain=DOMAIN)
    graph = helper.make_graph(
        [node], "cast", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])],
    )
    return helper.make_model(
        graph, functions=[cast_function(t)],
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)], ir_version=IR_VERSION,
    )
