"""K-hot weights as shifts and adds: signed-digit decompositions and which tensors qualify.

A weight tensor is emitted as shift-adds (no multiplier) when its quantizer says it is K-hot (an
integer attribute ``khot``, or a ``KHotQuantizer``) or when ``--khot-max K`` (K > 0) is given and
every code needs at most K nonzero signed digits. Codes are decomposed into their non-adjacent
form (canonical signed digits), never more terms than the binary ones: ``7 = 8 - 1``.
"""

from __future__ import annotations

import numpy as np

from qfx_onnx.errors import ExportError
from qfx_onnx.fixed.types import FixedType
from qfx_onnx.hls.model import Constant


def csd_weight(code: int) -> int:
    n = abs(int(code))
    return bin((3 * n) ^ n).count("1")


def csd_digits(code: int) -> list[tuple[int, int]]:
    """``[(sign, shift)]`` with ``sum(sign * 2**shift) == code``: the non-adjacent form (fewest
    signed digits), highest shift first."""
    try:
        from qfx_onnx.fixed.khot import khot_decompose
        return [(int(s), int(p)) for s, p in khot_decompose(int(code), None, signed_digits=True)]
    except ImportError:  # pragma: no cover - the K-hot module is another engineer's, may be absent
        pass
    n, sign, out, pos = abs(int(code)), (1 if code >= 0 else -1), [], 0
    while n:
        if n & 1:
            d = 2 - (n & 3)
            out.append((sign * d, pos))
            n -= d
        n >>= 1
        pos += 1
    return out[::-1]


def khot_weight(quant, codes: np.ndarray, khot_max: int) -> int | None:
    """K when the weight tensor is emitted as shift-adds, else None.

    A tensor qualifies when its quantizer says so (an integer attribute ``khot``, or a
    ``KHotQuantizer``'s ``k``), or when ``khot_max > 0`` and every code needs at most
    ``khot_max`` signed digits. A quantizer that claims K-hot but holds a code needing more
    digits is an error.
    """
    claimed = getattr(quant, "khot", None) if quant is not None else None
    if claimed is None and quant is not None and type(quant).__name__ == "KHotQuantizer":
        claimed = getattr(quant, "k", None)
    digits = max((csd_weight(c) for c in np.unique(codes)), default=0)
    if claimed is not None and int(claimed) > 0:
        if digits > int(claimed):
            raise ExportError(f"a weight quantizer says khot={int(claimed)} but a code needs {digits} digits")
        return int(claimed)
    if khot_max > 0 and digits <= khot_max:
        return khot_max
    return None


def khot_terms(c: Constant) -> int:
    return int(sum(csd_weight(v) for v in c.codes))




def khot_term_type(data_t: FixedType, w: Constant) -> FixedType:
    """A signed type holding ``x * 2**e`` exactly for every data value x and every digit
    exponent e of the weight codes (so each shift of a K-hot product is exact)."""
    shifts = [p - w.ctype.type.frac for c in np.unique(w.codes) if c for _, p in csd_digits(int(c))]
    lo, hi = min(shifts, default=0), max(shifts, default=0)
    frac = data_t.frac + max(0, -lo)
    integer = data_t.integer + max(0, hi) + 1 + (0 if data_t.signed else 1)
    return FixedType(integer + frac, integer, signed=True)
