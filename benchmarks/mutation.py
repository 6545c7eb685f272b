"""Mutation testing: inject known faults into the numeric core and the HLS generator and check that
the test suite notices each one.

Every mutant is one textual replacement (an original snippet that occurs exactly once in its file,
and the faulty text) with a one-line description of the fault and the test selection that should
kill it. The script copies the repository (without ``.venv`` and ``.git``) to a work folder, makes
the copy's packages the ones Python imports (``PYTHONPATH``; the editable install of the checkout
is never touched), and for each mutant: applies it to the copy, runs its tests
(``pytest -x -q -p no:cacheprovider -p no:xdist``, one process, a per-mutant timeout), restores
the file, and records ``killed`` (a test failed: the first failing test is the killer), ``error``
(pytest could not even collect or import: also a kill), ``survived`` or ``timeout``. A survivor
that carries an ``equivalent`` note is counted as *explained*: the note says why no test can or
should notice it. The run ends with a baseline check: every selection passes on the unmutated code.

    python benchmarks/mutation.py                   # everything, writes benchmarks/mutation_report.md
    python benchmarks/mutation.py --only rnd_conv_tie_up sat_sym_min   # re-run some (report merges)
    python benchmarks/mutation.py --list            # the mutants, no tests run
    python benchmarks/mutation.py --check           # every snippet occurs once; nothing run

Results are cached in ``<workdir>/results.json`` so that ``--only`` re-runs update one table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "benchmarks" / "mutation_report.md"
DEFAULT_WORKDIR = Path("/tmp/qfx_mutation")
DEFAULT_TIMEOUT = 300

# ------------------------------------------------------------------------ test selections
TYPES = "tests/test_fixed_types.py"
CAST = "tests/test_fixed_cast.py"
HEADERS = "tests/test_ap_fixed_headers.py"  # the real ap_fixed.h, ~70 s (one g++ build)
HEADER_TYPES = (HEADERS + "::test_result_types_match_decltype", HEADERS + "::test_accum_type_holds_extreme_sums")
QUANTIZER = "tests/test_quantizer.py"
KHOT = "tests/test_khot.py"
ONNX = "tests/test_onnx_cast.py"
DERIVED = "tests/test_derived_types.py"
NEGATIVE = "tests/test_hls_negative.py"
EXPORT = "tests/test_hls_export.py"
KILLS = "tests/test_mutation_kills.py"
CSIM = "tests/test_hls_csim.py::"
ZOO = (CSIM + "test_every_layer_kind_is_bit_exact[zoo1d]", CSIM + "test_every_layer_kind_is_bit_exact[zoo2d]")
CSIM_KHOT = CSIM + "test_cnn_khot_weights_become_shift_adds_and_stay_bit_exact"
CSIM_MLP = CSIM + "test_shipped_model_after_ptq_is_bit_exact[mlp]"
CSIM_CNN = CSIM + "test_shipped_model_after_ptq_is_bit_exact[cnn]"


@dataclass(frozen=True)
class Mutant:
    ident: str
    path: str  # relative to the repository root
    old: str  # occurs exactly once in the file
    new: str
    description: str
    tests: tuple[str, ...]  # pytest arguments, fastest first (-x stops at the first failure)
    equivalent: str = ""  # why a survivor is harmless; empty: a survivor is a gap in the tests
    timeout: int = DEFAULT_TIMEOUT


def M(ident, path, old, new, description, *tests, equivalent="", timeout=DEFAULT_TIMEOUT) -> Mutant:
    flat: list[str] = []
    for t in tests:
        flat += list(t) if isinstance(t, tuple) else [t]
    return Mutant(ident, path, old, new, description, tuple(flat), equivalent, timeout)


F_TYPES, F_REF, F_CAST = "qfx_onnx/fixed/types.py", "qfx_onnx/fixed/reference.py", "qfx_onnx/fixed/cast.py"
F_QUANT, F_KHOT = "qfx_onnx/fixed/quantizer.py", "qfx_onnx/fixed/khot.py"
F_KERN = "qfx_onnx/fixed/kernels.py"
F_PROP, F_ONNX = "qfx_onnx/quant/typeprop.py", "qfx_onnx/quant/onnx_cast.py"
F_CPP, F_LAYERS, F_TB = "qfx_onnx/hls/cpp.py", "qfx_onnx/hls/templates/layers.h", "qfx_onnx/hls/templates/tb.cpp.j2"
F_LINEAR, F_ARITH = "qfx_onnx/ir/defs/linear.py", "qfx_onnx/ir/defs/arith.py"  # op definitions: type rules, C++
F_SHIFT, F_EST, F_CSIM = "qfx_onnx/hls/shift_add.py", "qfx_onnx/hls/estimate.py", "qfx_onnx/hls/csim.py"

MUTANTS: list[Mutant] = [
    # ------------------------------------------------------------ types.py: result-type rules
    M("add_int_bit", F_TYPES,
      "b.integer + (a.signed and not b.signed)) + 1",
      "b.integer + (a.signed and not b.signed))",
      "a + b (and a - b) one integer bit narrower (no carry bit)", TYPES, DERIVED, HEADER_TYPES),
    M("add_mixed_sign", F_TYPES,
      "return max(a.integer + (b.signed and not a.signed), b.integer + (a.signed and not b.signed)) + 1",
      "return max(a.integer, b.integer) + 1",
      "mixed-sign sum forgets the unsigned operand's extra integer bit", TYPES, DERIVED, HEADER_TYPES),
    M("add_signedness", F_TYPES,
      "return _base(i + max(a.frac, b.frac), i, a.signed or b.signed)",
      "return _base(i + max(a.frac, b.frac), i, a.signed and b.signed)",
      "signed + unsigned gives an unsigned sum", TYPES, DERIVED, HEADER_TYPES),
    M("add_frac_min", F_TYPES,
      "return _base(i + max(a.frac, b.frac), i, a.signed or b.signed)",
      "return _base(i + min(a.frac, b.frac), i, a.signed or b.signed)",
      "a + b keeps the coarser binary point (drops fraction bits)", TYPES, DERIVED, HEADER_TYPES),
    M("sub_unsigned", F_TYPES,
      "return _base(i + max(a.frac, b.frac), i, True)",
      "return _base(i + max(a.frac, b.frac), i, a.signed or b.signed)",
      "unsigned - unsigned gives an unsigned difference", TYPES, DERIVED, HEADER_TYPES),
    M("mul_width", F_TYPES,
      "return _base(a.width + b.width, a.integer + b.integer, a.signed or b.signed)",
      "return _base(a.width + b.width - 1, a.integer + b.integer - 1, a.signed or b.signed)",
      "a * b one integer bit narrower", TYPES, DERIVED, HEADER_TYPES),
    M("mul_signedness", F_TYPES,
      "return _base(a.width + b.width, a.integer + b.integer, a.signed or b.signed)",
      "return _base(a.width + b.width, a.integer + b.integer, a.signed and b.signed)",
      "signed * unsigned gives an unsigned product", TYPES, DERIVED, HEADER_TYPES),
    M("neg_no_bit", F_TYPES,
      "return _base(a.width + 1, a.integer + 1, True)",
      "return _base(a.width, a.integer, True)",
      "unary minus without the extra bit (-min overflows)", TYPES, HEADER_TYPES),
    M("neg_int1", F_TYPES,
      "return _base(3, 3, True)",
      "return _base(2, 2, True)",
      "-ap_int<1> gets the generic 2-bit type instead of the header's 3-bit difference", TYPES, HEADER_TYPES),
    M("accum_narrow", F_TYPES,
      "extra = (terms - 1).bit_length()",
      "extra = max(0, (terms - 1).bit_length() - 1)",
      "lossless accumulator one bit narrower", TYPES, DERIVED, HEADER_TYPES),
    M("accum_floor_log2", F_TYPES,
      "extra = (terms - 1).bit_length()",
      "extra = terms.bit_length() - 1",
      "accumulator uses floor(log2(K)) extra bits (too narrow when K is not a power of two)",
      TYPES, DERIVED, HEADER_TYPES),
    M("union_mixed_sign", F_TYPES,
      "integer = max(t.integer + (signed and not t.signed) for t in types)",
      "integer = max(t.integer for t in types)",
      "union of signed and unsigned forgets the sign bit (concat/max/clip types)", TYPES, DERIVED, ZOO),
    M("sat_sym_min", F_TYPES,
      "return -self.int_max",
      "return self.int_min",
      "SAT_SYM min not symmetric (saturates to -2**(W-1))", TYPES, CAST, QUANTIZER, ONNX, HEADERS),
    M("sat_sym_w1", F_TYPES,
      "if self.o is OverflowMode.SAT_SYM and self.signed and self.width > 1:",
      "if self.o is OverflowMode.SAT_SYM and self.signed:",
      "1-bit SAT_SYM saturates to 0 (the header's min|1 quirk ignored)", TYPES, CAST, HEADERS),
    # ------------------------------------------------------- reference.py: rounding and overflow
    M("ref_rnd_tie_down", F_REF, "Q.RND: above | tie,", "Q.RND: above,",
      "AP_RND ties go down (toward -inf)", CAST, HEADERS),
    M("ref_rnd_zero_away", F_REF, "Q.RND_ZERO: above | (tie & neg),", "Q.RND_ZERO: above | (tie & ~neg),",
      "AP_RND_ZERO ties go away from zero", CAST, HEADERS),
    M("ref_rnd_min_inf_up", F_REF, "Q.RND_MIN_INF: above,", "Q.RND_MIN_INF: above | tie,",
      "AP_RND_MIN_INF ties go up", CAST, HEADERS),
    M("ref_rnd_inf_zero", F_REF, "Q.RND_INF: above | (tie & ~neg),", "Q.RND_INF: above | (tie & neg),",
      "AP_RND_INF ties go toward zero", CAST, HEADERS),
    M("ref_rnd_conv_up", F_REF, "Q.RND_CONV: above | (tie & ((floor_small & 1) != 0)),", "Q.RND_CONV: above | tie,",
      "AP_RND_CONV ties go up (not to even)", CAST, HEADERS),
    M("ref_trn_zero_floor", F_REF, "Q.TRN_ZERO: neg & inexact,", "Q.TRN_ZERO: np.zeros_like(above),",
      "AP_TRN_ZERO floors negative values", CAST, HEADERS),
    M("ref_half_threshold", F_REF, "above, tie, inexact = rem > half, rem == half, rem != 0",
      "above, tie, inexact = rem >= half, rem == half, rem != 0",
      "an exact tie counts as above the midpoint in every rounding mode", CAST, HEADERS),
    M("ref_sat_overflow_edge", F_REF, "overflow = q_float >= top", "overflow = q_float > top",
      "saturation misses the first code beyond the top (2**(W-1))", CAST, HEADERS),
    M("ref_sat_zero_underflow", F_REF, "return np.where(out_of_range, 0, codes).astype(codes.dtype)",
      "return np.where(overflow, 0, codes).astype(codes.dtype)",
      "AP_SAT_ZERO zeroes overflow only; underflow wraps", CAST, HEADERS),
    M("ref_sat_sym_bottom", F_REF, "underflow = underflow | (q_float == bottom)", "underflow = underflow",
      "AP_SAT_SYM lets the code -2**(W-1) through", CAST, HEADERS),
    M("ref_wrap_n_bits", F_REF, "if n > 1:\n                adj = _set_range(adj, w - n, w - 2, ~neg_src)",
      "if n > 1:\n                adj = _set_range(adj, w - n, w - 2, neg_src)",
      "signed AP_WRAP with N saturation bits fills them with the sign, not its complement", CAST, HEADERS),
    M("ref_wrap_n2", F_REF, "if n > 1:\n                adj = _set_range(adj, w - n, w - 2, ~neg_src)",
      "if n > 2:\n                adj = _set_range(adj, w - n, w - 2, ~neg_src)",
      "signed AP_WRAP with N = 2 saturation bits behaves like N = 1", CAST, HEADERS),
    M("ref_wrap_unsigned_n", F_REF, "adj = _set_range(v, w - n, w - 1, np.ones_like(neg_src))",
      "adj = _set_range(v, w - n, w - 1, np.zeros_like(neg_src))",
      "unsigned AP_WRAP clears its N saturation bits instead of setting them", CAST, HEADERS),
    M("ref_wrap_sm_flip", F_REF, "flip = ld != msb", "flip = ld == msb",
      "AP_WRAP_SM (N = 0) reflects when it should not", CAST, HEADERS),
    M("ref_wrap_sm_n", F_REF, "adj = np.where(lno == neg_src, ~v & word_mask, v)",
      "adj = np.where(lno != neg_src, ~v & word_mask, v)",
      "AP_WRAP_SM with N >= 2 inverts the low bits on the wrong condition", CAST, HEADERS),
    M("ref_wrap_sm_unsigned", F_REF, "o = O.SAT  # the header's overflow_adjust", "o = O.WRAP  # the header's overflow_adjust",
      "unsigned AP_WRAP_SM wraps instead of saturating", CAST, HEADERS),
    # ----------------------------------------------- kernels.py (the one torch definition of the cast)
    M("cast_rnd_tie_down", F_KERN, "if q is Q.RND:\n        return y.floor_().mul_(0.5).ceil_()",
      "if q is Q.RND:\n        return y.ceil_().mul_(0.5).floor_()", "torch AP_RND ties go down", CAST, QUANTIZER),
    M("cast_rnd_half_up_naive", F_KERN, "if q is Q.RND:\n        return y.floor_().mul_(0.5).ceil_()",
      "if q is Q.RND:\n        return y.mul_(0.5).add_(0.5).floor_()",
      "torch AP_RND as floor(y + 0.5) (wrong below 0.5 and beyond 2**(p-1))", CAST, QUANTIZER),
    M("cast_rnd_conv_up", F_KERN, "return y.round_()  # half to even", "return y.add_(0.5).floor_()  # half to even",
      "torch AP_RND_CONV ties go up", CAST, QUANTIZER),
    M("cast_trn_zero_floor", F_KERN, "return y.trunc_()", "return y.floor_()", "torch AP_TRN_ZERO floors", CAST, QUANTIZER),
    M("cast_rnd_zero_inf_swap", F_KERN, "if q is Q.RND_INF else", "if q is Q.RND_ZERO else",
      "torch AP_RND_ZERO and AP_RND_INF tie directions swapped", CAST, QUANTIZER),
    M("cast_sat_sym_min", F_KERN, "lo = t.sat_min_code if o is O.SAT_SYM else t.int_min", "lo = t.int_min",
      "torch AP_SAT_SYM saturates to -2**(W-1)", CAST, QUANTIZER),
    M("cast_sat_zero_under", F_KERN, "c.masked_fill_(c != c.clamp(s.int_min, s.int_max), 0.0)",
      "c.masked_fill_(c > s.int_max, 0.0)", "torch AP_SAT_ZERO ignores underflow", CAST, QUANTIZER),
    M("cast_wrap_signed", F_KERN, "2.0 ** (1 - s.width) if s.signed else 2.0**-s.width",
      "2.0**-s.width if s.signed else 2.0**-s.width", "torch signed AP_WRAP wraps as unsigned", CAST, QUANTIZER),
    M("cast_wrap_n_bits", F_KERN, "torch.where(neg, -(2.0 ** (w - 1)), 2.0 ** (w - 1) - 2.0 ** (w - n))",
      "torch.where(neg, 2.0 ** (w - 1) - 2.0 ** (w - n), -(2.0 ** (w - 1)))",
      "torch signed AP_WRAP N saturation bits take the sign", CAST, QUANTIZER),
    M("cast_wrap_sm_flip", F_KERN, "torch.where(ld ^ (wrapped < 0), -wrapped - 1.0, wrapped)",
      "torch.where(ld ^ (wrapped >= 0), -wrapped - 1.0, wrapped)",
      "torch AP_WRAP_SM (N <= 1) reflects when it should not", CAST, QUANTIZER),
    M("cast_wrap_sm_ld_rounded", F_KERN, "return s.o is O.WRAP_SM and s.n == 0 and s.q is not Q.TRN",
      "return False", "torch AP_WRAP_SM (N = 0) reads lD from the rounded code, not floor(x * 2**F)", CAST, QUANTIZER),
    M("cast_wrap_sm_unsigned", F_KERN, "o = t.o if t.signed or t.o is not O.WRAP_SM else O.SAT",
      "o = t.o if t.signed or t.o is not O.WRAP_SM else O.WRAP",
      "torch unsigned AP_WRAP_SM wraps instead of saturating", CAST, QUANTIZER),
    M("cast_float32_w25", F_KERN, "if dtype == torch.float32 and t.width <= 24 and", "if dtype == torch.float32 and t.width <= 25 and",
      "float32 work dtype for 25-bit types (not exact)", KILLS, CAST, QUANTIZER),
    M("cast_nan_sign", F_KERN, "fill = torch.where(torch.signbit(x), low, high)", "fill = torch.where(torch.signbit(x), high, low)",
      "NaN saturates to the wrong end (the header reads NaN as an infinity of its sign)", CAST, QUANTIZER),
    M("cast_nan_never_fixed", F_KERN, "and not torch.isnan(out.sum()):", "and True:",
      "torch cast leaves NaN as NaN on CPU", CAST, QUANTIZER),
    M("cast_underflow_sign", F_KERN, "    if negative_frac:\n", "    if False:\n",
      "x * 2**F underflowing to 0 loses its sign (negative F)", CAST, QUANTIZER),
    M("cast_negative_zero", F_KERN, "return c.mul_(inv).add_(0.0)", "return c.mul_(inv)",
      "torch cast returns -0.0 where HLS gives +0.0", CAST, QUANTIZER),
    # ------------------------------------------------------------------ quantizer.py (fast path, STE)
    M("quant_sat_sym_bounds", F_QUANT,
      "self._bounds = (base.sat_min_code if o_eff is OverflowMode.SAT_SYM else base.int_min, base.int_max)",
      "self._bounds = (base.int_min, base.int_max)",
      "quantizer code range ignores AP_SAT_SYM's symmetric minimum", QUANTIZER),
    M("quant_ste_saturating", F_QUANT, "grad_x = grad.masked_fill(state != 0, 0.0) if ctx.saturating else grad",
      "grad_x = grad", "straight-through gradient passes outside a saturating range (general path)", QUANTIZER),
    M("quant_fast_ste", F_QUANT, "grad_x = grad * inside if ctx.needs_input_grad[0] else None",
      "grad_x = grad if ctx.needs_input_grad[0] else None",
      "straight-through gradient passes outside the range (fast path)", QUANTIZER),
    M("quant_fast_lsq_sign", F_QUANT, "torch.dot(grad.reshape(-1), xq.reshape(-1)) - torch.dot(",
      "torch.dot(grad.reshape(-1), xq.reshape(-1)) + torch.dot(", "fast-path LSQ term adds x instead of subtracting it",
      QUANTIZER),
    M("quant_lsq_ends", F_QUANT, "torch.where(state > 0, hi, lo))", "torch.where(state > 0, lo, hi))",
      "LSQ binary-point gradient uses the wrong range end", QUANTIZER),
    M("quant_traced_floor", F_QUANT, "f = torch.round(self.frac.detach()", "f = torch.floor(self.frac.detach()",
      "the compiled quantizer floors the binary point (eager rounds half to even)", "tests/test_finetune.py::test_compiled_training_step_matches_eager"),
    # --------------------------------------------------------------------------------- khot.py
    M("khot_tie_larger", F_KHOT, "((two_y == mid) & (b.abs() <= a.abs()))", "((two_y == mid) & (b.abs() >= a.abs()))",
      "K-hot projection ties go to the larger magnitude", KHOT),
    M("khot_table_k_minus_1", F_KHOT, "return codes[digit_count(codes, signed_digits) <= k]",
      "return codes[digit_count(codes, signed_digits) < k]", "K-hot table allows only K-1 digits", KHOT),
    M("khot_naf_binary", F_KHOT, "d = 2 - (n & 3)  # +1 or -1", "d = 1  # +1 or -1",
      "signed-digit decomposition is plain binary (more terms than the NAF)", KHOT, DERIVED, CSIM_KHOT),
    M("khot_csd_weight", F_KHOT, "return _popcount((3 * n) ^ n)", "return _popcount(n)",
      "tensor CSD weight counts binary ones", KHOT),
    M("khot_wide_bound", F_KHOT, "digits, bound = torch.cat([powers, -powers]), 1 << (width + 1)",
      "digits, bound = torch.cat([powers, -powers]), 1 << width",
      "wide signed-digit tables drop partial sums beyond 2**W", KHOT,
      equivalent="the tables are identical for every (W, signedness, K) the limits allow (106 of them, "
                 "W = 21..32, checked by brute force): digits can always be added in an order whose partial "
                 "sums stay within 2**W, so the wider bound is only a safety margin"),
    # ------------------------------------------------------------------------------ typeprop.py
    M("prop_conv_terms", F_LINEAR, "terms = math.prod(q.shape(q.args[1])[1:])", "terms = math.prod(q.shape(q.args[1])[2:])",
      "conv accumulator ignores the input channels", DERIVED, ZOO),
    M("prop_conv_transpose_terms", F_LINEAR, "terms = math.prod(w_shape[2:]) * w_shape[0] // q.kwargs[\"group\"]",
      "terms = math.prod(w_shape[2:])", "ConvTranspose accumulator ignores the input channels", KILLS, DERIVED, ZOO),
    M("prop_gemm_transA", F_LINEAR, "terms = a_shape[0] if q.kwargs.get(\"transA\", 0) else a_shape[-1]",
      "terms = a_shape[-1]", "Gemm with transA counts the wrong dimension", KILLS, DERIVED, ZOO),
    M("prop_matmul_terms", F_LINEAR, "terms = q.shape(q.args[0])[-1]", "terms = q.shape(q.args[0])[0]",
      "MatMul accumulator counts rows, not the inner dimension", DERIVED, ZOO),
    M("prop_bias", F_LINEAR, "return add_type(acc, q.type(bias))", "return acc",
      "bias not added into the accumulator type", DERIVED, ZOO),
    M("prop_leaky", F_ARITH, "return union_type(q.types[0], mul_type(q.types[0], q.types[1])), 1",
      "return mul_type(q.types[0], q.types[1]), 1", "LeakyRelu/PRelu type holds only the negative branch", DERIVED, ZOO),
    M("prop_hard_sigmoid_bit", F_ARITH,
      "return union_type(add_type(mul_type(types[0], types[1]), types[2]), BIT)",
      "return add_type(mul_type(types[0], types[1]), types[2])",
      "HardSigmoid type forgets the clamp values 0 and 1", KILLS, DERIVED, ZOO),
    M("prop_sum_pool", F_ARITH, "terms = math.prod(q.kwargs[\"kernel_shape\"])\n    return accum_type(q.types[0], terms), terms",
      "terms = math.prod(q.kwargs[\"kernel_shape\"])\n    return accum_type(q.types[0], max(1, terms // 2)), terms",
      "pooling-sum accumulator one bit narrower", DERIVED, ZOO),
    M("prop_reduce_sum", F_ARITH, "terms = math.prod(in_shape[a] for a in axes)", "terms = math.prod(in_shape[a] for a in list(axes)[:1])",
      "ReduceSum over several axes counts only the first", DERIVED, ZOO),
    M("prop_exact_sign_bit", F_PROP, "+ (1 if signed else 0)\n", "\n",
      "an uncast signed constant gets no sign bit", KILLS, DERIVED, ZOO),
    # ------------------------------------------------------------------------------ onnx_cast.py
    M("onnx_rnd_tie_down", F_ONNX, "up = b.op(\"And\", b.op(\"GreaterOrEqual\", y, mid), not_int)",
      "up = b.op(\"And\", b.op(\"Greater\", y, mid), not_int)", "ONNX AP_RND ties go down", ONNX),
    M("onnx_rnd_conv_up", F_ONNX, "return b.op(\"Round\", y), fl", "return b.op(\"Floor\", b.op(\"Add\", y, b.const(0.5))), fl",
      "ONNX AP_RND_CONV ties go up", ONNX),
    M("onnx_trn_zero", F_ONNX, "b.op(\"Ceil\", y), fl), fl", "b.op(\"Floor\", y), fl), fl",
      "ONNX AP_TRN_ZERO floors negative values", ONNX),
    M("onnx_rnd_zero_side", F_ONNX, "side = b.op(\"Less\", y, b.const(0.0)) if q is Q.RND_ZERO",
      "side = b.op(\"Greater\", y, b.const(0.0)) if q is Q.RND_ZERO", "ONNX AP_RND_ZERO ties go away from zero", ONNX),
    M("onnx_sat_sym", F_ONNX, "b.const(float(t.sat_min_code))", "b.const(lo)", "ONNX AP_SAT_SYM min not symmetric", ONNX),
    M("onnx_sat_zero", F_ONNX, "out_of_range = b.op(\"Or\", b.op(\"Less\", qv, b.const(lo)), b.op(\"Greater\", qv, b.const(hi)))",
      "out_of_range = b.op(\"Greater\", qv, b.const(hi))", "ONNX overflow test misses underflow (SAT_ZERO, N bits)", ONNX),
    M("onnx_wrap_edge", F_ONNX, "b.op(\"Greater\", wrapped, b.const(hi))", "b.op(\"GreaterOrEqual\", wrapped, b.const(hi))",
      "ONNX AP_WRAP maps the top code to the wrong end", ONNX),
    M("onnx_wrap_unsigned_n", F_ONNX, "adjusted = b.op(\"Add\", low, b.const(2.0**w - 2.0 ** (w - n)))",
      "adjusted = b.op(\"Add\", low, b.const(0.0))", "ONNX unsigned AP_WRAP does not set its N saturation bits", ONNX),
    M("onnx_wrap_sm_swap", F_ONNX, "flipped, wrapped)\n", "wrapped, flipped)\n",
      "ONNX AP_WRAP_SM (N <= 1) reflects when it should not", ONNX),
    M("onnx_wrap_n_top", F_ONNX, "b.const(2.0 ** (w - 1) - 2.0 ** (w - n))", "b.const(0.0)",
      "ONNX signed AP_WRAP/AP_WRAP_SM N bits not set on positive overflow", ONNX),
    M("onnx_neg_zero", F_ONNX, "b.nodes.append(helper.make_node(\"Add\", [scaled, b.const(0.0)], [\"y\"]))",
      "b.nodes.append(helper.make_node(\"Identity\", [scaled], [\"y\"]))", "ONNX cast returns -0.0 where HLS gives +0.0", ONNX),
    M("onnx_float32_limit", F_ONNX, "if t.width > 24:", "if t.width > 25:", "ONNX cast accepts 25-bit types float32 cannot run", ONNX),
    # ------------------------------------------------------------------------- HLS generator
    M("tb_always_passes", F_TB, "if ((got & mask) == ((unsigned long long)expected & mask)) return;", "return;",
      "testbench comparison always passes", NEGATIVE),
    M("tb_exit_zero", F_TB, "return mismatches == 0 ? 0 : 1;", "return 0;",
      "testbench exits 0 on mismatches", NEGATIVE),
    M("tb_mask_sign", F_TB, "((1ULL << width) - 1);", "((1ULL << (width - 1)) - 1);",
      "testbench comparison ignores the sign bit", NEGATIVE),
    M("csim_parse", F_CSIM, "return self.returncode == 0 and self.mismatches == 0 and self.vectors > 0",
      "return self.returncode == 0", "csim result trusts the exit code alone", NEGATIVE),
    M("codegen_decimal", F_CPP, "digits = str(abs(code) * 5**frac).rjust(frac + 1, \"0\")",
      "digits = str(abs(code) * 5**frac).rjust(frac, \"0\")",
      "weight literals below 1 lose their leading zero (\".25\")", EXPORT, NEGATIVE),
    M("codegen_relu_ge", F_ARITH, "{a[0]} > 0 ? {T}({a[0]}) : {T}(0)", "{a[0]} >= 0 ? {T}({a[0]}) : {T}(0)",
      "ReLU tests x >= 0 instead of x > 0", NEGATIVE, ZOO,
      equivalent="at x = 0 both branches give 0: the generated C++ computes the same value"),
    M("codegen_leaky_sign", F_ARITH, "{a[0]} < 0 ? {T}({a[0]} * {a[1]}) : {T}({a[0]})", "{a[0]} > 0 ? {T}({a[0]} * {a[1]}) : {T}({a[0]})",
      "LeakyRelu scales the positive side", ZOO),
    M("codegen_clip_lo", F_ARITH, "out.append(f\"if ({v} < {a[1]}) {v} = {a[1]};\")", "out.append(f\"if ({v} > {a[1]}) {v} = {a[1]};\")",
      "Clip lower bound tested the wrong way", ZOO),
    M("codegen_hsig_hi", F_ARITH, "f\"if ({v} > 1) {v} = 1;\"]", "f\"if ({v} > 2) {v} = 2;\"]",
      "HardSigmoid clamps at 2", ZOO),
    M("codegen_lut_range", F_CPP, "lines.append(f\"ap_uint<{w}> {var}_k = {value}.range({w - 1}, 0);\")",
      "lines.append(f\"ap_uint<{w}> {var}_k = {value}.range({w - 2}, 0);\")",
      "lookup-table index drops the input's top bit", ZOO),
    M("codegen_khot_shift", F_CPP, "frac = w.ctype.type.frac\n    used", "frac = w.ctype.type.frac + 1\n    used",
      "K-hot shifts off by one bit", CSIM_KHOT),
    M("codegen_khot_sign", F_CPP, "pattern = \"\".join(\"p\" if sign > 0 else \"m\" for sign, _ in digits)",
      "pattern = \"\".join(\"p\" for sign, _ in digits)", "K-hot negative digits are added", CSIM_KHOT),
    M("layers_dense_bias", F_LAYERS, "      if (CONFIG_T::has_bias) acc = b[CONFIG_T::n_bias == 1 ? 0 : o];\n    DenseProducts:",
      "    DenseProducts:", "dense layer ignores its bias", NEGATIVE),
    M("layers_conv_dilation", F_LAYERS,
      "              const int ih = oh * CONFIG_T::stride_h - CONFIG_T::pad_top + kh * CONFIG_T::dil_h;\n"
      "              const int iw = ow * CONFIG_T::stride_w - CONFIG_T::pad_left + kw * CONFIG_T::dil_w;\n"
      "              if (ih >= 0 && ih < CONFIG_T::in_h && iw >= 0 && iw < CONFIG_T::in_w)\n                acc +=",
      "              const int ih = oh * CONFIG_T::stride_h - CONFIG_T::pad_top + kh;\n"
      "              const int iw = ow * CONFIG_T::stride_w - CONFIG_T::pad_left + kw * CONFIG_T::dil_w;\n"
      "              if (ih >= 0 && ih < CONFIG_T::in_h && iw >= 0 && iw < CONFIG_T::in_w)\n                acc +=",
      "conv ignores the vertical dilation", ZOO),
    M("layers_max_pool_min", F_LAYERS, "else if (first || v > acc) acc = v;", "else if (first || v < acc) acc = v;",
      "max pool takes the minimum", ZOO),
    M("layers_reduce_first", F_LAYERS, "for (int r = 1; r < CONFIG_T::n_red; r++) {", "for (int r = 2; r < CONFIG_T::n_red; r++) {",
      "reduce skips its second term", ZOO),
    M("layers_remap_pad", F_LAYERS, "const data_T v = s < 0 ? data_T(0) : x[s < 0 ? 0 : s];", "const data_T v = x[s < 0 ? 0 : s];",
      "zero padding reads element 0", ZOO),
    M("shift_term_frac", F_SHIFT, "frac = data_t.frac + max(0, -lo)", "frac = data_t.frac",
      "K-hot shift operand loses the bits a right shift moves below the LSB", DERIVED, CSIM_KHOT),
    M("shift_term_spare", F_SHIFT, "integer = data_t.integer + max(0, hi) + 1 + (0 if data_t.signed else 1)",
      "integer = data_t.integer + max(0, hi) + (0 if data_t.signed else 1)",
      "K-hot shift operand without its spare integer bit", DERIVED, CSIM_KHOT),
    M("shift_claim_check", F_SHIFT, "if digits > int(claimed):", "if digits > int(claimed) + 1:",
      "a K-hot claim one digit short is accepted", KILLS, EXPORT, CSIM_KHOT),
    M("est_tiles", F_EST, "return 1 if width <= port else 1 + math.ceil((width - port) / (port - 1))",
      "return 1 if width <= port else 1 + math.ceil((width - port) / port)",
      "DSP tiling counts full-width tiles (no sign bit overlap)", KILLS, EXPORT),
    M("est_lut_mult", F_EST, "if min(a.width, b.width) <= LUT_MULT_MAX_BITS:", "if min(a.width, b.width) < LUT_MULT_MAX_BITS:",
      "a 4-bit operand multiplier goes to a DSP", EXPORT),
    M("est_depth", F_EST, "depth = max(depth, math.ceil(math.log2(max(terms, 1))) + 2)",
      "depth = max(depth, math.ceil(math.log2(max(terms, 1))) + 1)", "adder-tree latency one cycle short", KILLS, EXPORT),
    M("est_khot_dsp", F_EST, "key, dsp, lut = f\"{prod.a.width} x K-hot\", 0,", "key, dsp, lut = f\"{prod.a.width} x K-hot\", 1,",
      "a K-hot product is counted as a DSP", EXPORT),
]


# ------------------------------------------------------------------------------------ running
def prepare_workdir(workdir: Path) -> dict[str, str]:
    """A fresh copy of the repository and the environment that makes Python import it."""
    src = workdir / "repo"
    if src.exists():
        shutil.rmtree(src)
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__", ".pytest_cache",
                                                             ".hypothesis", "*.egg-info"))
    pkgs = workdir / "pkgs"
    pkgs.mkdir(parents=True, exist_ok=True)
    link = pkgs / "qfx_onnx_cli"  # the CLI package lives in cli/ (an editable-install mapping)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(src / "cli")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(src), str(pkgs)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # a restored file must never meet a stale mutated .pyc
    env.setdefault("OMP_NUM_THREADS", "1")
    probe = subprocess.run([sys.executable, "-c", "import qfx_onnx, qfx_onnx_cli; print(qfx_onnx.__file__); "
                            "print(qfx_onnx_cli.__file__)"], cwd=src, env=env, capture_output=True, text=True)
    files = probe.stdout.split()
    if probe.returncode or len(files) != 2 or not all(f.startswith(str(workdir)) for f in files):
        sys.exit(f"the copy's packages are not the ones imported: {probe.stdout} {probe.stderr}")
    return env


_FAILED = re.compile(r"^(FAILED|ERROR) (\S+)", re.M)


def run_tests(tests: tuple[str, ...], cwd: Path, env: dict, timeout: int) -> tuple[str, str, float]:
    """(result, first failing test or '', seconds): result is passed/failed/error/timeout."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider", "-p", "no:xdist",
           "-p", "no:randomly", *tests]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # pytest and the g++/csim processes it started
        proc.communicate()
        return "timeout", "", time.perf_counter() - t0
    seconds = time.perf_counter() - t0
    m = _FAILED.search(out)
    if proc.returncode == 0:
        return "passed", "", seconds
    if proc.returncode == 1:
        return "failed", m.group(2) if m else "", seconds
    tail = out.strip().splitlines()[-1] if out.strip() else f"exit {proc.returncode}"
    return "error", m.group(2) if m else tail[:120], seconds


def check_snippets(mutants: list[Mutant]) -> list[str]:
    problems = []
    for m in mutants:
        text = (ROOT / m.path).read_text()
        count = text.count(m.old)
        if count != 1:
            problems.append(f"{m.ident}: the original snippet occurs {count} times in {m.path}")
        if m.old == m.new:
            problems.append(f"{m.ident}: replacement equals the original")
    idents = [m.ident for m in mutants]
    problems += [f"duplicate mutant id {i}" for i in sorted({i for i in idents if idents.count(i) > 1})]
    return problems


def run_mutant(m: Mutant, repo: Path, env: dict) -> dict:
    path = repo / m.path
    original = path.read_text()
    assert original.count(m.old) == 1, m.ident
    path.write_text(original.replace(m.old, m.new))
    try:
        outcome, test, seconds = run_tests(m.tests, repo, env, m.timeout)
    finally:
        path.write_text(original)
    result = {"passed": "survived", "failed": "killed", "error": "killed (error)", "timeout": "timeout"}[outcome]
    return dict(result=result, test=test, seconds=round(seconds, 1))


def classify(m: Mutant, r: dict | None) -> str:
    if r is None:
        return "not run"
    if r["result"] == "survived" and m.equivalent:
        return "explained"
    return r["result"]


# ------------------------------------------------------------------------------------ report
NOTES = """\
## What the survivors of the first run showed

The first full run (100 mutants) left 10 survivors. One (`codegen_relu_ge`) was expected to be
equivalent. Eight were gaps in the tests, now closed by `tests/test_mutation_kills.py`; the re-run
shows each of them killed by it:

* `prop_gemm_transA`, `prop_conv_transpose_terms`: no derived-type test covered Gemm with `transA`
  or ConvTranspose; an accumulator too narrow for them went unnoticed. New extreme-operand checks,
  in the style of `tests/test_derived_types.py`.
* `prop_exact_sign_bit`: the type of an uncast constant (`exact_type_of`) was never tested.
* `prop_hard_sigmoid_bit`: the union with `ap_ufixed<1,1>` in HardSigmoid's type looks redundant
  (a type that cannot hold 1 usually has no value above 1), but not on a grid coarser than 1: with
  an input LSB of 4, `alpha*x + beta` steps by 8, the clamp writes 1, and without the union the
  type (and the C++ `if (v > 1) v = 1;`) would hold 0 instead. No test had a negative binary point there.
* `cast_float32_w25`: float32 inputs to types wider than 24 bits (the result is promised "rounded
  to nearest", i.e. the exact float64 cast rounded once) were never tested.
* `shift_claim_check`: the error for a K-hot claim that a code exceeds never ran.
* `est_tiles`, `est_depth`: the DSP tiling was tested only where the two formulas agree, and the
  latency only as a lower bound.

Two survivors are equivalent (explained in the table): `codegen_relu_ge` and `khot_wide_bound` (a
safety margin that never changes a table the limits allow).

Also found while writing the kills, not bugs: `exact_type_of` gives one spare bit when every value
is negative (`[-1.0]` gets `ap_fixed<2,2>`; `ap_fixed<1,1>` holds it), and `khot_term_type` keeps
one spare integer bit (documented by a strict xfail in `tests/test_derived_types.py`, which is what
kills `shift_term_spare`). `sat_sym_min` (a wrong `FixedType.sat_min_code`) passes
`test_fixed_types.py` and `test_fixed_cast.py`, because the torch cast and the numpy reference both
read that property; the quantizer's gradient test and the real `ap_fixed.h` comparison catch it.
"""


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def _short(test: str, limit: int = 48) -> str:
    """A test id with long parameters cut, for the table."""
    m = re.match(r"^(.*?)\[(.*)\]$", test)
    if not m or len(m.group(2)) <= limit:
        return test
    return f"{m.group(1)}[{m.group(2)[:limit]}...]"


def render_report(results: dict, baseline: dict | None, wall: float | None) -> str:
    counts: dict[str, int] = {}
    rows = []
    for m in MUTANTS:
        r = results.get(m.ident)
        state = classify(m, r)
        counts[state] = counts.get(state, 0) + 1
        shown = {"explained": "survived: explained", "killed (error)": "killed (import/collection error)"}.get(state, state)
        killer = _short(r["test"]) if r and r["test"] else ("-" if state != "explained" else m.equivalent)
        secs = f"{r['seconds']:.0f}" if r else "-"
        rows.append(f"| `{m.ident}` | `{m.path.removeprefix('qfx_onnx/')}` | {_md(m.description)} | {shown} | "
                    f"{_md(killer)} | {secs} |")
    total = len(MUTANTS)
    killed = counts.get("killed", 0) + counts.get("killed (error)", 0)
    summary = (f"{total} mutants: **{killed} killed**, {counts.get('explained', 0)} survived and explained, "
               f"{counts.get('survived', 0)} survived unexplained, {counts.get('timeout', 0)} timed out"
               + (f", {counts['not run']} not run" if counts.get("not run") else "") + ".")
    base = ""
    if baseline is not None:
        bad = {k: v for k, v in baseline.items() if v["result"] != "passed"}
        base = (f"Baseline: on the unmutated code every test selection passes ({', '.join(baseline)})."
                if not bad else "Baseline FAILURES (kills by these selections are not meaningful): "
                + ", ".join(f"{k}: {v}" for k, v in bad.items()))
    timing = f" Last full run: {wall / 60:.0f} minutes on the shared 2-core machine." if wall else ""
    return f"""# Mutation testing report

Generated by `python benchmarks/mutation.py` (see `benchmarks/README.md`). Each mutant is one
textual fault injected into a copy of the repository; its test selection runs with `-x`, so the
"killed by" column names the first test that failed. A survivor is *explained* when no test can or
should notice it (the reason is in the "killed by / why" column).

{summary}{timing}

{base}

| mutant | file | fault | result | killed by / why | s |
|---|---|---|---|---|---|
{chr(10).join(rows)}

{NOTES}"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", metavar="ID", help="run only these mutants (results merge into the cache)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--check", action="store_true", help="check that every snippet occurs exactly once, and exit")
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    ap.add_argument("--no-baseline", action="store_true", help="skip running the selections on the unmutated code")
    ap.add_argument("--report", type=Path, default=REPORT)
    args = ap.parse_args(argv)

    problems = check_snippets(MUTANTS)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 2
    if args.check:
        print(f"{len(MUTANTS)} mutants, every snippet found exactly once")
        return 0
    if args.list:
        for m in MUTANTS:
            print(f"{m.ident:28} {m.path:32} {m.description}")
        return 0
    chosen = MUTANTS if not args.only else [m for m in MUTANTS if m.ident in set(args.only)]
    unknown = set(args.only or ()) - {m.ident for m in MUTANTS}
    if unknown:
        print(f"unknown mutant ids: {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2

    args.workdir.mkdir(parents=True, exist_ok=True)
    cache = args.workdir / "results.json"
    state = json.loads(cache.read_text()) if cache.exists() else {}
    results, baseline = state.get("results", {}), state.get("baseline")
    env = prepare_workdir(args.workdir)
    repo = args.workdir / "repo"
    t0 = time.perf_counter()
    for k, m in enumerate(chosen, 1):
        r = run_mutant(m, repo, env)
        results[m.ident] = r
        print(f"[{k}/{len(chosen)}] {m.ident:28} {classify(m, r):16} {r['seconds']:6.1f}s  {r['test']}", flush=True)
        cache.write_text(json.dumps(dict(state, results=results), indent=1))
    if not args.no_baseline:
        selections = sorted({t for m in chosen for t in m.tests})
        files = {t for t in selections if "::" not in t}
        selections = [t for t in selections if t in files or t.split("::")[0] not in files]
        outcome, test, seconds = run_tests(tuple(selections), repo, env, 3600)
        key = "re-run selections" if args.only else "all selections"
        baseline = dict(baseline or {}, **{key: dict(result=outcome, test=test, seconds=round(seconds, 1))})
        print(f"baseline: {outcome} {test} ({seconds:.0f}s)")
    wall = time.perf_counter() - t0
    full_wall = wall if not args.only else state.get("wall")
    cache.write_text(json.dumps(dict(results=results, baseline=baseline, wall=full_wall), indent=1))
    args.report.write_text(render_report(results, baseline, full_wall))
    counts: dict[str, int] = {}
    for m in MUTANTS:
        s = classify(m, results.get(m.ident))
        counts[s] = counts.get(s, 0) + 1
    print(f"{len(MUTANTS)} mutants: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
          + f" ({wall / 60:.1f} min); report: {args.report}")
    survivors = [m.ident for m in MUTANTS if classify(m, results.get(m.ident)) in ("survived", "timeout")]
    if survivors:
        print("unexplained survivors: " + " ".join(survivors))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
