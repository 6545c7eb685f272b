"""The one torch definition of ``ap_fixed``'s float-path arithmetic: rounding and overflow on codes.

Every torch cast in the project comes from these functions: eager :func:`~qfx_onnx.fixed.cast.cast`
(Python scalars), :func:`~qfx_onnx.fixed.fused.fused_cast` (the same functions handed to
``torch.compile``) and the trainable :class:`~qfx_onnx.fixed.quantizer.FixedQuantizer` (per-channel
scale tensors; also traced by ``finetune --compile``). The numpy oracle
(:mod:`qfx_onnx.fixed.reference`) and the ONNX form (:mod:`qfx_onnx.quant.onnx_cast`) are separate
and tested against each other. Bit-level overflow modes (``AP_WRAP`` with N > 0, signed
``AP_WRAP_SM``), ``ap_int`` and W > 53 stay on cast.py's int64 path.

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
    int_min: float  # the type's full code range (overflow test of AP_SAT_ZERO)
    int_max: float

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
    return FloatSpec(t.q, o, t.width, t.signed, float(lo), float(t.int_max), float(t.int_min), float(t.int_max))


def needs_int_path(t: FixedType) -> bool:
    """True for the types cast.py computes on int64 words (bit-level overflow, ap_int, W > 53)."""
    return t.is_int or t.width > 53 or (t.o is O.WRAP and t.n > 0) or (t.o is O.WRAP_SM and t.signed)


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


def overflow_(c: torch.Tensor, s: FloatSpec) -> torch.Tensor:
    """Resolve overflow on integer codes ``c`` (float, in place where possible) for the float-path
    modes. Infinities saturate (``AP_SAT*``) or give 0 (``AP_SAT_ZERO``: overflow; ``AP_WRAP``:
    no bits below 2**W), NaN stays NaN for :func:`fix_nan_`."""
    if s.o is O.SAT or s.o is O.SAT_SYM:
        return c.clamp_(s.lo, s.hi)
    if s.o is O.SAT_ZERO:
        return c.masked_fill_(c != c.clamp(s.int_min, s.int_max), 0.0)  # NaN != NaN: 0 as well
    k = torch.mul(c, 2.0 ** (1 - s.width) if s.signed else 2.0**-s.width)
    k = k.floor_().mul_(0.5).ceil_() if s.signed else k.floor_()  # RND / floor of c * 2**-W
    return c.add_(k, alpha=-(2.0**s.width))  # inf - inf is NaN: fix_nan_ gives it 0


def fix_nan_(out: torch.Tensor, x: torch.Tensor, s: FloatSpec, low, high) -> torch.Tensor:
    """Set the NaN entries of ``out`` (where ``x`` was NaN, or an infinity under AP_WRAP) to what the
    header gives: ``high``/``low`` (values of the saturated codes) by the sign of NaN under
    saturation, 0 otherwise. ``low``/``high`` broadcast like the scale."""
    if lazy_nan() and out.device.type == "cpu" and not torch.isnan(out.sum()):
        return out
    if s.o is O.SAT or s.o is O.SAT_SYM:
        low, high = (v if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=out.dtype, device=out.device)
                     for v in (low, high))  # a Python float would become float32 here
        fill = torch.where(torch.signbit(x), low, high).to(out.dtype)
    else:
        fill = torch.zeros((), dtype=out.dtype, device=out.device)
    return torch.where(torch.isnan(out), fill, out)


def float_codes(x: torch.Tensor, s: FloatSpec, frac: int, dtype: torch.dtype) -> torch.Tensor:
    """The codes of ``T(x)`` (integer-valued floats in ``dtype``) for one binary point ``frac``."""
    c = overflow_(round_(scaled(x, 2.0**frac * s.grid, dtype, frac < 0), s.q), s)
    return fix_nan_(c, x, s, s.lo, s.hi)


def float_cast(x: torch.Tensor, s: FloatSpec, frac: int, dtype: torch.dtype) -> torch.Tensor:
    """``T(x)`` on the float path for one binary point ``frac``, in the input's dtype."""
    out = to_values_(float_codes(x, s, frac, dtype), 2.0**-frac)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def to_values_(c: torch.Tensor, inv) -> torch.Tensor:
    """Codes to values in place: ``c * inv + 0.0`` (``-0.0`` becomes ``+0.0``, as in HLS)."""
    return c.mul_(inv).add_(0.0)
