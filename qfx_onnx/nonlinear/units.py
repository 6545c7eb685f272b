"""Table units: ``exp``, ``reciprocal``, ``rsqrt``, ``erf``, ``gelu`` (exact and tanh forms),
``sigmoid`` and ``tanh``, each a :class:`~qfx_onnx.fixed.tables.LookupTable` built from explicit
parameters.

Every factory takes the input :class:`FixedType`, the value range the table covers, the number of
index bits (``2**bits`` entries at most; ``None`` for one entry per code), the output type and,
for ``reciprocal``/``rsqrt``, the index kind (``"log2"``: same relative resolution in every
octave, :class:`~qfx_onnx.fixed.tables.Log2Index`; ``"uniform"``: :class:`TableIndex`).
Output types default to ``AP_RND, AP_SAT`` so each entry is the nearest representable value.

The error of a unit against its float function, for an input inside the covered range, is at most
``max|f'| * 2**(shift - F_in - 1)`` (half a bin) plus half an output LSB; beyond the range it is
the distance from the function to the clamp value or asymptote. :func:`max_abs_error` measures it
over every input code; ``tests/test_nonlinear_tables.py`` asserts the stated bounds
(:data:`STATED_BOUNDS`) for the defaults.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from qfx_onnx.errors import ConfigError
from qfx_onnx.fixed.tables import Log2Index, LookupTable, TableIndex
from qfx_onnx.fixed.types import FixedType

DEFAULT_BITS = 10


# float functions (torch, float64): the entries come from these and so does the gradient
def gelu_exact(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


FUNCTIONS = {
    "exp": torch.exp,
    "reciprocal": torch.reciprocal,
    "erf": torch.erf,
    "gelu": gelu_exact,
    "gelu_tanh": gelu_tanh,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
}


def exp_table(in_type: FixedType | str, out_type: FixedType | str = "ap_ufixed<16,1,AP_RND,AP_SAT>",
              bits: int | None = DEFAULT_BITS, lo: float | None = None) -> LookupTable:
    """``exp(x)`` for ``x <= 0`` (max-subtracted softmax inputs); inputs above 0 read ``exp(0)``.

    Covers ``[lo, 0]``; ``lo`` defaults to where ``exp`` drops below half an output LSB (it
    rounds to 0 there), or the input type's minimum. The top code 0 has its own entry, so
    ``exp(0) = 1`` exactly when the output type holds 1.
    """
    out = FixedType.coerce(out_type)
    if lo is None:
        lo = -math.log(2.0) * (out.frac + 1)
    index = TableIndex.over(in_type, lo, 0.0, bits, align_high=True)
    return LookupTable.build("exp", index, out, torch.exp)


def _positive_index(in_type, lo: float, hi: float | None, bits: int | None, index: str):
    if index == "log2":
        return Log2Index.over(in_type, lo, hi, DEFAULT_BITS if bits is None else bits)
    if index == "uniform":
        return TableIndex.over(in_type, lo, hi, bits)
    raise ConfigError(f"table index {index!r}: expected 'log2' or 'uniform'")


def reciprocal_table(in_type: FixedType | str, out_type: FixedType | str | None = None,
                     bits: int | None = DEFAULT_BITS, lo: float = 1.0, hi: float | None = None,
                     index: str = "log2") -> LookupTable:
    """``1/x`` of a positive ``x`` (a softmax sum) over ``[lo, hi]``; clamped outside.

    ``index="log2"`` (default) gives every octave the same number of entries (relative error
    about ``2**-(mant_bits+1)``, see :class:`Log2Index`); ``"uniform"`` spaces them evenly.
    ``hi`` defaults to the input type's maximum. ``out_type`` defaults to an
    ``ap_ufixed<18, I>`` with just enough integer bits for ``1/lo``.
    """
    if lo <= 0:
        raise ConfigError(f"reciprocal table: lower end {lo} must be positive")
    if out_type is None:
        out_type = FixedType(18, max(1, math.floor(math.log2(1.0 / lo)) + 1), signed=False, q="AP_RND", o="AP_SAT")
    return LookupTable.build("reciprocal", _positive_index(in_type, lo, hi, bits, index), out_type, torch.reciprocal)


def rsqrt_table(in_type: FixedType | str, out_type: FixedType | str | None = None,
                bits: int | None = DEFAULT_BITS, eps: float = 1e-5, lo: float = 0.0,
                hi: float | None = None, index: str = "log2") -> LookupTable:
    """``1/sqrt(x + eps)`` of a variance ``x >= 0`` over ``[lo, hi]``; clamped outside.

    ``index="log2"`` (default): equal relative resolution in every octave; ``lo`` is raised to
    the smallest value the mantissa bits resolve, ``2**(mant_bits - F_in)``, and smaller
    variances read that entry. ``index="uniform"``: the first entry comes from the midpoint of
    its codes, so a variance of 0 reads ``1/sqrt(bin/2 + eps)`` rather than ``1/sqrt(eps)``.
    Either way a near-constant row's normalized outputs stay bounded (the centered values are at
    most ``sqrt(n * var)``). ``out_type`` defaults to an ``ap_ufixed<18, I>`` holding the largest
    entry.
    """
    if eps < 0 or lo < 0:
        raise ConfigError(f"rsqrt table: eps {eps} and lower end {lo} must be non-negative")

    def f(v: torch.Tensor) -> torch.Tensor:
        return torch.rsqrt(v + eps)

    idx = _positive_index(in_type, lo, hi, bits, index)
    if out_type is None:
        top = float(f(torch.tensor(idx.representatives()[:1])).item())
        out_type = FixedType(18, max(1, math.floor(math.log2(top)) + 1), signed=False, q="AP_RND", o="AP_SAT")
    return LookupTable.build("rsqrt", idx, out_type, f)


def erf_table(in_type: FixedType | str, out_type: FixedType | str = "ap_fixed<16,2,AP_RND,AP_SAT>",
              bits: int | None = DEFAULT_BITS, limit: float = 3.5) -> LookupTable:
    """``erf(x)`` over ``[-limit, limit]``, clamped beyond (``|1 - erf(3.5)| < 8e-7``)."""
    index = TableIndex.over(in_type, -limit, limit, bits)
    return LookupTable.build("erf", index, out_type, torch.erf)


def gelu_table(in_type: FixedType | str, out_type: FixedType | str | None = None,
               bits: int | None = DEFAULT_BITS, approximate: str = "none", limit: float = 4.0) -> LookupTable:
    """GELU (ONNX ``Gelu``, ``approximate`` ``"none"`` or ``"tanh"``) over ``[-limit, limit]``:
    zero below, the input itself (cast to ``out_type``) above.

    Beyond ``limit`` the asymptotes are off by ``|x| * Phi(-|x|)``, at most ``1.3e-4`` at 4.
    ``out_type`` defaults to the input type with rounding and saturation.
    """
    if approximate not in ("none", "tanh"):
        raise ConfigError(f"gelu: approximate={approximate!r}, expected 'none' or 'tanh'")
    t = FixedType.coerce(in_type)
    out = t.with_modes("AP_RND", "AP_SAT") if out_type is None else FixedType.coerce(out_type)
    index = TableIndex.over(t, -limit, limit, bits)
    fn = gelu_exact if approximate == "none" else gelu_tanh
    return LookupTable.build("gelu" if approximate == "none" else "gelu_tanh", index, out, fn,
                             below="zero", above="identity")


def sigmoid_table(in_type: FixedType | str, out_type: FixedType | str, bits: int | None = None,
                  limit: float | None = None) -> LookupTable:
    """``sigmoid(x)``; with the defaults one entry per input code, which is exactly the table the
    HLS exporter builds today (``hls/heads.py``: ``T_out(sigmoid(x))`` for every code)."""
    index = TableIndex.over(in_type, None if limit is None else -limit, limit, bits)
    return LookupTable.build("sigmoid", index, out_type, torch.sigmoid)


def tanh_table(in_type: FixedType | str, out_type: FixedType | str, bits: int | None = None,
               limit: float | None = None) -> LookupTable:
    """``tanh(x)``, like :func:`sigmoid_table`."""
    index = TableIndex.over(in_type, None if limit is None else -limit, limit, bits)
    return LookupTable.build("tanh", index, out_type, torch.tanh)


def all_codes(t: FixedType | str) -> np.ndarray:
    """Every code of ``t`` as float64 values, ascending."""
    t = FixedType.coerce(t)
    return np.ldexp(np.arange(t.int_min, t.int_max + 1, dtype=np.int64).astype(np.float64), -t.frac)


def max_abs_error(table: LookupTable, lo: float | None = None, hi: float | None = None) -> float:
    """Largest ``|table(x) - f(x)|`` over every input code with ``lo <= x <= hi`` (float64 ``f``)."""
    x = all_codes(table.in_type)
    keep = np.ones(x.shape, bool)
    if lo is not None:
        keep &= x >= lo
    if hi is not None:
        keep &= x <= hi
    xt = torch.from_numpy(x[keep])
    with torch.no_grad():
        return float((table.torch_lookup(xt) - table.function(xt)).abs().max())
