"""C++ config structs for ``cpp/nnet_qfx_nonlinear.h``: tables as exact initializer text.

Each table becomes a struct with its types, index constants and a function-local ``static const``
array of raw output codes in the narrowest C integer type (a ROM of plain integers: no
``double`` conversion, and it compiles fast); ``entry(k)`` writes code ``k`` into the bits of an
``out_t``. Kernel structs name their intermediate types and their tables' structs.
``ident`` arguments must be C identifiers (the caller sanitizes ONNX names).
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

from qfx_onnx.fixed.tables import BEYOND_MODES, Log2Index, LookupTable
from qfx_onnx.nonlinear.kernels import LayerNormConfig, SoftmaxConfig

HEADER = "nnet_qfx_nonlinear.h"
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def header_dir() -> Path:
    """The folder holding ``nnet_qfx_nonlinear.h`` (pass it to the compiler as ``-I``)."""
    return Path(str(resources.files("qfx_onnx.nonlinear") / "cpp"))


def _check_ident(ident: str) -> None:
    if not _IDENT.match(ident):
        raise ValueError(f"not a C identifier: {ident!r}")


def _codes(table: LookupTable, per_line: int = 16) -> str:
    items = [str(int(c)) for c in table.codes]
    rows = [", ".join(items[i:i + per_line]) for i in range(0, len(items), per_line)]
    return ",\n            ".join(rows)


def _code_type(t) -> str:
    """The narrowest C integer type holding every code of ``t`` (the table ROM's word)."""
    for bits, signed, unsigned in ((8, "signed char", "unsigned char"), (16, "short", "unsigned short"),
                                   (32, "int", "unsigned int"), (64, "long long", "unsigned long long")):
        if t.width <= bits:
            return signed if t.signed else unsigned
    raise ValueError(f"no C integer type holds {t}")


def table_struct(table: LookupTable, ident: str) -> str:
    """``struct ident`` describing ``table`` for ``qfx_nl::table_lookup<ident>``."""
    _check_ident(ident)
    idx = table.index
    if isinstance(idx, Log2Index):
        index = (f"    static const int index_kind = 1;\n    static const int shift = 0;\n"
                 f"    static const int mant_bits = {idx.mant_bits};\n    static const long long raw_lo = {idx.raw_lo}LL;\n")
    else:
        index = (f"    static const int index_kind = 0;\n    static const int shift = {idx.shift};\n"
                 f"    static const int mant_bits = 0;\n    static const long long raw_lo = 0;\n")
    return f"""struct {ident} {{  // {table.name}: {table.size} entries of {table.out_type}
    typedef {table.in_type} in_t;
    typedef {table.out_type} out_t;
    static const bool in_signed = {str(table.in_type.signed).lower()};
    static const long long code_lo = {idx.code_lo}LL;
    static const long long code_hi = {idx.code_hi}LL;
{index}    static const unsigned size = {table.size};
    static const int below = {BEYOND_MODES.index(table.below)};
    static const int above = {BEYOND_MODES.index(table.above)};
    static out_t entry(unsigned k) {{
        static const {_code_type(table.out_type)} codes[{table.size}] = {{
            {_codes(table)}}};
        out_t y;
        y.range({table.out_type.width - 1}, 0) = codes[k];  // the raw code: no conversion, no rounding
        return y;
    }}
}};
"""


def softmax_struct(cfg: SoftmaxConfig, ident: str) -> str:
    """Structs ``ident_exp``, ``ident_recip`` and ``ident`` for ``qfx_nl::softmax_stable<ident>``."""
    _check_ident(ident)
    return (table_struct(cfg.exp, ident + "_exp") + table_struct(cfg.reciprocal, ident + "_recip") + f"""
struct {ident} {{
    static const unsigned n = {cfg.n};
    typedef {cfg.in_type} in_t;
    typedef {cfg.diff_type} diff_t;
    typedef {cfg.exp.out_type} exp_t;
    typedef {cfg.sum_type} sum_t;
    typedef {cfg.reciprocal.out_type} recip_t;
    typedef {cfg.out_type} out_t;
    typedef {ident}_exp exp_table;
    typedef {ident}_recip recip_table;
}};
""")


def layer_norm_struct(cfg: LayerNormConfig, ident: str) -> str:
    """Structs ``ident_rsqrt`` and ``ident`` for ``qfx_nl::layer_norm<ident>``."""
    _check_ident(ident)
    return table_struct(cfg.rsqrt, ident + "_rsqrt") + f"""
struct {ident} {{
    static const unsigned n = {cfg.n};
    typedef {cfg.in_type} in_t;
    typedef {cfg.sum_type} sum_t;
    typedef {cfg.inv_n_type} inv_n_t;
    typedef {cfg.mean_type} mean_t;
    typedef {cfg.centered_type} centered_t;
    typedef {cfg.square_sum_type} sqsum_t;
    typedef {cfg.var_type} var_t;
    typedef {cfg.rsqrt.out_type} rsqrt_t;
    typedef {cfg.norm_type} norm_t;
    typedef {cfg.gamma_type} gamma_t;
    typedef {cfg.beta_type} beta_t;
    typedef {cfg.out_type} out_t;
    typedef {ident}_rsqrt rsqrt_table;
    static inv_n_t inv_n() {{ return inv_n_t({cfg.inv_n!r}); }}
}};
"""
