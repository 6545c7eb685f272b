"""Fixed-point nonlinear units (tables) and the softmax / LayerNormalization kernels.

One definition, three executions: the torch emulation (:mod:`.units`, :mod:`.kernels`, on
:mod:`qfx_onnx.fixed.tables`), the ONNX form (:mod:`.onnx_emit`) and the C++ form
(``cpp/nnet_qfx_nonlinear.h`` with structs from :mod:`.cpp_emit`), equal bit for bit.
"""

from qfx_onnx.fixed.tables import Log2Index, LookupTable, TableIndex
from qfx_onnx.nonlinear.kernels import (
    LayerNormConfig, SoftmaxConfig, layer_norm, layer_norm_exact, softmax, softmax_exact,
)
from qfx_onnx.nonlinear.units import (
    erf_table, exp_table, gelu_table, max_abs_error, reciprocal_table, rsqrt_table, sigmoid_table,
    tanh_table,
)

__all__ = [
    "LookupTable", "TableIndex", "Log2Index", "SoftmaxConfig", "LayerNormConfig", "softmax", "softmax_exact",
    "layer_norm", "layer_norm_exact", "exp_table", "reciprocal_table", "rsqrt_table", "erf_table",
    "gelu_table", "sigmoid_table", "tanh_table", "max_abs_error",
]
