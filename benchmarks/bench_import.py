"""ONNX import benchmark: load_onnx time and peak memory on a ResNet-50-sized model, against onnxruntime.

    python benchmarks/bench_import.py [--repeat 3] [--batch 2] [--profile] [--keep DIR]

Builds the ResNet-50 topology with random weights (7x7 stem conv, BatchNormalization, ReLU, max
pool; bottleneck blocks [3, 4, 6, 3] of 1x1/3x3/1x1 convs with projection shortcuts; global
average pool, flatten, Gemm 2048 -> 1000; 25.6M parameters and 0.1M BN statistics, about 103 MB of
float32; input (N, 3, 224, 224) with a symbolic batch dim), writes it to a temporary folder,
checks it with the ONNX checker and runs it once in onnxruntime.

Each measurement runs in a fresh Python process that first imports torch, onnx and qfx_onnx (or
onnxruntime), so that module loading is neither timed nor counted. It reads VmRSS just before
the call and VmHWM (the high-water mark, same as ``getrusage().ru_maxrss``) just after; peak extra
memory is their difference. The high-water mark is reset to the current RSS first through
``/proc/self/clear_refs`` where the kernel allows it; where it does not, a peak that stays under
the one left by module loading cannot be seen, and the number is marked as an upper bound.
``getrusage().ru_maxrss`` is shown too, but only as a lower bound: it cannot be reset, and after
fork and exec a child's starts at its parent's high-water mark, hiding any peak below it.
Times and memory are medians over ``--repeat`` processes. onnxruntime's ``InferenceSession``
creation (default CPU options) is measured the same way as a baseline.

Targets from the issue: import under 5 s, and extra memory under 3x the weights' size. Timings
are printed, never asserted. The imported graph is then run on one random batch and compared
with onnxruntime (max |ours - ort| / max |ort|); a mismatch exits with status 1.

``--profile`` adds, each in its own process: the importer's stages (every function that
:func:`qfx_onnx.importer.loader.prepare` and ``build_graph`` call, wrapped to record time, RSS and
the peak between consecutive events) and the top functions of a cProfile run.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console
from rich.table import Table

OPSET = 17
IR_VERSION = 8  # opset 17's; onnx 1.23 would write IR 14, which onnxruntime 1.31 refuses
STAGES = ((3, 64, 1), (4, 128, 2), (6, 256, 2), (3, 512, 2))  # blocks, width, first stride
TIME_TARGET_S = 5.0
MEMORY_TARGET_X = 3.0
MATCH_RTOL = 1e-4
MB = 1e6

# -------------------------------------------------------------------------------------------------
# the model


class _ResNetBuilder:
    """Collects nodes and float32 initializers with He-scaled random values."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    def node(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def conv(self, x: str, name: str, cin: int, cout: int, k: int, stride: int = 1) -> str:
        w = self.rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))
        return self.node("Conv", [x, self.init(f"{name}.weight", w)], name, kernel_shape=[k, k],
                          strides=[stride, stride], pads=[k // 2] * 4)

    def bn(self, x: str, name: str, c: int, gain: float = 1.0) -> str:
        """BatchNormalization; a small ``gain`` keeps the residual sum from growing block by block."""
        r = self.rng
        stats = [gain * r.uniform(0.5, 1.5, c), r.normal(0, 0.1, c), r.normal(0, 0.1, c), r.uniform(0.5, 1.5, c)]
        names = [self.init(f"{name}.{p}", v) for p, v in zip(("weight", "bias", "running_mean", "running_var"), stats)]
        return self.node("BatchNormalization", [x, *names], name, epsilon=1e-5)

    def relu(self, x: str, name: str) -> str:
        return self.node("Relu", [x], name)

    def conv_bn_relu(self, x: str, conv: str, bn: str, relu: str, cin: int, cout: int, k: int, stride: int = 1) -> str:
        return self.relu(self.bn(self.conv(x, conv, cin, cout, k, stride), bn, cout), relu)

    def bottleneck(self, x: str, name: str, cin: int, width: int, stride: int) -> str:
        cout = 4 * width
        y = self.conv_bn_relu(x, f"{name}.conv1", f"{name}.bn1", f"{name}.relu1", cin, width, 1)
        y = self.conv_bn_relu(y, f"{name}.conv2", f"{name}.bn2", f"{name}.relu2", width, width, 3, stride)
        y = self.bn(self.conv(y, f"{name}.conv3", width, cout, 1), f"{name}.bn3", cout, gain=0.2)
        if stride != 1 or cin != cout:
            x = self.bn(self.conv(x, f"{name}.downsample.0", cin, cout, 1, stride), f"{name}.downsample.1", cout)
        return self.relu(self.node("Add", [y, x], f"{name}.add"), f"{name}.relu3")


def build_resnet50(seed: int = 0) -> onnx.ModelProto:
    """The ResNet-50 topology (torchvision's layout and parameter names) with random weights."""
    b = _ResNetBuilder(np.random.default_rng(seed))
    x = b.conv_bn_relu("input", "conv1", "bn1", "relu", 3, 64, 7, 2)
    x = b.node("MaxPool", [x], "maxpool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = 64
    for stage, (blocks, width, stride) in enumerate(STAGES, 1):
        for i in range(blocks):
            x = b.bottleneck(x, f"layer{stage}.{i}", cin, width, stride if i == 0 else 1)
            cin = 4 * width
    x = b.node("Flatten", [b.node("GlobalAveragePool", [x], "avgpool")], "flatten", axis=1)
    w = b.init("fc.weight", b.rng.normal(0, 0.01, (1000, 2048)))
    bias = b.init("fc.bias", b.rng.normal(0, 0.01, 1000))
    b.node("Gemm", [x, w, bias], "logits", transB=1)
    graph = helper.make_graph(
        b.nodes, "resnet50",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])],
        b.inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="bench_import",
                             ir_version=IR_VERSION)


def write_model(folder: Path) -> tuple[Path, dict]:
    """Build, check and save the model, run it once in onnxruntime; its facts for the report."""
    import onnxruntime as ort

    model = build_resnet50()
    onnx.checker.check_model(model, full_check=True)
    path = folder / "resnet50.onnx"
    onnx.save(model, str(path))
    inits = model.graph.initializer
    bn_stats = sum(int(np.prod(t.dims)) for t in inits if t.name.endswith(("running_mean", "running_var")))
    numel = sum(int(np.prod(t.dims)) for t in inits)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {"input": np.zeros((1, 3, 224, 224), np.float32)})[0]
    assert out.shape == (1, 1000) and np.isfinite(out).all(), "onnxruntime could not run the model"
    return path, dict(nodes=len(model.graph.node), params=numel - bn_stats, bn_stats=bn_stats,
                      weight_bytes=4 * numel, file_bytes=path.stat().st_size)


# -------------------------------------------------------------------------------------------------
# child processes: one measurement each, printed as one JSON line


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc only), so that RSS shows live memory: glibc
    raises its mmap threshold after the first large free and then keeps ~200 MB of the importer's
    freed buffers in the heap."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _measure_call(fn) -> dict:
    """Seconds, RSS before, peak and RSS after of ``fn()``, in bytes. The result is kept alive
    until after the last reading; "retained" is what it holds once freed heap is trimmed."""
    import gc
    import resource

    gc.collect()
    reset = _reset_peak()
    rss0, hwm0 = _status_kb("VmRSS"), _status_kb("VmHWM")
    maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - t0
    hwm1 = _status_kb("VmHWM")
    maxrss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    gc.collect()
    _trim_heap()
    rss1 = _status_kb("VmRSS")
    del result
    return dict(seconds=seconds, rss_before=1024 * rss0, peak=1024 * hwm1, rss_after=1024 * rss1,
                peak_extra=1024 * (hwm1 - rss0), retained=1024 * (rss1 - rss0),
                upper_bound=not reset and hwm1 == hwm0, ru_maxrss_delta=1024 * (maxrss1 - maxrss0))


def _child_qfx(path: str) -> dict:
    import torch  # noqa: F401 - loaded before the measurement on purpose

    from qfx_onnx import load_onnx

    return _measure_call(lambda: load_onnx(path))


def _child_ort(path: str) -> dict:
    import onnxruntime as ort

    return _measure_call(lambda: ort.InferenceSession(path, providers=["CPUExecutionProvider"]))


def _child_stages(path: str) -> dict:
    """Time, RSS and peak between consecutive entries to and exits from the loader's stages."""
    from qfx_onnx.importer import context, loader

    events: list[tuple[str, float, int, int]] = []

    def mark(label: str) -> None:
        events.append((label, time.perf_counter(), _status_kb("VmRSS"), _status_kb("VmHWM")))
        _reset_peak()

    def traced(name: str, fn):
        def wrapper(*args, **kwargs):
            mark(f"{name} >")
            try:
                return fn(*args, **kwargs)
            finally:
                mark(f"{name} <")
        return wrapper

    for name in ("read_model", "check_opset", "_infer_shapes", "_node_names", "_initial_constants",
                 "_tensor_infos", "plan_folding", "find_unsupported", "fold_constants"):
        setattr(loader, name, traced(name, getattr(loader, name)))
    context.GraphBuilder.finish = traced("GraphBuilder.finish", context.GraphBuilder.finish)
    mark("start")
    gm = loader.load_onnx(path)
    mark("end")
    segments = [dict(span=f"{a[0]} .. {b[0]}", seconds=b[1] - a[1], rss_before=1024 * a[2], rss_after=1024 * b[2],
                     peak=1024 * b[3]) for a, b in zip(events, events[1:])]
    del gm
    return dict(segments=segments, reset=_reset_peak())


def _child_cprofile(path: str) -> dict:
    import cProfile
    import io
    import pstats

    from qfx_onnx import load_onnx

    profiler = cProfile.Profile()
    profiler.runcall(load_onnx, path)
    text = {}
    for key in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).strip_dirs().sort_stats(key).print_stats(18)
        text[key] = out.getvalue()
    return text


CHILDREN = {"qfx": _child_qfx, "ort": _child_ort, "stages": _child_stages, "cprofile": _child_cprofile}


def run_child(kind: str, path: Path) -> dict:
    """Run one measurement in a fresh interpreter and return its JSON result."""
    proc = subprocess.run([sys.executable, __file__, "--child", kind, str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child {kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -------------------------------------------------------------------------------------------------
# correctness and report


def verify(path: Path, batch: int, seed: int = 1) -> tuple[float, bool, tuple[int, ...]]:
    """Max |ours - ort| / max |ort| on one random batch, whether the top-1 classes agree, and the shape."""
    import onnxruntime as ort
    import torch

    from qfx_onnx import load_onnx

    x = np.random.default_rng(seed).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    with torch.no_grad():
        ours = load_onnx(path)(torch.from_numpy(x)).numpy()
    if ours.shape != ref.shape:
        return float("inf"), False, ours.shape
    rel = float(np.abs(ours - ref).max() / np.abs(ref).max())
    return rel, bool((ours.argmax(1) == ref.argmax(1)).all()), ours.shape


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def _mb(n: float) -> str:
    return f"{n / MB:.0f}"


def report(console: Console, facts: dict, qfx: list[dict], ort_runs: list[dict], check: tuple) -> None:
    weights = facts["weight_bytes"]
    t_q, t_o = _median(qfx, "seconds"), _median(ort_runs, "seconds")
    m_q, m_o = _median(qfx, "peak_extra"), _median(ort_runs, "peak_extra")
    bound = any(r["upper_bound"] for r in qfx + ort_runs)
    table = Table(title=f"ONNX import of a ResNet-50-sized model, median of {len(qfx)} fresh processes")
    for col in ("", "seconds", "peak extra MB", "x weights", "ru_maxrss rise MB", "retained MB", "runs (s)"):
        table.add_column(col, justify="left" if not col else "right")
    for label, runs in (("qfx_onnx.load_onnx", qfx), ("onnxruntime.InferenceSession", ort_runs)):
        t, m = _median(runs, "seconds"), _median(runs, "peak_extra")
        table.add_row(label, f"{t:.2f}", _mb(m) + ("*" if bound else ""), f"{m / weights:.2f}",
                      _mb(_median(runs, "ru_maxrss_delta")), _mb(_median(runs, "retained")),
                      " ".join(f"{r['seconds']:.2f}" for r in runs))
    table.add_row("ratio ours / onnxruntime", f"{t_q / t_o:.2f}", f"{m_q / m_o:.2f}", "", "", "", "")
    console.print(table)
    if bound:
        console.print("* the peak could not be reset: an upper bound (see the module docstring)")
    console.print("ru_maxrss rise: a lower bound (it starts at this process's high-water mark); "
                  "retained: held by the result once freed heap is trimmed")
    rel, top1, shape = check
    console.print(f"time target (< {TIME_TARGET_S:.0f} s): {'met' if t_q < TIME_TARGET_S else 'MISSED'} ({t_q:.2f} s); "
                  f"memory target (< {MEMORY_TARGET_X:.0f}x weights = {_mb(MEMORY_TARGET_X * weights)} MB): "
                  f"{'met' if m_q < MEMORY_TARGET_X * weights else 'MISSED'} ({m_q / weights:.2f}x)")
    console.print(f"imported graph vs onnxruntime on a random batch, output {tuple(shape)}: max relative error "
                  f"{rel:.2e} ({'matches' if rel < MATCH_RTOL else 'MISMATCH'}, tolerance {MATCH_RTOL:g}), "
                  f"top-1 {'identical' if top1 else 'DIFFERENT'}")


def report_profile(console: Console, path: Path) -> None:
    stages = run_child("stages", path)
    table = Table(title="load_onnx by stage, one process ('>' entry, '<' exit; other spans: the loader's own code)")
    for col in ("span", "seconds", "RSS before MB", "peak MB", "RSS after MB", "peak - RSS before MB"):
        table.add_column(col, justify="left" if col == "span" else "right")
    for s in stages["segments"]:
        if s["seconds"] < 0.005 and s["peak"] - s["rss_before"] < 5 * MB:
            continue
        table.add_row(s["span"], f"{s['seconds']:.2f}", _mb(s["rss_before"]), _mb(s["peak"]), _mb(s["rss_after"]),
                      _mb(max(0, s["peak"] - s["rss_before"])))
    console.print(table)
    if not stages["reset"]:
        console.print("peaks could not be reset between events: each peak column is the running maximum")
    profile = run_child("cprofile", path)
    for key in ("tottime", "cumulative"):
        console.print(f"cProfile, sorted by {key}:")
        console.print(profile[key], markup=False, highlight=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="fresh processes per measurement (medians)")
    parser.add_argument("--batch", type=int, default=2, help="batch size of the correctness check")
    parser.add_argument("--profile", action="store_true", help="also break the import down by stage and cProfile it")
    parser.add_argument("--keep", type=Path, help="write the model into this folder and keep it")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, path = args.child
        print(json.dumps(CHILDREN[kind](path)))
        return

    console = Console(width=150)
    with tempfile.TemporaryDirectory(prefix="bench_import_") as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        path, facts = write_model(folder)
        console.print(f"{path.name}: {facts['nodes']} nodes, {facts['params'] / 1e6:.2f}M parameters + "
                      f"{facts['bn_stats'] / 1e6:.2f}M BN statistics = {_mb(facts['weight_bytes'])} MB float32, "
                      f"file {_mb(facts['file_bytes'])} MB; checker and onnxruntime OK; {os.cpu_count()} CPUs, "
                      f"load average {os.getloadavg()[0]:.1f}")
        qfx = [run_child("qfx", path) for _ in range(args.repeat)]
        ort_runs = [run_child("ort", path) for _ in range(args.repeat)]
        check = verify(path, args.batch)
        report(console, facts, qfx, ort_runs, check)
        if args.profile:
            report_profile(console, path)
    if not check[0] < MATCH_RTOL:
        sys.exit(1)


if __name__ == "__main__":
    main()
