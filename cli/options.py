"""Every option that more than one command takes, declared once as a typer ``Annotated`` alias.

A command spells a shared option by using its alias here, so the flag, its type, its metavar, its
help and its default read the same in every ``--help``. Choices come from the library's enums
(:class:`~qfx_onnx.fixed.types.QuantMode`, :class:`~qfx_onnx.fixed.types.OverflowMode`,
:class:`~qfx_onnx.fixed.quantizer.CalibrationMethod`, :class:`~qfx_onnx.hls.export.IoMode`) and
are checked by the library, which reports a bad value as a one-line error.

Options whose default is "not given" (a ``--config`` value or the model's own width wins) show
the effective default as text: typer prints it as ``[default: (8)]``.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from qfx_onnx.errors import QfxError
from qfx_onnx.fixed.quantizer import CalibrationMethod
from qfx_onnx.fixed.types import OverflowMode, QuantMode
from qfx_onnx.hls.export import IoMode

DEFAULT_CALIBRATION = CalibrationMethod.MAX.value


def choices(enum: type[Enum]) -> str:
    """``a, b or c``: the values of a library enum, for help text."""
    values = [m.value for m in enum]
    return ", ".join(values[:-1]) + " or " + values[-1]


# --- what goes in ------------------------------------------------------------------------------

FloatModel = Annotated[Path, typer.Argument(metavar="MODEL", help="Float ONNX model.", show_default=False)]
AnnotatedModel = Annotated[Path, typer.Argument(metavar="MODEL", show_default=False,
                                                help="Annotated ONNX written by qfx-onnx quantize or finetune (.qfx.onnx).")]

_DATA_FORMS = ".npz (x, optional y, optional train_idx/test_idx), .npy (x only) or module:function"


def _data(purpose: str, default: str | bool) -> object:
    """``--data`` for one command: the same flag, type and forms everywhere; ``purpose`` says what
    the command does with it, ``default`` what it uses when the flag is left out (False: required)."""
    return Annotated[str | None, typer.Option("--data", metavar="DATA", show_default=default,
                                              help=f"Samples: {_DATA_FORMS}. {purpose}")]


InspectData = _data("Checks they fit the model and reports the float accuracy (class labels y) or MSE "
                    "(real-valued y).", "none")
CalibrationData = _data("Calibrates the binary points; the test split (or --eval-data) measures the result.",
                        "the one .npz beside the model")
TrainingData = _data("Trains on the train split (every row without train_idx); evaluates on the test split.", False)
TestData = _data("Inputs of the testbench vectors (the test split when there is one; y is ignored).",
                 "the one .npz beside the model, else random input codes (with a warning)")
EvalData = Annotated[str | None, typer.Option("--eval-data", metavar="DATA", show_default="the test split of --data",
                                              help=f"Evaluation samples: {_DATA_FORMS}.")]

# --- what comes out ----------------------------------------------------------------------------

Force = Annotated[bool, typer.Option("--force", help="Replace outputs that already exist (never the input model).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No tables, progress or details: only warnings, errors "
                                                           "and the final line.")]
Json = Annotated[bool, typer.Option("--json", help="Print the result as one JSON object on stdout (non-finite "
                                                   "numbers as the strings \"inf\", \"-inf\", \"nan\"); messages for "
                                                   "people go to stderr.")]
Verify = Annotated[bool, typer.Option("--verify/--no-verify", help="Run the written ONNX in onnxruntime and compare "
                                                                   "it with the emulation bit for bit.")]

# --- precision ---------------------------------------------------------------------------------

Calibration = Annotated[str, typer.Option("--calibration", metavar="METHOD",
                                          help=f"How a binary point is set from data: {choices(CalibrationMethod)}.")]
CalibrationAlias = Annotated[str | None, typer.Option("--method", hidden=True, help="Old name of --calibration.")]
CalibSamples = Annotated[int, typer.Option("--calib-samples", help="Samples used to calibrate binary points.")]
PerChannel = Annotated[bool, typer.Option("--per-channel", help="One binary point per output channel of each weight.")]


def _bits(flag: str, what: str, default: str) -> object:
    return Annotated[int | None, typer.Option(flag, metavar="BITS", show_default=default, help=f"Total width W of {what}.")]


# quantize: widths of the new model (a --config file's [defaults] come before these defaults)
WeightBits = _bits("--weight-bits", "weights", "8")
BiasBits = _bits("--bias-bits", "biases", "16")
ActBits = _bits("--act-bits", "layer outputs and activations", "8")
ElementwiseBits = _bits("--elementwise-bits", "BatchNorm, residual adds, pooling and their constants", "8")
InputBits = _bits("--input-bits", "the model input", "--act-bits")

# finetune: new widths of an annotated model (binary points recalibrated before training)
NewWeightBits = _bits("--weight-bits", "weights", "unchanged")
NewBiasBits = _bits("--bias-bits", "biases", "unchanged")
NewActBits = _bits("--act-bits", "layer outputs and activations", "unchanged")
NewElementwiseBits = _bits("--elementwise-bits", "BatchNorm, residual adds, pooling and their constants", "unchanged")
NewInputBits = _bits("--input-bits", "the model input", "--act-bits")

Rounding = Annotated[str | None, typer.Option("--rounding", metavar="MODE", show_default=QuantMode.RND.value,
                                              help=f"Quantization mode: {choices(QuantMode)} (AP_ optional).")]
Overflow = Annotated[str | None, typer.Option("--overflow", metavar="MODE", show_default=OverflowMode.SAT.value,
                                              help=f"Overflow mode: {choices(OverflowMode)} (AP_ optional).")]
SatBits = Annotated[int | None, typer.Option("--sat-bits", metavar="N", show_default="0",
                                             help="Saturation bits N of the overflow mode.")]
Io = Annotated[str, typer.Option("--io", metavar="IO", help=f"Interface: {choices(IoMode)} "
                                                            "(parallel: arrays; stream: hls::stream ports, DATAFLOW).")]


def calibration_method(calibration: str, alias: str | None) -> str:
    """The method from ``--calibration`` or its old spelling ``--method``; QfxError for an unknown
    name or for both spellings at once."""
    if alias is not None:
        if calibration != DEFAULT_CALIBRATION and calibration != alias:
            raise QfxError(f"--method {alias!r} and --calibration {calibration!r}: give one (--method is the old name)")
        calibration, flag = alias, "--method"
    else:
        flag = "--calibration"
    try:
        return CalibrationMethod(calibration).value
    except ValueError:
        raise QfxError(f"{flag} {calibration!r}: choose {choices(CalibrationMethod)}") from None


def find_default_data(model: Path) -> Path | None:
    """The one ``.npz`` beside ``model``, or None (none, or several: ambiguous). The shipped
    models sit next to their dataset, and quantize/finetune outputs next to their input's."""
    found = sorted(model.parent.glob("*.npz"))
    return found[0] if len(found) == 1 else None


def check_new_file(path: Path, force: bool) -> None:
    """QfxError unless ``path`` may be written: it does not exist, or ``force`` replaces a file.

    The wording is export-hls's for its project folder, so every command reads the same."""
    if path.is_dir():
        raise QfxError(f"{path} is a folder: choose a file name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():  # checked before any work, not after it
        raise QfxError(f"{parent}: output folder does not exist")
    if path.exists() and not force:
        raise QfxError(f"{path} already exists: pass --force to replace it")
