"""IR ops: the torch functions that imported graphs call, one per ONNX-level operation.

Contract (every pass relies on it):

* An IR op is a plain torch function with ONNX semantics and explicit keyword attributes named as
  in ONNX (``strides``, ``pads``, ``group`` ...). It works for float32 and float64 tensors of any
  batch size.
* Numbers that multiply or offset data (BatchNorm scale/shift, LeakyReLU alpha, average-pool
  reciprocals, Clip bounds, Gemm alpha/beta) are never Python scalars inside an op: the importer
  makes them ``get_attr`` constants so the quantizer can give them a fixed-point type.
* ``kind`` tells later passes how the op treats fixed-point values:
    - ``"linear"``: a sum of products (conv, gemm, matmul). Exact in float64 while the lossless
      accumulator fits 53 bits; the result is rounded once, by the cast after it.
    - ``"arith"``: +, -, *, neg, max, min, relu, clip, where: exact in float64 on exact inputs.
    - ``"move"``: data movement (reshape, transpose, concat, slice, pad with zeros, resize-nearest,
      gather): value preserving, the output may inherit the input's type.
    - ``"shape"``: int64 shape arithmetic (Shape, ConstantOfShape ...); never quantized.
    - ``"nonlinear"``: functions that float64 cannot evaluate exactly in hardware terms (sigmoid,
      tanh, softmax ...); the fixed-point graph evaluates them through a lookup table.
* ``onnx_op`` is the ONNX op type the annotated-ONNX writer emits by default, copying the op's
  keyword attributes to ONNX attributes; ops that need a different emission register an emitter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

IR_OPS: dict[str, "IrOp"] = {}

KINDS = ("linear", "arith", "move", "shape", "nonlinear")


@dataclass(frozen=True)
class IrOp:
    name: str
    fn: Callable
    kind: str
    onnx_op: str | None


def ir_op(kind: str, onnx_op: str | None = None) -> Callable[[Callable], Callable]:
    """Register ``fn`` as an IR op of ``kind``; the function itself is the fx call target."""
    if kind not in KINDS:
        raise ValueError(f"unknown IR op kind {kind!r}")

    def register(fn: Callable) -> Callable:
        op = IrOp(fn.__name__, fn, kind, onnx_op)
        if op.name in IR_OPS:
            raise ValueError(f"IR op {op.name!r} registered twice")
        IR_OPS[op.name] = op
        fn.ir_op = op
        return fn

    return register


def op_of(target: object) -> IrOp | None:
    """The IR op behind an fx ``call_function`` target, or None for anything else."""
    return getattr(target, "ir_op", None)
