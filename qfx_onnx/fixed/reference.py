"""Integer-domain reference of assigning a ``double`` to an ``ap_fixed``/``ap_int`` (numpy).

This module is the numeric source of truth: the torch emulation, the annotated ONNX and the
generated C++ are all tested against it, and it is tested against the real ``ap_fixed.h``.

It follows ``ap_fixed_base(double)`` in ``ap_fixed_base.h``: the double is split into its sign,
exponent and 53-bit significand ``man`` (value ``man * 2**(exp-52)``), the significand is shifted
to the target's binary point with the quantization increment decided from the dropped bits, and
overflow is resolved from the exact rounded integer. Everything happens on int64/uint64 words; no
floating-point arithmetic decides a bit. Header behaviours that differ from the textbook
definitions are reproduced and listed in ``docs/exactness.md``.
"""

from __future__ import annotations

import numpy as np

from qfx_onnx.fixed.types import FixedType, OverflowMode as O, QuantMode as Q

_MAN_BITS = 52
_SIGN = np.uint64(1 << 63)
_ABS = np.uint64((1 << 63) - 1)
_FRAC_MASK = np.uint64((1 << 52) - 1)
_HIDDEN = np.int64(1 << 52)


def _split(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(neg, exp, man, zero): ``man`` the signed significand with the hidden bit always set.

    Like the header, subnormals, infinities and NaNs get the hidden bit too: an infinity is
    ``±2**1024`` and a NaN ``±1.m * 2**1024`` (the header warns about NaN and carries on).
    """
    bits = x.view(np.uint64)
    neg = (bits & _SIGN) != 0
    exp = ((bits >> np.uint64(_MAN_BITS)) & np.uint64(0x7FF)).astype(np.int64) - 1023
    mag = (bits & _FRAC_MASK).astype(np.int64) | _HIDDEN
    man = np.where(neg, -mag, mag)
    zero = (bits & _ABS) == 0
    return neg, exp, man, zero


def _shift_left_u64(v: np.ndarray, sh: np.ndarray) -> np.ndarray:
    """``v << sh`` modulo 2**64 for 0 <= sh; 0 once sh >= 64."""
    out = v.astype(np.uint64) << np.minimum(sh, 63).astype(np.uint64)
    return np.where(sh >= 64, np.uint64(0), out)


def _sign_extend(v: np.ndarray, width: int, signed: bool) -> np.ndarray:
    """The low ``width`` bits of the uint64 words ``v`` as codes: int64, or uint64 for ap_ufixed<64>."""
    if width == 64:
        return v.view(np.int64) if signed else v
    low = v & np.uint64((1 << width) - 1)
    if not signed:
        return low.astype(np.int64)
    sh = np.uint64(64 - width)
    return (low << sh).view(np.int64) >> np.int64(64 - width)


def _bit(v: np.ndarray, i: int) -> np.ndarray:
    return ((v >> np.uint64(i)) & np.uint64(1)) != 0


def _set_range(v: np.ndarray, lo: int, hi: int, ones: np.ndarray) -> np.ndarray:
    """Set bits lo..hi (inclusive) of uint64 words to all-ones where ``ones`` else to zero."""
    if hi < lo:
        return v
    mask = np.uint64(((1 << (hi - lo + 1)) - 1) << lo)
    return np.where(ones, v | mask, v & ~mask)


def _set_bit(v: np.ndarray, i: int, b: np.ndarray) -> np.ndarray:
    return _set_range(v, i, i, b)


def reference_codes(x, t: FixedType | str) -> np.ndarray:
    """Raw integer codes of ``T(x)`` for each double in ``x``: the value is ``code * 2**-t.frac``.

    Returns int64 (two's complement value) for every type except ``ap_ufixed<64,...>``/``ap_uint<64>``,
    which return uint64. Requires ``t.width <= 64``.
    """
    t = FixedType.coerce(t)
    if t.width > 64:
        raise ValueError(f"the reference casts to at most 64 bits, not {t}")
    x = np.ascontiguousarray(x, dtype=np.float64)
    if t.is_int:
        return _int_codes(x, t)
    neg, exp, man, zero = _split(x)
    w = t.width
    sh = exp - _MAN_BITS + t.frac  # value * 2**F == man * 2**sh

    # --- quantization: floor(man * 2**sh) plus the increment the mode takes from the dropped bits.
    k = np.clip(-sh, 0, 62)  # beyond 62 the floor is 0 or -1 and the remainder test is unchanged
    floor_small = man >> k
    rem = man - (floor_small << k)  # dropped bits, in [0, 2**k)
    half = np.where(k > 0, np.int64(1) << np.maximum(k - 1, 0), np.int64(1) << 62)
    above, tie, inexact = rem > half, rem == half, rem != 0
    inc = {
        Q.TRN: np.zeros_like(above),
        Q.TRN_ZERO: neg & inexact,
        Q.RND: above | tie,
        Q.RND_ZERO: above | (tie & neg),
        Q.RND_MIN_INF: above,
        Q.RND_INF: above | (tie & ~neg),
        Q.RND_CONV: above | (tie & ((floor_small & 1) != 0)),
    }[t.q] & (sh < 0)
    q_small = floor_small + inc  # exact where sh < 0 (|q| <= 2**53)

    # low 64 bits of the rounded integer q, and q itself as an exact float for range tests
    low = np.where(sh < 0, q_small.view(np.uint64), _shift_left_u64(man.view(np.uint64), np.maximum(sh, 0)))
    with np.errstate(over="ignore"):
        q_float = np.where(sh < 0, q_small.astype(np.float64), np.ldexp(man.astype(np.float64), np.maximum(sh, 0)))
    low = np.where(zero, np.uint64(0), low)
    q_float = np.where(zero, 0.0, q_float)

    codes_wrapped = _sign_extend(low, w, t.signed)
    if t.o is O.WRAP and t.n == 0:
        return codes_wrapped

    top = 2.0 ** (w - 1) if t.signed else 2.0**w
    bottom = -(2.0 ** (w - 1)) if t.signed else 0.0
    overflow = q_float >= top
    underflow = q_float < bottom
    neg_src = q_float < 0  # the sign of the rounded source value
    out_of_range = overflow | underflow
    int_max, int_min = t.int_max, t.int_min

    o = t.o
    if o is O.WRAP_SM and not t.signed:
        o = O.SAT  # the header's overflow_adjust only handles AP_WRAP_SM for signed types
    if o in (O.SAT, O.SAT_SYM, O.SAT_ZERO):
        codes = codes_wrapped
        if o is O.SAT_ZERO:
            return np.where(out_of_range, 0, codes).astype(codes.dtype)
        lo = t.sat_min_code if o is O.SAT_SYM else int_min
        if o is O.SAT_SYM and t.signed:
            underflow = underflow | (q_float == bottom)
        codes = np.where(overflow, np.array(int_max).astype(codes.dtype), codes)
        return np.where(underflow, np.array(lo).astype(codes.dtype), codes)

    # Bit-level modes: AP_WRAP with N saturation bits, signed AP_WRAP_SM. Work on the W-bit word.
    v = low & np.uint64((1 << w) - 1) if w < 64 else low.copy()
    n = t.n
    if o is O.WRAP:
        if t.signed:
            adj = _set_bit(v, w - 1, neg_src)
            if n > 1:
                adj = _set_range(adj, w - n, w - 2, ~neg_src)
        else:
            adj = _set_range(v, w - n, w - 1, np.ones_like(neg_src))
    else:  # signed AP_WRAP_SM
        word_mask = np.uint64((1 << w) - 1) if w < 64 else np.uint64(0xFFFFFFFFFFFFFFFF)
        msb = _bit(v, w - 1)
        if n == 0:
            # lD: bit W of floor(x * 2**F), read from the significand (0 when beyond it)
            j = w - sh
            ld = np.where((j >= 0) & (j <= 53), ((man >> np.clip(j, 0, 63)) & 1) != 0, False)
            flip = ld != msb
            adj = np.where(flip, ~v & word_mask, v)
            adj = np.where(flip, _set_bit(adj, w - 1, ld), adj)
        else:
            if n == 1:
                adj = np.where(neg_src != msb, ~v & word_mask, v)
            else:
                lno = _bit(v, w - n)
                adj = np.where(lno == neg_src, ~v & word_mask, v)
                adj = _set_range(adj, w - n, w - 2, ~neg_src)
            adj = _set_bit(adj, w - 1, neg_src)
    v = np.where(out_of_range, adj, v)
    return _sign_extend(v, w, t.signed)


def _int_codes(x: np.ndarray, t: FixedType) -> np.ndarray:
    """``ap_int_base(double)``: the magnitude is truncated, shifted, wrapped, then negated.

    Reproduces the header's quirk that a negative value with magnitude below 0.5 becomes +1.
    """
    neg, exp, man, zero = _split(x)
    mag = np.abs(man)
    sh_amt = _MAN_BITS - exp
    right = np.where((sh_amt > 0) & (sh_amt < 54), mag >> np.clip(sh_amt, 0, 63), 0)
    small = np.where(neg, np.int64(-1), np.int64(0))  # sh_amt >= 54: V = is_neg ? -1 : 0
    left = _shift_left_u64(mag.view(np.uint64), np.maximum(-sh_amt, 0))
    low = np.where(sh_amt >= 54, small.view(np.uint64), np.where(sh_amt > 0, right.view(np.uint64), left))
    low = np.where(sh_amt == 0, mag.view(np.uint64), low)
    low = np.where(neg, (~low) + np.uint64(1), low)  # *this = -(*this), modulo 2**64
    low = np.where(zero, np.uint64(0), low)
    return _sign_extend(low, t.width, t.signed)


def reference_cast(x, t: FixedType | str) -> np.ndarray:
    """``T(x)`` as float64 values (exact while the type has at most 53 significant bits)."""
    t = FixedType.coerce(t)
    codes = reference_codes(x, t)
    return np.ldexp(codes.astype(np.float64), -t.frac) + 0.0
