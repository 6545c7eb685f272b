"""Lookup tables on fixed-point codes: the exact definition of a table-based nonlinear unit.

A :class:`LookupTable` maps a value of its input :class:`FixedType` to a value of its output type
with integer arithmetic on the input's raw code ``c`` (the value is ``c * 2**-F``):

1. **clamp** ``c`` to the table's code range ``[code_lo, code_hi]``;
2. **index** ``k = (c - code_lo) >> shift`` (so each entry covers ``2**shift`` consecutive codes);
3. **entry** ``table[k]``, an output-type code.

Outside the code range a table either clamps (the default: the end entries hold) or, for units
such as GELU, takes the value of an asymptote: ``"identity"`` (the input cast to the output type)
or ``"zero"``.

Entry ``k`` is computed once, in float64, from the **representative input** of the codes that
reach it, the midpoint of the codes ``code_lo + k*2**shift ... code_lo + (k+1)*2**shift - 1``
(intersected with the clamp range and the input type's range): ``f(midpoint * 2**-F)`` is cast
to the output type with :func:`qfx_onnx.fixed.reference.reference_codes`, so the output type's
rounding and overflow modes decide the last bit, as ``T y = (double)f(x)`` would in ``ap_fixed.h``.

Because evaluation is integer arithmetic on codes, numpy (:meth:`LookupTable.lookup_codes`),
torch (:meth:`LookupTable.torch_lookup`, float64 tensors holding ``code * 2**-F``), onnxruntime
(:mod:`qfx_onnx.nonlinear.onnx_emit`) and C++ (``qfx_onnx/nonlinear/cpp/nnet_qfx_nonlinear.h``)
agree bit for bit. Requires input and output widths of at most 53 bits (float64-exact codes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from qfx_onnx.errors import ConfigError
from qfx_onnx.fixed.cast import cast
from qfx_onnx.fixed.reference import reference_codes
from qfx_onnx.fixed.types import FixedType

BEYOND_MODES = ("clamp", "identity", "zero")
MAX_TABLE_BITS = 16  # 65536 entries: beyond that a table is no longer a sensible BRAM/LUTRAM


@dataclass(frozen=True)
class TableIndex:
    """Which input codes index a table: clamp to ``[code_lo, code_hi]``, subtract, shift right.

    ``size`` entries; entry ``k`` is reached by the codes ``code_lo + k*2**shift`` up to
    ``min(code_lo + (k+1)*2**shift - 1, code_hi)``.
    """

    in_type: FixedType
    code_lo: int
    code_hi: int
    shift: int

    def __post_init__(self) -> None:
        t = self.in_type
        if t.width > 53:
            raise ConfigError(f"table input {t}: codes wider than 53 bits are not float64-exact")
        if self.shift < 0 or self.code_lo > self.code_hi:
            raise ConfigError(f"table index over {t}: empty range [{self.code_lo}, {self.code_hi}] "
                              f"or negative shift {self.shift}")
        if self.size > 1 << MAX_TABLE_BITS:
            raise ConfigError(f"table index over {t}: {self.size} entries, more than 2**{MAX_TABLE_BITS}")

    @property
    def size(self) -> int:
        return ((self.code_hi - self.code_lo) >> self.shift) + 1

    @classmethod
    def over(cls, in_type: FixedType | str, lo: float | None = None, hi: float | None = None,
             bits: int | None = None, align_high: bool = False) -> "TableIndex":
        """The index covering input values ``[lo, hi]`` (default: the whole type) in at most
        ``2**bits`` entries (default: one entry per code), with the smallest shift that fits.

        When the codes of ``[lo, hi]`` fill ``2**bits`` bins and one code more, that code (at the
        end away from the alignment) is left out and clamps to its neighbour.

        ``align_high`` makes the top code ``hi`` an entry of its own (so ``exp`` at 0 is exactly
        ``exp(0)``); the range then starts up to ``2**shift - 1`` codes below ``lo``.
        """
        t = FixedType.coerce(in_type)
        c_lo = t.int_min if lo is None else max(t.int_min, math.ceil(math.ldexp(lo, t.frac)))
        c_hi = t.int_max if hi is None else min(t.int_max, math.floor(math.ldexp(hi, t.frac)))
        if c_lo > c_hi:
            raise ConfigError(f"table over {t}: the range [{lo}, {hi}] holds no code of the type")
        span = c_hi - c_lo
        shift, entries = 0, _entries(span, 0, align_high)
        if bits is not None:
            if not 1 <= bits <= MAX_TABLE_BITS:
                raise ConfigError(f"table bits {bits} out of range 1..{MAX_TABLE_BITS}")
            limit = 1 << bits
            while _entries(span, shift, align_high) > limit + 1:
                shift += 1
            # one entry too many: give up the far end's last code (it clamps to its neighbour)
            # rather than halve the resolution; a power-of-two span then fills the table
            entries = min(_entries(span, shift, align_high), limit)
        if align_high:
            c_lo = c_hi - (entries - 1) * (1 << shift)
        else:
            c_hi = min(c_hi, c_lo + entries * (1 << shift) - 1)
        return cls(t, c_lo, c_hi, shift)

    def indices(self, codes: np.ndarray) -> np.ndarray:
        """int64 entry index of each input code (integer arithmetic only)."""
        c = np.clip(np.asarray(codes, dtype=np.int64), self.code_lo, self.code_hi)
        return (c - self.code_lo) >> self.shift

    def representatives(self) -> np.ndarray:
        """float64 input value that entry ``k`` is computed from: the midpoint of its codes."""
        k = np.arange(self.size, dtype=np.int64)
        first = np.maximum(self.code_lo + (k << self.shift), max(self.code_lo, self.in_type.int_min))
        last = np.minimum(self.code_lo + ((k + 1) << self.shift) - 1, min(self.code_hi, self.in_type.int_max))
        last = np.maximum(last, first)  # a bin wholly below the type's range keeps its first code
        return np.ldexp((first + last).astype(np.float64) / 2.0, -self.in_type.frac)


@dataclass(frozen=True)
class Log2Index:
    """A floating-point-like index for functions of positive inputs that vary over decades
    (``1/x``, ``1/sqrt(x)``): equal *relative* resolution everywhere.

    Clamp the code to ``[code_lo, code_hi]`` (``code_lo >= 2**mant_bits``), find its leading one
    ``e = floor(log2 c)`` and keep the ``mant_bits`` bits after it, ``m = (c >> (e - mant_bits))
    - 2**mant_bits``; the entry is ``e * 2**mant_bits + m - raw_lo`` with ``raw_lo`` that of
    ``code_lo``. Each entry covers the codes sharing ``e`` and ``m``, a relative width of at most
    ``2**-mant_bits``.
    """

    in_type: FixedType
    code_lo: int
    code_hi: int
    mant_bits: int

    def __post_init__(self) -> None:
        t = self.in_type
        if t.width > 53:
            raise ConfigError(f"table input {t}: codes wider than 53 bits are not float64-exact")
        if not 0 <= self.mant_bits <= MAX_TABLE_BITS or self.code_lo < 1 << self.mant_bits or self.code_lo > self.code_hi:
            raise ConfigError(f"log2 index over {t}: range [{self.code_lo}, {self.code_hi}] must start at "
                              f"2**mant_bits = {1 << self.mant_bits} or above")
        if self.size > 1 << MAX_TABLE_BITS:
            raise ConfigError(f"table index over {t}: {self.size} entries, more than 2**{MAX_TABLE_BITS}")

    def raw(self, codes: np.ndarray) -> np.ndarray:
        """``e * 2**mant_bits + m`` of each code (codes >= 2**mant_bits)."""
        c = np.asarray(codes, dtype=np.int64)
        e = np.frexp(c.astype(np.float64))[1].astype(np.int64) - 1  # exact: c < 2**53
        return (e << self.mant_bits) + (c >> (e - self.mant_bits)) - (1 << self.mant_bits)

    @property
    def raw_lo(self) -> int:
        return int(self.raw(np.array([self.code_lo]))[0])

    @property
    def size(self) -> int:
        return int(self.raw(np.array([self.code_hi]))[0]) - self.raw_lo + 1

    @classmethod
    def over(cls, in_type: FixedType | str, lo: float, hi: float | None = None,
             bits: int = 10) -> "Log2Index":
        """The index covering ``[lo, hi]`` (``hi`` default: the type's maximum) in at most
        ``2**bits`` entries, with as many mantissa bits as fit. ``lo`` is raised to the
        smallest value the mantissa bits resolve, ``2**(mant_bits - F)``, if it is below."""
        t = FixedType.coerce(in_type)
        c_hi = t.int_max if hi is None else min(t.int_max, math.floor(math.ldexp(hi, t.frac)))
        c_lo0 = max(1, math.ceil(math.ldexp(lo, t.frac)))
        for mant in range(min(bits, MAX_TABLE_BITS), -1, -1):
            c_lo = max(c_lo0, 1 << mant)
            if c_lo <= c_hi and _log2_size(c_lo, c_hi, mant) <= 1 << bits:
                return cls(t, c_lo, c_hi, mant)
        raise ConfigError(f"log2 table over {t}: the range [{lo}, {hi}] holds no positive code")

    def indices(self, codes: np.ndarray) -> np.ndarray:
        c = np.clip(np.asarray(codes, dtype=np.int64), self.code_lo, self.code_hi)
        return self.raw(c) - self.raw_lo

    def representatives(self) -> np.ndarray:
        raw = np.arange(self.size, dtype=np.int64) + self.raw_lo
        e, m = raw >> self.mant_bits, raw & ((1 << self.mant_bits) - 1)
        first = ((1 << self.mant_bits) + m) << (e - self.mant_bits)
        last = np.minimum(first + (np.int64(1) << (e - self.mant_bits)) - 1, self.code_hi)
        first = np.maximum(first, self.code_lo)
        return np.ldexp((first + last).astype(np.float64) / 2.0, -self.in_type.frac)


def _log2_size(c_lo: int, c_hi: int, mant: int) -> int:
    def raw(c: int) -> int:
        e = c.bit_length() - 1
        return (e << mant) + (c >> (e - mant)) - (1 << mant)
    return raw(c_hi) - raw(c_lo) + 1


def _entries(span: int, shift: int, align_high: bool) -> int:
    step = 1 << shift
    return (-(-span // step) if align_high else span // step) + 1


@dataclass(frozen=True, eq=False)
class LookupTable:
    """A table-based unit ``y = T_out(f(x))`` on fixed-point codes; see the module docstring.

    ``codes`` (int64, read-only) are output-type codes; ``below``/``above`` say what happens to
    codes below ``code_lo``/above ``code_hi``: ``"clamp"`` (end entry), ``"identity"``
    (``T_out(x)``), ``"zero"``. ``name`` is the unit (``"exp"``, ``"gelu"`` ...) and
    ``function`` the float function the entries come from (for the smooth gradient).
    """

    name: str
    index: TableIndex | Log2Index
    out_type: FixedType
    codes: np.ndarray
    function: Callable[[torch.Tensor], torch.Tensor] = field(repr=False)
    below: str = "clamp"
    above: str = "clamp"

    @classmethod
    def build(cls, name: str, index: TableIndex | Log2Index, out_type: FixedType | str,
              function: Callable[[torch.Tensor], torch.Tensor], below: str = "clamp",
              above: str = "clamp") -> "LookupTable":
        """Entries ``reference_codes(function(representatives), out_type)``, computed in float64."""
        out = FixedType.coerce(out_type)
        if out.width > 53 or out.is_int:
            raise ConfigError(f"table output {out}: use an ap_fixed/ap_ufixed of at most 53 bits")
        for side in (below, above):
            if side not in BEYOND_MODES:
                raise ConfigError(f"table {name}: beyond-range mode {side!r} not in {BEYOND_MODES}")
        with torch.no_grad():
            y = function(torch.from_numpy(index.representatives())).numpy()
        codes = reference_codes(y, out)
        codes.setflags(write=False)
        return cls(name, index, out, codes, function, below, above)

    @property
    def in_type(self) -> FixedType:
        return self.index.in_type

    @property
    def size(self) -> int:
        return self.index.size

    @property
    def values(self) -> np.ndarray:
        """The entries as float64 values ``code * 2**-F_out`` (exact)."""
        return np.ldexp(self.codes.astype(np.float64), -self.out_type.frac)

    @property
    def bits(self) -> int:
        """Storage: entries times output width (for the resource estimate)."""
        return self.size * self.out_type.width

    # ------------------------------------------------------------------------ evaluation
    def lookup_codes(self, in_codes: np.ndarray) -> np.ndarray:
        """Output codes (int64) for input codes: the integer definition, numpy."""
        c = np.asarray(in_codes, dtype=np.int64)
        out = self.codes[self.index.indices(c)]
        for side, beyond in (("below", c < self.index.code_lo), ("above", c > self.index.code_hi)):
            mode = getattr(self, side)
            if mode == "zero":
                out = np.where(beyond, 0, out)
            elif mode == "identity":
                x = np.ldexp(c.astype(np.float64), -self.in_type.frac)
                out = np.where(beyond, reference_codes(x, self.out_type), out)
        return out

    def torch_lookup(self, x: torch.Tensor) -> torch.Tensor:
        """float64 ``T_out(table[x])`` for float64 ``x`` on the input grid; no gradient."""
        t, idx = self.in_type, self.index
        code = torch.floor(x.to(torch.float64) * math.ldexp(1.0, t.frac)).to(torch.int64)
        c = code.clamp(idx.code_lo, idx.code_hi)
        if isinstance(idx, Log2Index):
            mb = idx.mant_bits
            e = torch.frexp(c.to(torch.float64)).exponent.to(torch.int64) - 1
            k = (e << mb) + (c >> (e - mb)) - (1 << mb) - idx.raw_lo
        else:
            k = (c - idx.code_lo) >> idx.shift
        y = torch.from_numpy(self.values).to(x.device)[k]
        for mode, beyond in ((self.below, code < idx.code_lo), (self.above, code > idx.code_hi)):
            if mode == "zero":
                y = torch.where(beyond, torch.zeros_like(y), y)
            elif mode == "identity":
                y = torch.where(beyond, cast(x.to(torch.float64), self.out_type), y)
        return y

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The trainable unit: exact table forward, gradient of the float function backward."""
        return _TableFn.apply(x, self)


class _TableFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, table):
        ctx.save_for_backward(x)
        ctx.table = table
        return table.torch_lookup(x).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            xd = x.detach().to(torch.float64).requires_grad_(True)
            (g,) = torch.autograd.grad(ctx.table.function(xd).sum(), xd)
        return grad * g.to(grad.dtype), None
