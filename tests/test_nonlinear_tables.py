"""Table units and the softmax / LayerNorm kernels: one definition, three bit-exact executions.

What is proved here:

* the integer definition (numpy ``lookup_codes`` on codes) and the torch emulation agree on every
  input code, and entries are the reference cast of ``f`` at each bin's midpoint (independently
  recomputed); one-entry-per-code sigmoid/tanh equal the tables ``hls/heads.py`` builds today;
* each unit's default error against float over its stated domain is within
  ``STATED_BOUNDS``, and the kernels' errors against float softmax / LayerNorm are within theirs;
* onnxruntime runs the ONNX form bit for bit like the emulation: every code of 8- and 10-bit input
  types, random codes of wider ones, random tensors for softmax and LayerNorm;
* g++ against the real ``ap_fixed.h`` runs ``nnet_qfx_nonlinear.h`` bit for bit like the emulation
  on the same inputs (one compile for the whole file);
* gradients flow: the float function's gradient for units, float softmax / LayerNorm gradients
  (x, gamma, beta) for the kernels.
"""

from __future__ import annotations

import math
import subprocess
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
import pytest
import torch

from qfx_onnx.errors import ConfigError
from qfx_onnx.fixed.cast import cast
from qfx_onnx.fixed.reference import reference_cast, reference_codes
from qfx_onnx.fixed.tables import Log2Index, LookupTable, TableIndex
from qfx_onnx.fixed.types import FixedType
from qfx_onnx.hls.aptypes import compile_cpp, find_ap_types_include
from qfx_onnx.nonlinear import cpp_emit, onnx_emit
from qfx_onnx.nonlinear.kernels import (
    LayerNormConfig, SoftmaxConfig, layer_norm, layer_norm_exact, softmax, softmax_exact,
)
from qfx_onnx.nonlinear.units import (
    all_codes, erf_table, exp_table, gelu_table, max_abs_error, reciprocal_table, rsqrt_table,
    sigmoid_table, tanh_table,
)

SEED = 20261130
SMALL = ("ap_fixed<8,3>", "ap_fixed<10,4>")  # every code is checked
WIDE = ("ap_fixed<16,6>", "ap_fixed<20,7>")  # random codes, tables with shift > 0


# ----------------------------------------------------------------------------- the cases
def unit_tables() -> dict[str, LookupTable]:
    """Every unit over 8- and 10-bit inputs (all codes) and wider ones (bins of several codes)."""
    tables = {}
    for k, t in enumerate(SMALL + WIDE):
        ft = FixedType.parse(t)
        u = FixedType(ft.width, ft.integer, signed=False)
        tables[f"exp{k}"] = exp_table(FixedType(ft.width + 1, ft.integer + 1))
        tables[f"recip{k}"] = reciprocal_table(u, lo=0.25, bits=7)
        tables[f"recipu{k}"] = reciprocal_table(u, lo=0.25, index="uniform")
        tables[f"rsqrt{k}"] = rsqrt_table(u, bits=8)
        tables[f"rsqrtu{k}"] = rsqrt_table(u, index="uniform")
        tables[f"erf{k}"] = erf_table(ft)
        tables[f"gelu{k}"] = gelu_table(ft)
        tables[f"gelut{k}"] = gelu_table(ft, approximate="tanh", bits=8, limit=3.0)
        tables[f"sigmoid{k}"] = sigmoid_table(ft, "ap_ufixed<8,0,AP_RND,AP_SAT>", bits=None if k < 2 else 10)
        tables[f"tanh{k}"] = tanh_table(ft, "ap_fixed<10,1,AP_RND_CONV,AP_SAT>", bits=None if k < 2 else 9, limit=4.0)
    return tables


def unit_inputs(table: LookupTable, rng: np.random.Generator) -> np.ndarray:
    t = table.in_type
    if t.width <= 12:
        return all_codes(t)
    codes = rng.integers(t.int_min, t.int_max, 4000, endpoint=True)
    edges = [table.index.code_lo, table.index.code_hi, t.int_min, t.int_max, 0]
    codes = np.concatenate([codes, [c + d for c in edges for d in (-1, 0, 1)]])
    codes = np.clip(codes, t.int_min, t.int_max)
    return np.ldexp(codes.astype(np.float64), -t.frac)


def softmax_configs() -> dict[str, SoftmaxConfig]:
    return {
        "sm8": SoftmaxConfig.create("ap_fixed<8,3>", 8),
        "sm10": SoftmaxConfig.create("ap_fixed<10,4>", 16, exp_bits=8, reciprocal_bits=8,
                                     out_type="ap_ufixed<10,1,AP_RND_CONV,AP_SAT>"),
        "sm6": SoftmaxConfig.create("ap_fixed<6,2>", 5, exp_type="ap_ufixed<10,1,AP_RND,AP_SAT>",
                                    out_type="ap_ufixed<6,0,AP_TRN,AP_SAT>"),
    }


def layer_norm_configs() -> dict[str, LayerNormConfig]:
    return {
        "ln8": LayerNormConfig.create("ap_fixed<8,3>", 32),
        "ln10": LayerNormConfig.create("ap_fixed<10,4>", 24, rsqrt_bits=8, out_type="ap_fixed<12,4,AP_RND_CONV,AP_SAT>"),
        "ln6": LayerNormConfig.create("ap_fixed<6,2>", 7, eps=1e-3, mean_type="ap_fixed<8,2,AP_TRN,AP_SAT>"),
    }


def random_rows(t: FixedType, n: int, rows: int, rng: np.random.Generator) -> np.ndarray:
    """Random codes, plus rows that are constant, nearly constant, or at the range ends."""
    x = rng.integers(t.int_min, t.int_max, (rows, n), endpoint=True)
    x[0] = 0
    x[1] = t.int_max
    x[2] = t.int_min
    x[3, :] = t.int_min
    x[3, 0] = t.int_max
    near = max(0, min(36, rows - 4))  # nearly constant rows: tiny variances, one dominant logit
    x[4:4 + near] = rng.integers(-2, 3, (near, n)) + rng.integers(t.int_min, t.int_max, (near, 1))
    x = np.clip(x, t.int_min, t.int_max)
    return np.ldexp(x.astype(np.float64), -t.frac)


def affine(cfg: LayerNormConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    g = cast(rng.uniform(-2.5, 2.5, cfg.n), cfg.gamma_type)
    b = cast(rng.uniform(-1.0, 1.0, cfg.n), cfg.beta_type)
    return g, b


@dataclass
class Results:
    """Inputs and emulation outputs for every case (float64 arrays)."""

    units: dict[str, tuple[LookupTable, np.ndarray, np.ndarray]]
    softmax: dict[str, tuple[SoftmaxConfig, np.ndarray, np.ndarray]]
    layer_norm: dict[str, tuple[LayerNormConfig, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]


@pytest.fixture(scope="module")
def cases() -> Results:
    return build_cases()


def build_cases() -> Results:
    rng = np.random.default_rng(SEED)
    units = {}
    for name, table in unit_tables().items():
        x = unit_inputs(table, rng)
        units[name] = (table, x, table.torch_lookup(torch.from_numpy(x)).numpy())
    sms = {}
    for name, cfg in softmax_configs().items():
        x = random_rows(cfg.in_type, cfg.n, 400, rng)
        sms[name] = (cfg, x, softmax_exact(torch.from_numpy(x), cfg).numpy())
    lns = {}
    for name, cfg in layer_norm_configs().items():
        x = random_rows(cfg.in_type, cfg.n, 400, rng)
        g, b = affine(cfg, rng)
        y = layer_norm_exact(torch.from_numpy(x), torch.from_numpy(g), torch.from_numpy(b), cfg).numpy()
        lns[name] = (cfg, x, g, b, y)
    return Results(units, sms, lns)


# -------------------------------------------------------------------- the definition itself
def test_torch_equals_integer_definition(cases):
    for name, (table, x, y) in cases.units.items():
        codes = reference_codes(x, table.in_type)
        want = np.ldexp(table.lookup_codes(codes).astype(np.float64), -table.out_type.frac)
        assert np.array_equal(y, want), name


def test_entries_are_reference_casts_of_bin_midpoints():
    """Recomputes every entry from first principles: the codes reaching entry k, their midpoint."""
    for name, table in unit_tables().items():
        t, idx = table.in_type, table.index
        codes = np.arange(t.int_min, t.int_max + 1, dtype=np.int64)
        inside = codes[(codes >= idx.code_lo) & (codes <= idx.code_hi)]
        k = idx.indices(inside)
        step = max(1, len(inside) // 20000)  # wide types: every step-th code, plus both ends
        probe = np.unique(np.concatenate([inside[::step], inside[-2:]]))
        assert [_independent_index(idx, int(c)) for c in probe] == idx.indices(probe).tolist(), name
        for entry in np.unique(k)[:: max(1, len(np.unique(k)) // 200)]:
            members = inside[k == entry]
            mid = math.ldexp((int(members.min()) + int(members.max())) / 2, -t.frac)
            f = float(table.function(torch.tensor([mid], dtype=torch.float64))[0])
            assert table.codes[entry] == reference_codes(np.array([f]), table.out_type)[0], (name, entry)
        assert len(np.unique(k)) == table.size, name  # no entry is unreachable


def _independent_index(idx, c: int) -> int:
    """The entry of an in-range code, in Python integers (bit_length for the leading one)."""
    if isinstance(idx, Log2Index):
        def raw(v: int) -> int:
            e = v.bit_length() - 1
            return e * 2**idx.mant_bits + v // 2 ** (e - idx.mant_bits) - 2**idx.mant_bits
        return raw(c) - raw(idx.code_lo)
    return (c - idx.code_lo) // 2**idx.shift


def test_full_code_tables_match_todays_hls_tables():
    """hls/heads.py fills a sigmoid/tanh LUT with T_out(f(x)) for every input code."""
    sigmoid = lambda v: 1.0 / (1.0 + np.exp(-v))  # noqa: E731
    for t in SMALL:
        x = all_codes(t)
        for make, fn, out in ((sigmoid_table, sigmoid, "ap_ufixed<8,0,AP_RND,AP_SAT>"),
                              (tanh_table, np.tanh, "ap_fixed<8,1,AP_RND,AP_SAT>")):
            table = make(t, out)
            assert table.size == 1 << FixedType.parse(t).width
            assert np.array_equal(table.torch_lookup(torch.from_numpy(x)).numpy(), reference_cast(fn(x), out))


def test_index_over():
    idx = TableIndex.over("ap_fixed<12,4>", -3.0, 5.0, bits=6)
    # 2049 codes: 64 bins of 32 codes; the top code 5.0 clamps to its neighbour
    assert (idx.size, idx.shift, idx.code_lo, idx.code_hi) == (64, 5, -768, 1279)
    assert TableIndex.over("ap_fixed<12,4>", -3.0, 5.0, bits=5).shift == 6
    assert TableIndex.over("ap_fixed<9,4>", -8.0, 0.0, bits=7, align_high=True).code_lo == -254
    high = TableIndex.over("ap_fixed<9,4>", -5.0, 0.0, bits=5, align_high=True)
    assert high.indices(np.array([0]))[0] == high.size - 1 and high.indices(np.array([-1]))[0] == high.size - 2
    assert high.representatives()[-1] == 0.0  # exp(0) is computed at 0
    assert np.array_equal(TableIndex.over("ap_ufixed<4,2>").indices(np.arange(-2, 18)),
                          np.clip(np.arange(-2, 18), 0, 15))
    for bad in (lambda: TableIndex.over("ap_fixed<8,3>", 5.0, 6.0),
                lambda: TableIndex.over("ap_fixed<8,3>", bits=0),
                lambda: TableIndex(FixedType.parse("ap_fixed<60,3>"), 0, 1, 0),
                lambda: reciprocal_table("ap_ufixed<8,4>", lo=0.0),
                lambda: gelu_table("ap_fixed<8,3>", approximate="erf"),
                lambda: LayerNormConfig.create("ap_fixed<24,8>", 64)):
        with pytest.raises(ConfigError):
            bad()


# ------------------------------------------------------------------------- stated accuracy
# unit -> (factory on the default config, domain (lo, hi), stated max |table - f|)
STATED_BOUNDS = {
    # every code its own entry: half an output LSB (2**-16)
    "exp": (lambda: exp_table("ap_fixed<9,4>"), (-8.0, 0.0), 2.0**-16 + 1e-12),
    # 16-code bins of 2**-6 over [-11.8, 0]: half a bin times exp'(0) = 1
    "exp_wide": (lambda: exp_table("ap_fixed<17,7>"), (-16.0, 0.0), 7.5e-3),
    # log2 index, 8 mantissa bits over [1, 8] (769 entries): relative half-bin 2**-9, times 1/x <= 1
    "reciprocal": (lambda: reciprocal_table("ap_ufixed<19,4>", hi=8.0), (1.0, 8.0), 2.0e-3),
    # uniform bins of 2**-7 over [1, 8] (897 entries): half a bin times |1/x'| <= 1
    "reciprocal_uniform": (lambda: reciprocal_table("ap_ufixed<19,4>", hi=8.0, index="uniform"), (1.0, 8.0), 4.0e-3),
    # log2 index, 6 mantissa bits (768 entries): relative error <= 2**-8 at every variance it resolves
    "rsqrt": (lambda: rsqrt_table("ap_ufixed<18,5>"), (1.0, 16.0), 4.0e-3),
    "rsqrt_small_var": (lambda: rsqrt_table("ap_ufixed<18,5>"), (0.25, 16.0), 8.0e-3),
    # uniform bins of 2**-5 over [0, 16]: half a bin times |rsqrt'| = 0.5 v**-1.5, steep at small v
    "rsqrt_uniform": (lambda: rsqrt_table("ap_ufixed<14,5>", index="uniform"), (1.0, 16.0), 8.0e-3),
    "rsqrt_uniform_small_var": (lambda: rsqrt_table("ap_ufixed<14,5>", index="uniform"), (0.25, 16.0), 6.0e-2),
    # bins of 2**-7 over [-3.5, 3.5]: half a bin times erf'(0) = 1.13
    "erf": (lambda: erf_table("ap_fixed<16,6>"), None, 4.0e-3),
    "gelu": (lambda: gelu_table("ap_fixed<16,6>", "ap_fixed<16,6,AP_RND,AP_SAT>"), None, 4.5e-3),
    "gelu_tanh": (lambda: gelu_table("ap_fixed<16,6>", "ap_fixed<16,6,AP_RND,AP_SAT>", approximate="tanh"), None, 4.5e-3),
    # one entry per code: half an output LSB, and saturation below 1 (tanh: 1 - 2**-7)
    "sigmoid": (lambda: sigmoid_table("ap_fixed<8,3>", "ap_ufixed<8,0,AP_RND,AP_SAT>"), None, 2.0e-3),
    "tanh": (lambda: tanh_table("ap_fixed<8,3>", "ap_fixed<8,1,AP_RND,AP_SAT>"), None, 7.2e-3),
}


@pytest.mark.parametrize("unit", sorted(STATED_BOUNDS))
def test_stated_unit_bounds(unit):
    make, domain, bound = STATED_BOUNDS[unit]
    err = max_abs_error(make(), *(domain or (None, None)))
    assert err <= bound, f"{unit}: max error {err:.3g} above the stated {bound:.3g}"


def test_stated_kernel_bounds(cases):
    """Default softmax (8-bit in): |p - p_float| <= 7.8e-3 (one LSB of its ap_ufixed<8,1> output); default LayerNorm (8-bit in, gamma 1,
    beta 0) on rows with variance >= 0.25: |y - y_float| <= 3.5e-2 where y_float is within the
    output type's range (the default output type is the input type, saturating); dominated by the
    8-bit output's LSB, 2**-5."""
    rng = np.random.default_rng(SEED + 1)
    cfg = SoftmaxConfig.create("ap_fixed<8,3>", 8)
    x = torch.from_numpy(random_rows(cfg.in_type, 8, 2000, rng))
    assert float((softmax_exact(x, cfg) - torch.softmax(x, -1)).abs().max()) <= 2.0**-7
    ln = LayerNormConfig.create("ap_fixed<8,3>", 32)
    x = torch.from_numpy(random_rows(ln.in_type, 32, 2000, rng))
    x = x[x.var(-1, unbiased=False) >= 0.25]
    ones, zeros = torch.ones(32, dtype=torch.float64), torch.zeros(32, dtype=torch.float64)
    y = layer_norm_exact(x, ones, zeros, ln)
    want = torch.nn.functional.layer_norm(x, (32,), eps=1e-5)
    inside = (want >= ln.out_type.min_value) & (want <= ln.out_type.max_value)
    assert inside.float().mean() > 0.99
    assert float((y - want)[inside].abs().max()) <= 3.5e-2


# ------------------------------------------------------------------------------ onnxruntime
def _ort(model, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x.astype(np.float32)})[0].astype(np.float64)


def test_onnx_units_bit_exact(cases):
    for name, (table, x, y) in cases.units.items():
        if table.in_type.width > 24 or table.out_type.width > 24:
            continue
        got = _ort(onnx_emit.table_model(table), x)
        assert np.array_equal(got, y), f"{name}: {np.count_nonzero(got != y)} of {len(x)} differ"


def test_onnx_kernels_bit_exact(cases):
    for name, (cfg, x, y) in cases.softmax.items():
        got = _ort(onnx_emit.softmax_model(cfg), x)
        assert np.array_equal(got, y), f"{name}: {np.count_nonzero(got != y)} differ"
    for name, (cfg, x, g, b, y) in cases.layer_norm.items():
        got = _ort(onnx_emit.layer_norm_model(cfg, g, b), x)
        assert np.array_equal(got, y), f"{name}: {np.count_nonzero(got != y)} differ"


# ------------------------------------------------------------------------------------ C++
def _cpp_program(cases: Results) -> tuple[str, list[tuple[str, int, np.ndarray, np.ndarray]]]:
    """One translation unit: every case as a struct and a run function; the jobs to feed it."""
    parts, runs, jobs = ['#include <cstdio>', '#include <vector>', '#include "nnet_qfx_nonlinear.h"', ""], [], []
    for k, (name, (table, x, y)) in enumerate(cases.units.items()):
        ident = f"u{k}_{name}"
        parts.append(cpp_emit.table_struct(table, ident))
        parts.append(f"static void run_{len(runs)}(const double* in, double* out, long rows) {{\n"
                     f"  for (long i = 0; i < rows; i++) {{ {ident}::in_t v = in[i]; "
                     f"out[i] = qfx_nl::table_lookup<{ident}>(v).to_double(); }}\n}}\n")
        jobs.append((name, 1, x, y))
        runs.append(ident)
    for name, (cfg, x, y) in cases.softmax.items():
        parts.append(cpp_emit.softmax_struct(cfg, name))
        parts.append(f"static void run_{len(runs)}(const double* in, double* out, long rows) {{\n"
                     f"  for (long r = 0; r < rows; r++) {{\n"
                     f"    {name}::in_t x[{cfg.n}]; {name}::out_t y[{cfg.n}];\n"
                     f"    for (int j = 0; j < {cfg.n}; j++) x[j] = in[r * {cfg.n} + j];\n"
                     f"    qfx_nl::softmax_stable<{name}>(x, y);\n"
                     f"    for (int j = 0; j < {cfg.n}; j++) out[r * {cfg.n} + j] = y[j].to_double();\n  }}\n}}\n")
        jobs.append((name, cfg.n, x, y))
        runs.append(name)
    for name, (cfg, x, g, b, y) in cases.layer_norm.items():
        parts.append(cpp_emit.layer_norm_struct(cfg, name))
        gs, bs = ", ".join(map(repr, g.tolist())), ", ".join(map(repr, b.tolist()))
        parts.append(f"static void run_{len(runs)}(const double* in, double* out, long rows) {{\n"
                     f"  static const {name}::gamma_t g[{cfg.n}] = {{{gs}}};\n"
                     f"  static const {name}::beta_t b[{cfg.n}] = {{{bs}}};\n"
                     f"  for (long r = 0; r < rows; r++) {{\n"
                     f"    {name}::in_t x[{cfg.n}]; {name}::out_t y[{cfg.n}];\n"
                     f"    for (int j = 0; j < {cfg.n}; j++) x[j] = in[r * {cfg.n} + j];\n"
                     f"    qfx_nl::layer_norm<{name}>(x, g, b, y);\n"
                     f"    for (int j = 0; j < {cfg.n}; j++) out[r * {cfg.n} + j] = y[j].to_double();\n  }}\n}}\n")
        jobs.append((name, cfg.n, x, y))
        runs.append(name)
    table = ", ".join(f"run_{i}" for i in range(len(runs)))
    parts.append(f"""typedef void (*RunFn)(const double*, double*, long);
static const RunFn runs[] = {{{table}}};

int main(int argc, char** argv) {{
  // jobs: int64 (case, rows, values per row); in/out: float64
  if (argc != 4) return 2;
  std::FILE* fj = std::fopen(argv[1], "rb"); std::FILE* fi = std::fopen(argv[2], "rb");
  std::FILE* fo = std::fopen(argv[3], "wb");
  if (!fj || !fi || !fo) return 3;
  long long job[3];
  while (std::fread(job, sizeof(long long), 3, fj) == 3) {{
    std::vector<double> in(job[1] * job[2]), out(job[1] * job[2]);
    if (std::fread(in.data(), sizeof(double), in.size(), fi) != in.size()) return 4;
    runs[job[0]](in.data(), out.data(), job[1]);
    std::fwrite(out.data(), sizeof(double), out.size(), fo);
  }}
  std::fclose(fo);
  return 0;
}}
""")
    return "\n".join(parts), jobs


def test_cpp_bit_exact(cases, tmp_path):
    source, jobs = _cpp_program(cases)
    (tmp_path / "nonlinear_check.cpp").write_text(source)
    binary = compile_cpp([tmp_path / "nonlinear_check.cpp"], tmp_path / "nonlinear_check",
                         include_dirs=[find_ap_types_include(), cpp_emit.header_dir()], extra_flags=("-O1",),
                         timeout=300)
    rows = [(k, len(x) // per_row if per_row == 1 else x.shape[0], per_row) for k, (_, per_row, x, _) in enumerate(jobs)]
    np.array(rows, dtype=np.int64).tofile(tmp_path / "jobs.bin")
    np.concatenate([x.ravel() for _, _, x, _ in jobs]).tofile(tmp_path / "in.f64")
    proc = subprocess.run([str(binary), str(tmp_path / "jobs.bin"), str(tmp_path / "in.f64"),
                           str(tmp_path / "out.f64")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = np.fromfile(tmp_path / "out.f64", dtype=np.float64)
    at, failures = 0, []
    for name, _, x, y in jobs:
        got = out[at:at + y.size].reshape(y.shape)
        at += y.size
        if not np.array_equal(got, y):
            bad = np.flatnonzero(got.ravel() != y.ravel())
            failures.append(f"{name}: {len(bad)} of {y.size} differ, first at input "
                            f"{x.ravel()[bad[0]] if x.ndim == 1 else x[bad[0] // x.shape[1]].tolist()}: "
                            f"C++ {got.ravel()[bad[0]]!r}, emulation {y.ravel()[bad[0]]!r}")
    assert at == out.size
    assert not failures, "\n".join(failures)


# ------------------------------------------------------------------------------- gradients
def test_unit_gradient_is_the_float_gradient():
    table = gelu_table("ap_fixed<10,4>")
    x = torch.from_numpy(all_codes("ap_fixed<10,4>")).requires_grad_(True)
    table(x).sum().backward()
    xf = x.detach().clone().requires_grad_(True)
    table.function(xf).sum().backward()
    assert torch.equal(x.grad, xf.grad) and x.grad.abs().sum() > 0


def test_kernel_gradients_flow():
    rng = np.random.default_rng(SEED + 2)
    sm = SoftmaxConfig.create("ap_fixed<8,3>", 8)
    x = torch.from_numpy(random_rows(sm.in_type, 8, 16, rng)).requires_grad_(True)
    w = torch.from_numpy(rng.normal(size=(16, 8)))
    (softmax(x, sm) * w).sum().backward()
    xf = x.detach().clone().requires_grad_(True)
    (torch.softmax(xf, -1) * w).sum().backward()
    assert torch.allclose(x.grad, xf.grad) and x.grad.abs().sum() > 0
    assert torch.equal(softmax(x, sm).detach(), softmax_exact(x.detach(), sm))

    ln = LayerNormConfig.create("ap_fixed<8,3>", 32)
    x = torch.from_numpy(random_rows(ln.in_type, 32, 60, rng)[40:]).requires_grad_(True)
    g = torch.from_numpy(rng.uniform(0.5, 1.5, 32)).requires_grad_(True)
    b = torch.zeros(32, dtype=torch.float64, requires_grad=True)
    w = torch.from_numpy(rng.normal(size=(x.shape[0], 32)))
    (layer_norm(x, g, b, ln) * w).sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (x, g, b))
    xf, gf = x.detach().clone().requires_grad_(True), g.detach().clone().requires_grad_(True)
    (torch.nn.functional.layer_norm(xf, (32,), gf, None, 1e-5) * w).sum().backward()
    assert torch.allclose(x.grad, xf.grad) and torch.allclose(g.grad, gf.grad)


# ---------------------------------------------------------------------------- bad input
def test_refusals_are_typed_one_liners():
    from qfx_onnx.errors import ExportError
    b = onnx_emit.OnnxBuilder()
    with pytest.raises(ExportError, match="AP_RND_ZERO"):
        onnx_emit.emit_cast(b, "x", FixedType.parse("ap_fixed<8,3,AP_RND_ZERO,AP_SAT>"))
    with pytest.raises(ConfigError, match="8 values"):
        softmax_exact(torch.zeros(2, 5, dtype=torch.float64), SoftmaxConfig.create("ap_fixed<8,3>", 8))
    with pytest.raises(ConfigError, match="index"):
        reciprocal_table("ap_ufixed<8,4>", index="piecewise")
    with pytest.raises(ConfigError, match="2\\*\\*mant_bits"):
        Log2Index(FixedType.parse("ap_ufixed<8,4>"), 3, 200, 4)
    with pytest.raises(ConfigError, match="beyond-range"):
        LookupTable.build("f", TableIndex.over("ap_fixed<8,3>"), "ap_fixed<8,3>", torch.tanh, above="wrap")
    with pytest.raises(ValueError, match="identifier"):
        cpp_emit.table_struct(exp_table("ap_fixed<9,4>"), "exp table")


def test_float32_tensors_keep_their_dtype_and_values():
    """The annotated graph runs float32 tensors: the same values (exact for <= 24-bit types)."""
    cfg = SoftmaxConfig.create("ap_fixed<8,3>", 8)
    x = torch.from_numpy(random_rows(cfg.in_type, 8, 50, np.random.default_rng(SEED + 3)))
    y32 = softmax(x.float(), cfg)
    assert y32.dtype == torch.float32 and torch.equal(y32.double(), softmax_exact(x, cfg))
    table = gelu_table("ap_fixed<10,4>")
    x = torch.from_numpy(all_codes("ap_fixed<10,4>"))
    assert torch.equal(table(x.float()).double(), table.torch_lookup(x))
