"""HLS export benchmark: generate a Vitis HLS project per shipped model, compile and run its C simulation.

    python benchmarks/bench_hls.py [--models mlp cnn resnet dscnn] [--vectors 20] [--io parallel]
                                   [--khot] [--jobs 2] [--repeat 1]

For each model: default PTQ (8 bits, AP_RND, AP_SAT, 256 training images), then
:func:`qfx_onnx.hls.project.export_hls` with the first ``--vectors`` test images, then
:func:`qfx_onnx.hls.csim.run_csim` (g++ against the real ap_fixed.h, the same flags as
``--csim``). The table shows generation time, compile time, run time and their sum (the project's
target for the CNN: under 60 s), whether every output bit matched, and the estimate's DSP and
latency. ``--khot`` projects the weights to 2-hot codes first (shift-add layers). Timings are
medians over ``--repeat`` runs and are reported, never asserted.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from qfx_onnx.data import load_arrays
from qfx_onnx.hls.csim import run_csim
from qfx_onnx.hls.project import export_hls
from qfx_onnx.importer import load_onnx
from qfx_onnx.quant.quantize import quantize_graph

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("mlp", "cnn", "resnet", "dscnn")
CNN_TARGET_S = 60.0


def _khot(fpm, k: int = 2) -> None:
    from qfx_onnx.fixed.khot import khot_project

    gm = fpm.graph_module
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.meta.get("role") == "weight":
            q = gm.get_submodule(node.target)
            param = gm.get_parameter(node.all_input_nodes[0].target)
            with torch.no_grad():
                param.copy_(khot_project(param.to(torch.float64), q.frozen_types()[0], k).to(param.dtype))
            q.khot = k


def run_one(model: str, args, folder: Path) -> dict:
    x_train, _ = load_arrays(ROOT / "models" / "digits.npz", "train")
    x_test, _ = load_arrays(ROOT / "models" / "digits.npz", "test")
    fpm = quantize_graph(load_onnx(ROOT / "models" / f"{model}.onnx"), [x_train[:256]])
    if args.khot:
        _khot(fpm)
    t0 = time.perf_counter()
    result = export_hls(fpm, folder / model, top=model, io=args.io, data=(x_test,), n_vectors=args.vectors,
                        force=True)
    generate = time.perf_counter() - t0
    sim = run_csim(result.project, model, jobs=args.jobs)
    return dict(generate=generate, compile=sim.compile_s, run=sim.run_s, passed=sim.passed,
                mismatches=sim.mismatches, values=sim.values, dsp=result.report["totals"]["dsp"],
                latency=result.report["totals"]["latency_cycles"], layers=len(result.model.layers))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--vectors", type=int, default=20)
    parser.add_argument("--io", default="parallel", choices=("parallel", "stream"))
    parser.add_argument("--khot", action="store_true", help="2-hot weights (shift-add layers)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)

    console = Console(width=150)
    gxx = subprocess.run(["g++", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    console.print(f"{platform.processor() or platform.machine()}, {gxx}, io {args.io}, "
                  f"{args.vectors} test vectors{', 2-hot weights' if args.khot else ''}")
    table = Table(title="qfx-onnx export-hls: generate + compile + run C simulation (seconds)")
    for col in ("model", "layers", "generate", "compile", "run", "total", "bit-exact", "DSP (est.)", "latency (cycles)"):
        table.add_column(col, justify="left" if col == "model" else "right")
    with tempfile.TemporaryDirectory(prefix="bench_hls_") as tmp:
        for model in args.models:
            runs = [run_one(model, args, Path(tmp) / str(r)) for r in range(args.repeat)]
            med = {k: statistics.median(r[k] for r in runs) for k in ("generate", "compile", "run")}
            total = sum(med.values())
            last = runs[-1]
            exact = "yes" if all(r["passed"] for r in runs) else f"NO ({last['mismatches']} of {last['values']})"
            note = f" (target < {CNN_TARGET_S:.0f})" if model == "cnn" else ""
            table.add_row(model, str(last["layers"]), f"{med['generate']:.1f}", f"{med['compile']:.1f}",
                          f"{med['run']:.2f}", f"{total:.1f}{note}", exact, str(last["dsp"]), str(last["latency"]))
    console.print(table)


if __name__ == "__main__":
    main()
