"""``python -m qfx_onnx_cli``: the same as the ``qfx-onnx`` command."""

from qfx_onnx_cli.main import app

app(prog_name="qfx-onnx")
