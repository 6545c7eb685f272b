"""The one torch definition of ``ap_fixed``'s float-path arithmetic: rounding and overflow on codes.

Every torch cast in the project comes from these functions: eager :func:`~qfx_onnx.fixed.cast.cast`
(Python scalars), :func:`~qfx_onnx.fixed.fused.fused_cast` (the same functions handed to
``torch.compile``) and the trainable :class:`~qfx_onnx.fixed.quantizer.FixedQuantizer` (per-channel
scale tensors; also traced by ``finetune --compile``). The numpy oracle
(:mod:`qfx_onnx.fixed.reference`) and the ONNX form (:mod:`qfx_onnx.quant.onnx_cast`) are separate
and tested against each other. The bit-level overflow modes (``AP_WRAP`` with N > 0, signed
``AP_WRAP_SM``) are arithmetic on the code here too, in place as the others (``_bit_level``: a
clamp of the bits above W - N and a reflection of the bits below); ``ap_int`` and W > 53 stay on
cast.py's int64 path (rounded by :func:`round_`).

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
    nan_lo: float = 0.0  # the codes of -inf and +inf (and of NaN, read as one by its sign)
    nan_hi: float = 0.0

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
    return FloatSpec(t.q, o, t.width, t.signed, float(lo), float(t.int_max), float(t.int_min), float(t.int_max), t.n,
                     *_infinity_codes(o, t.width, t.n, t.signed, float(lo), float(t.int_max)))


def _infinity_codes(o: O, w: int, n: int, signed: bool, lo: float, hi: float) -> tuple[float, float]:
    """The codes of -inf and +inf: saturated; 0 where the low W bits (all 0) are the result; under
    the bit-level modes the low bits 0 with the top N bits set as on overflow (see _bit_level)."""
    if o is O.SAT or o is O.SAT_SYM:
        return lo, hi
    if not (o is O.WRAP_SM or n > 0) or o is O.SAT_ZERO or (o is O.WRAP_SM and n == 0):
        return 0.0, 0.0  # AP_WRAP_SM, N = 0: lD (bit W of an infinity) is 0, as is bit W-1
    top = 2.0 ** (w - 1) - 2.0 ** (w - n)  # sign 0, bits W-N..W-2 set
    if not signed:
        return 2.0**w - 2.0 ** (w - n), 2.0**w - 2.0 ** (w - n)
    if o is O.WRAP:
        return -(2.0 ** (w - 1)), top
    if n == 1:  # bit W-1 (0) differs from the sign of -inf: -inf inverts the low bits
        return -1.0, 0.0
    return -(2.0 ** (w - 1)), 2.0 ** (w - 1) - 1.0  # bit W-N (0) equals the sign of +inf: inverted


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


def _bit_level(c: torch.Tensor, s: FloatSpec, fl: torch.Tensor | None) -> torch.Tensor:
    """``AP_WRAP`` with N > 0 and signed ``AP_WRAP_SM`` as arithmetic on the code ``c`` (in place
    with one temporary, two for ``AP_WRAP_SM`` with N > 0; no boolean masks but one of unsigned
    ``AP_WRAP``'s; the header's bit manipulations, as in quant/onnx_cast.py). With ``L`` the low
    W - N bits, ``m = floor(c * 2**-(W-N))`` the bits above and ``m'`` its clamp to the range it
    has in range, the header's result is ``L' + 2**(W-N) * m'``: ``m' = m`` in range; on overflow
    the top N bits are set (unsigned) or sign, !sign... (signed), which is exactly the clamp; and
    ``AP_WRAP_SM`` inverts ``L`` (``L' = 2**(W-N) - 1 - L``) on overflow when bit W-N equals the
    sign (N >= 2) or bit W-1 differs from it (N = 1), in both cases when ``m - m'`` is odd.
    Every intermediate is an integer (or a half) of at most W bits, hence exact. An infinite code
    becomes NaN (``inf - inf``), as NaN stays NaN; :func:`fix_nan_` gives both the codes of an
    infinity of their sign (``FloatSpec.nan_lo``/``nan_hi``), as the header reads NaN."""
    n = s.n
    if s.o is O.WRAP_SM and n == 0:
        return _wrap_sm0(c, s.width, fl)
    step = 2.0 ** (s.width - n)
    k = torch.mul(c, 1.0 / step).floor_()  # m
    c.add_(k, alpha=-step)  # L
    if not s.signed:  # in range m is in [0, 2**N); beyond either end all N bits are set
        top = 2.0**n - 1.0
        return c.add_(k.masked_fill_(k < 0, top).clamp_(max=top), alpha=step)
    lo, hi = -(2.0 ** (n - 1)), 2.0 ** (n - 1) - 1.0
    if s.o is O.WRAP:
        return c.add_(k.clamp_(lo, hi), alpha=step)
    clamped = torch.clamp(k, lo, hi)
    flip = k.fmod_(2.0).sub_(clamped).fmod_(2.0)  # ±1 where m - m' is odd (m mod 2 first: m - m' may round)
    half = (step - 1.0) / 2.0  # L' = half ± (L - half): a reflection, exact in halves
    c.sub_(half).addcmul_(c, flip.mul_(flip), value=-2.0).add_(half)
    return c.add_(clamped, alpha=step)


def _wrap_sm0(c: torch.Tensor, w: int, fl: torch.Tensor | None) -> torch.Tensor:
    """Signed ``AP_WRAP_SM`` with N = 0: on overflow the low W bits ``v`` are inverted when bit W-1
    differs from ``lD``, bit W of ``floor(x * 2**F)`` (``fl``; ``c`` itself for ``AP_TRN``, ``fl``
    None). Either way the result's sign bit is ``lD``, so with ``u = v + 1/2`` (``v`` signed)
    the result is ``|u| * (-1)**lD - 1/2``; in range ``lD`` is the sign of ``c`` and this is ``c``.
    From ``c``: ``v = c - 2**W * M`` with ``M = RND(c * 2**-W)``, and ``(-1)**lD = (-1)**M * sign(u)``,
    so the result is ``u * (-1)**M - 1/2``. From ``fl`` (in ``{c - 1, c}``): only ``fl = -1`` with
    ``c = 0`` has another bit W than ``c`` in range, and ``max(fl, -2|c|)`` mends that alone."""
    t = torch.abs(c)
    if fl is not None:
        torch.maximum(fl, t.mul_(-2.0), out=fl)
    t = torch.mul(c, 2.0 ** (1 - w), out=t).floor_().mul_(0.5).ceil_()  # M
    c.add_(t, alpha=-(2.0**w)).add_(0.5)  # u
    if fl is None:
        sign = t.fmod_(2.0)  # ±1 where M is odd
    else:
        c.abs_()
        sign = fl.mul_(2.0**-w).floor_().fmod_(2.0)  # ±1 where lD is set
    return c.addcmul_(c, sign.mul_(sign), value=-2.0).sub_(0.5)  # times 1 - 2 * (0 or 1)


def fix_nan_(out: torch.Tensor, x: torch.Tensor, s: FloatSpec, low, high) -> torch.Tensor:
    """Set the NaN entries of ``out`` (where ``x`` was NaN, or an infinity under the wrapping
    modes) to what the header gives for an infinity of the sign of ``x``: ``low``/``high`` (the
    codes ``s.nan_lo``/``s.nan_hi``, or their values; they broadcast like the scale) under
    saturation and the bit-level modes, 0 under ``AP_SAT_ZERO`` and plain ``AP_WRAP``."""
    if lazy_nan() and out.device.type == "cpu" and not torch.isnan(out.sum()):
        return out
    # spelled for inductor's CPU code, which vectorizes compares and copysign but not isnan/signbit
    if s.o is O.SAT or s.o is O.SAT_SYM or s.bit_level:
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
    return fix_nan_(c, x, s, s.nan_lo, s.nan_hi)


def float_cast(x: torch.Tensor, s: FloatSpec, frac: int, dtype: torch.dtype) -> torch.Tensor:
    """``T(x)`` on the float path for one binary point ``frac``, in the input's dtype."""
    out = to_values_(float_codes(x, s, frac, dtype), 2.0**-frac)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def to_values_(c: torch.Tensor, inv) -> torch.Tensor:
    """Codes to values in place: ``c * inv + 0.0`` (``-0.0`` becomes ``+0.0``, as in HLS)."""
    return c.mul_(inv).add_(0.0)
