"""Accuracy of the table-based nonlinear units and kernels against float, as a function of table size.

    python benchmarks/bench_nonlinear.py [--rows 4000] [--seed 0]

Three tables, all errors max |fixed - float| (float64 functions, torch):

1. per unit, over every input code of its input type inside the stated domain, for table index
   bits 6, 8, 10, 12 (entries = 2**bits at most) and the default output type;
2. softmax over 8 and 32 values of 8- and 10-bit inputs, for exp/reciprocal table bits and exp
   entry widths (``--rows`` random rows of random codes, as in the tests);
3. LayerNorm over 32 values (gamma 1, beta 0), for rsqrt table bits and variance widths, on rows
   whose float output stays inside the output type (errors from saturation left out) and whose
   variance is at least 0.25.

Nothing is timed; this is the accuracy table the issue asks for. The full transformer accuracy
sweep (model accuracy against table sizes) comes with the shipped transformer model.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from qfx_onnx.fixed.types import FixedType
from qfx_onnx.nonlinear.kernels import LayerNormConfig, SoftmaxConfig, layer_norm_exact, softmax_exact
from qfx_onnx.nonlinear.units import (
    erf_table, exp_table, gelu_table, max_abs_error, reciprocal_table, rsqrt_table, sigmoid_table,
    tanh_table,
)

BITS = (6, 8, 10, 12)
# unit -> (factory(bits), input type, domain)
UNITS = {
    "exp": (lambda b: exp_table("ap_fixed<17,7>", bits=b), "ap_fixed<17,7>", (-16.0, 0.0)),
    "reciprocal (log2)": (lambda b: reciprocal_table("ap_ufixed<19,4>", bits=b, hi=8.0), "ap_ufixed<19,4>", (1.0, 8.0)),
    "reciprocal (uniform)": (lambda b: reciprocal_table("ap_ufixed<19,4>", bits=b, hi=8.0, index="uniform"),
                             "ap_ufixed<19,4>", (1.0, 8.0)),
    "rsqrt (log2) var>=1": (lambda b: rsqrt_table("ap_ufixed<18,5>", bits=b), "ap_ufixed<18,5>", (1.0, 16.0)),
    "rsqrt (log2) var>=1/4": (lambda b: rsqrt_table("ap_ufixed<18,5>", bits=b), "ap_ufixed<18,5>", (0.25, 16.0)),
    "rsqrt (uniform) var>=1": (lambda b: rsqrt_table("ap_ufixed<18,5>", bits=b, index="uniform"), "ap_ufixed<18,5>",
                               (1.0, 16.0)),
    "rsqrt (uniform) var>=1/4": (lambda b: rsqrt_table("ap_ufixed<18,5>", bits=b, index="uniform"), "ap_ufixed<18,5>",
                                 (0.25, 16.0)),
    "erf": (lambda b: erf_table("ap_fixed<16,6>", bits=b), "ap_fixed<16,6>", (None, None)),
    "gelu": (lambda b: gelu_table("ap_fixed<16,6>", "ap_fixed<18,6,AP_RND,AP_SAT>", bits=b), "ap_fixed<16,6>", (None, None)),
    "gelu tanh": (lambda b: gelu_table("ap_fixed<16,6>", "ap_fixed<18,6,AP_RND,AP_SAT>", bits=b, approximate="tanh"),
                  "ap_fixed<16,6>", (None, None)),
    "sigmoid": (lambda b: sigmoid_table("ap_fixed<16,6>", "ap_ufixed<16,0,AP_RND,AP_SAT>", bits=b, limit=8.0),
                "ap_fixed<16,6>", (None, None)),
    "tanh": (lambda b: tanh_table("ap_fixed<16,6>", "ap_fixed<16,1,AP_RND,AP_SAT>", bits=b, limit=4.0),
             "ap_fixed<16,6>", (None, None)),
}


def random_rows(t: FixedType, n: int, rows: int, rng: np.random.Generator) -> torch.Tensor:
    codes = rng.integers(t.int_min, t.int_max, (rows, n), endpoint=True)
    return torch.from_numpy(np.ldexp(codes.astype(np.float64), -t.frac))


def unit_table() -> Table:
    table = Table(title="table units: max |table(x) - f(x)| over every input code in the domain")
    table.add_column("unit")
    table.add_column("input type")
    table.add_column("domain")
    for b in BITS:
        table.add_column(f"{b} bits", justify="right")
    for name, (make, in_t, (lo, hi)) in UNITS.items():
        cells = []
        for b in BITS:
            t = make(b)
            cells.append(f"{max_abs_error(t, lo, hi):.2e} ({t.size})")
        domain = "all codes" if lo is None else f"[{lo:g}, {hi:g}]"
        table.add_row(name, in_t, domain, *cells)
    table.caption = "cell: error (entries); output types as in UNITS"
    return table


def softmax_table(rows: int, rng: np.random.Generator) -> Table:
    table = Table(title="softmax: max |p - p_float|")
    for col in ("input", "n", "exp bits", "recip bits", "recip index", "exp type", "output", "error", "table bits"):
        table.add_column(col, justify="right")
    for in_t, n in (("ap_fixed<8,3>", 8), ("ap_fixed<8,3>", 32), ("ap_fixed<10,4>", 32)):
        x = random_rows(FixedType.parse(in_t), n, rows, rng)
        want = torch.softmax(x, -1)
        for eb, rb, et, out in ((6, 6, "ap_ufixed<10,1,AP_RND,AP_SAT>", None), (8, 8, "ap_ufixed<12,1,AP_RND,AP_SAT>", None),
                                (10, 10, "ap_ufixed<16,1,AP_RND,AP_SAT>", None),
                                (10, 10, "ap_ufixed<16,1,AP_RND,AP_SAT>", "ap_ufixed<16,1,AP_RND,AP_SAT>"),
                                (12, 12, "ap_ufixed<18,1,AP_RND,AP_SAT>", "ap_ufixed<16,1,AP_RND,AP_SAT>")):
            for index in ("log2", "uniform"):
                cfg = SoftmaxConfig.create(in_t, n, out_type=out, exp_type=et, exp_bits=eb, reciprocal_bits=rb,
                                           reciprocal_index=index)
                err = float((softmax_exact(x, cfg) - want).abs().max())
                table.add_row(in_t, str(n), str(eb), str(rb), index, et, str(cfg.out_type), f"{err:.2e}",
                              str(cfg.exp.bits + cfg.reciprocal.bits))
    return table


def layer_norm_table(rows: int, rng: np.random.Generator) -> Table:
    table = Table(title="LayerNorm (n = 32, gamma 1, beta 0): max |y - y_float|")
    for col in ("input", "rsqrt bits", "rsqrt index", "var type", "output", "error", "table bits"):
        table.add_column(col, justify="right")
    n = 32
    for in_t, outs in (("ap_fixed<8,3>", (None,)), ("ap_fixed<10,4>", (None, "ap_fixed<16,4,AP_RND,AP_SAT>"))):
        t = FixedType.parse(in_t)
        x = random_rows(t, n, rows, rng)
        x = x[x.var(-1, unbiased=False) >= 0.25]
        want = torch.nn.functional.layer_norm(x, (n,), eps=1e-5)
        ones, zeros = torch.ones(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        for out in outs:
            for rb in (6, 8, 10, 12):
                for index, var_frac in (("log2", t.frac + 8), ("uniform", t.frac + 4), ("uniform", t.frac + 8)):
                    vi = 2 * t.integer - 1
                    var_t = FixedType(vi + var_frac, vi, signed=False, q="AP_RND", o="AP_SAT")
                    cfg = LayerNormConfig.create(in_t, n, var_type=var_t, rsqrt_bits=rb, out_type=out,
                                                 rsqrt_index=index)
                    y = layer_norm_exact(x, ones, zeros, cfg)
                    inside = (want >= cfg.out_type.min_value) & (want <= cfg.out_type.max_value)
                    err = float((y - want)[inside].abs().max())
                    table.add_row(in_t, str(rb), index, str(var_t), str(cfg.out_type), f"{err:.2e}",
                                  str(cfg.rsqrt.bits))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    console = Console(markup=False, highlight=False)
    console.print(unit_table())
    console.print(softmax_table(args.rows, rng))
    console.print(layer_norm_table(args.rows, rng))


if __name__ == "__main__":
    main()
