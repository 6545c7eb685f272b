"""``qfx-onnx export-hls``: an annotated ONNX to a Vitis HLS C++ project, C-simulated bit for bit."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import typer

from qfx_onnx.errors import ExportError, OnnxModelError
from qfx_onnx.hls.export import IoMode
from qfx_onnx_cli.main import QfxCommand, app, run_command
from qfx_onnx_cli.options import AnnotatedModel, Force, Io, Json, Quiet, TestData, find_default_data
from qfx_onnx_cli.output import Output, estimate_table

DEFAULT_PART = "xcvu9p-flga2104-2-e"


def default_top(model: Path) -> str:
    """The top function's name from the file name: ``cnn.qfx.onnx`` -> ``cnn``."""
    name = model.name
    for suffix in (".onnx", ".qfx"):
        name = name.removesuffix(suffix)
    return name or "myproject"


@app.command("export-hls", cls=QfxCommand)
def export_hls(
    model: AnnotatedModel,
    output: Path = typer.Option(..., "-o", "--output", metavar="FOLDER", help="Project folder to create."),
    csim: bool = typer.Option(False, "--csim", help="Compile with g++ against ap_fixed.h and run the testbench; "
                                                    "fail unless every output bit matches."),
    io: Io = IoMode.PARALLEL.value,
    reuse_factor: int = typer.Option(1, "--reuse-factor", help="Initiation interval of each layer's pipelined loop."),
    part: str = typer.Option(DEFAULT_PART, "--part", help="FPGA part for build.tcl."),
    clock_ns: float = typer.Option(5.0, "--clock-ns", help="Clock period for build.tcl and latency in ns."),
    force: Force = False,
    test_vectors: int = typer.Option(20, "--test-vectors", help="Number of test vectors in the testbench."),
    data: TestData = None,
    khot_max: int = typer.Option(0, "--khot-max", help="Emit weights whose codes all have at most K signed "
                                                      "digits as shift-adds (0: only weights annotated K-hot)."),
    top: str | None = typer.Option(None, "--top", show_default="from the file name: cnn.qfx.onnx -> cnn",
                                   help="Top function name."),
    jobs: int = typer.Option(2, "--jobs", help="Parallel compiler jobs for --csim."),
    quiet: Quiet = False,
    json_output: Json = False,
) -> None:
    """Generate a Vitis HLS project whose C simulation reproduces the PyTorch emulation bit for bit.

    --json: project, top, layers, estimate (as report.json), csim (null without --csim).
    """
    args = dict(locals())
    out = Output(json_mode=args.pop("json_output"), quiet=args.pop("quiet"))
    run_command(lambda: _export_hls(**args, out=out))


def _export_hls(model, output, csim, io, reuse_factor, part, clock_ns, force, test_vectors, data, khot_max, top,
                jobs, out: Output) -> None:
    from qfx_onnx.data import load_arrays
    from qfx_onnx.hls.project import check_output_dir, check_vector_count, export_hls as export
    from qfx_onnx.quant.annotated import read_annotated
    from qfx_onnx.quant.api import evaluation_split

    if not model.is_file():
        raise OnnxModelError(f"{model}: no such file")
    check_vector_count(test_vectors)
    check_output_dir(output, force=force, protect=(model,))
    inputs = None
    if data is None and find_default_data(model) is not None:
        data = str(find_default_data(model))
        out.line(f"test data: {data} (the .npz beside the model)")
    if data is not None:
        x, _ = load_arrays(data, evaluation_split(data), real_targets=True)  # inputs only; any y is ignored
        inputs = (x,)
    with out.status("reading the annotated model"):
        fixed = read_annotated(model)
    with out.status("generating the HLS project"):
        result = export(fixed, output, top=top or default_top(model), io=io, reuse_factor=reuse_factor, part=part,
                        clock_ns=clock_ns, force=force, data=inputs, n_vectors=test_vectors, khot_max=khot_max,
                        protect=(model,))
    if inputs is None:
        out.warn("no --data: the testbench uses random input codes, whose outputs mostly sit at the saturation "
                 "limits; pass --data with real samples for a testbench that exercises the model as deployed")
    out.table(estimate_table(result.report))
    payload = {"project": str(result.project), "top": result.model.top, "layers": len(result.model.layers),
               "estimate": result.report, "csim": None}
    written = f"wrote {result.project} (top function {result.model.top}, {len(result.model.layers)} layers)"
    if not csim:
        out.final(written)
        out.result(payload)
        return
    out.line(written)
    from qfx_onnx.hls.csim import compile_csim, run_csim

    started = time.perf_counter()
    with out.status("C simulation: compiling with g++"):  # minutes for a large model: show the elapsed time
        binary = compile_csim(result.project, result.model.top, jobs=jobs)
    compile_s = time.perf_counter() - started
    with out.status("C simulation: running the testbench"):
        sim = replace(run_csim(result.project, result.model.top, jobs=jobs, binary=binary), compile_s=compile_s)
    payload["csim"] = {"vectors": sim.vectors, "values": sim.values, "mismatches": sim.mismatches,
                       "compile_s": sim.compile_s, "run_s": sim.run_s, "passed": sim.passed}
    out.line(f"csim: {sim.vectors} test vectors, {sim.values} output values, {sim.mismatches} mismatches "
             f"(compile {sim.compile_s:.1f} s, run {sim.run_s:.2f} s)")
    out.result(payload)
    if not sim.passed:
        details = sim.output.strip().splitlines()
        raise ExportError(f"C simulation failed: {sim.mismatches} mismatching values"
                          + (f"; first: {details[0]}" if details else ""))
    out.final("csim: bit-exact with the PyTorch emulation")
