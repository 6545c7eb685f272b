"""qfx-onnx: float ONNX models to bit-exact ap_fixed fixed-point models."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("qfx-onnx")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+source"
from qfx_onnx.importer import load_onnx  # noqa: E402,F401 - the public entry point
