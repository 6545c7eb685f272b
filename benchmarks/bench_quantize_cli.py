"""`qfx-onnx quantize` from the command line against the same work in-process, on bigger models.

    python benchmarks/bench_quantize_cli.py [--rounds 3] [--threads N] [--calib-samples 256]
        [--eval-samples 256] [--memory-samples 4] [--no-time] [--no-memory] [--baseline DIR] [--keep DIR]

Time, on CIFAR ResNet-20 (``tests/zoo_arch.py``: 3x32x32, widths 16/32/64, 0.27M parameters),
exported with the TorchScript exporter (opset 17, BatchNormalization kept, dynamic batch) and
random data of its shape saved as an .npz with labels and train/test splits (``--calib-samples``
training rows, ``--eval-samples`` test rows: the CLI's evaluation, report and verify data). Each
round, in this order:

* a fresh Python process that imports qfx_onnx and then runs the in-process quantize
  ``qfx_onnx.quantize(model, data, calib_samples=N)`` twice (the second, warm call is the
  baseline; the first is shown too), then the CLI's own code in-process (``app([...])``) with the
  library calls it makes wrapped to time each stage: ONNX import, calibration, evaluation (the
  model's forward passes outside other stages: the float score), report (per-tensor statistics
  with the fixed-point pass that also gives the fixed-point score, lossless types), write
  (build and save), verify, and the rest (data loading, tables, JSON);
* ``qfx-onnx quantize MODEL --data DATA --calib-samples N -o OUT`` as a subprocess.

Wall and CPU seconds (``time.process_time`` in-process, ``RUSAGE_CHILDREN`` for the subprocess)
are both measured: on a shared machine the wall times of two processes a minute apart can differ
by 3x, while CPU seconds move far less (``--threads 1`` steadies them further). Ratios are taken
within a round, then the median over rounds; every other number is a median. "Start-up" is the
subprocess's CPU seconds minus the in-process CLI's: Python, imports, first-call warm-up, exit.

Memory, on the ResNet-50-sized model of ``bench_import.py`` (its builder, 25.6M parameters, 102 MB
of float32): a fresh process imports the CLI and everything its quantize command imports,
reads VmRSS, resets the high-water mark (``/proc/self/clear_refs``) and runs the command
in-process on ``--memory-samples`` samples (calibration, evaluation and verify); the peak extra
memory is VmHWM minus that RSS, per stage too (the mark is reset at every stage boundary). Each
tree runs twice: with glibc's default allocator settings, and with ``MALLOC_MMAP_THRESHOLD_`` fixed
at 1 MiB, where every large buffer is returned to the OS when freed, so the peak is live memory
rather than heap the allocator kept. The real command's ``ru_maxrss`` (from a small parent, so that
it shows the command's own peak, imports included) is shown beside each.

Targets from the issue: the CLI within 3x the in-process quantize; the CLI's peak extra memory on
the ResNet-50-sized model within 3x the weights. Timings are printed, never asserted. The exit
status is 1 when a command fails or verify does not report a bit-exact match.

``--baseline DIR`` also measures the source tree in DIR, interleaved in the same rounds: a folder
holding ``qfx_onnx/`` and ``qfx_onnx_cli/`` (the ``cli/`` folder renamed), e.g. from
``git archive <commit> qfx_onnx cli | tar -x -C DIR && mv DIR/cli DIR/qfx_onnx_cli``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
# last, so that a --baseline tree on PYTHONPATH (or the installed package) provides qfx_onnx
sys.path += [str(ROOT / "benchmarks"), str(ROOT)]

from bench_import import _reset_peak, _status_kb, _trim_heap, write_model  # noqa: E402

TIME_TARGET_X = 3.0
MEMORY_TARGET_X = 3.0
MB = 1e6
LIVE_MMAP_THRESHOLD = 1 << 20  # every buffer of 1 MiB or more is its own mapping: RSS follows live memory
STAGES = ("import", "calibrate", "evaluate", "report", "write", "verify", "other")

# -------------------------------------------------------------------------------------------------
# models and data


def write_resnet20(folder: Path) -> tuple[Path, dict]:
    """CIFAR ResNet-20 from tests/zoo_arch.py as ONNX (BatchNormalization kept, dynamic batch)."""
    import onnx
    import torch

    from tests.zoo_arch import resnet20

    model = resnet20()
    path = folder / "resnet20.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, 32, 32),), str(path), dynamo=False, opset_version=17,
                          do_constant_folding=False, training=torch.onnx.TrainingMode.EVAL,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    proto = onnx.load(str(path))
    params = sum(p.numel() for p in model.parameters())
    return path, dict(nodes=len(proto.graph.node), params=params)


def write_data(path: Path, shape: tuple[int, ...], classes: int, train: int, test: int, seed: int = 0) -> Path:
    """Random inputs of ``shape`` with random labels: ``train`` rows then ``test`` rows, split."""
    rng = np.random.default_rng(seed)
    n = train + test
    np.savez(path, x=rng.standard_normal((n, *shape)).astype(np.float32), y=rng.integers(0, classes, n).astype(np.int64),
             train_idx=np.arange(train, dtype=np.int64), test_idx=np.arange(train, n, dtype=np.int64))
    return path


# -------------------------------------------------------------------------------------------------
# child processes: one measurement each, printed as one JSON line


class _Stages:
    """Wraps the library calls the CLI makes; time (and the memory peak) between consecutive
    entries and exits, attributed to the innermost wrapped call (else "other")."""

    def __init__(self, memory: bool) -> None:
        self.memory = memory
        self.stack: list[str] = []
        self.seconds: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.peak: dict[str, int] = defaultdict(int)
        self.base = 0
        self.last = (time.perf_counter(), time.process_time())

    def start(self) -> None:
        if self.memory:
            _trim_heap()
            self.base = 1024 * _status_kb("VmRSS")
            _reset_peak()
        self.last = (time.perf_counter(), time.process_time())

    def boundary(self) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        label = self.stack[-1] if self.stack else "other"
        self.seconds[label] += wall - self.last[0]
        self.cpu[label] += cpu - self.last[1]
        if self.memory:
            self.peak[label] = max(self.peak[label], 1024 * _status_kb("VmHWM") - self.base)
            _reset_peak()
        self.last = (time.perf_counter(), time.process_time())

    def wrap(self, owner, name: str, label: str, top_only: bool = False) -> None:
        """Time ``owner.name`` as ``label`` (only outside other stages when ``top_only``)."""
        fn = getattr(owner, name, None)
        if fn is None:  # an older tree without it
            return

        def wrapper(*args, **kwargs):
            if top_only and self.stack:
                return fn(*args, **kwargs)
            self.boundary()
            self.stack.append(label)
            try:
                return fn(*args, **kwargs)
            finally:
                self.boundary()
                self.stack.pop()

        setattr(owner, name, wrapper)


def _cli_args(model: Path, data: Path, out: Path, calib: int, extra: list[str]) -> list[str]:
    return ["quantize", str(model), "--data", str(data), "--calib-samples", str(calib), "-o", str(out), *extra]


def _run_cli_in_process(args: list[str], stages: _Stages) -> tuple[float, float, str]:
    """The CLI's quantize command run in this process, its stages timed; (seconds, CPU seconds, stdout)."""
    import qfx_onnx.quant.annotated as annotated
    import qfx_onnx.quant.api as api
    import qfx_onnx.quant.report as report
    from qfx_onnx.quant import annotated_write
    from qfx_onnx.quant.quantize import FixedPointModel
    from qfx_onnx_cli.main import app

    # the command imports these names when it runs, so it picks up the wrappers
    stages.wrap(api, "load_onnx", "import")
    stages.wrap(api, "quantize", "calibrate")
    stages.wrap(FixedPointModel, "forward", "evaluate", top_only=True)
    stages.wrap(report, "measure_tensors", "report")
    stages.wrap(report, "layer_exactness", "report")
    stages.wrap(annotated_write, "lossless_values", "report", top_only=True)
    stages.wrap(annotated, "write_annotated", "write")
    stages.wrap(annotated_write, "build_annotated", "write", top_only=True)
    stages.wrap(annotated_write, "save_annotated", "write")
    stages.wrap(annotated, "verify_annotated", "verify")
    out = io.StringIO()
    stages.start()
    t0, c0 = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = app(args, standalone_mode=False)  # a failed command returns its exit code
        except SystemExit as exc:
            code = exc.code
    if code:
        raise RuntimeError(f"qfx-onnx {' '.join(args)} failed ({code}):\n{out.getvalue()[-3000:]}")
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    stages.boundary()
    return seconds, cpu, out.getvalue()


def _child_time(model: str, data: str, out: str, calib: int) -> dict:
    """In-process quantize twice (cold, warm), then the CLI command in-process with stage times."""
    import torch  # noqa: F401 - loaded before the measurement on purpose

    import qfx_onnx

    runs = []
    for _ in range(2):
        t0, c0 = time.perf_counter(), time.process_time()
        qfx_onnx.quantize(model, data, calib_samples=calib)
        runs.append((time.perf_counter() - t0, time.process_time() - c0))
    stages = _Stages(memory=False)
    seconds, cpu, text = _run_cli_in_process(_cli_args(Path(model), Path(data), Path(out), calib, []), stages)
    Path(out).unlink(missing_ok=True)
    return dict(quantize_cold=runs[0][0], quantize=runs[1][0], quantize_cpu=runs[1][1], cli_in_process=seconds,
                cli_in_process_cpu=cpu, stages=dict(stages.seconds), stages_cpu=dict(stages.cpu),
                bit_exact="bit for bit" in " ".join(text.split()), tree=_tree())


def _child_memory(model: str, data: str, out: str, calib: int, samples: int) -> dict:
    """The CLI command in-process after all its imports; peak extra memory, in total and per stage."""
    import qfx_onnx.data  # noqa: F401 - everything the command imports, before the baseline reading
    import qfx_onnx.quant.annotated_write  # noqa: F401
    import qfx_onnx.quant.api  # noqa: F401
    import qfx_onnx.quant.policy  # noqa: F401
    import qfx_onnx.quant.report  # noqa: F401
    import qfx_onnx.quant.verify  # noqa: F401
    import qfx_onnx_cli.main  # noqa: F401

    stages = _Stages(memory=True)
    seconds, _, text = _run_cli_in_process(_cli_args(Path(model), Path(data), Path(out), calib, ["--verify-samples", str(samples)]), stages)
    Path(out).unlink(missing_ok=True)
    return dict(seconds=seconds, base=stages.base, peak=max(stages.peak.values()), stages=dict(stages.peak), tree=_tree(),
                stage_seconds=dict(stages.seconds), bit_exact="bit for bit" in " ".join(text.split()))


def _tree() -> str:
    """The folder this process imported qfx_onnx and the CLI from (one folder, or it says both)."""
    import qfx_onnx
    import qfx_onnx_cli

    lib, cli = Path(qfx_onnx.__file__).parents[1], Path(qfx_onnx_cli.__file__).parents[1]
    return str(lib) if lib == cli or cli == lib / "cli" else f"{lib} + {cli}"


CHILDREN = {"time": _child_time, "memory": _child_memory}


def run_child(kind: str, env: dict, tree: Path | None, *args) -> dict:
    """One measurement in a fresh interpreter with environment ``env``, checked to import from
    ``tree`` (None: this checkout)."""
    proc = subprocess.run([sys.executable, __file__, "--child", kind, *map(str, args)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"child {kind} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if Path(result["tree"]) != (tree or ROOT):
        raise RuntimeError(f"child {kind} imported qfx-onnx from {result['tree']}, not {tree or ROOT}")
    return result


def make_env(tree: Path | None, threads: int | None = None, mmap_threshold: int | None = None) -> dict:
    """This environment, importing from ``tree`` first, with ``threads`` intra-op threads and
    glibc's mmap threshold fixed at ``mmap_threshold`` bytes (freed buffers go back to the OS at
    once, so RSS follows live memory) when given."""
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(tree), *filter(None, [env.get("PYTHONPATH")])])
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    if mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    return env


def _cli_command() -> list[str]:
    script = Path(sys.executable).with_name("qfx-onnx")
    return [str(script)] if script.exists() else [sys.executable, "-c", "from qfx_onnx_cli.main import app; app()"]


def run_cli(env: dict, args: list[str], out: Path) -> tuple[float, float]:
    """Wall and CPU seconds of the real command as a subprocess; raises when it fails or verify is
    not bit-exact."""
    import resource

    out.unlink(missing_ok=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([*_cli_command(), *args], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    if proc.returncode != 0 or "bit for bit" not in " ".join(proc.stdout.split()):
        raise RuntimeError(f"qfx-onnx {' '.join(args)} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    out.unlink(missing_ok=True)
    return seconds, cpu


_MAXRSS = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:], capture_output=True).returncode; "
           "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def cli_maxrss(env: dict, args: list[str], out: Path) -> int:
    """ru_maxrss of the real command, bytes, seen from a small parent (whose own RSS is ~10 MB)."""
    out.unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, "-c", _MAXRSS, *_cli_command(), *args], capture_output=True, text=True, env=env)
    rc, maxrss = proc.stdout.split()
    out.unlink(missing_ok=True)
    if int(rc) != 0:
        raise RuntimeError(f"qfx-onnx {' '.join(args)} failed ({rc})")
    return 1024 * int(maxrss)


# -------------------------------------------------------------------------------------------------
# report


def _median(values) -> float:
    return statistics.median(values)


def report_time(console: Console, trees: dict[str, list[tuple[dict, tuple[float, float]]]]) -> None:
    """Wall and CPU seconds, the ratios per round (medians), and the CLI's stages in CPU seconds."""
    table = Table(title="ResNet-20: `qfx-onnx quantize` against in-process `qfx_onnx.quantize` (medians over rounds)")
    for col in ("tree", "in-process s", "(first call)", "CLI s", "CLI / in-process", "in-process CPU s", "CLI CPU s",
                "CLI / in-process, CPU", f"target <= {TIME_TARGET_X:g}x"):
        table.add_column(col, justify="left" if col == "tree" else "right")
    for name, runs in trees.items():
        wall = _median(cli[0] / child["quantize"] for child, cli in runs)
        cpu = _median(cli[1] / child["quantize_cpu"] for child, cli in runs)
        met = "[green]met[/]" if max(wall, cpu) <= TIME_TARGET_X else "[red]not met[/]"
        table.add_row(name, f"{_median(c['quantize'] for c, _ in runs):.2f}", f"{_median(c['quantize_cold'] for c, _ in runs):.2f}",
                      f"{_median(cli[0] for _, cli in runs):.2f}", f"{wall:.2f}x", f"{_median(c['quantize_cpu'] for c, _ in runs):.2f}",
                      f"{_median(cli[1] for _, cli in runs):.2f}", f"{cpu:.2f}x", met)
    console.print(table)
    table = Table(title="Where the CLI's time goes: CPU seconds per stage, in-process (medians); start-up = CLI CPU - in-process CLI CPU")
    for col in ("tree", "start-up", *STAGES, "in-process CLI", "share of calibrate"):
        table.add_column(col, justify="left" if col == "tree" else "right")
    for name, runs in trees.items():
        stages = {s: _median(c["stages_cpu"].get(s, 0.0) for c, _ in runs) for s in STAGES}
        startup = _median(cli[1] - c["cli_in_process_cpu"] for c, cli in runs)
        total = _median(c["cli_in_process_cpu"] for c, _ in runs)
        table.add_row(name, f"{startup:.2f}", *(f"{stages[s]:.2f}" for s in STAGES), f"{total:.2f}",
                      f"{total / max(stages['import'] + stages['calibrate'], 1e-9):.1f}x")
    console.print(table)


def report_memory(console: Console, weight_bytes: int, results: dict[str, tuple[dict, int]]) -> None:
    table = Table(title=f"ResNet-50-sized model: peak extra memory of the CLI quantize (weights {weight_bytes / MB:.0f} MB float32)")
    for col in ("tree, allocator", "seconds", "peak extra MB", "x weights", f"target <= {MEMORY_TARGET_X:g}x",
                *(f"{s} MB" for s in STAGES), "ru_maxrss MB"):
        table.add_column(col, justify="left" if col.startswith("tree") else "right")
    for name, (child, maxrss) in results.items():
        x = child["peak"] / weight_bytes
        met = "[green]met[/]" if x <= MEMORY_TARGET_X else "[red]not met[/]"
        table.add_row(name, f"{child['seconds']:.1f}", f"{child['peak'] / MB:.0f}", f"{x:.2f}", met,
                      *(f"{child['stages'].get(s, 0) / MB:.0f}" for s in STAGES), f"{maxrss / MB:.0f}")
    console.print(table)


# -------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians)")
    parser.add_argument("--threads", type=int, help="intra-op threads (OMP_NUM_THREADS) of every process; default: torch's")
    parser.add_argument("--calib-samples", type=int, default=256)
    parser.add_argument("--eval-samples", type=int, default=256, help="rows of the test split (evaluation, report, verify)")
    parser.add_argument("--memory-samples", type=int, default=4, help="samples of the ResNet-50 run (calibration, evaluation, verify)")
    parser.add_argument("--no-memory", action="store_true", help="skip the ResNet-50 memory measurement")
    parser.add_argument("--no-time", action="store_true", help="skip the ResNet-20 time measurement")
    parser.add_argument("--baseline", type=Path, help="also measure the source tree in this folder (see the module docstring)")
    parser.add_argument("--keep", type=Path, help="write models and data into this folder and keep them")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        print(json.dumps(CHILDREN[kind](*rest[:3], *map(int, rest[3:]))))
        return

    console = Console(width=200)
    trees = {"this tree": None, **({f"baseline {args.baseline}": args.baseline.resolve()} if args.baseline else {})}
    console.print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, threads {args.threads or 'default'}; "
                  f"CLI: {' '.join(_cli_command())}")
    ok = True
    with tempfile.TemporaryDirectory(prefix="bench_quantize_cli_") as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        if not args.no_time:
            model, facts = write_resnet20(folder)
            data = write_data(folder / "resnet20_random.npz", (3, 32, 32), 10, args.calib_samples, args.eval_samples)
            console.print(f"{model.name}: {facts['nodes']} ONNX nodes, {facts['params'] / 1e6:.2f}M parameters; "
                          f"{data.name}: {args.calib_samples} train + {args.eval_samples} test rows")
            out = folder / "resnet20.qfx.onnx"
            cli = _cli_args(model, data, out, args.calib_samples, [])
            runs: dict[str, list] = {name: [] for name in trees}
            for r in range(args.rounds):
                for name, tree in trees.items():
                    env = make_env(tree, args.threads)
                    child = run_child("time", env, tree, model, data, out, args.calib_samples)
                    wall, cpu = run_cli(env, cli, out)
                    ok &= child["bit_exact"]
                    runs[name].append((child, (wall, cpu)))
                    console.print(f"round {r + 1} {name}: in-process {child['quantize']:.2f} s ({child['quantize_cpu']:.2f} CPU), "
                                  f"CLI {wall:.2f} s ({cpu:.2f} CPU): {wall / child['quantize']:.2f}x ({cpu / child['quantize_cpu']:.2f}x CPU); "
                                  f"load {os.getloadavg()[0]:.1f}")
            report_time(console, runs)
        if not args.no_memory:
            model, facts = write_model(folder)
            data = write_data(folder / "resnet50_random.npz", (3, 224, 224), 1000, args.memory_samples, args.memory_samples)
            console.print(f"{model.name}: {facts['nodes']} nodes, {facts['weight_bytes'] / MB:.0f} MB of float32 weights; "
                          f"{args.memory_samples} calibration, evaluation and verify samples")
            out = folder / "resnet50.qfx.onnx"
            cli = _cli_args(model, data, out, args.memory_samples, ["--verify-samples", str(args.memory_samples)])
            results = {}
            for name, tree in trees.items():
                for allocator, threshold in (("glibc default", None), (f"MALLOC_MMAP_THRESHOLD_={LIVE_MMAP_THRESHOLD}", LIVE_MMAP_THRESHOLD)):
                    env = make_env(tree, args.threads, threshold)
                    child = run_child("memory", env, tree, model, data, out, args.memory_samples, args.memory_samples)
                    ok &= child["bit_exact"]
                    results[f"{name}, {allocator}"] = (child, cli_maxrss(env, cli, out))
            report_memory(console, facts["weight_bytes"], results)
    if not ok:
        console.print("[red]verify did not report a bit-exact match[/]")
        sys.exit(1)


if __name__ == "__main__":
    main()
