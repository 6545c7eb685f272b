"""``qfx-onnx quantize``: whole-model post-training quantization to an annotated ONNX."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
import typer
from rich.text import Text

from qfx_onnx.errors import DataError, OnnxModelError, QfxError
from qfx_onnx_cli.main import app, console, run_command

CALIB_METHODS = ("max", "percentile", "mse")


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


@app.command()
def quantize(
    model: Path = typer.Argument(..., help="Float ONNX model."),
    data: Path | None = typer.Option(None, "--data", help="Calibration data: .npz (x, y), .npy or module:function. Default: the one .npz beside the model."),
    output: Path | None = typer.Option(None, "-o", "--output", help="Annotated ONNX to write (default: <model>.qfx.onnx)."),
    calib_samples: int = typer.Option(512, help="Number of samples used to calibrate binary points."),
    method: str = typer.Option("max", help="Calibration: max, percentile or mse."),
    weight_bits: int | None = typer.Option(None, help="Width of weights [default 8]."),
    bias_bits: int | None = typer.Option(None, help="Width of biases [default 16]."),
    act_bits: int | None = typer.Option(None, help="Width of layer outputs and activations [default 8]."),
    elementwise_bits: int | None = typer.Option(None, help="Width of BatchNorm, residual adds, pooling and their constants [default 8]."),
    input_bits: int | None = typer.Option(None, help="Width of the model input [default: act bits]."),
    rounding: str | None = typer.Option(None, help="Quantization mode, e.g. AP_RND, AP_TRN, AP_RND_CONV [default AP_RND]."),
    overflow: str | None = typer.Option(None, help="Overflow mode: AP_SAT, AP_WRAP, AP_SAT_SYM, AP_SAT_ZERO, AP_WRAP_SM [default AP_SAT]."),
    sat_bits: int | None = typer.Option(None, help="N saturation bits for the overflow mode [default 0]."),
    config: Path | None = typer.Option(None, "--config", help="TOML/JSON precision config with per-layer overrides."),
    fold_bn: bool = typer.Option(False, "--fold-bn", help="Fold BatchNorm into the preceding conv/Gemm instead of keeping it as a fixed-point affine."),
    per_channel: bool = typer.Option(False, "--per-channel", help="Per-output-channel binary points for weights."),
    eval_data: Path | None = typer.Option(None, "--eval-data", help="Data for the report, verify and accuracy (class labels y) or MSE (real-valued y) "
                                                                 "(default: the test split of --data)."),
    report: Path | None = typer.Option(None, "--report", help="Write the per-tensor report as JSON."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Run the written ONNX in onnxruntime and compare bit for bit."),
    verify_samples: int = typer.Option(64, help="Samples used by --verify."),
    show_all: bool = typer.Option(False, "--show-all", help="Show every tensor in the table (default: the 25 noisiest)."),
) -> None:
    """Quantize every tensor of a float ONNX model to ap_fixed and write an annotated ONNX."""
    args = dict(locals())
    run_command(lambda: _quantize(**args))


def _quantize(model, data, output, calib_samples, method, weight_bits, bias_bits, act_bits, elementwise_bits,
              input_bits, rounding, overflow, sat_bits, config, fold_bn, per_channel, eval_data, report, verify,
              verify_samples, show_all) -> None:
    from qfx_onnx.data import load_arrays, score
    from qfx_onnx.fixed.types import OverflowMode, QuantMode
    from qfx_onnx.quant.annotated import verify_annotated, write_annotated
    from qfx_onnx.quant.api import evaluation_split, quantize as quantize_model
    from qfx_onnx.quant.policy import load_policy, parse_mode
    from qfx_onnx.quant.report import QuantReport, layer_exactness, measure_tensors, tensor_table

    if not model.is_file():
        raise OnnxModelError(f"{model}: no such file")
    if method not in CALIB_METHODS:
        raise QfxError(f"--method {method!r}: choose one of {', '.join(CALIB_METHODS)}")
    out = resolve_output(model, output)
    if data is None:
        data = find_default_data(model)
        if data is None:
            raise DataError(f"{model}: no calibration data; pass --data data.npz")
        console.print(f"calibration data: {data}")
    policy = load_policy(config, weight_bits=weight_bits, bias_bits=bias_bits, act_bits=act_bits,
                         elementwise_bits=elementwise_bits, input_bits=input_bits,
                         rounding=parse_mode(QuantMode, rounding), overflow=parse_mode(OverflowMode, overflow),
                         sat_bits=sat_bits)
    eval_spec = eval_data or data
    x_eval, y_eval = load_arrays(str(eval_spec), evaluation_split(str(eval_spec)) if eval_data is None else None,
                                 real_targets=True)

    with console.status("importing and calibrating"):
        fixed = quantize_model(model, str(data), policy=policy, method=method, calib_samples=calib_samples,
                               fold_bn=fold_bn, per_channel=per_channel)

    result = QuantReport()
    with console.status("evaluating"), torch.no_grad():
        if y_eval is not None:  # accuracy for class outputs, MSE for anything else (qfx_onnx.data.score)
            fixed.set_casts_enabled(False)
            float_score = score(_first(fixed(x_eval)), y_eval, str(eval_spec))
            fixed.set_casts_enabled(True)
            fixed_score = score(_first(fixed(x_eval)), y_eval, str(eval_spec))
            if fixed_score.metric == "accuracy":
                result.float_accuracy, result.fixed_accuracy = float_score.value, fixed_score.value
        result.tensors = measure_tensors(fixed, torch.split(x_eval, 256))
        result.layers = layer_exactness(fixed, x_eval[:1])

    write_annotated(fixed, out, source=model.name)
    console.print(f"wrote {out}")
    noisiest = sorted(result.tensors, key=lambda t: t.sqnr_db)
    result_view = QuantReport(tensors=result.tensors if show_all else noisiest[:25])
    console.print(tensor_table(result_view))
    inexact = [layer for layer in result.layers if not layer.exact_float32]
    for layer in inexact:
        console.print(Text.assemble(("note:", "yellow"), f" {layer.tensor}: lossless accumulator {layer.type} ({layer.terms} terms) "
                                    "exceeds float32's 24 bits; onnxruntime is exact only while partial sums stay small"))
    if y_eval is None:
        console.print(f"accuracy: none, {eval_spec} has no labels (y)")
    else:
        console.print(f"{fixed_score.name} on {eval_spec}: float {float_score.value_text()}, fixed point {fixed_score.value_text()}")

    if verify:
        with console.status("verifying in onnxruntime"):
            check = verify_annotated(fixed, out, x_eval[:verify_samples])
        result.verify = {"ok": check.ok, "summary": check.summary(), "layers": [asdict(layer) for layer in check.layers]}
        samples = min(verify_samples, len(x_eval))
        if check.ok:
            console.print(f"verify: onnxruntime matches the emulation bit for bit on {samples} samples ({check.summary()})")
        else:
            console.print(Text(f"verify on {samples} samples: {check.summary()}", style="red" if check.unexpected else "yellow"))
    if report is not None:
        _write_text(report, result.to_json())
        console.print(f"report: {report}")
    if verify and check.unexpected:
        raise QfxError("onnxruntime and the emulation disagree where exactness was guaranteed (see above)")


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)

