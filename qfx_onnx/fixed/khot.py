"""K-hot values: fixed-point numbers whose code magnitude has at most K ones, so that multiplying
by one is at most K shifts and adds.

With ``signed_digits=True`` the count is of nonzero signed digits (canonical signed digit, CSD:
``7 = 8 - 1`` is 2-hot); the minimal count is the weight of the non-adjacent form,
``popcount(3n ^ n)`` for ``n = |code|``.

Projection is exact: the sorted table of every K-hot code of the type is built once (cached) and
``torch.searchsorted`` finds the two neighbours of each value. The nearest one wins; a tie (a value
exactly halfway) goes to the smaller magnitude (a tie between equal magnitudes cannot occur since 0
is always K-hot; it would go to the positive code). Values beyond the table saturate to its ends,
NaN stays NaN. The type's quantization and overflow modes play no part.

Limits: the table is built by listing every code when the type has at most 2**20 codes (W <= 20
signed or unsigned, any K); wider types (W <= 32) are built digit by digit and allowed while the
table has at most 2**18 codes (e.g. W = 32 with K <= 3 binary digits). Anything else raises
ValueError. Codes are handled as int64 and as exact float64 values.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import torch

from qfx_onnx.fixed.quantizer import BinaryPointQuantizer
from qfx_onnx.fixed.types import FixedType, OverflowMode, QuantMode

MAX_LISTED_CODES = 1 << 20
MAX_TABLE_SIZE = 1 << 18
MAX_TABLE_WIDTH = 32


# ------------------------------------------------------------------------------------ digits
def _popcount(v: torch.Tensor) -> torch.Tensor:
    """Ones in each nonnegative int64 (SWAR, no multiplication so nothing overflows)."""
    v = v - ((v >> 1) & 0x5555555555555555)
    v = (v & 0x3333333333333333) + ((v >> 2) & 0x3333333333333333)
    v = (v + (v >> 4)) & 0x0F0F0F0F0F0F0F0F
    v = v + (v >> 8)
    v = v + (v >> 16)
    v = v + (v >> 32)
    return v & 0x7F


def count_ones(code: int | torch.Tensor) -> int | torch.Tensor:
    """Ones in the binary magnitude ``|code|`` (tensors: int64, ``|code| < 2**63``)."""
    if isinstance(code, torch.Tensor):
        return _popcount(code.to(torch.int64).abs())
    return bin(abs(int(code))).count("1")


def csd_weight(code: int | torch.Tensor) -> int | torch.Tensor:
    """The fewest nonzero signed digits (±2**i) that sum to ``code``: the NAF weight.

    Tensors: int64 with ``|code| < 2**61``.
    """
    if isinstance(code, torch.Tensor):
        n = code.to(torch.int64).abs()
        return _popcount((3 * n) ^ n)
    n = abs(int(code))
    return bin((3 * n) ^ n).count("1")


def digit_count(code: int | torch.Tensor, signed_digits: bool = False) -> int | torch.Tensor:
    return csd_weight(code) if signed_digits else count_ones(code)


def is_khot(code: int | torch.Tensor, k: int, signed_digits: bool = False) -> bool | torch.Tensor:
    """Whether ``code`` needs at most ``k`` binary ones (or signed digits)."""
    return digit_count(code, signed_digits) <= k


def khot_decompose(code: int, k: int | None = None, signed_digits: bool = False) -> list[tuple[int, int]]:
    """Shift-add terms ``[(sign, shift), ...]`` with ``sum(sign * 2**shift) == code``, highest shift
    first: the binary ones of ``|code|``, or its non-adjacent form (the fewest signed digits), with
    the code's sign applied. Raises ValueError when ``k`` is given and more than ``k`` terms are
    needed.
    """
    code = int(code)
    sign, n = (-1 if code < 0 else 1), abs(code)
    terms = []
    shift = 0
    while n:
        if signed_digits and n & 1:
            d = 2 - (n & 3)  # +1 or -1: the NAF digit, which leaves n - d divisible by 4
            terms.append((sign * d, shift))
            n -= d
        elif n & 1:
            terms.append((sign, shift))
            n -= 1
        n >>= 1
        shift += 1
    if k is not None and len(terms) > k:
        kind = "signed digits" if signed_digits else "ones"
        raise ValueError(f"code {code} needs {len(terms)} {kind}, more than K={k}")
    return terms[::-1]


# ------------------------------------------------------------------------------------- table
def khot_codes(t: FixedType | str, k: int, signed_digits: bool = False,
               device: torch.device | str | None = None) -> torch.Tensor:
    """Every K-hot code of type ``t`` (within ``[int_min, int_max]``), sorted, as int64.

    Raises ValueError beyond the limits in the module docstring.
    """
    t = FixedType.coerce(t)
    table = _table(t.int_min, t.int_max, t.width, int(k), bool(signed_digits))
    return table if device is None else table.to(device)


@functools.lru_cache(maxsize=64)
def _table(lo: int, hi: int, width: int, k: int, signed_digits: bool) -> torch.Tensor:
    if k < 0:
        raise ValueError(f"K must be >= 0, not {k}")
    if hi - lo + 1 <= MAX_LISTED_CODES:
        codes = torch.arange(lo, hi + 1, dtype=torch.int64)
        return codes[digit_count(codes, signed_digits) <= k]
    if width > MAX_TABLE_WIDTH:
        raise ValueError(f"K-hot tables need W <= {MAX_TABLE_WIDTH}, not W={width}")
    size = _table_size_bound(width, k, signed_digits)
    if size > MAX_TABLE_SIZE:
        raise ValueError(f"W={width} with K={k} allows up to {size} K-hot codes; "
                         f"the table is limited to {MAX_TABLE_SIZE}")
    return _table_by_digits(lo, hi, width, k, signed_digits)


def _table_size_bound(width: int, k: int, signed_digits: bool) -> int:
    if signed_digits:
        return sum(math.comb(width + 1, j) << j for j in range(min(k, width + 1) + 1))
    return 2 * sum(math.comb(width, j) for j in range(min(k, width) + 1))


def _table_by_digits(lo: int, hi: int, width: int, k: int, signed_digits: bool) -> torch.Tensor:
    """Add one digit at a time: the values with at most j digits are those with at most j - 1
    plus one digit (digit counts are subadditive, and every such value is reached)."""
    if signed_digits:
        # A NAF of |v| <= 2**W has digits at positions 0..W, and adding them from the top keeps
        # every partial sum within 2**(W+1).
        powers = torch.tensor([1 << i for i in range(width + 1)], dtype=torch.int64)
        digits, bound = torch.cat([powers, -powers]), 1 << (width + 1)
    else:
        # Magnitudes; partial sums of a subset of the ones of m never exceed m.
        digits = torch.tensor([1 << i for i in range(width)], dtype=torch.int64)
        bound = max(hi, -lo)
    values = torch.zeros(1, dtype=torch.int64)
    for _ in range(k):
        grown = (values[:, None] + digits[None, :]).reshape(-1)
        values = torch.unique(torch.cat([values, grown[grown.abs() <= bound]]))
    if not signed_digits:
        values = torch.unique(torch.cat([values, -values]))
    return values[(values >= lo) & (values <= hi)]


@functools.lru_cache(maxsize=64)
def _device_table(lo: int, hi: int, width: int, k: int, signed_digits: bool, device: str) -> torch.Tensor:
    return _table(lo, hi, width, k, signed_digits).to(device=device, dtype=torch.float64)


# -------------------------------------------------------------------------------- projection
def _nearest(y: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The nearest entry of the sorted float64 ``table`` to each float64 ``y`` (ties: smaller
    magnitude). ``2y`` against ``a + b`` decides exactly: both sides are exact in float64."""
    idx = torch.searchsorted(table, y.contiguous())
    a = table[(idx - 1).clamp(min=0, max=len(table) - 1)]
    b = table[idx.clamp(max=len(table) - 1)]
    two_y, mid = 2.0 * y, a + b
    pick_b = (two_y > mid) | ((two_y == mid) & (b.abs() <= a.abs()))
    return torch.where(pick_b, b, a)


def _project_codes(x: torch.Tensor, scale: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes as float64 with NaN kept, y = x * scale in float64)."""
    y = x.to(torch.float64) * scale
    codes = _nearest(torch.nan_to_num(y, nan=0.0), table)
    return torch.where(torch.isnan(y), y, codes), y


def khot_project(x: torch.Tensor, t: FixedType | str, k: int, signed_digits: bool = False) -> torch.Tensor:
    """The nearest K-hot value of type ``t`` to each element of ``x`` (tie rule and limits in the
    module docstring). Same dtype and device as ``x``; the result is exactly representable in ``t``
    (in float32 when W <= 24), so casting it to ``t`` changes nothing.
    """
    t = FixedType.coerce(t)
    if not x.is_floating_point():
        raise TypeError(f"khot_project expects a floating-point tensor, got {x.dtype}")
    table = _device_table(t.int_min, t.int_max, t.width, int(k), bool(signed_digits), str(x.device))
    scale = torch.tensor(math.ldexp(1.0, t.frac), dtype=torch.float64, device=x.device)
    codes, _ = _project_codes(x, scale, table)
    return (codes * math.ldexp(1.0, -t.frac) + 0.0).to(x.dtype)


class KHotQuantizer(BinaryPointQuantizer):
    """Projection onto the K-hot values of ``ap_fixed<W, W-F>`` with a (learnable) binary point F.

    Same interface as :class:`~qfx_onnx.fixed.quantizer.FixedQuantizer` (calibration, frozen
    types, per-channel F, the LSQ frac gradient); the input gradient is straight-through inside
    ``[min K-hot value, max K-hot value]`` and zero beyond, where the projection saturates. Frozen
    types carry ``AP_RND, AP_SAT`` (nearest, saturating); the projected values are exact in them.
    """

    def __init__(self, width: int, signed: bool, k: int, frac: float | torch.Tensor | Sequence[float] = 0.0, *,
                 signed_digits: bool = False, per_channel_axis: int | None = None,
                 num_channels: int | None = None, learn_frac: bool = True, enabled: bool = True) -> None:
        base = FixedType(width, width, bool(signed))
        table = _table(base.int_min, base.int_max, base.width, int(k), bool(signed_digits))  # checks limits
        super().__init__(width, signed, frac, per_channel_axis, num_channels, learn_frac, enabled)
        self.k, self.signed_digits = int(k), bool(signed_digits)
        self._bounds = (int(table[0]), int(table[-1]))

    def _type(self, f: int) -> FixedType:
        return FixedType(self.width, self.width - f, self.signed, QuantMode.RND, OverflowMode.SAT)

    def _code_bounds(self) -> tuple[int, int]:
        return self._bounds

    def _fit_round(self, y: torch.Tensor) -> torch.Tensor:
        return y  # nearest projection clips exactly beyond the extreme codes

    def _quantize_with(self, x, fracs, axis):
        lo, hi = self._bounds
        base = self._type(0)
        table = _device_table(base.int_min, base.int_max, self.width, self.k, self.signed_digits, str(x.device))
        scale = self._per_channel([math.ldexp(1.0, f) for f in fracs], x, axis, torch.float64)
        codes, y = _project_codes(x, scale, table)
        state = (y > hi).to(torch.int8) - (y < lo).to(torch.int8)
        inv = self._per_channel([math.ldexp(1.0, -f) for f in fracs], x, axis, torch.float64)
        return (codes * inv + 0.0).to(x.dtype), state

    def extra_repr(self) -> str:
        digits = "signed digits" if self.signed_digits else "ones"
        return f"K={self.k} {digits}, {super().extra_repr()}"
