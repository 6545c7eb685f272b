"""The annotated ONNX form of an exact nonlinear op, and its read-back.

Written (:func:`emit_exact`, the ``emit`` of every op in :data:`~qfx_onnx.nonlinear.wiring.EXACT_OPS`
that carries a ``fixed`` spec): the float32 inputs are cast to double, the op's definition is
emitted with :mod:`qfx_onnx.nonlinear.onnx_emit` (index cast, Gather on the table, kernels; every
value float64-exact), and a final ``Cast`` to float (exact: the result type is at most 24 bits
wide) writes the op's output. That last node carries the node metadata ``qfx.nonlinear``: a JSON
object with the IR op, its input tensors and its keywords (the spec included).

Read (:func:`collapse_exact`, before the importer runs): each tagged node becomes one node of the
domain ``qfx.nonlinear`` (op type = the IR op, attributes = the keywords) on the recorded inputs,
the emission's inner nodes and tables are dropped, and the importer's converters of that domain
(:mod:`qfx_onnx.importer.nonlinear_ops`) give back the IR op with the same spec.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper

from qfx_onnx.errors import ExportError
from qfx_onnx.fixed.types import FixedType
from qfx_onnx.nonlinear import wiring
from qfx_onnx.nonlinear.onnx_emit import OnnxBuilder, emit_cast, emit_softmax, emit_table

NL_DOMAIN = "qfx.nonlinear"
NL_KEY = "qfx.nonlinear"
INNER = "::nl_"  # the inner nodes' and tables' names contain this


def _emit_layer_norm(b: OnnxBuilder, x: str, gamma: str, beta: str | None, cfg) -> str:
    """:func:`~qfx_onnx.nonlinear.kernels.layer_norm_exact` with gamma/beta as tensors."""
    axes = b.const([-1], dtype=np.int64)
    inv_n = b.const(cfg.inv_n)
    mean = emit_cast(b, b.op("Mul", b.op("ReduceSum", x, axes, keepdims=1), inv_n), cfg.mean_type)
    c = b.op("Sub", x, mean)
    var = emit_cast(b, b.op("Mul", b.op("ReduceSum", b.op("Mul", c, c), axes, keepdims=1), inv_n), cfg.var_type)
    z = emit_cast(b, b.op("Mul", c, emit_table(b, var, cfg.rsqrt)), cfg.norm_type)
    g = emit_cast(b, gamma, cfg.gamma_type)
    shift = emit_cast(b, beta, cfg.beta_type) if beta else b.const(0.0)
    return emit_cast(b, b.op("Add", b.op("Mul", z, g), shift), cfg.out_type)


def emit_exact(w, node, out: str, name: str) -> None:
    """Write the exact form of ``node`` (an op with a ``fixed`` spec) through the annotated writer ``w``."""
    op = node.target.ir_op.name
    text = node.kwargs["fixed"]
    spec = wiring.parse_spec(text)
    cfg = wiring.build(op, text, node.kwargs.get("approximate", "none"))
    b = OnnxBuilder(prefix=out + INNER.rstrip("_"))
    inputs = [w.arg(a) for a in node.args]
    dbl = [b.op("Cast", i, to=TensorProto.DOUBLE) if i else "" for i in inputs]
    x = emit_cast(b, dbl[0], FixedType.parse(spec["in"])) if "in" in spec else dbl[0]
    if op in wiring.TABLE_OPS:
        y = emit_table(b, x, cfg)
    elif op == "softmax":
        rank = len(w.shape(node.args[0], f"{name}: softmax"))
        if node.kwargs.get("axis", -1) % rank != rank - 1:
            raise ExportError(f"node {name!r}: exact softmax over a non-last axis has no ONNX form yet")
        y = emit_softmax(b, x, cfg)
    elif op == "layer_norm":
        y = _emit_layer_norm(b, x, dbl[1], dbl[2] if len(dbl) > 2 else "", cfg)
    else:  # div
        bq = emit_cast(b, dbl[1], FixedType.parse(spec["b"]))
        y = emit_cast(b, b.op("Mul", dbl[0], emit_table(b, bq, cfg)), FixedType.parse(spec["out"]))
    w.extend(b.nodes, b.initializers)
    w.node("Cast", [y], [out], name, to=TensorProto.FLOAT)
    entry = w.nodes[-1].metadata_props.add()
    kwargs = {k: v for k, v in node.kwargs.items() if v is not None}
    entry.key, entry.value = NL_KEY, json.dumps({"ir_op": op, "inputs": inputs, "kwargs": kwargs})


def collapse_exact(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[onnx.ValueInfoProto]]:
    """A copy of ``model`` with every tagged exact emission back to one ``qfx.nonlinear`` node
    (see the module docstring; ``model`` itself if it has none), and the inferred types of those
    nodes' outputs (ONNX shape inference knows nothing of the ``qfx.nonlinear`` domain: give them
    back to the graph, :func:`restore_types`, so the shapes after them stay known)."""
    tagged = [n for n in model.graph.node if any(p.key == NL_KEY for p in n.metadata_props)]
    if not tagged:
        return model, []
    outputs = {o for n in tagged for o in n.output}
    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph.value_info
    except Exception:  # noqa: BLE001 - without shapes the importer names what it is missing
        inferred = []
    typed = [v for v in inferred if v.name in outputs]
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    nodes = []
    for node in graph.node:
        meta = next((json.loads(p.value) for p in node.metadata_props if p.key == NL_KEY), None)
        if meta is None:
            nodes.append(node)
            continue
        inputs = list(meta["inputs"])
        while inputs and not inputs[-1]:
            inputs.pop()
        nodes.append(helper.make_node(meta["ir_op"], inputs, list(node.output), name=node.name, domain=NL_DOMAIN,
                                      **meta["kwargs"]))
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(nodes):  # drop the inner steps nobody reads any more
        if INNER in node.name and not needed.intersection(node.output):
            continue
        kept.append(node)
        needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    tables = [t for t in graph.initializer if INNER not in t.name or t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(tables)
    out.opset_import.append(helper.make_opsetid(NL_DOMAIN, 1))
    return out, typed


def restore_types(model: onnx.ModelProto, typed: list[onnx.ValueInfoProto], rename: dict[str, str]) -> None:
    """Add ``typed`` (from :func:`collapse_exact`, names mapped through ``rename``) to the graph's value_info."""
    for value in typed:
        entry = model.graph.value_info.add()
        entry.CopyFrom(value)
        entry.name = rename.get(value.name, value.name)


__all__ = ["NL_DOMAIN", "NL_KEY", "collapse_exact", "emit_exact", "restore_types"]
