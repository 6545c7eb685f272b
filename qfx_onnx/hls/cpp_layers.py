"""The fixed part of every generated project: ``firmware/layers.h``, one template per built-in
layer kind, shipped as the package file ``qfx_onnx/hls/templates/layers.h`` (this name is kept
for callers of ``LAYERS_H``).

Each template loops over a layer's outputs; what differs per layer (sizes, the accumulator and
weight types, index maps, the fused element-wise chain ``epilogue``, K-hot ``mac`` bodies) comes
from the layer's generated ``CONFIG_T`` struct in ``parameters.h``. Arrays are flat, row-major,
batch 1. Accumulators are the lossless types of :mod:`qfx_onnx.quant.typeprop`, so every ``+=``
is exact and the only rounding is the quantizer cast inside ``epilogue``.
"""

from qfx_onnx.hls.files import header

LAYERS_H = header("layers.h")
