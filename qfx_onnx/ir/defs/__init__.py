"""The IR op definitions, one module per family; importing this package registers every op.

A new op family (or a single new op) is one more module here, named in the list below.
"""

from qfx_onnx.ir.defs import linear, arith, move, nonlinear, transformer, shape  # noqa: F401  (order: shape twins last)

FAMILIES = (linear, arith, move, nonlinear, transformer, shape)
