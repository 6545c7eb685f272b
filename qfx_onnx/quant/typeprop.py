"""Lossless type propagation: the exact ``ap_fixed`` type of every value in a fixed-point graph.

Casts fix a type; every other op produces the full-precision type HLS derives for it (``a*b``,
``a+b``, a sum of K products, max, data movement), by the ``type_rule`` defined beside the op in
:mod:`qfx_onnx.ir.defs`. This is what makes results independent of
summation order, tells where float64 (53 bits) and float32 (24 bits) evaluation stay exact, and
gives the HLS generator a type for every intermediate. Nonlinear ops (sigmoid, softmax ...) give
no fixed type: their float result is only meaningful after the cast that follows them.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np
import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp

from qfx_onnx.fixed.types import FixedType, union_type
from qfx_onnx.ir.ops import TypeQuery, op_of

@dataclass
class ValueInfo:
    """What type propagation knows about one fx node's output."""

    type: FixedType | None  # None: not a fixed-point value (shape ints, nonlinear float results)
    shape: tuple[int, ...] | None
    terms: int = 1  # products summed by a linear op / elements summed by a pooling sum

    @property
    def exact_float64(self) -> bool:
        return self.type is None or self.type.width <= 53

    @property
    def exact_float32(self) -> bool:
        return self.type is None or self.type.width <= 24


def exact_type_of(values: np.ndarray, max_frac: int = 64) -> FixedType | None:
    """The narrowest ap_fixed holding every value exactly (uncast constants), or None."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0 or not np.all(np.isfinite(v)):
        return None
    for frac in range(-64, max_frac + 1):
        codes = np.ldexp(v, frac)
        if np.all(codes == np.round(codes)):
            break
    else:
        return None
    lo, hi = int(codes.min()), int(codes.max())
    signed = lo < 0
    bits = max(int(hi).bit_length(), int(-lo - 1).bit_length() if signed else 0) + (1 if signed else 0)
    bits = max(bits, 1)
    if bits > 64:
        return None
    return FixedType(bits, bits - frac, signed=signed)


def propagate(graph_module: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...]) -> dict[fx.Node, ValueInfo]:
    """ValueInfo for every node, using one forward pass on ``example_inputs`` for static shapes."""
    ShapeProp(graph_module).propagate(*example_inputs)
    info: dict[fx.Node, ValueInfo] = {}
    for node in graph_module.graph.nodes:
        shape = _shape(node)
        if node.op == "placeholder":
            info[node] = ValueInfo(None, shape)
        elif node.op == "get_attr":
            info[node] = ValueInfo(_attr_type(graph_module, node), shape)
        elif node.op == "call_module":
            module = graph_module.get_submodule(node.target)
            types = module.frozen_types()
            info[node] = ValueInfo(types[0] if len(types) == 1 else union_type(*types), shape)
        elif node.op == "call_function":
            t, terms = _function_type(node, info)
            info[node] = ValueInfo(t, shape, terms)
        else:
            info[node] = ValueInfo(None, None)
    return info


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _attr_type(gm: fx.GraphModule, node: fx.Node) -> FixedType | None:
    value = gm
    for part in node.target.split("."):
        value = getattr(value, part)
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return None
    return exact_type_of(value.detach().cpu().numpy())


def _t(info: dict[fx.Node, ValueInfo], arg) -> FixedType | None:
    return info[arg].type if isinstance(arg, fx.Node) else None


def _function_type(node: fx.Node, info: dict[fx.Node, ValueInfo]) -> tuple[FixedType | None, int]:
    """The op's own type rule (:attr:`~qfx_onnx.ir.opdef.IrOp.type_rule`) on its inputs' types."""
    if node.target is operator.getitem:
        return _t(info, node.args[0]), 1
    op = op_of(node.target)
    if op is None:
        return None, 1
    types = [_t(info, a) for a in node.args if isinstance(a, fx.Node)]
    if op.kind in ("linear", "arith") and any(t is None for t in types):
        return None, 1  # a float operand somewhere upstream: nothing exact to say
    return op.type_rule(TypeQuery(node, types, info))
