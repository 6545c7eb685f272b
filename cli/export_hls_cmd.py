"""``qfx-onnx export-hls``: an annotated ONNX to a Vitis HLS C++ project, C-simulated bit for bit."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from qfx_onnx.errors import ExportError, OnnxModelError
from qfx_onnx_cli.main import app, console, run_command

DEFAULT_PART = "xcvu9p-flga2104-2-e"


def default_top(model: Path) -> str:
    """The top function's name from the file name: ``cnn.qfx.onnx`` -> ``cnn``."""
    name = model.name
    for suffix in (".onnx", ".qfx"):
        name = name.removesuffix(suffix)
    return name or "myproject"


def report_table(report: dict) -> Table:
    """The resource estimate as a rich table, one row per layer plus the totals."""
    table = Table(title=f"resource estimate ({report['io']} io, reuse factor {report['reuse_factor']}, "
                        f"{report['part']} @ {report['clock_ns']} ns)")
    for col in ("layer", "kind", "multiplies (bits)", "DSP", "LUT", "shift-add", "weight bits", "BRAM18K", "latency"):
        table.add_column(col, justify="left" if col in ("layer", "kind", "multiplies (bits)") else "right")
    for e in report["layers"]:
        mults = ", ".join(f"{k}: {m['count']}" for k, m in e["multiplies"].items()) or "-"
        table.add_row(e["layer"], e["kind"], mults, str(e["dsp"]), str(e["lut"]), str(e["shift_add_terms"]),
                      str(e["weight_bits"]), str(e["bram18"]), str(e["latency"]))
    t = report["totals"]
    table.add_row("total", "", "", str(t["dsp"]), str(t["lut"]), str(t["shift_add_terms"]), str(t["weight_bits"]),
                  str(t["bram18"]), f"{t['latency_cycles']} ({t['latency_ns']} ns)", style="bold")
    return table


@app.command("export-hls")
def export_hls(
    model: Path = typer.Argument(..., help="Annotated ONNX written by qfx-onnx quantize or finetune."),
    output: Path = typer.Option(..., "-o", "--output", help="Project folder to create."),
    csim: bool = typer.Option(False, "--csim", help="Compile with g++ against ap_fixed.h and run the testbench; "
                                                    "fail unless every output bit matches."),
    io: str = typer.Option("parallel", "--io", help="parallel (arrays) or stream (hls::stream ports, DATAFLOW)."),
    reuse_factor: int = typer.Option(1, "--reuse-factor", help="Initiation interval of each layer's pipelined loop."),
    part: str = typer.Option(DEFAULT_PART, "--part", help="FPGA part for build.tcl."),
    clock_ns: float = typer.Option(5.0, "--clock-ns", help="Clock period for build.tcl and latency in ns."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
    test_vectors: int = typer.Option(20, "--test-vectors", help="Number of test vectors in the testbench."),
    data: Path | None = typer.Option(None, "--data", help="Test inputs: .npz/.npy/module:function, labels optional "
                                                          "(test split when the .npz has one). Default: random input codes."),
    khot_max: int = typer.Option(0, "--khot-max", help="Emit weights whose codes all have at most K signed "
                                                      "digits as shift-adds (0: only weights annotated K-hot)."),
    top: str | None = typer.Option(None, "--top", help="Top function name (default: from the file name)."),
    jobs: int = typer.Option(2, "--jobs", help="Parallel compiler jobs for --csim."),
) -> None:
    """Generate a Vitis HLS project whose C simulation reproduces the PyTorch emulation bit for bit."""
    args = dict(locals())
    run_command(lambda: _export_hls(**args))


def _export_hls(model, output, csim, io, reuse_factor, part, clock_ns, force, test_vectors, data, khot_max, top,
                jobs) -> None:
    from qfx_onnx.data import load_arrays
    from qfx_onnx.hls.project import check_output_dir, check_vector_count, export_hls as export
    from qfx_onnx.quant.annotated import read_annotated
    from qfx_onnx.quant.api import evaluation_split

    if not model.is_file():
        raise OnnxModelError(f"{model}: no such file")
    check_vector_count(test_vectors)
    check_output_dir(output, force=force, protect=(model,))
    inputs = None
    if data is not None:
        x, _ = load_arrays(str(data), evaluation_split(str(data)), real_targets=True)  # inputs only; any y is ignored
        inputs = (x,)
    with console.status("reading the annotated model"):
        fixed = read_annotated(model)
    with console.status("generating the HLS project"):
        result = export(fixed, output, top=top or default_top(model), io=io, reuse_factor=reuse_factor, part=part,
                        clock_ns=clock_ns, force=force, data=inputs, n_vectors=test_vectors, khot_max=khot_max,
                        protect=(model,))
    console.print(report_table(result.report))
    console.print(f"wrote {result.project} (top function {result.model.top}, {len(result.model.layers)} layers)")
    if not csim:
        return
    from qfx_onnx.hls.csim import run_csim

    with console.status("C simulation: compiling with g++"):
        sim = run_csim(result.project, result.model.top, jobs=jobs)
    console.print(f"csim: {sim.vectors} test vectors, {sim.values} output values, {sim.mismatches} mismatches "
                  f"(compile {sim.compile_s:.1f} s, run {sim.run_s:.2f} s)")
    if not sim.passed:
        details = sim.output.strip().splitlines()
        raise ExportError(f"C simulation failed: {sim.mismatches} mismatching values"
                          + (f"; first: {details[0]}" if details else ""))
    console.print("csim: bit-exact with the PyTorch emulation")
