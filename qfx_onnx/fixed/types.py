"""``FixedType``: the value object for ``ap_fixed<W,I,Q,O,N>`` and friends, and HLS result-type rules.

The text form round-trips: ``str(FixedType.parse(s))`` is the canonical HLS spelling of ``s``
(modes at their defaults are omitted, as a person would write them).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from enum import Enum

from qfx_onnx.errors import FixedTypeError


class QuantMode(str, Enum):
    """What happens to bits below the LSB (``ap_q_mode``)."""

    TRN = "AP_TRN"  # floor
    TRN_ZERO = "AP_TRN_ZERO"  # toward zero
    RND = "AP_RND"  # nearest, ties toward +inf
    RND_ZERO = "AP_RND_ZERO"  # nearest, ties toward zero
    RND_MIN_INF = "AP_RND_MIN_INF"  # nearest, ties toward -inf
    RND_INF = "AP_RND_INF"  # nearest, ties away from zero
    RND_CONV = "AP_RND_CONV"  # nearest, ties to even


class OverflowMode(str, Enum):
    """What happens to values outside the range (``ap_o_mode``)."""

    WRAP = "AP_WRAP"
    WRAP_SM = "AP_WRAP_SM"
    SAT = "AP_SAT"
    SAT_ZERO = "AP_SAT_ZERO"
    SAT_SYM = "AP_SAT_SYM"


MAX_WIDTH = 1024  # AP_INT_MAX_W default; casts are exact and tested for W <= 64
MAX_ABS_FRAC = 900  # |W - I| bound: keeps 2**F a normal double (see docs/exactness.md)

_FIXED_RE = re.compile(r"^\s*(ap_u?fixed)\s*<\s*([^<>]*)>\s*$")
_INT_RE = re.compile(r"^\s*(ap_u?int)\s*<\s*([+-]?\d+)\s*>\s*$")


@dataclass(frozen=True)
class FixedType:
    """An HLS arbitrary-precision fixed-point type.

    ``width`` (W) total bits, ``integer`` (I) bits left of the binary point (sign included for
    signed types), so ``frac = W - I`` bits right of it; ``signed``; quantization ``q``, overflow
    ``o`` and saturation bits ``n``. ``is_int`` marks ``ap_int``/``ap_uint``, whose conversion from
    ``double`` follows ``ap_int_base`` (truncation of the magnitude) rather than ``ap_fixed``.
    """

    width: int
    integer: int
    signed: bool = True
    q: QuantMode = QuantMode.TRN
    o: OverflowMode = OverflowMode.WRAP
    n: int = 0
    is_int: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "q", QuantMode(self.q))
        object.__setattr__(self, "o", OverflowMode(self.o))
        if not 1 <= self.width <= MAX_WIDTH:
            raise FixedTypeError(f"width W={self.width} out of range 1..{MAX_WIDTH}")
        if abs(self.width - self.integer) > MAX_ABS_FRAC:
            raise FixedTypeError(
                f"binary point W-I={self.width - self.integer} out of the supported range "
                f"-{MAX_ABS_FRAC}..{MAX_ABS_FRAC}"
            )
        if not 0 <= self.n <= self.width:
            raise FixedTypeError(f"saturation bits N={self.n} out of range 0..W={self.width}")
        if self.is_int and (self.integer != self.width or self.q is not QuantMode.TRN
                            or self.o is not OverflowMode.WRAP or self.n):
            raise FixedTypeError("ap_int/ap_uint have I == W and no quantization/overflow modes")

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def parse(cls, text: str) -> "FixedType":
        """Parse the HLS spelling: ``ap_fixed<8,3,AP_RND,AP_SAT>``, ``ap_ufixed<4,0>``, ``ap_int<7>``.

        Mode names may drop the ``AP_`` prefix; whitespace is ignored. Raises FixedTypeError.
        """
        if not isinstance(text, str):
            raise FixedTypeError(f"expected a type string, got {type(text).__name__}")
        m = _INT_RE.match(text)
        if m:
            w = int(m.group(2))
            return cls(w, w, signed=m.group(1) == "ap_int", is_int=True)
        m = _FIXED_RE.match(text)
        if not m:
            raise FixedTypeError(f"cannot parse fixed-point type {text!r}: expected e.g. ap_fixed<8,3,AP_RND,AP_SAT>")
        parts = [p.strip() for p in m.group(2).split(",")]
        if not 2 <= len(parts) <= 5:
            raise FixedTypeError(f"{text!r}: expected 2 to 5 template arguments, got {len(parts)}")
        try:
            w, i = int(parts[0]), int(parts[1])
        except ValueError:
            raise FixedTypeError(f"{text!r}: W and I must be integers") from None
        q = _parse_mode(QuantMode, parts[2], text) if len(parts) > 2 else QuantMode.TRN
        o = _parse_mode(OverflowMode, parts[3], text) if len(parts) > 3 else OverflowMode.WRAP
        try:
            n = int(parts[4]) if len(parts) > 4 else 0
        except ValueError:
            raise FixedTypeError(f"{text!r}: N must be an integer") from None
        return cls(w, i, signed=m.group(1) == "ap_fixed", q=q, o=o, n=n)

    @classmethod
    def coerce(cls, value: "FixedType | str") -> "FixedType":
        return value if isinstance(value, FixedType) else cls.parse(value)

    def with_modes(self, q: QuantMode | str | None = None, o: OverflowMode | str | None = None,
                   n: int | None = None) -> "FixedType":
        """The same W, I and sign with other modes (an ap_int becomes the equivalent ap_fixed)."""
        return replace(self, q=QuantMode(q) if q is not None else self.q,
                       o=OverflowMode(o) if o is not None else self.o,
                       n=self.n if n is None else n, is_int=False)

    def with_width(self, width: int, integer: int | None = None) -> "FixedType":
        return replace(self, width=width, integer=self.integer if integer is None else integer)

    # ------------------------------------------------------------------------------ properties
    @property
    def frac(self) -> int:
        """F = W - I, the number of fractional bits (negative when I > W)."""
        return self.width - self.integer

    @property
    def lsb(self) -> float:
        return math.ldexp(1.0, -self.frac)

    @property
    def int_min(self) -> int:
        """Smallest raw integer code (the value is ``code * 2**-F``)."""
        return -(1 << (self.width - 1)) if self.signed else 0

    @property
    def int_max(self) -> int:
        return (1 << (self.width - 1)) - 1 if self.signed else (1 << self.width) - 1

    @property
    def sat_min_code(self) -> int:
        """Where saturation sends values below the range: ``-int_max`` for signed AP_SAT_SYM.

        Except at W = 1, where the header's ``min | 1`` is the code -1 itself (ap_fixed<1,..,AP_SAT_SYM>
        saturates like AP_SAT).
        """
        if self.o is OverflowMode.SAT_SYM and self.signed and self.width > 1:
            return -self.int_max
        return self.int_min

    @property
    def min_value(self) -> float:
        return math.ldexp(self.int_min, -self.frac)

    @property
    def max_value(self) -> float:
        return math.ldexp(self.int_max, -self.frac)

    @property
    def saturating(self) -> bool:
        return self.o in (OverflowMode.SAT, OverflowMode.SAT_ZERO, OverflowMode.SAT_SYM)

    @property
    def rounding(self) -> bool:
        return self.q not in (QuantMode.TRN, QuantMode.TRN_ZERO)

    @property
    def finn_datatype(self) -> str | None:
        """The QONNX/FINN DataType string where one exists (``FIXED<W,I>``, ``INT8``, ``UINT4``)."""
        if self.frac == 0:
            return f"{'INT' if self.signed else 'UINT'}{self.width}"
        if self.signed and self.integer >= 1:
            return f"FIXED<{self.width},{self.integer}>"
        return None

    # ------------------------------------------------------------------------------------ text
    def __str__(self) -> str:
        if self.is_int:
            return f"{'ap_int' if self.signed else 'ap_uint'}<{self.width}>"
        args = [str(self.width), str(self.integer)]
        if self.n:
            args += [self.q.value, self.o.value, str(self.n)]
        elif self.o is not OverflowMode.WRAP:
            args += [self.q.value, self.o.value]
        elif self.q is not QuantMode.TRN:
            args += [self.q.value]
        return f"{'ap_fixed' if self.signed else 'ap_ufixed'}<{','.join(args)}>"

    def c_name(self) -> str:
        """A C identifier fragment naming this type, e.g. ``fx8_3_rnd_sat``."""
        s = f"{'fx' if self.signed else 'ufx'}{self.width}_{self.integer}".replace("-", "m")
        if self.is_int:
            return f"{'int' if self.signed else 'uint'}{self.width}"
        if self.q is not QuantMode.TRN:
            s += "_" + self.q.value[3:].lower()
        if self.o is not OverflowMode.WRAP:
            s += "_" + self.o.value[3:].lower()
        if self.n:
            s += f"_n{self.n}"
        return s

    def __repr__(self) -> str:
        return f"FixedType({str(self)!r})"


def _parse_mode(enum: type[Enum], text: str, full: str):
    name = text.upper()
    if not name.startswith("AP_"):
        name = "AP_" + name
    try:
        return enum(name)
    except ValueError:
        choices = ", ".join(m.value for m in enum)
        raise FixedTypeError(f"{full!r}: unknown {enum.__name__} {text!r} (choose from {choices})") from None


# ------------------------------------------------------------------------------ result types
# The rules of ap_fixed_base<...>::RType in ap_fixed_base.h. Results carry default modes.


def _base(width: int, integer: int, signed: bool) -> FixedType:
    return FixedType(width, integer, signed=signed)


def _sum_integer(a: FixedType, b: FixedType) -> int:
    # An unsigned operand needs one more integer bit once the result is signed.
    return max(a.integer + (b.signed and not a.signed), b.integer + (a.signed and not b.signed)) + 1


def add_type(a: FixedType, b: FixedType) -> FixedType:
    """Result type of ``a + b`` (lossless), as HLS derives it."""
    i = _sum_integer(a, b)
    return _base(i + max(a.frac, b.frac), i, a.signed or b.signed)


def sub_type(a: FixedType, b: FixedType) -> FixedType:
    """Result type of ``a - b``: the width of a sum, always signed."""
    i = _sum_integer(a, b)
    return _base(i + max(a.frac, b.frac), i, True)


def mul_type(a: FixedType, b: FixedType) -> FixedType:
    """Result type of ``a * b``: widths and integer bits add."""
    return _base(a.width + b.width, a.integer + b.integer, a.signed or b.signed)


def neg_type(a: FixedType) -> FixedType:
    """Result type of unary minus: one more bit, signed.

    ``-ap_int<1>`` is the exception: the header computes it as ``ap_int_base<1,false>(0) - x``,
    a 3-bit difference.
    """
    if a.is_int and a.signed and a.width == 1:
        return _base(3, 3, True)
    return _base(a.width + 1, a.integer + 1, True)


def accum_type(product: FixedType, terms: int) -> FixedType:
    """Lossless accumulator for the sum of ``terms`` values of type ``product``.

    ``terms`` values in ``[min, max]`` sum into ``[terms*min, terms*max]``, which needs
    ``ceil(log2(terms))`` more integer bits; no fractional bit is lost, so the sum is exact in any
    order.
    """
    if terms < 1:
        raise ValueError("an accumulator needs at least one term")
    extra = (terms - 1).bit_length()
    return _base(product.width + extra, product.integer + extra, product.signed)


def union_type(*types: FixedType) -> FixedType:
    """The smallest type that holds every value of each of ``types`` exactly (for concat, max ...)."""
    signed = any(t.signed for t in types)
    frac = max(t.frac for t in types)
    integer = max(t.integer + (signed and not t.signed) for t in types)
    return _base(integer + frac, integer, signed)
