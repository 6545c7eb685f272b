"""``qfx-onnx profile``: every quantized tensor's values against its type, as a plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from qfx_onnx.errors import OnnxModelError, QfxError
from qfx_onnx_cli.main import QfxCommand, app, run_command
from qfx_onnx_cli.options import Force, Json, Quiet, _data, check_new_file
from qfx_onnx_cli.output import Output

MAX_SAMPLES = 100_000

Models = Annotated[list[Path], typer.Argument(metavar="MODEL...", show_default=False,
                                              help="One or more annotated models (.qfx.onnx), e.g. before and after "
                                                   "finetune; drawn side by side.")]
ProfileData = _data("Runs the models on them to profile activations (the test split of an .npz that has one; "
                    "y is ignored).", False)


@app.command("profile", cls=QfxCommand)
def profile(
    models: Models,
    data: ProfileData,
    output: Path = typer.Option(Path("profile.png"), "-o", "--output", metavar="FILE",
                                help="The plot to write (PNG; PDF or SVG by its suffix)."),
    samples: int = typer.Option(256, "--samples", help=f"Input samples to run (1 to {MAX_SAMPLES:,})."),
    force: Force = False,
    quiet: Quiet = False,
    json_output: Json = False,
) -> None:
    """Plot log2|x| of every tensor in graph order against its ap_fixed range (LSB to max), as
    hls4ml's numerical profiling does; matplotlib comes with pip install "qfx-onnx\\[plot]".

    --json: output, data, samples, models (name, tensors: tensor, role, type, lsb_log2, max_log2,
    max_seen_log2, zeros, count, beyond_range), beyond_range (model and tensor of each tensor
    holding values beyond its type's range).
    """
    args = dict(locals())
    ui = Output(json_mode=args.pop("json_output"), quiet=args.pop("quiet"))
    run_command(lambda: _profile(**args, ui=ui))


def _profile(models: list[Path], data: str, output: Path, samples: int, force: bool, ui: Output) -> None:
    from qfx_onnx.data import load_arrays
    from qfx_onnx.profile import plot_profiles, profile_model
    from qfx_onnx.quant.annotated import read_annotated
    from qfx_onnx.quant.api import evaluation_split

    if not 1 <= samples <= MAX_SAMPLES:
        raise QfxError(f"--samples {samples}: must be from 1 to {MAX_SAMPLES:,}")
    for model in models:
        if not model.is_file():
            raise OnnxModelError(f"{model}: no such file")
        if output.exists() and output.resolve() == model.resolve():
            raise QfxError(f"{output}: refusing to overwrite an input model; choose another -o")
    check_new_file(output, force)
    x, _ = load_arrays(data, evaluation_split(data), real_targets=True)
    x = x[:samples]
    measured = []
    for model in ui.track(models, "profiling"):
        fixed = read_annotated(model)
        measured.append((model.name, profile_model(fixed, x.split(256))))
    with ui.status("drawing the plot"):
        path = plot_profiles(measured, output, title=f"numerical profile on {len(x)} samples of {Path(data).name}")
    outside = [(label, p.tensor) for label, profiles in measured for p in profiles if _beyond(p)]
    ui.final(f"wrote {path} ({len(measured[0][1])} tensors, {len(models)} model(s), {len(x)} samples)")
    if outside:
        ui.warn(f"{len(outside)} tensor(s) hold values beyond their type's range (they saturate or wrap): "
                + ", ".join(f"{t} ({label})" for label, t in outside[:8]) + (" ..." if len(outside) > 8 else ""))
    ui.result({"output": str(path), "data": data, "samples": len(x),
               "models": [{"name": label, "tensors": [_tensor_json(p) for p in profiles]} for label, profiles in measured],
               "beyond_range": [{"model": label, "tensor": t} for label, t in outside]})


def _beyond(p) -> bool:
    """Whether some value of the profile lies beyond its type's largest magnitude by half an LSB
    or more, so that even rounding to nearest cannot bring it back into range (a value just above
    the maximum that rounds down to it is not an overflow)."""
    return bool(p.log2_abs.size) and float(p.log2_abs.max()) >= math.log2(2.0 ** p.max_log2 + 2.0 ** p.lsb_log2 / 2)


def _tensor_json(p) -> dict:
    return {"tensor": p.tensor, "role": p.role, "type": p.type_text, "lsb_log2": p.lsb_log2, "max_log2": p.max_log2,
            "max_seen_log2": float(p.log2_abs.max()) if p.log2_abs.size else None, "zeros": p.zeros, "count": p.count,
            "beyond_range": _beyond(p)}
