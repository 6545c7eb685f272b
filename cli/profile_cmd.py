"""``qfx-onnx profile``: every quantized tensor's values against its type, as a plot."""

from __future__ import annotations

from pathlib import Path

import typer

from qfx_onnx.errors import OnnxModelError, QfxError
from qfx_onnx_cli.main import app, console, run_command


@app.command("profile")
def profile(
    models: list[Path] = typer.Argument(..., help="One or more annotated models (*.qfx.onnx), e.g. before and after finetune; "
                                                  "drawn side by side."),
    data: Path = typer.Option(..., "--data", help="Inputs to profile activations on (.npz/.npy or module:function; "
                                                   "the test split of an .npz that has one)."),
    output: Path = typer.Option(Path("profile.png"), "-o", "--output", help="The plot (PNG; .pdf/.svg by suffix)."),
    samples: int = typer.Option(256, "--samples", help="Input samples to run (1 to 100,000)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing plot."),
) -> None:
    """Plot log2|x| of every tensor in graph order against its ap_fixed range (LSB to max), as
    hls4ml's numerical profiling does; matplotlib comes with ``pip install "qfx-onnx[plot]"``."""
    args = dict(locals())
    run_command(lambda: _profile(**args))


def _profile(models, data, output, samples, force) -> None:
    from qfx_onnx.data import load_arrays
    from qfx_onnx.profile import plot_profiles, profile_model
    from qfx_onnx.quant.annotated import read_annotated
    from qfx_onnx.quant.api import evaluation_split

    if not 1 <= samples <= 100_000:
        raise QfxError(f"--samples {samples}: must be from 1 to 100,000")
    for model in models:
        if not model.is_file():
            raise OnnxModelError(f"{model}: no such file")
        if output.exists() and output.resolve() == model.resolve():
            raise QfxError(f"{output}: refusing to overwrite an input model; choose another -o")
    if output.exists() and not force:
        raise QfxError(f"{output} exists; pass --force to overwrite it")
    x, _ = load_arrays(str(data), evaluation_split(str(data)), real_targets=True)
    x = x[:samples]
    measured = []
    for model in models:
        fixed = read_annotated(model)
        measured.append((model.name, profile_model(fixed, x.split(256))))
    path = plot_profiles(measured, output, title=f"numerical profile on {len(x)} samples of {data.name}")
    outside = [(label, p.tensor) for label, profiles in measured for p in profiles
               if p.log2_abs.size and float(p.log2_abs.max()) > p.max_log2]
    console.print(f"wrote {path} ({len(measured[0][1])} tensors, {len(models)} model(s))")
    if outside:
        console.print(f"{len(outside)} tensor(s) hold values beyond their type's range (they saturate or wrap): "
                      + ", ".join(f"{t} ({label})" for label, t in outside[:8]) + (" ..." if len(outside) > 8 else ""))
