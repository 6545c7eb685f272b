"""The one torch definition of ``ap_fixed``'s float-path arithmetic: rounding and overflow on codes.

Every torch cast in the project comes from these functions: eager :func:`~qfx_onnx.fixed.cast.cast`
(Python scalars), :func:`~qfx_onnx.fixed.fused.fused_cast` (the same functions handed to
``torch.compile``) and the trainable :class:`~qfx_onnx.fixed.quantizer.FixedQuantizer` (per-channel
scale tensors; also traced by ``finetune --compile``). The numpy oracle
(:mod:`qfx_onnx.fixed.reference`) and the ONNX form (:mod:`qfx_onnx.quant.onnx_cast`) are separate
and tested against each other. The bit-level overflow modes (``AP_WRAP`` with N > 0, signed
``AP_WRAP_SM``) are arithmetic on the W-bit code here too; ``ap_int`` and W > 53 stay on cast.py's
int64 path (rounded by :func:`round_`).

Exactness (``y = x * 2**F`` is exact in the work dtype, or an infinity). Each rounding mode is
spelled with ``floor``/``ceil``/``trunc``/``round``, halving and sign copies only, all exact for
every float (the usual ``floor(y + 0.5)`` is not: ``y + 0.5`` rounds up to 1.0 for the largest
float below 0.5, and to an odd neighbour for integers beyond ``2**(p-1)``). With ``m`` the first
rounding of ``2y``: ``AP_RND = ceil(floor(2y) / 2)``, ``AP_RND_MIN_INF = floor(ceil(2y) / 2)``, and
the two sign-symmetric modes apply those to ``|y|`` and copy the sign back. ``AP_WRAP`` keeps the
low W bits as ``v - 2**W * floor(v * 2**-W)`` and, signed, ``v - 2**W * RND(v * 2**-W)``; both
differences are integers of at most W bits, hence exact.

Speed (eager): one new tensor per cast (the scaled input), every later step in place, Python
scalars for every per-type constant. NaN (read by the header as an infinity of its sign) survives
each step as NaN, so it is resolved once at the end: on CPU only when a sum shows one is there,
elsewhere and under ``torch.compile`` unconditionally (no device-to-host sync; inductor fuses it).
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from qfx_onnx.fixed.types import FixedType, OverflowMode as O, QuantMode as Q

TINY = 2.0**-30  # stands in for a nonzero |x * 2**F| that underflowed to zero: sign is all that counts
GRID = {Q.TRN: 1, Q.TRN_ZERO: 1, Q.RND_CONV: 1}  # first rounding on the grid of 2**-(GRID - 1); others 2


@dataclasses.dataclass(frozen=True)
class FloatSpec:
    """What the float path needs of a type, except its binary point: mode, code range and width.

    ``o`` is the effective overflow mode (unsigned ``AP_WRAP_SM`` saturates, as in the header);
    ``lo``/``hi`` are the codes a saturating mode clamps to (``AP_SAT_SYM``'s symmetric low end).
    """

    q: Q
    o: O
    width: int
    signed: bool
    lo: float  # clamp range of the codes
    hi: float
    int_min: float  # the type's full code range (overflow test of AP_SAT_ZERO and the bit-level modes)
    int_max: float
    n: int = 0  # saturation bits of AP_WRAP / AP_WRAP_SM

    @property
    def bit_level(self) -> bool:
        """``AP_WRAP`` with N > 0 or signed ``AP_WRAP_SM``: the header's bit manipulations."""
        return (self.o is O.WRAP and self.n > 0) or self.o is O.WRAP_SM

    @property
    def grid(self) -> int:
        return GRID.get(self.q, 2)

    @property
    def saturating(self) -> bool:
        return self.o in (O.SAT, O.SAT_SYM, O.SAT_ZERO)


@functools.lru_cache(maxsize=1024)
def float_spec(t: FixedType) -> FloatSpec:
    """The :class:`FloatSpec` of ``t`` (any binary point; only W, sign and modes matter)."""
    o = t.o if t.signed or t.o is not O.WRAP_SM else O.SAT
    lo = t.sat_min_code if o is O.SAT_SYM else t.int_min
    return FloatSpec(t.q, o, t.width, t.signed, float(lo), float(t.int_max), float(t.int_min), float(t.int_max), t.n)


def needs_int_path(t: FixedType) -> bool:
    """True for the types cast.py computes on int64 words (ap_int, W > 53)."""
    return t.is_int or t.width > 53


def work_dtype(dtype: torch.dtype, t: FixedType) -> torch.dtype:
    """float32 when every intermediate of ``t``'s float path is exact there, else float64."""
    if dtype == torch.float32 and t.width <= 24 and 0 <= t.frac <= 126 and not needs_int_path(t):
        return torch.float32
    return torch.float64


def lazy_nan() -> bool:
    """Whether NaN may be resolved after a data-dependent check (eager code only)."""
    return not torch.compiler.is_compiling()


def scaled(x: torch.Tensor, scale, dtype: torch.dtype, negative_frac: bool) -> torch.Tensor:
    """A new tensor ``x * scale`` in ``dtype`` (``scale`` = ``2**F`` times the mode's grid, a float
    or a tensor broadcasting along a channel axis). With ``negative_frac`` an underflow to zero
    becomes ``±TINY``: rounding then sees the sign of the nonzero value."""
    y = torch.mul(x, scale) if x.dtype == dtype else x.to(dtype).mul_(scale)
    if negative_frac:
        y = torch.where((y == 0) & (x != 0), torch.copysign(torch.full_like(y, TINY), x.to(dtype)), y)
    return y


def round_(y: torch.Tensor, q: Q) -> torch.Tensor:
    """Round ``y`` to integers in place by mode ``q`` (``y`` already on the mode's grid: ``2 * x * 2**F``
    for the round-to-nearest modes but ``AP_RND_CONV``). May leave ``-0.0``; NaN stays NaN."""
    if q is Q.TRN:
        return y.floor_()
    if q is Q.TRN_ZERO:
        return y.trunc_()
    if q is Q.RND_CONV:
        return y.round_()  # half to even, exact
    if q is Q.RND:
        return y.floor_().mul_(0.5).ceil_()
    if q is Q.RND_MIN_INF:
        return y.ceil_().mul_(0.5).floor_()
    a = y.abs()  # AP_RND_INF: RND on |y|; AP_RND_ZERO: RND_MIN_INF on |y|; then y's sign
    a = a.floor_().mul_(0.5).ceil_() if q is Q.RND_INF else a.ceil_().mul_(0.5).floor_()
    return torch.copysign(a, y, out=y)


def needs_floor(s: FloatSpec) -> bool:
    """Whether :func:`overflow_` needs ``floor(x * 2**F)`` besides the rounded codes."""
    return s.o is O.WRAP_SM and s.n == 0 and s.q is not Q.TRN


def overflow_(c: torch.Tensor, s: FloatSpec, fl: torch.Tensor | None = None) -> torch.Tensor:
    """Resolve overflow on integer codes ``c`` (float, in place where possible) for the float-path
    modes. Infinities saturate (``AP_SAT*``) or give 0 (``AP_SAT_ZERO``: overflow; ``AP_WRAP``:
    no bits below 2**W), NaN stays NaN for :func:`fix_nan_`."""
    if s.o is O.SAT or s.o is O.SAT_SYM:
        return c.clamp_(s.lo, s.hi)
    if s.o is O.SAT_ZERO:
        return c.masked_fill_(c != c.clamp(s.int_min, s.int_max), 0.0)  # NaN != NaN: 0 as well
    if s.bit_level:
        return _bit_level(c, s, fl)
    k = torch.mul(c, 2.0 ** (1 - s.width) if s.signed else 2.0**-s.width)
    k = k.floor_().mul_(0.5).ceil_() if s.signed else k.floor_()  # RND / floor of c * 2**-W
    return c.add_(k, alpha=-(2.0**s.width))  # inf - inf is NaN: fix_nan_ gives it 0


def _wrap(v: torch.Tensor, bits: int) -> torch.Tensor:
    """``v mod 2**bits`` in ``[0, 2**bits)`` for integer-valued finite ``v`` (exact: see the module doc)."""
    return v - torch.floor(v * 2.0**-bits) * 2.0**bits


def _finite(v: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(v), v, 0.0)


def _bit_level(c: torch.Tensor, s: FloatSpec, fl: torch.Tensor | None) -> torch.Tensor:
    """``AP_WRAP`` with N > 0 and signed ``AP_WRAP_SM`` as arithmetic on the W-bit code (the
    header's bit manipulations, as in quant/onnx_cast.py): every intermediate is an integer of at
    most W + 1 bits. NaN is read as an infinity of its sign; an infinity has no bits below 2**W.
    ``AP_WRAP_SM`` with N = 0 needs bit W of ``floor(x * 2**F)``, which is bit W of ``c``'s floor
    for ``AP_TRN``; the other modes pass that floor as ``fl`` (:func:`needs_floor`)."""
    w, n = s.width, s.n
    c = torch.where(torch.isnan(c), torch.copysign(torch.full_like(c, float("inf")), c), c)
    out = (c < s.int_min) | (c > s.int_max)
    neg = c < 0
    c = torch.where(torch.isinf(c), 0.0, c)
    wrapped = _wrap(c, w)
    if s.signed:
        wrapped = torch.where(wrapped > s.int_max, wrapped - 2.0**w, wrapped)
    if s.o is O.WRAP and not s.signed:  # the top N bits set
        adjusted = _wrap(c, w - n) + (2.0**w - 2.0 ** (w - n))
    elif s.o is O.WRAP_SM and n <= 1:
        ld = (_wrap(torch.floor(_finite(c if fl is None else fl) * 2.0**-w), 1) == 1) if n == 0 else neg
        adjusted = torch.where(ld ^ (wrapped < 0), -wrapped - 1.0, wrapped)  # all bits flipped: -v - 1
    else:  # signed AP_WRAP, N >= 1, or AP_WRAP_SM, N >= 2: MSB := sign, bits W-N..W-2 := !sign
        low = _wrap(c, w - n)
        if s.o is O.WRAP_SM:  # and the low W-N bits inverted when bit W-N equals the sign
            bit = _wrap(torch.floor(c * 2.0 ** -(w - n)), 1) == 1
            low = torch.where(bit == neg, (2.0 ** (w - n) - 1.0) - low, low)
        adjusted = low + torch.where(neg, -(2.0 ** (w - 1)), 2.0 ** (w - 1) - 2.0 ** (w - n))
    return torch.where(out, adjusted, wrapped)


def fix_nan_(out: torch.Tensor, x: torch.Tensor, s: FloatSpec, low, high) -> torch.Tensor:
    """Set the NaN entries of ``out`` (where ``x`` was NaN, or an infinity under AP_WRAP) to what the
    header gives: ``high``/``low`` (values of the saturated codes) by the sign of NaN under
    saturation, 0 otherwise. ``low``/``high`` broadcast like the scale."""
    if lazy_nan() and out.device.type == "cpu" and not torch.isnan(out.sum()):
        return out
    # spelled for inductor's CPU code, which vectorizes compares and copysign but not isnan/signbit
    if s.o is O.SAT or s.o is O.SAT_SYM:
        low, high = (v if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=out.dtype, device=out.device)
                     for v in (low, high))  # a Python float would become float32 here
        fill = torch.where(torch.copysign(torch.ones_like(out), x) < 0, low, high).to(out.dtype)
    else:
        fill = torch.zeros((), dtype=out.dtype, device=out.device)
    return torch.where(out != out, fill, out)


def float_codes(x: torch.Tensor, s: FloatSpec, frac: int, dtype: torch.dtype) -> torch.Tensor:
    """The codes of ``T(x)`` (integer-valued floats in ``dtype``) for one binary point ``frac``."""
    fl = scaled(x, 2.0**frac, dtype, frac < 0).floor_() if needs_floor(s) else None
    c = overflow_(round_(scaled(x, 2.0**frac * s.grid, dtype, frac < 0), s.q), s, fl)
    return fix_nan_(c, x, s, s.lo, s.hi)


def float_cast(x: torch.Tensor, s: FloatSpec, frac: int, dtype: torch.dtype) -> torch.Tensor:
    """``T(x)`` on the float path for one binary point ``frac``, in the input's dtype."""
    out = to_values_(float_codes(x, s, frac, dtype), 2.0**-frac)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def to_values_(c: torch.Tensor, inv) -> torch.Tensor:
    """Codes to values in place: ``c * inv + 0.0`` (``-0.0`` becomes ``+0.0``, as in HLS)."""
    return c.mul_(inv).add_(0.0)
