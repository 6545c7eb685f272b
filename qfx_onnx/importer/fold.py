"""Constant folding at import: every node whose inputs are all known before the model runs.

Known means: initializers (and graph inputs that have one), Constant nodes, outputs of folded
nodes, and the Shape of a tensor whose shape inference gave every dim. Folded nodes are evaluated
with onnx's reference implementation and never reach a converter, so they need none.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator

from qfx_onnx.errors import OnnxModelError
from qfx_onnx.importer.context import Producer, TensorInfo
from qfx_onnx.importer.registry import DEFAULT_DOMAINS

# Ops whose value changes from run to run, or that read outer-scope values through subgraphs.
_NEVER_FOLD = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def plan_folding(nodes: Sequence[onnx.NodeProto], constant_names: set[str], infos: dict[str, TensorInfo]) -> set[int]:
    """Indices of the nodes whose outputs can all be computed at import."""
    known = set(constant_names)
    folded = set()
    for index, node in enumerate(nodes):
        if node.domain not in DEFAULT_DOMAINS or node.op_type in _NEVER_FOLD or _has_subgraph(node):
            continue
        inputs = [name for name in node.input if name]
        if node.op_type == "Shape":
            shape = infos.get(inputs[0], TensorInfo(None, None)).shape
            ok = inputs[0] in known or (shape is not None and None not in shape)
        else:
            ok = all(name in known for name in inputs)
        if ok:
            folded.add(index)
            known.update(name for name in node.output if name)
    return folded


def fold_constants(
    nodes: Sequence[onnx.NodeProto],
    names: Sequence[str],
    plan: set[int],
    constants: dict[str, np.ndarray],
    infos: dict[str, TensorInfo],
    opset: int,
) -> dict[str, Producer]:
    """Evaluate the planned nodes, adding their outputs to ``constants`` and ``infos``.

    Returns the producer of each new constant. A node the reference implementation cannot
    evaluate is an OnnxModelError naming it.
    """
    producers = {}
    for index in sorted(plan):
        node, name = nodes[index], names[index]
        try:
            values = _evaluate(node, constants, infos, opset)
        except Exception as exc:
            raise OnnxModelError(f"cannot fold constant node {name!r} ({node.op_type}): {' '.join(str(exc).split())[:200]}") from None
        for output, value in zip(node.output, values):
            if output:
                array = np.asarray(value)
                constants[output] = array
                infos[output] = TensorInfo(array.dtype, tuple(array.shape))
                producers[output] = Producer(name, node.op_type)
    return producers


def _evaluate(node: onnx.NodeProto, constants: dict[str, np.ndarray], infos: dict[str, TensorInfo], opset: int) -> list[np.ndarray]:
    if node.op_type == "Shape" and node.input[0] not in constants:
        return [_static_shape(node, infos[node.input[0]].shape)]
    feeds = {name: constants[name] for name in node.input if name}
    graph = onnx.helper.make_graph(
        [node],
        "fold",
        [onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for n, v in feeds.items()],
        [onnx.helper.make_empty_tensor_value_info(n) for n in node.output if n],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    return ReferenceEvaluator(model).run(None, feeds)


def _static_shape(node: onnx.NodeProto, shape: tuple[int, ...]) -> np.ndarray:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    start, end = attrs.get("start", 0), attrs.get("end", None)
    return np.array(shape[start:end], dtype=np.int64)
