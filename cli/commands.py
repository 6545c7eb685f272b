"""Imports every command module so that each registers itself on the typer app."""
from qfx_onnx_cli import quantize_cmd  # noqa: F401
from qfx_onnx_cli import inspect_cmd  # noqa: F401
from qfx_onnx_cli import finetune_cmd  # noqa: F401
from qfx_onnx_cli import export_hls_cmd  # noqa: F401
from qfx_onnx_cli import profile_cmd  # noqa: F401
from qfx_onnx_cli import export_qonnx_cmd  # noqa: F401
