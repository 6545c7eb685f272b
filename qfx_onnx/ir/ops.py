"""IR ops: the torch functions that imported graphs call, one per ONNX-level operation.

Contract (every pass relies on it):

* An IR op is a plain torch function with ONNX semantics and explicit keyword attributes named as
  in ONNX (``strides``, ``pads``, ``group`` ...). It works for float32 and float64 tensors of any
  batch size.
* Numbers that multiply or offset data (BatchNorm scale/shift, LeakyReLU alpha, average-pool
  reciprocals, Clip bounds, Gemm alpha/beta) are never Python scalars inside an op: the importer
  makes them ``get_attr`` constants so the quantizer can give them a fixed-point type. (Only
  ``"nonlinear"`` ops, evaluated by table, keep scalar parameters, e.g. LRN's alpha; clamps to
  0 and 1 in hard_sigmoid are bounds, not factors.)
* ``kind`` tells later passes how the op treats fixed-point values:
    - ``"linear"``: a sum of products (conv, gemm, matmul). Exact in float64 while the lossless
      accumulator fits 53 bits; the result is rounded once, by the cast after it.
    - ``"arith"``: +, -, *, neg, max, min, relu, clip, where: exact in float64 on exact inputs.
    - ``"move"``: data movement (reshape, transpose, concat, slice, pad with zeros, resize-nearest,
      gather): value preserving, the output may inherit the input's type.
    - ``"shape"``: int64 shape arithmetic (Shape and the twins below); never quantized.
    - ``"nonlinear"``: functions that float64 cannot evaluate exactly in hardware terms (sigmoid,
      tanh, softmax ...); the fixed-point graph evaluates them through a lookup table.
* Each op is defined once, beside its rules for every back end, in :mod:`qfx_onnx.ir.defs`
  (see :mod:`qfx_onnx.ir.opdef` for the record and "How to add an IR op"). This module is the
  namespace every caller uses: ``ops.conv``, ``op_of``, ``IR_OPS``.
* ``onnx_op`` is the ONNX op type the annotated-ONNX writer emits by default, copying the op's
  keyword attributes to ONNX attributes; ops that need a different emission define ``emit``.
  Keyword attributes are normalized at import: explicit ``pads`` (auto_pad resolved), non-negative
  axes where the rank is known, and values that ONNX passes as constant inputs in newer opsets
  (``axes``, ``starts``, ``scales`` ...) become keyword lists too. ``sum_pool`` has no ONNX op of
  its own (``onnx_op`` None): a writer emits it, e.g., as AveragePool times the window size.
  Multi-input ops whose ONNX form takes these as inputs (ReduceSum-13, Resize ...) likewise need
  the writer to turn keywords back into inputs.
* Positional arguments are tensors (fx nodes in the graph), None for an absent optional input,
  or for ``reshape`` a tuple of ints; ``concat`` takes a list and ``nary_sum`` varargs.
* ``split`` is the one multi-output op: it returns a tuple, read by ``operator.getitem`` nodes.
* An op whose output is an integer tensor (shape arithmetic) is the ``"shape"``-kind twin listed
  in ``SHAPE_TWINS`` (``shape_gather`` for ``gather`` ...): same semantics, never quantized.
"""

from __future__ import annotations

from qfx_onnx.ir.defs.arith import (
    add, clip, global_max_pool, hard_sigmoid, hard_swish, leaky_relu, max_pool, mul, nary_sum, neg, prelu, reduce_sum, relu,
    sub, sum_pool,
)
from qfx_onnx.ir.defs.linear import conv, conv_transpose, gemm, matmul
from qfx_onnx.ir.defs.move import (
    cast, concat, fixed_cast, flatten, gather, identity, pad, reshape, resize, slice_axes, split, squeeze, transpose, unsqueeze,
)
from qfx_onnx.ir.defs.nonlinear import div, log_softmax, lrn, sigmoid, softmax, tanh
from qfx_onnx.ir.defs.transformer import erf, exp, gelu, layer_norm, reciprocal, reduce_max, sqrt
from qfx_onnx.ir.defs.shape import (
    SHAPE_TWINS, shape_add, shape_cast, shape_concat, shape_div, shape_gather, shape_identity, shape_mul, shape_of,
    shape_reshape, shape_slice_axes, shape_squeeze, shape_sub, shape_unsqueeze,
)
from qfx_onnx.ir.geometry import nearest_indices, pool_output_size, pool_padding, resize_output_length, torch_dtype
from qfx_onnx.ir.opdef import IR_OPS, KINDS, HlsForm, IrOp, NoHls, OpDef, TypeQuery, ir_op, op_of

__all__ = [
    "IR_OPS", "KINDS", "SHAPE_TWINS", "HlsForm", "IrOp", "NoHls", "OpDef", "TypeQuery", "ir_op", "op_of",
    "nearest_indices", "pool_output_size", "pool_padding", "resize_output_length", "torch_dtype",
    *sorted(IR_OPS),
]
