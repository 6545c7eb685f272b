"""The ``ap_fixed`` type an imported quantizer stands for: QONNX ``Quant``/``BipolarQuant`` and
ONNX ``QuantizeLinear``/``DequantizeLinear`` pairs (QDQ), or why it has none.

A quantizer ``y = s * (clamp(R(x / s + z), lo, hi) - z)`` is a cast to ``ap_fixed`` exactly when
the scale ``s`` is a power of two ``2**-F`` and the integer range ``[lo - z, hi - z]`` is the
code range of a W-bit type:

=========================================  ==============================================
quantizer (QONNX attributes / QDQ dtype)    ap_fixed type (F = -log2 s)
=========================================  ==============================================
signed=1 narrow=0, W bits; int<W>           ``ap_fixed<W, W-F, Q, AP_SAT>``
signed=1 narrow=1, W >= 2                   ``ap_fixed<W, W-F, Q, AP_SAT_SYM>`` (-(2^(W-1)-1) .. 2^(W-1)-1)
signed=0 narrow=0; uint<W>                  ``ap_ufixed<W, W-F, Q, AP_SAT>``
signed=0 narrow=1 (0 .. 2^W-2)              error: no ap_ufixed has that range
W = 1 signed (QONNX executes it bipolar)    as ``BipolarQuant``: ``x >= 0 ? s : -s``
zero point z != 0                           the shifted range, when it is a full signed or
                                            unsigned range (uint8 z=128: ``ap_fixed<8>``) and
                                            the rounding commutes with adding z; else error
=========================================  ==============================================

Rounding: QONNX ``rounding_mode`` -> ``ap_q_mode`` by the one mode table,
:mod:`qfx_onnx.qonnx_modes` (``CEIL`` and ``UP`` have no counterpart: an error); QDQ always rounds
half to even (ONNX QuantizeLinear), ``AP_RND_CONV``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from qfx_onnx import qonnx_modes
from qfx_onnx.fixed.types import FixedType, OverflowMode, QuantMode

# modes whose result moves by exactly z when the input moves by an integer z (half to even only
# for even z): only then is a zero point a shift of the range
_SHIFT_INVARIANT = {QuantMode.TRN}
MAX_IMPORT_WIDTH = 32  # codes of wider quantizers do not fit float32 ONNX exactly


class QuantTypeError(ValueError):
    """Why a quantizer has no ap_fixed type (the message completes 'tensor X: ...')."""


class ScaleNotPowerOfTwo(QuantTypeError):
    """The scale is no power of two: approximating it (``approximate_scales``) would help."""


@dataclass(frozen=True)
class Pin:
    """The type(s) an imported quantizer fixes on a tensor: one, or one per channel of ``axis``."""

    types: tuple[FixedType, ...]
    axis: int | None = None

    def meta(self) -> dict:
        """``node.meta`` entries the quantizer reads (see :mod:`qfx_onnx.quant.quantize`)."""
        pinned = list(self.types) if self.axis is not None else self.types[0]
        return {"pinned_type": pinned, "pinned_axis": self.axis}

    def type_text(self) -> tuple[str, ...] | str:
        return tuple(str(t) for t in self.types) if self.axis is not None else str(self.types[0])

    def describe(self) -> str:
        if self.axis is None:
            return str(self.types[0])
        return f"{self.types[0]} .. {self.types[-1]} (per channel, axis {self.axis})"


def rounding_of(mode: str) -> QuantMode:
    """The ``ap_q_mode`` of a QONNX ``rounding_mode`` (:func:`qfx_onnx.qonnx_modes.rounding_of`);
    QuantTypeError if none rounds that way."""
    try:
        return qonnx_modes.rounding_of(mode)
    except ValueError as exc:
        raise QuantTypeError(str(exc)) from None


def power_of_two_exponents(scale: np.ndarray) -> np.ndarray | None:
    """``e`` with ``scale == 2**e`` elementwise (int64), or None when some entry is not a positive
    power of two."""
    s = np.asarray(scale, dtype=np.float64)
    if s.size == 0 or not np.all(np.isfinite(s)) or np.any(s <= 0):
        return None
    mantissa, exponent = np.frexp(s)
    if np.any(mantissa != 0.5):
        return None
    return (exponent - 1).astype(np.int64)


def channel_axis(scale: np.ndarray, rank: int | None) -> int | None:
    """The axis of a rank-``rank`` tensor along which ``scale`` (broadcast to it, numpy rules) varies;
    None when ``scale`` has one element. QuantTypeError when it varies along several."""
    s = np.asarray(scale)
    if s.size == 1:
        return None
    if rank is None or s.ndim > rank:
        raise QuantTypeError(f"scale of shape {tuple(s.shape)} does not broadcast to the tensor (rank {rank})")
    dims = [rank - s.ndim + i for i, d in enumerate(s.shape) if d > 1]
    if len(dims) != 1:
        raise QuantTypeError(f"scale of shape {tuple(s.shape)} varies along more than one axis")
    return dims[0]


def code_range_type(lo: int, hi: int, frac: int, q: QuantMode) -> FixedType:
    """The saturating type whose codes run exactly from ``lo`` to ``hi`` at ``frac`` fractional bits."""
    if lo == 0 and hi >= 1 and (hi + 1) & hi == 0:
        width = hi.bit_length()
        return FixedType(width, width - frac, False, q, OverflowMode.SAT)
    if lo < 0 and hi >= 0 and (hi + 1) & hi == 0:
        width = hi.bit_length() + 1
        if lo == -(hi + 1):
            return FixedType(width, width - frac, True, q, OverflowMode.SAT)
        if lo == -hi and width >= 2:
            return FixedType(width, width - frac, True, q, OverflowMode.SAT_SYM)
    raise QuantTypeError(f"integer range [{lo}, {hi}] is not the range of any ap_fixed or ap_ufixed type")


def int_quant_range(width: int, signed: bool, narrow: bool) -> tuple[int, int]:
    """QONNX ``min_int``/``max_int`` (``qonnx.custom_op.general.intquant``)."""
    if signed:
        top = (1 << (width - 1)) - 1
        return (-top if narrow else -top - 1), top
    return 0, (1 << width) - (2 if narrow else 1)


def shifted_type(lo: int, hi: int, zero_point: np.ndarray, frac: int, q: QuantMode, *, round_then_shift: bool) -> FixedType:
    """The type of ``(clamp(R(x*2**F) + z, lo, hi) - z) * 2**-F`` (``round_then_shift``, ONNX
    QuantizeLinear) or of ``(clamp(R(x*2**F + z)) - z) * 2**-F`` (QONNX Quant)."""
    zp = np.unique(np.asarray(zero_point, dtype=np.float64))
    if zp.size != 1:
        raise QuantTypeError(f"zero points differ across channels ({zp[:4].tolist()}...)")
    z = float(zp[0])
    if z != int(z):
        raise QuantTypeError(f"zero point {z:g} is not an integer")
    z = int(z)
    if z and not round_then_shift and not (q in _SHIFT_INVARIANT or (q is QuantMode.RND_CONV and z % 2 == 0)):
        raise QuantTypeError(f"zero point {z} with this rounding_mode rounds ties differently than a shift of the range")
    try:
        return code_range_type(lo - z, hi - z, frac, q)
    except QuantTypeError as exc:
        if z:
            raise QuantTypeError(f"zero point {z} shifts the {exc} (use symmetric quantization: zero point 0, "
                                 "e.g. onnxruntime's quantize_static with extra_options ActivationSymmetric=True)") from None
        raise


def quant_pin(scale: np.ndarray, zero_point: np.ndarray, width: int, signed: bool, narrow: bool, q: QuantMode,
              rank: int | None, *, round_then_shift: bool = False) -> Pin:
    """The pin of a power-of-two-scaled quantizer (see the module table); QuantTypeError otherwise."""
    if not 1 <= width <= MAX_IMPORT_WIDTH:
        raise QuantTypeError(f"bit width {width} is outside 1..{MAX_IMPORT_WIDTH}")
    exps = power_of_two_exponents(scale)
    lo, hi = int_quant_range(width, signed, narrow)
    if exps is None:
        shown = np.asarray(scale, dtype=np.float64).ravel()
        try:  # say everything that is wrong with this quantizer at once
            shifted_type(lo, hi, zero_point, 0, q, round_then_shift=round_then_shift)
        except QuantTypeError as exc:
            raise QuantTypeError(f"scale {_show(shown)} is not a power of two, and {exc}") from None
        raise ScaleNotPowerOfTwo(f"scale {_show(shown)} is not a power of two")
    axis = channel_axis(scale, rank)
    fracs = [int(-e) for e in exps.ravel()] if axis is not None else [int(-exps.ravel()[0])]
    types = tuple(shifted_type(lo, hi, zero_point, f, q, round_then_shift=round_then_shift) for f in fracs)
    return Pin(types, axis)


def bipolar_pin(scale: np.ndarray, rank: int | None) -> Pin:
    """The type holding ``±s``: ``ap_fixed<2, 2+e>`` for ``s = 2**e``."""
    exps = power_of_two_exponents(scale)
    if exps is None:
        raise QuantTypeError(f"scale {_show(np.asarray(scale, dtype=np.float64).ravel())} is not a power of two")
    axis = channel_axis(scale, rank)
    exps_list = [int(e) for e in exps.ravel()] if axis is not None else [int(exps.ravel()[0])]
    return Pin(tuple(FixedType(2, 2 + e, True, QuantMode.TRN, OverflowMode.SAT) for e in exps_list), axis)


def _show(values: np.ndarray) -> str:
    text = ", ".join(f"{v:.9g}" for v in values[:3])
    return text if values.size == 1 else f"[{text}{', ...' if values.size > 3 else ''}]"


# --------------------------------------------------------------------------------------------------
# approximating a scale that is not a power of two


def multiplier(value: float, bits: int) -> tuple[int, int]:
    """``(M, F)``: the nearest ``M * 2**-F`` to ``value > 0`` with ``M`` an integer of ``bits``
    bits (``2**(bits-1) <= M < 2**bits``; ties to even)."""
    exponent = math.frexp(value)[1]  # value = f * 2**exponent, 0.5 <= f < 1
    frac = bits - exponent
    m = round(math.ldexp(value, frac))
    if m == 1 << bits:  # rounded up to the next power of two
        m, frac = m >> 1, frac - 1
    return m, frac


@dataclass(frozen=True)
class Approximation:
    """A quantizer with a scale ``s`` that is no power of two, computed in fixed point:
    ``code = T_code(x * (1/s)~)``, ``y = code * s~``, with ``(1/s)~`` and ``s~`` the nearest
    ``bits``-bit multipliers (one per channel of ``axis`` for a weight). ``out`` holds the exact
    product of each channel; ``max_rel_error`` is the largest relative error of ``s~`` and ``(1/s)~``."""

    code: FixedType
    inverse: tuple[tuple[int, int], ...]
    scale: tuple[tuple[int, int], ...]
    out: tuple[FixedType, ...]
    axis: int | None
    bits: int
    max_rel_error: float

    def out_pin(self) -> Pin:
        return Pin(self.out, self.axis)

    @staticmethod
    def multiplier_type(mf: tuple[int, int], bits: int) -> FixedType:
        """The ``ap_ufixed`` holding ``M * 2**-F`` exactly."""
        return FixedType(bits, bits - mf[1], False)


def approximate(scale: np.ndarray, zero_point: np.ndarray, width: int, signed: bool, narrow: bool, q: QuantMode,
                rank: int | None, bits: int, *, round_then_shift: bool = False) -> Approximation:
    """The :class:`Approximation` of a quantizer whose scale is not a power of two."""
    if not 1 <= width <= MAX_IMPORT_WIDTH:
        raise QuantTypeError(f"bit width {width} is outside 1..{MAX_IMPORT_WIDTH}")
    s = np.asarray(scale, dtype=np.float64)
    if not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise QuantTypeError(f"scale {_show(s.ravel())} is not positive and finite")
    axis = channel_axis(s, rank)
    values = s.ravel().tolist() if axis is not None else [float(s.ravel()[0])]
    lo, hi = int_quant_range(width, signed, narrow)
    code = shifted_type(lo, hi, zero_point, 0, q, round_then_shift=round_then_shift)
    scales = tuple(multiplier(v, bits) for v in values)
    inverses = tuple(multiplier(1.0 / v, bits) for v in values)
    error = max(max(abs(math.ldexp(m, -f) - v) / v, abs(math.ldexp(mi, -fi) * v - 1.0))
                for v, (m, f), (mi, fi) in zip(values, scales, inverses))
    out_width = code.width + bits
    out = tuple(FixedType(out_width, out_width - f, code.signed, QuantMode.TRN, OverflowMode.SAT) for _, f in scales)
    return Approximation(code, inverses, scales, out, axis, bits, error)
