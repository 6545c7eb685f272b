"""``cast(x, T)``: what ``ap_fixed`` returns when a double of the same value is assigned to it, on torch.

Every ``ap_fixed`` of W <= 53 takes the float path, :mod:`qfx_onnx.fixed.kernels`: the one
definition of each mode's rounding and overflow arithmetic (the bit-level modes, ``AP_WRAP`` with
N saturation bits and ``AP_WRAP_SM``, as arithmetic on the W-bit code), called here with Python
scalars. ``ap_int`` and widths above 53 bits take the int64 path below, on codes rounded by the
same kernels.
float32 tensors are computed in float32 when every intermediate is exact there (W <= 24 and
0 <= F <= 126) and in float64 otherwise; the result has the input's dtype, so a float32 result is
exact only for types with at most 24 significant bits. Tested against
:mod:`qfx_onnx.fixed.reference`, which is tested against the real ``ap_fixed.h``.
"""

from __future__ import annotations

import numpy as np
import torch

from qfx_onnx.fixed.kernels import GRID, float_cast, float_codes, float_spec, needs_int_path, round_, scaled, work_dtype
from qfx_onnx.fixed.types import FixedType, OverflowMode as O



def _needs_int_path(t: FixedType) -> bool:
    return needs_int_path(t)


def _nan_as_inf(x: torch.Tensor) -> torch.Tensor:
    """float64 ``x`` with NaN read as an infinity of its sign (the header treats NaN as huge)."""
    y = x.to(torch.float64)
    return torch.where(torch.isnan(y), torch.copysign(torch.full_like(y, float("inf")), y), y)


def _int_path_round(x: torch.Tensor, t: FixedType) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, floor): float64 ``x * 2**F`` rounded by ``t.q`` (kernels.py's rounding), and its floor."""
    y = _nan_as_inf(x)
    qv = round_(scaled(y, 2.0**t.frac * GRID.get(t.q, 2), torch.float64, t.frac < 0), t.q)
    fl = scaled(y, 2.0**t.frac, torch.float64, t.frac < 0).floor_() if t.o is O.WRAP_SM else qv
    return qv, fl


def _low64(v: torch.Tensor) -> torch.Tensor:
    """The low 64 bits (two's complement) of exact integer-valued float64s, as int64."""
    v = torch.where(torch.isinf(v), torch.zeros_like(v), v)
    big = v.abs() >= 2.0**63  # multiples of 2**11 there: the reduction below is exact
    r = torch.remainder(v, 2.0**64)
    r = torch.where(r >= 2.0**63, r - 2.0**64, r)
    return torch.where(big, r, v).to(torch.int64)


def _sign_extend(v: torch.Tensor, w: int, signed: bool) -> torch.Tensor:
    if w == 64:
        return v
    if signed:
        return (v << (64 - w)) >> (64 - w)
    return v & ((1 << w) - 1)


def _mask(lo: int, hi: int) -> int:
    """int64 constant with bits lo..hi set (two's complement for bit 63)."""
    m = ((1 << (hi - lo + 1)) - 1) << lo
    return m - (1 << 64) if m >= 1 << 63 else m


def _set_range(v: torch.Tensor, lo: int, hi: int, ones: torch.Tensor) -> torch.Tensor:
    if hi < lo:
        return v
    m = _mask(lo, hi)
    return torch.where(ones, v | m, v & ~m)


def _overflow_int(qv: torch.Tensor, fl: torch.Tensor, t: FixedType) -> torch.Tensor:
    """Overflow on int64 words: wide types and the header's bit-level modes (see reference.py)."""
    w, n = t.width, t.n
    word = _low64(qv)
    if w < 64:
        word = word & _mask(0, w - 1)
    top = 2.0 ** (w - 1) if t.signed else 2.0**w
    bottom = -(2.0 ** (w - 1)) if t.signed else 0.0
    overflow, underflow, neg = qv >= top, qv < bottom, qv < 0
    o = t.o if t.signed or t.o is not O.WRAP_SM else O.SAT
    if o is O.WRAP and n == 0:
        return _sign_extend(word, w, t.signed)
    if o in (O.SAT, O.SAT_SYM, O.SAT_ZERO):
        codes = _sign_extend(word, w, t.signed)
        if o is O.SAT_ZERO:
            return codes.masked_fill(overflow | underflow, 0)
        lo = t.sat_min_code if o is O.SAT_SYM else t.int_min
        if o is O.SAT_SYM and t.signed:
            underflow = underflow | (qv == bottom)
        hi = t.int_max if t.int_max < 1 << 63 else -1  # ap_ufixed<64>: all ones
        return codes.masked_fill(overflow, hi).masked_fill(underflow, lo)
    word_mask = _mask(0, w - 1)
    msb = ((word >> (w - 1)) & 1) != 0
    if o is O.WRAP:
        if t.signed:
            adj = _set_range(word, w - 1, w - 1, neg)
            if n > 1:
                adj = _set_range(adj, w - n, w - 2, ~neg)
        else:
            adj = _set_range(word, w - n, w - 1, torch.ones_like(neg))
    else:  # signed AP_WRAP_SM
        if n == 0:
            # lD: bit W of floor(x * 2**F), exact in float: floor(fl / 2**W) mod 2
            ld = torch.remainder(torch.floor(torch.where(torch.isinf(fl), 0.0, fl) * 2.0**-w), 2.0) != 0
            flip = ld != msb
            adj = torch.where(flip, ~word & word_mask, word)
            adj = torch.where(flip, _set_range(adj, w - 1, w - 1, ld), adj)
        else:
            if n == 1:
                adj = torch.where(neg != msb, ~word & word_mask, word)
            else:
                lno = ((word >> (w - n)) & 1) != 0
                adj = torch.where(lno == neg, ~word & word_mask, word)
                adj = _set_range(adj, w - n, w - 2, ~neg)
            adj = _set_range(adj, w - 1, w - 1, neg)
    word = torch.where(overflow | underflow, adj, word)
    return _sign_extend(word, w, t.signed)


def _int_type_codes(x: torch.Tensor, t: FixedType) -> torch.Tensor:
    """``ap_int_base(double)``: truncate toward zero and wrap; a value in (-0.5, 0) gives +1."""
    x = x.to(torch.float64)
    v = torch.where(torch.isnan(x) | torch.isinf(x), torch.zeros_like(x), torch.trunc(x))
    v = torch.where((x < 0) & (x > -0.5), torch.ones_like(v), v)
    return _sign_extend(_low64(v), t.width, t.signed)


def cast_codes(x: torch.Tensor | np.ndarray, t: FixedType | str) -> torch.Tensor | np.ndarray:
    """Raw int64 codes of ``T(x)`` (value = code * 2**-F), exact for every W <= 64.

    For 64-bit unsigned types the int64 holds the bit pattern (codes >= 2**63 read negative).
    A numpy array (or number, list) gives a numpy int64 array back.
    """
    if not isinstance(x, torch.Tensor):
        return cast_codes(_from_numpy(x), t).numpy()
    t = FixedType.coerce(t)
    _check(x, t)
    if t.is_int:
        return _int_type_codes(x, t)
    if _needs_int_path(t):
        qv, fl = _int_path_round(x, t)
        return _overflow_int(qv, fl, t)
    return _low64(float_codes(x, float_spec(t), t.frac, torch.float64))


def cast(x: torch.Tensor | np.ndarray, t: FixedType | str) -> torch.Tensor | np.ndarray:
    """``T(x)`` for every element: the value an ``ap_fixed``/``ap_int`` holds after ``T v = (double)x``.

    Works on CPU and CUDA, float32 and float64, any shape; returns the input's dtype and device.
    A numpy array (or a Python number or list) gives a numpy array back: float32 and float64
    arrays keep their dtype, anything else is cast as float64. Exact whenever the result is
    representable in that dtype (float64: 53 significant bits, float32: 24); a wider value is
    returned rounded to nearest, so use :func:`cast_codes` or float64 where wider values must be
    exact. ``-0.0`` casts to ``+0.0``, as in HLS. Raises TypeError for a non-float tensor or
    non-numeric data, ValueError for W > 64.
    """
    if not isinstance(x, torch.Tensor):
        return cast(_from_numpy(x), t).numpy()
    t = FixedType.coerce(t)
    _check(x, t)
    if _needs_int_path(t):
        v = cast_codes(x, t).to(torch.float64)
        if not t.signed and t.width == 64:
            v = torch.where(v < 0, v + 2.0**64, v)  # the bit pattern of an unsigned 64-bit code
        return (v * 2.0**-t.frac).to(x.dtype)
    return float_cast(x, float_spec(t), t.frac, work_dtype(x.dtype, t))


def _from_numpy(x) -> torch.Tensor:
    """A numpy array, number or list as a float tensor (float32/float64 kept, others float64)."""
    array = np.asarray(x)
    if array.dtype.kind not in "biuf":
        raise TypeError(f"cast expects numbers, got an array of {array.dtype}")
    return torch.from_numpy(np.array(array, dtype=array.dtype if array.dtype.kind == "f" and array.dtype.itemsize >= 4 else np.float64))


def _check(x: torch.Tensor, t: FixedType) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"cast expects a floating-point torch tensor, got {getattr(x, 'dtype', type(x))}")
    if t.width > 64:
        raise ValueError(f"casts are defined for W <= 64, not {t}")
