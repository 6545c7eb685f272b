"""Cast benchmark: ``ap_fixed`` casts on CPU against one ``torch.clamp`` pass, and against other libraries.

    python benchmarks/bench_cast.py [--n 10000000] [--repeat 5] [--lib-n 1000000]

Three tables:

1. throughput of eager :func:`cast` and compiled :func:`fused_cast` on ``--n`` float32 and float64
   values per mode family, as median ms and as ratios to one ``torch.clamp(x, lo, hi)`` pass and to
   the naive four-op emulation ``clamp(floor(x * 2**F + 0.5), lo, hi) * 2**-F`` (not exact: it
   misrounds the float below 0.5 LSB, and ignores every mode), timed round by round in the same
   process. Targets (issue 12): eager cast at most 1.3x the naive emulation for float-path modes,
   3x for the bit-level ones (AP_WRAP with N, AP_WRAP_SM). Every result is checked bit for bit (fused against eager, eager against the numpy
   reference) and the agreement printed; timings are reported, never asserted.
2. compile time of each fused kernel (first call minus one warm call), by default with a fresh
   inductor cache so the numbers are what a first run pays.
3. the same values through apytypes, fxpmath and quantizers (those installed) on ``--lib-n``
   float64 values: the fraction of results equal to qfx-onnx's cast, and their time over ours.
   A mode a library lacks is reported as such, never replaced by a neighbouring mode.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.metadata
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from qfx_onnx.fixed import FixedType, cast, reference_cast
from qfx_onnx.fixed.fused import fused_cast
from qfx_onnx.fixed.kernels import float_spec


@dataclass(frozen=True)
class Family:
    label: str
    type: FixedType


def _fam(label: str, text: str) -> Family:
    return Family(label, FixedType.parse(text))


FAMILIES = [
    _fam("TRN+WRAP", "ap_fixed<8,3,AP_TRN,AP_WRAP>"),
    _fam("RND+SAT", "ap_fixed<8,3,AP_RND,AP_SAT>"),
    _fam("RND_CONV+SAT_SYM", "ap_fixed<8,3,AP_RND_CONV,AP_SAT_SYM>"),
    _fam("TRN_ZERO+SAT_ZERO", "ap_fixed<8,3,AP_TRN_ZERO,AP_SAT_ZERO>"),
    _fam("RND+WRAP_SM (bit-level)", "ap_fixed<8,3,AP_RND,AP_WRAP_SM>"),
    _fam("TRN+WRAP N=2 (bit-level)", "ap_fixed<8,3,AP_TRN,AP_WRAP,2>"),
]
# The library table adds the quantization modes the families above leave out.
LIB_FAMILIES = FAMILIES + [
    _fam("RND_INF+WRAP", "ap_fixed<8,3,AP_RND_INF,AP_WRAP>"),
    _fam("RND_ZERO+SAT", "ap_fixed<8,3,AP_RND_ZERO,AP_SAT>"),
    _fam("RND_MIN_INF+SAT", "ap_fixed<8,3,AP_RND_MIN_INF,AP_SAT>"),
]
FUSED = True  # --no-fused: the fused columns repeat eager cast
TARGET_RATIO = 2.0  # against one clamp pass (the earlier target, still printed)
NAIVE_TARGET = {False: 1.3, True: 3.0}  # eager cast / naive four-op emulation, by "bit-level mode"


# ----------------------------------------------------------------------------------- data
def make_values(n: int, t: FixedType, nonfinite: bool, seed: int = 0) -> np.ndarray:
    """float64 test values for type ``t``, shuffled: a quarter exact ties (half an LSB between codes),
    a quarter exact codes, up to 1.5x beyond the range on both sides, and half normal(0, 3) (about
    18 % beyond ``ap_fixed<8,3>``'s range); a few edge values (±0, the range ends and the ties just
    beyond them, ±2**-60, ±1e6, a tie near 2**20 codes); with ``nonfinite``, also ±inf, NaN,
    subnormals and ±1e±300, which the other libraries do not define and so never see."""
    rng = np.random.default_rng(seed)
    k = n // 4
    span = 3 * 2 ** t.width // 2
    ties = (rng.integers(-span, span, k) + 0.5) * t.lsb
    grid = rng.integers(-span, span, k) * t.lsb
    vals = np.concatenate([ties, grid, rng.normal(0.0, 3.0, n - 2 * k)])
    edge = [0.0, -0.0, t.max_value, t.min_value, t.max_value + t.lsb / 2, t.min_value - t.lsb / 2,
            2.0**-60, -(2.0**-60), 1e6, -1e6, (2**20 + 0.5) * t.lsb, -(2**20 + 0.5) * t.lsb]
    if nonfinite:
        edge += [np.inf, -np.inf, np.nan, 5e-324, -5e-324, 1e-300, -1e-300, 1e300, -1e300]
    vals[: len(edge)] = edge
    rng.shuffle(vals)
    return vals


# ----------------------------------------------------------------------------------- timing
def time_rounds(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, list[float]]:
    """Wall-clock ms of each callable per round, after one warm-up call each. Rounds interleave the
    callables, so load from other processes hits all of them alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def median(v: list[float]) -> float:
    return statistics.median(v)


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of a/b: each round's two timings saw the same machine load."""
    return statistics.median(x / y for x, y in zip(a, b))


def _bits(a: torch.Tensor) -> torch.Tensor:
    return a.contiguous().view(torch.int64 if a.dtype == torch.float64 else torch.int32)


def _agree(count: int, n: int) -> str:
    return f"[green]all {n:,}[/]" if count == n else f"[red]{count:,}/{n:,}[/]"


# ----------------------------------------------------------------------------------- table 1, 2
def bench_torch(n: int, repeat: int, console: Console) -> tuple[Table, Table, list[str]]:
    """Tables 1 and 2, and summary lines."""
    speed = Table(title=f"cast on {n:,} values, CPU, {torch.get_num_threads()} threads: median ms; "
                        f"x = time / one clamp pass, median over paired rounds (target <= {TARGET_RATIO:g})")
    for col in ("dtype", "family", "type", "clamp ms", "naive ms", "eager ms", "eager/naive", "eager x", "fused ms",
                "fused x", "fused == eager", "eager == reference"):
        speed.add_column(col, justify="left" if col in ("dtype", "family", "type") else "right")
    compile_t = Table(title="fused_cast compile time per kernel (first call minus one warm call), s")
    for col in ("family", "float32", "float64"):
        compile_t.add_column(col, justify="left" if col == "family" else "right")
    start = time.perf_counter()
    if FUSED:
        fused_cast(torch.zeros(16), "ap_fixed<4,2>")  # inductor start-up, paid once per process
    startup = time.perf_counter() - start
    summary = [f"inductor start-up (first compile in the process, not in the table): {startup:.1f} s"]
    compile_s: dict[str, list[str]] = {f.label: [] for f in FAMILIES}
    met = {"eager": 0, "fused": 0, "naive": 0}
    for dtype in (torch.float32, torch.float64):
        for fam in FAMILIES:
            console.log(f"{fam.label}, {dtype}")
            x = torch.from_numpy(make_values(n, fam.type, nonfinite=True)).to(dtype)
            cells, compile_time, ratios = _measure(x, fam.type, repeat)
            compile_s[fam.label].append(f"{compile_time:.1f}")
            for k in ("eager", "fused"):
                met[k] += ratios[k] <= TARGET_RATIO
            met["naive"] += ratios["naive"] <= NAIVE_TARGET[_bit_level(fam.type)]
            speed.add_row(str(dtype).removeprefix("torch."), fam.label, str(fam.type), *cells)
    for label, cells in compile_s.items():
        compile_t.add_row(label, *cells)
    rows = 2 * len(FAMILIES)
    summary += [f"target cast <= {TARGET_RATIO:g}x clamp: eager cast meets it in {met['eager']}/{rows} rows, "
                f"fused_cast in {met['fused']}/{rows}",
                f"target eager cast <= {NAIVE_TARGET[False]:g}x naive four-op (float path), <= {NAIVE_TARGET[True]:g}x "
                f"(bit-level modes): met in {met['naive']}/{rows} rows"]
    return speed, compile_t, summary


def _measure(x: torch.Tensor, t: FixedType, repeat: int) -> tuple[list[str], float, dict[str, float]]:
    """One row of table 1: timings, ratios and bit agreement; also the compile time and raw ratios."""
    fuse = fused_cast if FUSED else cast
    start = time.perf_counter()
    fused = fuse(x, t)
    first = time.perf_counter() - start
    scale, inv, lo, hi = 2.0**t.frac, 2.0**-t.frac, float(t.int_min), float(t.int_max)
    ms = time_rounds({
        "clamp": lambda: torch.clamp(x, t.min_value, t.max_value),
        "naive": lambda: torch.clamp(torch.floor(x * scale + 0.5), lo, hi) * inv,
        "eager": lambda: cast(x, t),
        "fused": lambda: fuse(x, t),
    }, repeat)
    eager = cast(x, t)
    same = int((_bits(fused) == _bits(eager)).sum())
    ref = reference_cast(x.double().numpy(), t)
    same_ref = int((eager.double().numpy().view(np.int64) == ref.view(np.int64)).sum())
    ratios = {k: paired_ratio(ms[k], ms["clamp"]) for k in ("eager", "fused")}
    ratios["naive"] = paired_ratio(ms["eager"], ms["naive"])
    goal = NAIVE_TARGET[_bit_level(t)]
    naive = f"[green]{ratios['naive']:.2f}[/]" if ratios["naive"] <= goal else f"[red]{ratios['naive']:.2f}[/]"
    cells = [f"{median(ms['clamp']):.1f}", f"{median(ms['naive']):.1f}", f"{median(ms['eager']):.1f}", naive,
             _ratio(ratios["eager"]),
             f"{median(ms['fused']):.1f}", _ratio(ratios["fused"]), _agree(same, x.numel()),
             _agree(same_ref, x.numel())]
    return cells, first - median(ms["fused"]) / 1e3, ratios


def _bit_level(t: FixedType) -> bool:
    return float_spec(t).bit_level


def _ratio(r: float) -> str:
    return f"[green]{r:.2f}[/]" if r <= TARGET_RATIO else f"[red]{r:.2f}[/]"


# ----------------------------------------------------------------------------------- table 3
# Each adapter maps a FixedType to a numpy float64 -> float64 function, or says why it cannot.
Adapter = Callable[[FixedType, np.ndarray], tuple]

_APY_Q = {"AP_TRN": "TRN", "AP_TRN_ZERO": "TRN_ZERO", "AP_RND": "RND", "AP_RND_ZERO": "RND_ZERO",
          "AP_RND_MIN_INF": "RND_MIN_INF", "AP_RND_INF": "RND_INF", "AP_RND_CONV": "RND_CONV"}
_FXP_Q = {"AP_TRN": "floor", "AP_TRN_ZERO": "trunc", "AP_RND": "nearest_posinf",
          "AP_RND_ZERO": "nearest_zero", "AP_RND_MIN_INF": "nearest_neginf",
          "AP_RND_INF": "nearest_away", "AP_RND_CONV": "around"}


def _unsupported(t: FixedType, modes: tuple[str, ...]) -> str | None:
    if t.n:
        return "no saturation bits (N)"
    if t.o.value not in modes:
        return f"no {t.o.value}"
    return None


def adapt_apytypes(t: FixedType, x: np.ndarray):
    apy = importlib.import_module("apytypes")
    why = _unsupported(t, ("AP_WRAP", "AP_SAT"))  # its third mode, NUMERIC_STD, is VHDL resize
    if why:
        return None, why
    # from_float itself rounds RND_INF and wraps; for any other mode, first hold the doubles
    # exactly in a wide format (checked on x), then cast. apytypes 0.5.1's cast() leaves values
    # unwrapped when the source is wider than 64 bits (<70,10> 5.0 -> <8,3> WRAP stays 5.0), so
    # the rounding cast keeps the wide integer part and a second cast resolves overflow.
    nz = np.abs(x[x != 0])
    ib = int(np.frexp(nz.max())[1]) + 2
    fb = max(53 - int(np.frexp(nz.min())[1]), t.frac)
    if not np.array_equal(apy.APyFixedArray.from_float(x, int_bits=ib, frac_bits=fb).to_numpy(), x):
        return None, "wide intermediate not exact"
    q = getattr(apy.QuantizationMode, _APY_Q[t.q.value])
    o = apy.OverflowMode.WRAP if t.o.value == "AP_WRAP" else apy.OverflowMode.SAT

    def run(v: np.ndarray) -> np.ndarray:
        wide = apy.APyFixedArray.from_float(v, int_bits=ib, frac_bits=fb)
        rounded = wide.cast(int_bits=ib, frac_bits=t.frac, quantization=q)
        return rounded.cast(int_bits=t.integer, frac_bits=t.frac, overflow=o).to_numpy()

    return run, f"from_float(<{ib + fb},{ib}>).cast(<{ib + t.frac},{ib}>, {q.name}).cast({o.name})"


def adapt_fxpmath(t: FixedType, x: np.ndarray):
    fxpmath = importlib.import_module("fxpmath")
    why = _unsupported(t, ("AP_WRAP", "AP_SAT"))
    if why:
        return None, why
    rounding, overflow = _FXP_Q[t.q.value], "wrap" if t.o.value == "AP_WRAP" else "saturate"

    def run(v: np.ndarray) -> np.ndarray:
        return fxpmath.Fxp(v, signed=t.signed, n_word=t.width, n_frac=t.frac,
                           rounding=rounding, overflow=overflow).get_val()

    return run, f"Fxp(rounding={rounding!r}, overflow={overflow!r})"


def adapt_quantizers(t: FixedType, x: np.ndarray):
    qz = importlib.import_module("quantizers")
    why = _unsupported(t, ("AP_WRAP", "AP_SAT", "AP_SAT_SYM", "AP_WRAP_SM"))
    if why:
        return None, why
    rnd, ovf = t.q.value[3:], t.o.value[3:]
    if ovf == "WRAP_SM" and rnd not in ("RND", "RND_CONV"):
        return None, "WRAP_SM only with RND, RND_CONV"
    quantize = qz.get_fixed_quantizer_np(rnd, ovf)
    k, i = int(t.signed), t.integer - int(t.signed)  # k + i + f = W: i excludes the sign bit

    def run(v: np.ndarray) -> np.ndarray:
        return quantize(v, k, i, t.frac)

    return run, f"get_fixed_quantizer_np({rnd!r}, {ovf!r})"


ADAPTERS: dict[str, Adapter] = {"apytypes": adapt_apytypes, "fxpmath": adapt_fxpmath,
                                "quantizers": adapt_quantizers}


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def bench_libraries(n: int, repeat: int, console: Console) -> tuple[Table, list[str]]:
    """Table 3, and summary lines."""
    wins = {"fused": [0, 0], "eager": [0, 0]}  # [qfx-onnx faster, comparisons]
    libs = {name: adapt for name, adapt in ADAPTERS.items() if _version(name) is not None}
    table = Table(title=f"other libraries on {n:,} finite float64 values: "
                        "time and agreement with qfx-onnx's cast")
    for col in ("family", "library", "mode used", "median ms", "÷ fused", "÷ eager", "equal to cast",
                "first difference"):
        table.add_column(col, justify="right" if col in ("median ms", "÷ fused", "÷ eager") else "left")
    for fam in LIB_FAMILIES:
        t = fam.type
        vals = make_values(n, t, nonfinite=False)
        x = torch.from_numpy(vals)
        ours = cast(x, t).numpy()
        console.log(f"libraries: {fam.label}")
        fns: dict[str, Callable[[], object]] = {"eager": lambda: cast(x, t),
                                                "fused": lambda: fused_cast(x, t)}
        rows = []
        for name, adapt in libs.items():
            run, desc = adapt(t, vals)
            if run is None:
                rows.append((name, f"[yellow]no equivalent: {desc}[/]", None, None))
                continue
            fns[name] = functools.partial(run, vals)
            rows.append((name, desc, run(vals), name))
        ms = time_rounds(fns, repeat)
        table.add_row(fam.label, "qfx-onnx cast", str(t), f"{median(ms['eager']):.1f}", "", "", "", "")
        table.add_row("", "qfx-onnx fused_cast", "", f"{median(ms['fused']):.1f}", "", "", "", "")
        for name, desc, out, key in rows:
            if out is None:
                table.add_row("", name, desc, "", "", "", "", "")
                continue
            eq = out == ours  # compared as values: a fixed-point code has no -0
            for k in wins:
                wins[k][0] += paired_ratio(ms[key], ms[k]) > 1
                wins[k][1] += 1
            over = {k: _speed(paired_ratio(ms[key], ms[k])) for k in ("fused", "eager")}
            table.add_row("", name, desc, f"{median(ms[key]):.1f}", over["fused"], over["eager"],
                          _share(int(eq.sum()), n), _first_diff(vals, out, ours, eq))
        table.add_section()
    summary = [f"qfx-onnx {k} faster than the library in {w}/{c} comparisons" for k, (w, c) in wins.items()]
    return table, summary


def _speed(r: float) -> str:
    return f"[green]{r:.1f}[/]" if r > 1 else f"[red]{r:.2f}[/]"


def _share(count: int, n: int) -> str:
    if count == n:
        return "[green]100 %[/]"
    return f"[red]{100 * count / n:.3f} % ({n - count:,} differ)[/]"


def _first_diff(vals: np.ndarray, out: np.ndarray, ours: np.ndarray, eq: np.ndarray) -> str:
    bad = np.flatnonzero(~eq)
    if bad.size == 0:
        return ""
    i = bad[0]
    return f"x={vals[i]!r}: {out[i]!r} vs {ours[i]!r}"


# ----------------------------------------------------------------------------------- main
def machine_info() -> str:
    model = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    libs = ", ".join(f"{name} {_version(name)}" for name in ADAPTERS if _version(name) is not None)
    thp = os.environ.get("THP_MEM_ALLOC_ENABLE", "unset")
    return (f"{model}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads, "
            f"THP_MEM_ALLOC_ENABLE={thp}), numpy {np.__version__}, {libs}; load average {load}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000_000, help="values for the clamp-ratio table")
    parser.add_argument("--repeat", type=int, default=5, help="timed rounds (median reported)")
    parser.add_argument("--lib-n", type=int, default=1_000_000, help="values for the library table")
    parser.add_argument("--no-libs", action="store_true", help="skip the library comparison")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (1: stable on a shared machine)")
    parser.add_argument("--no-fused", action="store_true", help="skip fused_cast (no compiles)")
    parser.add_argument("--warm-cache", action="store_true",
                        help="use inductor's usual on-disk cache instead of a fresh one (compile times then "
                             "show what a second process pays)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    global FUSED
    FUSED = not args.no_fused
    fresh = None if args.warm_cache else tempfile.mkdtemp(prefix="qfx_bench_inductor_")
    if fresh:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = fresh
    console = Console(width=None if sys.stdout.isatty() else 200)
    console.print(machine_info())
    try:
        speed, compile_t, summary = bench_torch(args.n, args.repeat, console)
        console.print(speed)
        console.print(compile_t)
        if not args.no_libs:
            libs, lib_summary = bench_libraries(args.lib_n, args.repeat, console)
            console.print(libs)
            summary += lib_summary
        for line in summary:
            console.print(line)
    finally:
        if fresh:
            shutil.rmtree(fresh, ignore_errors=True)
    console.print(f"load average after: {', '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
