"""``qfx-onnx quantize``: whole-model post-training quantization to an annotated ONNX."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
import typer
from rich.text import Text

from qfx_onnx.atomic import write_atomic
from qfx_onnx.errors import DataError, OnnxModelError, QfxError
from qfx_onnx_cli.main import QfxCommand, app, run_command
from qfx_onnx_cli.options import (
    DEFAULT_CALIBRATION, ActBits, BiasBits, CalibrationAlias, Calibration, CalibrationData, CalibSamples,
    ElementwiseBits, EvalData, FloatModel, Force, InputBits, Json, Overflow, PerChannel, Quiet, Rounding, SatBits,
    Verify, WeightBits, calibration_method, check_new_file)
from qfx_onnx_cli.output import Output

TABLE_ROWS = 25  # tensors in the table without --all


def default_output(model: Path) -> Path:
    stem = model.name.removesuffix(".onnx")
    return model.with_name(f"{stem}.qfx.onnx")


def find_default_data(model: Path) -> Path | None:
    """The one ``.npz`` beside the model (the shipped models sit next to their dataset)."""
    found = sorted(model.parent.glob("*.npz"))
    return found[0] if len(found) == 1 else None


def resolve_output(model: Path, output: Path | None) -> Path:
    out = output or default_output(model)
    if out.resolve() == model.resolve():
        raise QfxError(f"{out}: refusing to overwrite the input model; choose another -o")
    if out.parent and not out.parent.exists():
        raise QfxError(f"{out.parent}: output folder does not exist")
    return out


@app.command(cls=QfxCommand)
def quantize(
    model: FloatModel,
    data: CalibrationData = None,
    output: Path | None = typer.Option(None, "-o", "--output", metavar="FILE", show_default="<model>.qfx.onnx beside the model",
                                       help="Annotated ONNX to write."),
    calib_samples: CalibSamples = 512,
    calibration: Calibration = DEFAULT_CALIBRATION,
    method: CalibrationAlias = None,
    weight_bits: WeightBits = None,
    bias_bits: BiasBits = None,
    act_bits: ActBits = None,
    elementwise_bits: ElementwiseBits = None,
    input_bits: InputBits = None,
    rounding: Rounding = None,
    overflow: Overflow = None,
    sat_bits: SatBits = None,
    config: Path | None = typer.Option(None, "--config", metavar="FILE", show_default="none", help="TOML/JSON precision config with per-layer overrides."),
    fold_bn: bool = typer.Option(False, "--fold-bn", help="Fold BatchNorm into the preceding conv/Gemm instead of keeping it as a fixed-point affine."),
    per_channel: PerChannel = False,
    recalibrate_imported: bool = typer.Option(
        False, "--recalibrate-imported",
        help="Calibrate the binary points of the types an imported QONNX/QDQ model fixes (width, sign and modes stay); "
             "by default they are kept as given."),
    approximate_scales: int | None = typer.Option(
        None, "--approximate-scales", metavar="BITS", show_default="none: an error",
        help="Approximate QONNX/QDQ scales that are not powers of two by BITS-bit fixed-point multipliers "
             "(x * (1/s)~, rounded, times s~); the largest relative error is printed as a warning."),
    eval_data: EvalData = None,
    report: Path | None = typer.Option(None, "--report", metavar="FILE", show_default="none", help="Write the per-tensor report as JSON."),
    verify: Verify = True,
    verify_samples: int = typer.Option(64, "--verify-samples", help="Samples used by --verify."),
    show_all: bool = typer.Option(False, "--all", help=f"Show every tensor in the table, not only the {TABLE_ROWS} noisiest."),
    plot: Path | None = typer.Option(None, "--plot", metavar="FILE", show_default="none",
                                     help="Write the numerical profile (as qfx-onnx profile) of the quantized model on "
                                          "the evaluation data: PNG, or PDF/SVG by suffix."),
    force: Force = False,
    quiet: Quiet = False,
    json_output: Json = False,
) -> None:
    """Quantize every tensor of a float ONNX model to ap_fixed and write an annotated ONNX.

    --json: model, output, data, eval_data, calibration, score, float_accuracy, fixed_accuracy,
    tensors (every one, in graph order), layers, verify, report, plot: as --report writes, plus the run.
    """
    args = dict(locals())
    ui = Output(json_mode=args.pop("json_output"), quiet=args.pop("quiet"))
    run_command(lambda: _quantize(**args, ui=ui))


def _quantize(model, data, output, calib_samples, calibration, method, weight_bits, bias_bits, act_bits, elementwise_bits,
              input_bits, rounding, overflow, sat_bits, config, fold_bn, per_channel, recalibrate_imported, approximate_scales, eval_data, report, verify,
              verify_samples, show_all, plot, force, ui: Output) -> None:
    from qfx_onnx.data import load_arrays, score
    from qfx_onnx.fixed.types import OverflowMode, QuantMode
    from qfx_onnx.quant.annotated import verify_annotated
    from qfx_onnx.quant.annotated_write import build_annotated, save_annotated
    from qfx_onnx.quant.annotated_write import lossless_values
    from qfx_onnx.quant.api import evaluation_split, quantize as quantize_model
    from qfx_onnx.quant.policy import load_policy, parse_mode
    from qfx_onnx.quant.report import QuantReport, layer_exactness, measure_tensors, samples_per_pass, tensor_table

    if not model.is_file():
        raise OnnxModelError(f"{model}: no such file")
    method = calibration_method(calibration, method)
    out = resolve_output(model, output)
    check_new_file(out, force)
    if report is not None:
        if report.resolve() in (model.resolve(), out.resolve()):
            raise QfxError(f"{report}: --report would overwrite the {'input model' if report.resolve() == model.resolve() else 'output'}")
        check_new_file(report, force)
    if plot is not None:
        if plot.resolve() in (model.resolve(), out.resolve()):
            raise QfxError(f"{plot}: --plot would overwrite the {'input model' if plot.resolve() == model.resolve() else 'output'}")
        check_new_file(plot, force)
    if data is None:
        data = find_default_data(model)
        if data is None:
            raise DataError(f"{model}: no calibration data; pass --data data.npz")
        data = str(data)
        ui.line(f"calibration data: {data}")
    policy = load_policy(config, weight_bits=weight_bits, bias_bits=bias_bits, act_bits=act_bits,
                         elementwise_bits=elementwise_bits, input_bits=input_bits,
                         rounding=parse_mode(QuantMode, rounding), overflow=parse_mode(OverflowMode, overflow),
                         sat_bits=sat_bits)
    eval_spec = eval_data or data
    x_eval, y_eval = load_arrays(str(eval_spec), evaluation_split(str(eval_spec)) if eval_data is None else None,
                                 real_targets=True)

    with ui.status("importing and calibrating"):
        fixed = quantize_model(model, str(data), policy=policy, method=method, calib_samples=calib_samples,
                               fold_bn=fold_bn, per_channel=per_channel, recalibrate_imported=recalibrate_imported,
                               approximate_scales=approximate_scales)

    result = QuantReport()
    with ui.status("evaluating"), torch.no_grad():
        values = lossless_values(fixed.graph_module, [x_eval[:1]])  # types once, for the report, write and verify
        batches = torch.split(x_eval, samples_per_pass(values))  # small passes: far faster than one big one
        if y_eval is not None:  # accuracy for class outputs, MSE for anything else (qfx_onnx.data.score)
            fixed.set_casts_enabled(False)
            float_score = score(torch.cat([_first(fixed(x)) for x in batches]), y_eval, str(eval_spec))
            fixed.set_casts_enabled(True)
        fixed_out = []  # the report's fixed-point pass gives the fixed-point score too
        result.tensors = measure_tensors(fixed, batches, on_output=lambda out: fixed_out.append(_first(out)))
        if y_eval is not None:
            fixed_score = score(torch.cat(fixed_out), y_eval, str(eval_spec))
            if fixed_score.metric == "accuracy":
                result.float_accuracy, result.fixed_accuracy = float_score.value, fixed_score.value
        result.layers = layer_exactness(fixed, x_eval[:1], values=values)

    # what will be written, built once: verify runs these exact bytes, and only a model that
    # passes is written (verify reads no file that another run may have replaced meanwhile)
    proto = build_annotated(fixed, source=model.name, values=values)
    shown = result.tensors if show_all else _noisiest_in_graph_order(result.tensors, TABLE_ROWS)
    ui.table(tensor_table(QuantReport(tensors=shown)))
    if len(shown) < len(result.tensors):
        ui.line(f"showing the {len(shown)} noisiest of {len(result.tensors)} tensors, in graph order; --all for every one")
    inexact = [layer for layer in result.layers if not layer.exact_float32]
    for layer in inexact:
        ui.warn(f"{layer.tensor}: lossless accumulator {layer.type} ({layer.terms} terms) "
                "exceeds float32's 24 bits; onnxruntime is exact only while partial sums stay small")
    run = {"model": str(model), "output": str(out), "data": data, "eval_data": str(eval_spec), "calibration": method,
           "score": None, "report": None if report is None else str(report), "plot": None if plot is None else str(plot)}
    if y_eval is None:
        ui.line(f"accuracy: none, {eval_spec} has no labels (y)")
    else:
        ui.line(f"{fixed_score.name} on {eval_spec}: float {float_score.value_text()}, fixed point {fixed_score.value_text()}")
        run["score"] = {"metric": fixed_score.metric, "float": float_score.value, "fixed": fixed_score.value,
                        "samples": fixed_score.count}

    if verify:
        with ui.status("verifying in onnxruntime"):
            check = verify_annotated(fixed, proto, x_eval[:verify_samples], values=values)
        result.verify = {"ok": check.ok, "summary": check.summary(), "layers": [asdict(layer) for layer in check.layers]}
        samples = min(verify_samples, len(x_eval))
        if check.ok:
            ui.line(f"verify: onnxruntime matches the emulation bit for bit on {samples} samples ({check.summary()})")
        else:
            ui.final(Text(f"verify on {samples} samples: {check.summary()}", style="red" if check.unexpected else "yellow"))
    if plot is not None:
        from qfx_onnx.profile import plot_profiles, profile_model

        with ui.status("drawing the numerical profile"):
            samples = x_eval[:256]
            plot_profiles([(out.name, profile_model(fixed, samples.split(256)))], plot,
                          title=f"numerical profile on {len(samples)} samples of {Path(str(eval_spec)).name}")
        ui.line(f"profile plot: {plot}")
    report_json = result.to_json()
    if report is not None:  # written either way: it holds the verify details
        write_atomic(report, report_json, what="report")
        ui.line(f"report: {report}")
    if verify and check.unexpected:
        raise QfxError(f"{out}: not written: onnxruntime and the emulation disagree where exactness was guaranteed "
                       f"({', '.join(check.unexpected[:5])}{' ...' if len(check.unexpected) > 5 else ''})")
    save_annotated(proto, fixed, out)
    ui.final(f"wrote {out}")
    ui.result({**run, **json.loads(report_json)})


def _noisiest_in_graph_order(tensors: list, n: int) -> list:
    """The ``n`` tensors with the lowest SQNR, kept in graph order."""
    keep = set(sorted(range(len(tensors)), key=lambda i: tensors[i].sqnr_db)[:n])
    return [t for i, t in enumerate(tensors) if i in keep]


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out
