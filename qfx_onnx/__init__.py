"""qfx-onnx: float ONNX models to bit-exact ap_fixed fixed-point models.

The public entry points: :func:`load_onnx` (ONNX -> torch.fx IR), :func:`quantize` (whole-model
PTQ -> :class:`FixedPointModel`), :func:`write_annotated` / :func:`read_annotated` (the annotated
ONNX), :func:`export_qonnx` (the annotated ONNX as QONNX), :class:`FixedType` and :func:`cast`
(exact ``ap_fixed`` emulation on torch tensors).
"""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("qfx-onnx")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+source"

from qfx_onnx.fixed import FixedType, cast, cast_codes  # noqa: E402
from qfx_onnx.importer import load_onnx  # noqa: E402
from qfx_onnx.quant.annotated import read_annotated, verify_annotated, write_annotated  # noqa: E402
from qfx_onnx.quant.api import quantize  # noqa: E402
from qfx_onnx.qonnx_export import export_qonnx  # noqa: E402
from qfx_onnx.quant.quantize import FixedPointModel  # noqa: E402

__all__ = [
    "FixedPointModel", "FixedType", "cast", "cast_codes", "export_qonnx", "load_onnx", "quantize", "read_annotated",
    "verify_annotated", "write_annotated",
]
