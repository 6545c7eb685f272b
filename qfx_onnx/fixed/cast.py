"""``cast(x, T)``: what ``ap_fixed`` returns when a double of the same value is assigned to it, on torch.

Float arithmetic here only ever computes exact results: scaling by powers of two, ``floor``,
``floor + 0.5`` and comparisons. Bit-level overflow modes (``AP_WRAP`` with N
saturation bits, signed ``AP_WRAP_SM``), ``ap_int`` and widths above 53 bits take an int64 path.
float32 tensors are computed in float32 when every intermediate is exact there (W <= 24 and
0 <= F <= 126) and in float64 otherwise; the result has the input's dtype, so a float32 result is
exact only for types with at most 24 significant bits. Tested against
:mod:`qfx_onnx.fixed.reference`, which is tested against the real ``ap_fixed.h``.
"""

from __future__ import annotations

import numpy as np
import torch

from qfx_onnx.fixed.types import FixedType, OverflowMode as O, QuantMode as Q

_TINY = 2.0**-30  # stands in for a nonzero |x * 2**F| that underflowed to zero: sign is all that counts


def _needs_int_path(t: FixedType) -> bool:
    return t.is_int or t.width > 53 or (t.o is O.WRAP and t.n > 0) or (t.o is O.WRAP_SM and t.signed)


def _work_dtype(x: torch.Tensor, t: FixedType) -> torch.dtype:
    if x.dtype == torch.float32 and t.width <= 24 and 0 <= t.frac <= 126 and not _needs_int_path(t):
        return torch.float32
    return torch.float64


def _scaled(x: torch.Tensor, t: FixedType, dtype: torch.dtype) -> torch.Tensor:
    """``x * 2**F`` in ``dtype`` with NaN read as an infinity (the header treats NaN as huge)."""
    y = x.to(dtype)
    y = torch.where(torch.isnan(y), torch.copysign(torch.full_like(y, float("inf")), y), y)
    y = y * (2.0**t.frac)
    if t.frac < 0:
        # x * 2**F may underflow to zero; the rounding only needs the sign of a tiny value.
        y = torch.where((y == 0) & (x != 0), torch.copysign(torch.full_like(y, _TINY), x.to(dtype)), y)
    return y


def _round(y: torch.Tensor, q: Q) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, floor): ``y`` rounded to an integer by mode ``q``, and ``floor(y)``."""
    fl = torch.floor(y)
    if q is Q.TRN:
        return fl, fl
    if q is Q.TRN_ZERO:
        return torch.trunc(y), fl
    if q is Q.RND_CONV:
        return torch.round(y), fl  # torch.round is round-half-to-even, exact
    # Compare y with the midpoint fl + 0.5 rather than forming y - fl: for y in (-0.5, 0) the
    # difference 1 + y can round to exactly 0.5. fl + 0.5 is exact unless |y| is so large that y
    # is already an integer, which the y != fl term covers.
    mid = fl + 0.5
    above = y > mid
    if q is Q.RND:
        up = (y >= mid) & (y != fl)
    elif q is Q.RND_MIN_INF:
        up = above
    else:
        tie = (y == mid) & (y != fl)
        up = above | (tie & ((y < 0) if q is Q.RND_ZERO else (y > 0)))  # RND_ZERO / RND_INF
    return fl + up.to(y.dtype), fl


def _overflow_float(qv: torch.Tensor, t: FixedType) -> torch.Tensor:
    """Resolve overflow on exact integer-valued floats, for W <= 53 and the non-bit-level modes."""
    lo, hi = float(t.int_min), float(t.int_max)
    o = t.o if t.signed or t.o is not O.WRAP_SM else O.SAT
    if o is O.SAT:
        return qv.clamp_(lo, hi)
    if o is O.SAT_SYM:
        return qv.clamp_(float(t.sat_min_code), hi)
    if o is O.SAT_ZERO:
        return qv.masked_fill_((qv < lo) | (qv > hi), 0.0)
    # AP_WRAP, N == 0: keep the low W bits. remainder() by a power of two is exact here, and inf
    # (|x * 2**F| beyond the float range) has only zero bits below 2**W.
    qv = torch.where(torch.isinf(qv), torch.zeros_like(qv), qv)
    m = torch.remainder(qv, 2.0**t.width)
    if t.signed:
        m = torch.where(m > hi, m - 2.0**t.width, m)
    return m


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
    y = _scaled(x, t, torch.float64)
    qv, fl = _round(y, t.q)
    if _needs_int_path(t):
        return _overflow_int(qv, fl, t)
    return _low64(_overflow_float(qv, t))


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
    dtype = _work_dtype(x, t)
    y = _scaled(x, t, dtype)
    qv, _ = _round(y, t.q)
    qv = _overflow_float(qv, t)
    return (qv.mul_(2.0**-t.frac).add_(0.0)).to(x.dtype)


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
