"""Shape IR ops: int64 shape arithmetic kept at runtime (a dynamic batch), never quantized, no
type, no cast and no HLS form (the HLS exporter folds them into static shapes). An op whose
output is an integer tensor is the twin listed in ``SHAPE_TWINS``: the same function and ONNX
emission, of kind ``"shape"``."""

from __future__ import annotations

import inspect
from typing import Callable

import torch

from qfx_onnx.ir.defs.arith import add, mul, sub
from qfx_onnx.ir.defs.move import cast, concat, gather, identity, reshape, slice_axes, squeeze, unsqueeze
from qfx_onnx.ir.defs.nonlinear import div
from qfx_onnx.ir.opdef import add as add_op
from qfx_onnx.ir.opdef import ir_op, op_of, shape_twin_of


@ir_op("shape", "Shape")
def shape_of(x, *, start=0, end=None):
    """ONNX Shape: the dims ``start:end`` of ``x`` as an int64 tensor."""
    return torch.tensor(x.shape[start:end], dtype=torch.int64)


def _shape_twin(fn: Callable) -> Callable:
    """Register the "shape"-kind twin of IR op ``fn``: the same function, on int64 shape tensors."""

    def twin(*args, **kwargs):
        return fn(*args, **kwargs)

    twin.__name__ = twin.__qualname__ = f"shape_{fn.__name__}"
    twin.__doc__ = f"``{fn.__name__}`` on integer shape tensors (kind 'shape')."
    twin.__signature__ = inspect.signature(fn)  # same arguments and keywords as fn
    op = shape_twin_of(op_of(fn), twin)
    add_op(op)
    twin.ir_op = op
    return twin


# Module-level names, so that fx code and pickles can refer to each twin.
shape_gather = _shape_twin(gather)
shape_unsqueeze = _shape_twin(unsqueeze)
shape_squeeze = _shape_twin(squeeze)
shape_concat = _shape_twin(concat)
shape_slice_axes = _shape_twin(slice_axes)
shape_reshape = _shape_twin(reshape)
shape_cast = _shape_twin(cast)
shape_identity = _shape_twin(identity)
shape_add = _shape_twin(add)
shape_sub = _shape_twin(sub)
shape_mul = _shape_twin(mul)


@ir_op("shape", "Div")
def shape_div(a, b):
    """Integer division truncating toward zero, as ONNX Div on integers."""
    return torch.div(a, b, rounding_mode="trunc")


SHAPE_TWINS: dict[Callable, Callable] = {
    gather: shape_gather,
    unsqueeze: shape_unsqueeze,
    squeeze: shape_squeeze,
    concat: shape_concat,
    slice_axes: shape_slice_axes,
    reshape: shape_reshape,
    cast: shape_cast,
    identity: shape_identity,
    add: shape_add,
    sub: shape_sub,
    mul: shape_mul,
    div: shape_div,
}
"""The ``"shape"``-kind op that replaces an op when its output is an integer tensor."""
