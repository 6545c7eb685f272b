"""The integer-domain reference against the real Xilinx ``ap_fixed.h``, compiled with g++.

What is proved here, on the headers ``find_ap_types_include`` finds (hls4ml's copy in CI):

* ``reference_codes(x, T)`` equals the raw bits of ``T v = x;`` for every one of the 7 x 5
  quantization/overflow mode pairs, signed and unsigned, over widths 1..64 with the binary point
  inside, left of and right of the word (I < 0, I = 0, 0 < I < W, I = W, I > W), saturation bits
  N in {0, 1, 2, W}, and for ``ap_int<W>``/``ap_uint<W>``. Each type gets a few thousand doubles
  aimed at the edges: random values over the range and four times beyond it, exact ties at half
  an LSB and the doubles one ulp either side, the range ends and one LSB around them, powers of
  two across the whole shift range, signed zeros, subnormals, huge values, infinities and random
  bit patterns. NaN is cast by every type too: the header only warns, and reads it as
  ``±1.m * 2**1024`` as the reference does.
* ``ap_ufixed<..., AP_WRAP_SM>`` ends the C simulation (the header calls ``exit(1)``).
* ``add_type``/``sub_type``/``mul_type``/``neg_type`` give the ``decltype`` of the C++ expression,
  for mixed signed/unsigned, fixed and integer operands.
* ``accum_type(P, K)`` holds the sum of K copies of P's most negative or most positive value
  exactly, accumulated with the header's own ``+=``.
* Every example of "Surprising behaviours of ap_fixed.h" in docs/exactness.md (``SURPRISES``).

All C++ is generated into one program, compiled once per session (two jobs), and fed through
binary files: doubles in, one raw W-bit pattern (``v.range(W-1, 0)``) out, sign-extended here.
The test never skips: without headers or g++ it fails with the message that says what to install.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from qfx_onnx.errors import ExportError
from qfx_onnx.fixed.reference import reference_codes
from qfx_onnx.fixed.types import (
    FixedType, OverflowMode, QuantMode, accum_type, add_type, mul_type, neg_type, sub_type,
)
from qfx_onnx.hls.aptypes import compile_cpp, find_ap_types_include

CPP_DIR = Path(__file__).parent / "cpp"
WIDTHS = (1, 2, 3, 5, 8, 12, 16, 24, 31, 32, 33, 47, 53, 54, 63, 64)
ALWAYS = (1, 2, 8, 53, 54, 63, 64)  # widths every mode pair gets (double and word edges)
ROTATING = tuple(w for w in WIDTHS if w not in ALWAYS)
MODE_PAIRS = [(q, o) for q in QuantMode for o in OverflowMode]
CXX_FLAGS = ("-Og",)  # -Og compiles ~20% faster than -O2; outputs are the same at -O0..-O2
SEED = 20240611
NAN_BITS = np.array([0x7FF8000000000000, 0xFFF8000000000000, 0x7FF0000000000001,
                     0xFFF0000000000001, 0x7FFFFFFFFFFFFFFF, 0x7FF4000000000123], dtype=np.uint64)


# --------------------------------------------------------------------------- the types tested
def _integer_bits(w: int) -> list[int]:
    """I negative, zero, one, inside the word, at its top and beyond it."""
    return sorted({-5, 0, 1, w // 2, w - 1, w, w + 3, w + 37})


def _sat_bits(w: int) -> list[int]:
    return sorted({n for n in (0, 1, 2, w) if n <= w})


def cast_types() -> list[FixedType]:
    """The fixed-point types whose casts are compared, deterministic and duplicate-free.

    Every (Q, O, signedness) gets the widths in ALWAYS plus three of ROTATING; the integer bits
    and saturation bits rotate with the combination so that each (W, I) and (W, N) pair turns up
    under many modes. Unsigned AP_WRAP_SM is left out: the header refuses it (see
    ``wrap_sm_unsigned_types``).
    """
    types: dict[str, FixedType] = {}
    combo = 0
    for q, o in MODE_PAIRS:
        for signed in (True, False):
            if o is OverflowMode.WRAP_SM and not signed:
                continue
            widths = ALWAYS + tuple(ROTATING[(combo * 3 + j) % len(ROTATING)] for j in range(3))
            for k, w in enumerate(widths):
                ints, sats = _integer_bits(w), _sat_bits(w)
                i = ints[(combo + 3 * k) % len(ints)]
                n = sats[(combo + k) % len(sats)]
                t = FixedType(w, i, signed=signed, q=q, o=o, n=n)
                types[str(t)] = t
            combo += 1
    for w in WIDTHS:
        for signed in (True, False):
            t = FixedType(w, w, signed=signed, is_int=True)
            types[str(t)] = t
    return list(types.values())


def wrap_sm_unsigned_types() -> list[FixedType]:
    return [FixedType(w, w // 2, signed=False, q=q, o=OverflowMode.WRAP_SM)
            for q, w in zip(QuantMode, (1, 5, 8, 16, 32, 53, 64))]


# -------------------------------------------------------------------------------- the inputs
def edge_inputs(t: FixedType, rng: np.random.Generator) -> np.ndarray:
    """A few thousand doubles (no NaN) aimed at the places where a cast to ``t`` can go wrong."""
    f, lsb = t.frac, t.lsb
    lo, hi = t.min_value, t.max_value
    span = hi - lo + lsb
    mid = lo + span / 2
    parts = [
        rng.uniform(lo, hi, 800),
        rng.uniform(mid - 4 * span, mid + 4 * span, 800),
    ]
    # exact ties (k + 0.5) * lsb where the double can hold them (|k| < 2**51), and one ulp around
    exact = 2**51
    k_lo, k_hi = max(t.int_min - 3, -exact), min(t.int_max + 3, exact)
    ks = [rng.integers(k_lo, k_hi, 600, endpoint=True)]
    for anchor in (t.int_min, t.int_max, 0):
        ks.append(np.array([k for k in range(anchor - 3, anchor + 4) if abs(k) <= exact]))
    ks = np.concatenate(ks).astype(np.float64)
    ties = np.ldexp(ks + 0.5, -f)
    parts += [ties, np.nextafter(ties, -np.inf), np.nextafter(ties, np.inf)]
    parts += [np.ldexp(ks[:300] + 0.25, -f), np.ldexp(ks[:300] + 0.75, -f)]  # one guard bit set
    # the range ends and the LSB grid around them (rounded to doubles when W > 53)
    ends = np.array([lo, hi, -hi, 0.0])
    steps = np.array([-2, -1.5, -1, -0.75, -0.5, -0.25, 0, 0.25, 0.5, 0.75, 1, 1.5, 2]) * lsb
    around = (ends[:, None] + steps[None, :]).ravel()
    parts += [around, np.nextafter(around, -np.inf), np.nextafter(around, np.inf)]
    # powers of two over every shift the cast can take, and their neighbours
    e = np.arange(max(-f - 60, -1074), min(t.integer + 60, 1023) + 1)
    p2 = np.ldexp(1.0, e)
    p2 = np.concatenate([p2, 1.5 * p2, np.nextafter(p2, 0), np.nextafter(p2, np.inf)])
    parts += [p2, -p2]
    # random significands at random scales around the type, and random bit patterns
    exps = rng.integers(max(-f - 70, -1074), min(t.integer + 70, 1023), 800, endpoint=True)
    sig = rng.uniform(1.0, 2.0, 800) * rng.choice([-1.0, 1.0], 800)
    parts.append(np.ldexp(sig, exps))
    bits = rng.integers(0, 2**64, 300, dtype=np.uint64, endpoint=False).view(np.float64)
    parts.append(bits[~np.isnan(bits)])
    parts.append(np.array([0.0, -0.0, 5e-324, -5e-324, 1e-300, -1e-300, 2.2250738585072014e-308,
                           -2.2250738585072014e-308, 1e300, -1e300, 1.7976931348623157e308,
                           -1.7976931348623157e308, np.inf, -np.inf]))
    with np.errstate(over="ignore", invalid="ignore"):
        x = np.concatenate(parts).astype(np.float64)
    return x[~np.isnan(x)]


# ------------------------------------------------------------------- documented behaviours
@dataclass(frozen=True)
class Surprise:
    """One example of docs/exactness.md, "Surprising behaviours of ap_fixed.h": ``T v = x;``."""

    spelling: str
    width: int
    signed: bool
    x: float
    code: int  # the raw code C++ gives: the value is code * 2**-(W - I)


def _surprise(spelling: str, x: float, code: int) -> Surprise:
    t = _cpp_shape(spelling)
    return Surprise(spelling, t[0], t[1], x, code)


def _cpp_shape(spelling: str) -> tuple[int, bool]:
    """(W, signed) of a C++ spelling, also for types FixedType refuses (|W - I| > 900)."""
    head, args = spelling.split("<", 1)
    return int(args.split(",")[0].rstrip(">")), head in ("ap_fixed", "ap_int")


SURPRISES = [
    _surprise("ap_fixed<1,1,AP_TRN,AP_SAT_SYM>", -1.0, -1),  # 1-bit SAT_SYM is plain SAT
    _surprise("ap_fixed<1,0,AP_RND,AP_SAT_SYM>", -0.4, -1),
    _surprise("ap_int<8>", -0.3, 1),  # |x| < 0.5, negative: +1
    _surprise("ap_uint<8>", -1e-300, 1),
    _surprise("ap_int<8>", -0.7, 0),
    _surprise("ap_int<8>", -2.7, -2),  # ap_int truncates toward zero ...
    _surprise("ap_fixed<8,8>", -2.7, -3),  # ... ap_fixed<W,W> floors
    _surprise("ap_fixed<8,3,AP_RND,AP_SAT>", float("nan"), 127),  # NaN is +1.m * 2**1024
    _surprise("ap_fixed<8,3,AP_RND,AP_SAT>", -float("nan"), -128),
    _surprise("ap_fixed<8,3>", float("nan"), 0),
    _surprise("ap_fixed<8,3>", float("inf"), 0),
    _surprise("ap_int<8>", float("nan"), 0),
    _surprise("ap_fixed<4,4,AP_TRN,AP_WRAP>", 9.0, -7),
    _surprise("ap_fixed<4,4,AP_TRN,AP_WRAP_SM>", 9.0, 6),  # sign-magnitude wrap reflects
    _surprise("ap_fixed<4,4,AP_TRN,AP_WRAP_SM>", 8.0, 7),
    _surprise("ap_fixed<4,4,AP_RND,AP_WRAP_SM>", 7.5, 7),
    _surprise("ap_fixed<4,4,AP_RND,AP_WRAP_SM>", 15.5, 0),  # bit W is read before rounding
    _surprise("ap_fixed<4,4,AP_RND,AP_WRAP_SM>", 16.0, -1),
    _surprise("ap_ufixed<8,8>", -100.0, 156),
    _surprise("ap_ufixed<8,8,AP_TRN,AP_WRAP,2>", -100.0, 220),  # underflow sets the MSBs
    _surprise("ap_ufixed<8,8,AP_TRN,AP_WRAP,2>", 300.0, 236),
    _surprise("ap_fixed<8,8,AP_TRN,AP_WRAP,2>", -200.0, -72),
    _surprise("ap_ufixed<8,-1066>", 1e-323, 1),  # subnormal 2**-1073 read as 2**51 + 1 LSBs
    _surprise("ap_ufixed<8,-1066,AP_TRN,AP_SAT>", 5e-324, 255),
]
# ap_fixed<W,I>::to_string() and operator<< when I > W: (type, value, what to_string(10) prints)
TO_STRING = [("ap_fixed<8,16>", 768.0, "256"), ("ap_fixed<8,15>", 640.0, "128"),
             ("ap_fixed<8,15>", 384.0, "384"), ("ap_fixed<16,24>", 393216.0, "0")]


# ------------------------------------------------------------------------------- C++ sources
def _cast_unit(index: int, types: list[tuple[str, int]]) -> str:
    rows = ",\n".join(f"    &cast_loop<{spelling}, {width}>" for spelling, width in types)
    return (f'#include "apfixed_check.h"\n\nextern const CastFn cast_table_{index}[] = {{\n'
            f"{rows}\n}};\n")


def _dispatch_unit(sizes: list[int]) -> str:
    decls = "".join(f"extern const CastFn cast_table_{i}[];\n" for i in range(len(sizes)))
    tables = ", ".join(f"cast_table_{i}" for i in range(len(sizes)))
    return f"""#include "apfixed_check.h"

{decls}static const CastFn* const tables[] = {{{tables}}};
static const long sizes[] = {{{", ".join(map(str, sizes))}}};

CastFn cast_lookup(long id) {{
  for (unsigned t = 0; t < sizeof(sizes) / sizeof(sizes[0]); ++t) {{
    if (id < sizes[t]) return tables[t][id];
    id -= sizes[t];
  }}
  return 0;
}}
"""


@dataclass(frozen=True)
class AccumCase:
    product: FixedType
    acc: FixedType
    terms: int
    want_max: bool

    @property
    def tag(self) -> str:
        return f"acc {self.product.c_name()} {self.terms} {'max' if self.want_max else 'min'}"


def operand_pairs() -> list[tuple[FixedType, FixedType]]:
    """Operands for the result-type rules: every sign pairing, odd binary points, ints mixed in."""
    shapes = [(8, 3), (1, 1), (1, 0), (5, -2), (4, 7), (16, 16), (12, 0), (3, 9), (24, 10),
              (33, -4), (2, 2)]
    fixed = [FixedType(w, i, signed=s, q=QuantMode.RND, o=OverflowMode.SAT)
             for w, i in shapes for s in (True, False)]
    ints = [FixedType(w, w, signed=s, is_int=True) for w in (1, 2, 8, 17) for s in (True, False)]
    pairs = [(a, b) for k, a in enumerate(fixed) for b in fixed[k % 5::5]]
    pairs += [(a, b) for a in ints for b in ints[::3] + fixed[::7]]
    pairs += [(b, a) for a in ints[::2] for b in fixed[1::4]]
    return pairs


def accum_cases() -> list[AccumCase]:
    """K extreme products into ``accum_type``: K = 2**m is the tightest fit for m extra bits.

    K values that share an accumulator type share one C++ instantiation (~0.15 s of g++ each).
    """
    ops = [("ap_fixed<8,3>", "ap_ufixed<6,2>"), ("ap_ufixed<5,-1>", "ap_ufixed<7,9>"),
           ("ap_fixed<1,1>", "ap_fixed<1,1>"), ("ap_int<8>", "ap_uint<4>"),
           ("ap_fixed<33,5>", "ap_fixed<32,1>")]
    groups = [(1,), (2,), (3, 4), (5, 8), (513, 1024)]
    cases = []
    for a, b in ops:
        product = mul_type(FixedType.parse(a), FixedType.parse(b))
        for group in groups:
            for terms in group:
                acc = accum_type(product, terms)
                assert acc == accum_type(product, group[0])  # one C++ instantiation per group
                cases += [AccumCase(product, acc, terms, m) for m in (False, True)]
    return cases


def _arith_unit(pairs: list[tuple[FixedType, FixedType]], accs: list[AccumCase]) -> str:
    lines = ['#include "apfixed_check.h"', "", "void print_arith_checks() {"]
    for name in dict.fromkeys(str(t) for p in pairs for t in p):
        lines.append(f'  QFX_SHOW("neg {name}", -std::declval<const {name}&>());')
    for a, b in pairs:
        for tag, op in (("add", "+"), ("sub", "-"), ("mul", "*")):
            lines.append(f'  QFX_SHOW("{tag} {a}|{b}", std::declval<const {a}&>() {op} '
                         f"std::declval<const {b}&>());")
    for c in accs:
        lines.append(f'  QFX_SHOW("acctype {c.tag}", std::declval<{c.acc}&>());')
        lines.append(f'  accumulate_extreme<{c.product}, {c.acc}>("{c.tag}", {c.product.width}, '
                     f"{str(c.product.signed).lower()}, {c.acc.width}, "
                     f"{str(c.want_max).lower()}, {c.terms});")
    for spelling, x, _ in TO_STRING:
        lines.append(f'  print_to_string<{spelling}>("to_string {spelling} {x!r}", {x!r});')
    lines.append("}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ compile once
@dataclass
class CheckProgram:
    binary: Path
    type_ids: dict[str, int]  # C++ spelling -> index in cast_lookup


def table_types() -> list[tuple[str, int]]:
    """(C++ spelling, W) of every type the program can cast to, without duplicates."""
    types = {str(t): t.width for t in cast_types() + wrap_sm_unsigned_types()}
    for s in SURPRISES:
        types.setdefault(s.spelling, s.width)
    return list(types.items())


@pytest.fixture(scope="session")
def check_program(tmp_path_factory) -> CheckProgram:
    """The generated checker, built once per session (and shared by xdist workers)."""
    include = find_ap_types_include()  # fails (never skips) without headers
    types = table_types()
    units = [types[i::4] for i in range(4)]
    sources = {f"cast_{i}.cpp": _cast_unit(i, u) for i, u in enumerate(units)}
    sources["dispatch.cpp"] = _dispatch_unit([len(u) for u in units])
    sources["arith.cpp"] = _arith_unit(operand_pairs(), accum_cases())
    digest = hashlib.sha256()
    for name in sorted(sources):
        digest.update(name.encode() + sources[name].encode())
    headers = [include / "ap_fixed_base.h", include / "ap_int_base.h"]
    for path in sorted(CPP_DIR.iterdir()) + headers:
        digest.update(path.read_bytes())
    digest.update(repr(CXX_FLAGS).encode() + os.environ.get("CXX", "").encode())
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    build = root / f"apfixed_check_{digest.hexdigest()[:16]}"
    binary = build / "apfixed_check"
    if not binary.exists():
        build.mkdir(parents=True, exist_ok=True)
        for name, text in sources.items():
            (build / name).write_text(text)
        # ~11 s of g++ per cast unit, ~5 s for arith: this order keeps both jobs busy to the end
        order = ["cast_0.cpp", "cast_1.cpp", "cast_2.cpp", "arith.cpp", "cast_3.cpp",
                 "dispatch.cpp"]
        compile_cpp([build / n for n in order] + [CPP_DIR / "apfixed_check_main.cpp"], binary,
                    include_dirs=[include, CPP_DIR], extra_flags=CXX_FLAGS, jobs=2)
    ids = {spelling: k for k, (spelling, _) in enumerate(t for u in units for t in u)}
    return CheckProgram(binary, ids)


def _run_casts(program: CheckProgram, jobs: list[tuple[str, np.ndarray]], work: Path,
               check: bool = True) -> tuple[list[np.ndarray], subprocess.CompletedProcess]:
    """Casts each job's doubles to the C++ type it names; returns the raw W-bit patterns."""
    work.mkdir(parents=True, exist_ok=True)
    table = np.array([(program.type_ids[spelling], len(x)) for spelling, x in jobs], dtype=np.int64)
    table.tofile(work / "jobs.bin")
    np.concatenate([x for _, x in jobs]).astype(np.float64).tofile(work / "in.f64")
    proc = subprocess.run([str(program.binary), "cast", str(work / "jobs.bin"),
                           str(work / "in.f64"), str(work / "out.u64")],
                          capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, f"checker exit {proc.returncode}: {proc.stderr[-2000:]}"
    if proc.returncode != 0:
        return [], proc
    out = np.fromfile(work / "out.u64", dtype=np.uint64)
    bounds = np.cumsum([0] + [len(x) for _, x in jobs])
    return [out[a:b] for a, b in zip(bounds[:-1], bounds[1:])], proc


def codes_from_bits(bits: np.ndarray, width: int, signed: bool) -> np.ndarray:
    """W-bit patterns as codes typed like ``reference_codes``: int64, uint64 for 64-bit unsigned."""
    bits = bits.astype(np.uint64)
    if width == 64:
        return bits.view(np.int64) if signed else bits
    low = bits & np.uint64((1 << width) - 1)
    if not signed:
        return low.astype(np.int64)
    shift = np.uint64(64 - width)
    return (low << shift).view(np.int64) >> np.int64(64 - width)


@pytest.fixture(scope="session")
def cast_results(check_program, tmp_path_factory) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """str(type) -> (inputs, C++ codes) for every type of ``cast_types()``, from one run."""
    jobs = []
    for t in cast_types():
        rng = np.random.default_rng([SEED, zlib.crc32(str(t).encode())])
        jobs.append((t, edge_inputs(t, rng)))
    outs, _ = _run_casts(check_program, [(str(t), x) for t, x in jobs],
                         tmp_path_factory.mktemp("casts"))
    return {str(t): (x, codes_from_bits(bits, t.width, t.signed))
            for (t, x), bits in zip(jobs, outs)}


def _mismatch_report(t: FixedType, x: np.ndarray, cxx: np.ndarray, ref: np.ndarray) -> str:
    bad = np.flatnonzero(cxx != ref)
    rows = [f"{t}: {len(bad)} of {len(x)} differ"]
    for j in bad[:6]:
        v = x[j]
        rows.append(f"  x={float(v)!r} (bits 0x{int(np.float64(v).view(np.uint64)):016x}): "
                    f"C++ code {int(cxx[j])}, reference {int(ref[j])}")
    return "\n".join(rows)


def _compare(types: list[FixedType], results) -> list[str]:
    failures = []
    for t in types:
        x, cxx = results[str(t)]
        ref = reference_codes(x, t)
        assert ref.dtype == cxx.dtype, f"{t}: reference dtype {ref.dtype}, expected {cxx.dtype}"
        if not np.array_equal(ref, cxx):
            failures.append(_mismatch_report(t, x, cxx, ref))
    return failures


# ------------------------------------------------------------------------------------- tests
def test_find_ap_types_include_prefers_xilinx_hls(tmp_path, monkeypatch):
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "ap_fixed.h").write_text("// stub\n")
    monkeypatch.setenv("XILINX_HLS", str(tmp_path))
    assert find_ap_types_include() == tmp_path / "include"


def test_find_ap_types_include_uses_hls4ml_without_importing_it(monkeypatch):
    monkeypatch.setenv("XILINX_HLS", "/nonexistent")
    monkeypatch.delitem(sys.modules, "hls4ml", raising=False)
    include = find_ap_types_include()
    assert (include / "ap_fixed.h").is_file()
    assert include.parts[-3:] == ("templates", "vivado", "ap_types")
    assert "hls4ml" not in sys.modules


def test_find_ap_types_include_error(monkeypatch):
    monkeypatch.delenv("XILINX_HLS", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ExportError, match=r"install qfx-onnx\[csim\] \(hls4ml\) or set XILINX_HLS"):
        find_ap_types_include()


def test_compile_cpp_reports_the_first_error(tmp_path):
    src = tmp_path / "bad.cpp"
    src.write_text("int main() { return undeclared_name; }\n")
    with pytest.raises(ExportError, match="undeclared_name") as info:
        compile_cpp([src], tmp_path / "bad")
    assert "bad.cpp" in str(info.value) and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("q,o", MODE_PAIRS, ids=[f"{q.name}-{o.name}" for q, o in MODE_PAIRS])
def test_casts_match_ap_fixed_h(q, o, cast_results):
    types = [t for t in cast_types() if not t.is_int and t.q is q and t.o is o]
    assert {t.signed for t in types} == ({True} if o is OverflowMode.WRAP_SM else {True, False})
    failures = _compare(types, cast_results)
    assert not failures, "reference_codes differs from ap_fixed.h:\n" + "\n".join(failures)


def test_int_casts_match_ap_int_h(cast_results):
    types = [t for t in cast_types() if t.is_int]
    assert len(types) == 2 * len(WIDTHS)
    failures = _compare(types, cast_results)
    assert not failures, "reference_codes differs from ap_int.h:\n" + "\n".join(failures)


def test_enough_values_compared(cast_results):
    total = sum(len(x) for x, _ in cast_results.values())
    assert len(cast_results) > 600 and total > 3_000_000


def test_nan_survives_and_follows_the_reference(check_program, tmp_path):
    """NaN only warns ("assign NaN to fixed point value"); the header reads it as ±1.m * 2**1024,
    which is what ``reference_codes`` claims, so the codes are compared too."""
    nan = NAN_BITS.view(np.float64)
    types = cast_types()
    outs, proc = _run_casts(check_program, [(str(t), nan) for t in types], tmp_path)
    assert len(outs) == len(types)
    assert "assign NaN to fixed point value" in proc.stderr
    results = {str(t): (nan, codes_from_bits(o, t.width, t.signed)) for t, o in zip(types, outs)}
    failures = _compare(types, results)
    assert not failures, "reference_codes differs from the header on NaN:\n" + "\n".join(failures)


def test_unsigned_wrap_sm_ends_the_simulation(check_program, tmp_path):
    for t in wrap_sm_unsigned_types():
        _, proc = _run_casts(check_program, [(str(t), np.array([0.5]))], tmp_path / t.c_name(),
                             check=False)
        assert proc.returncode == 1 and "cannot support AP_WRAP_SM" in proc.stderr, (t, proc)


def test_documented_surprises(check_program, arith_output, tmp_path):
    """Every example of "Surprising behaviours of ap_fixed.h" in docs/exactness.md still holds."""
    jobs = [(s.spelling, np.array([s.x])) for s in SURPRISES]
    outs, _ = _run_casts(check_program, jobs, tmp_path / "all")
    got = [int(codes_from_bits(o, s.width, s.signed)[0]) for s, o in zip(SURPRISES, outs)]
    assert got == [s.code for s in SURPRISES]
    printed = dict(line.rsplit(" ", 1) for line in arith_output.splitlines()
                   if line.startswith("to_string "))
    for spelling, x, text in TO_STRING:
        assert printed[f"to_string {spelling} {x!r}"] == text, spelling
    # ap_int_base(double)'s NaN test looks at the wrong exponent: it fires on 1.5, not on NaN
    _, warns = _run_casts(check_program, [("ap_int<8>", np.array([1.5]))], tmp_path / "one")
    _, quiet = _run_casts(check_program, [("ap_int<8>", np.array([np.nan]))], tmp_path / "nan")
    assert "assign NaN to ap integer value" in warns.stderr and "NaN" not in quiet.stderr


def _parse_shown(text: str) -> dict[str, FixedType]:
    """``tag -> type`` from the "tag W I S Q O N kind" lines of ``show_type``.

    An ``ap_int_base`` result comes back as ``is_int=True``; compare ``with_modes()`` of it, since
    types.py's result types are always ``ap_fixed``-shaped.
    """
    shown = {}
    for line in text.splitlines():
        if line.startswith(("neg ", "add ", "sub ", "mul ", "acctype ")):
            *tag, w, i, s, q, o, n, kind = line.split(" ")
            t = FixedType(int(w), int(i), s == "1", q=q, o=o, n=int(n))
            if kind == "int":
                t = FixedType(t.width, t.width, t.signed, is_int=True)
            shown[" ".join(tag)] = t
    return shown


@pytest.fixture(scope="session")
def arith_output(check_program) -> str:
    proc = subprocess.run([str(check_program.binary), "arith"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_result_types_match_decltype(arith_output):
    shown = _parse_shown(arith_output)
    pairs = operand_pairs()
    expected = {}
    for a, b in pairs:
        expected[f"add {a}|{b}"] = add_type(a, b)
        expected[f"sub {a}|{b}"] = sub_type(a, b)
        expected[f"mul {a}|{b}"] = mul_type(a, b)
        expected[f"neg {a}"], expected[f"neg {b}"] = neg_type(a), neg_type(b)
    wrong = [f"{tag}: C++ {shown[tag]}, types.py {t}" for tag, t in expected.items()
             if shown[tag].with_modes() != t.with_modes()]
    assert not wrong, "result types differ from the header:\n" + "\n".join(wrong)


def test_accum_type_holds_extreme_sums(arith_output):
    sums = {}
    for line in arith_output.splitlines():
        if line.startswith("acc "):
            tag, bits = line.rsplit(" ", 1)
            sums[tag] = int(bits, 2)
    shown = _parse_shown(arith_output)
    wrong = []
    for c in accum_cases():
        assert shown[f"acctype {c.tag}"].with_modes() == c.acc.with_modes(), c.tag
        extreme = c.product.int_max if c.want_max else c.product.int_min
        got = sums[c.tag]
        if c.acc.signed and got >> (c.acc.width - 1):
            got -= 1 << c.acc.width
        if got != c.terms * extreme:
            wrong.append(f"{c.tag}: {c.terms} x {extreme} in {c.acc} gave {got}")
    assert not wrong, "accumulators overflowed:\n" + "\n".join(wrong)
