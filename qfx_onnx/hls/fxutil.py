"""Small helpers over fx graphs for the HLS exporter: node labels for messages, recorded values,
constant detection, and C++ index expressions for broadcasting and reductions."""

from __future__ import annotations

import operator

import numpy as np
import torch
from torch import fx

from qfx_onnx.errors import ExportError
from qfx_onnx.ir.ops import op_of


def label(node: fx.Node) -> str:
    """A one-line, quoted name of a node for messages (ONNX node name where known)."""
    return repr(str(node.meta.get("onnx_node") or node.meta.get("onnx_name") or node.name))


def op_name(node: fx.Node) -> str:
    if node.target is operator.getitem:
        return "getitem"
    op = op_of(node.target)
    return op.name if op is not None else getattr(node.target, "__name__", str(node.target))


class _Recorder(fx.Interpreter):
    """Runs the graph once and keeps every node's value (constants, shape tensors, activations)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[fx.Node, object] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        self.values[n] = out
        return out


def record_values(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> dict[fx.Node, object]:
    """Every node's value for ``inputs`` (float64), computed by the emulation itself."""
    rec = _Recorder(gm)
    with torch.no_grad():
        rec.run(*inputs)
    return rec.values


def const_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose value does not depend on a graph input (parameters, their casts, shape math)."""
    const: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            const.add(node)
        elif node.op in ("call_module", "call_function"):
            deps = node.all_input_nodes
            op = op_of(node.target) if node.op == "call_function" else None
            if (deps and all(d in const for d in deps)) or (op is not None and op.kind == "shape" and not deps):
                const.add(node)
    return const


def is_shape(node: fx.Node) -> bool:
    op = op_of(node.target) if node.op == "call_function" else None
    return op is not None and op.kind == "shape"


def bcast_index(out_shape: tuple[int, ...], in_shape: tuple[int, ...]) -> str:
    """C++ expression of ``i`` (flat index into ``out_shape``) giving the flat index of the
    numpy-broadcast element of an array of ``in_shape``."""
    n_in = int(np.prod(in_shape, dtype=np.int64)) if in_shape else 1
    if n_in == 1:
        return "0"
    rank = len(out_shape)
    if len(in_shape) > rank:
        raise ExportError(f"cannot broadcast shape {in_shape} to {out_shape}")
    padded = (1,) * (rank - len(in_shape)) + tuple(in_shape)
    if padded == tuple(out_shape):
        return "i"
    out_strides = [int(np.prod(out_shape[d + 1:], dtype=np.int64)) for d in range(rank)]
    in_strides = [int(np.prod(padded[d + 1:], dtype=np.int64)) for d in range(rank)]
    terms = []
    for d in range(rank):
        if padded[d] == 1:
            continue
        if padded[d] != out_shape[d]:
            raise ExportError(f"cannot broadcast shape {in_shape} to {out_shape}")
        term = "i" if out_strides[d] == 1 else f"(i / {out_strides[d]})"
        if d > 0 and any(out_shape[e] > 1 for e in range(d)):
            term = f"({term} % {out_shape[d]})"
        terms.append(term if in_strides[d] == 1 else f"{term} * {in_strides[d]}")
    return " + ".join(terms) if terms else "0"


def mixed_radix(var: str, dims: list[tuple[int, int]]) -> str:
    """C++ expression mapping ``var`` (flat over ``dims`` sizes, row-major) to ``sum(coord * stride)``."""
    terms, div = [], 1
    for size, stride in reversed(dims):
        if size > 1:
            t = var if div == 1 else f"({var} / {div})"
            if div * size < int(np.prod([s for s, _ in dims], dtype=np.int64)):
                t = f"({t} % {size})"
            terms.append(t if stride == 1 else f"{t} * {stride}")
        div *= size
    return " + ".join(reversed(terms)) if terms else "0"
