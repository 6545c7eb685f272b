"""The qfx-onnx command line (installed as the ``qfx_onnx_cli`` package)."""
