"""``load_onnx``: read, check, infer shapes, fold constants, convert node by node.

The stages, in order:

1. :func:`~qfx_onnx.importer.reader.read_model`: the file, its external data, the ONNX checker.
2. :func:`prepare`: opset range, shape inference, the folding plan, and then ONE check that every
   remaining node has a converter (all unsupported ops reported together).
3. :func:`~qfx_onnx.importer.fold.fold_constants`: evaluate the planned nodes.
4. :func:`build_graph`: one converter call per remaining node, building the fx graph.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import onnx
from torch import fx

from qfx_onnx.errors import OnnxModelError
from qfx_onnx.importer import elementwise_ops, linear_ops, pool_ops, shape_ops, spatial_ops  # noqa: F401 - registers converters
from qfx_onnx.importer.context import GraphBuilder, NodeContext, OnnxInfo, TensorInfo
from qfx_onnx.importer.fold import fold_constants, plan_folding
from qfx_onnx.importer.reader import read_model, weight_free
from qfx_onnx.importer.registry import DEFAULT_DOMAINS, Unsupported, check_opset, find_converter, find_unsupported, unsupported_error

log = logging.getLogger(__name__)


@dataclass
class PreparedModel:
    """A checked, shape-inferred model ready to fold and convert.

    ``model`` is weight-free (see :func:`~qfx_onnx.importer.reader.weight_free`): the values of
    all initializers are in ``constants``, and those of large float ones only there.
    ``names`` holds each node's name (``f"{op_type}_{index}"`` when it has none, made unique);
    ``folded`` the indices of nodes computed at import; ``unsupported`` the ops with no converter
    (empty unless :func:`prepare` was asked not to raise).
    """

    model: onnx.ModelProto
    label: str
    opset: int
    names: list[str]
    infos: dict[str, TensorInfo]
    constants: dict[str, np.ndarray]
    folded: set[int]
    unsupported: list[Unsupported]


def load_onnx(source: str | os.PathLike | onnx.ModelProto) -> fx.GraphModule:
    """Import a float ONNX model as a torch.fx GraphModule that reproduces onnxruntime's outputs.

    The graph follows the contract in :mod:`qfx_onnx.importer`. Raises OnnxModelError for an
    unreadable or invalid model, UnsupportedOpError (listing every unsupported op at once) before
    any conversion work, and UnsupportedAttributeError for an attribute value no converter handles.
    """
    prepared = prepare(source)
    return build_graph(prepared)


def prepare(source: str | os.PathLike | onnx.ModelProto, *, raise_unsupported: bool = True) -> PreparedModel:
    """Stages 1-2: read and check the model, infer shapes, plan folding, check op support."""
    model, label = read_model(source)
    opset = check_opset(_default_opset(model), label)
    constants = _initial_constants(model.graph, label)
    # From here on only a copy without the weights' data: the full model is freed on return
    # when the caller does not hold it.
    model = _infer_shapes(weight_free(model), label)
    graph = model.graph
    names = _node_names(graph)
    infos = _tensor_infos(graph, constants)
    folded = plan_folding(graph.node, set(constants), infos)
    remaining = [(names[i], node) for i, node in enumerate(graph.node) if i not in folded]
    unsupported = find_unsupported(remaining, opset)
    if unsupported and raise_unsupported:
        raise unsupported_error(unsupported, opset, label)
    return PreparedModel(model, label, opset, names, infos, constants, folded, unsupported)


def build_graph(prepared: PreparedModel) -> fx.GraphModule:
    """Stages 3-4: fold constants, then convert every other node into the fx graph."""
    graph = prepared.model.graph
    producers = fold_constants(graph.node, prepared.names, prepared.folded, prepared.constants, prepared.infos, prepared.opset)
    builder = GraphBuilder(prepared.infos, prepared.constants, producers)
    inputs = [i.name for i in graph.input if i.name not in prepared.constants]
    for name in inputs:
        builder.add_input(name)
    for index, node in enumerate(graph.node):
        if index in prepared.folded:
            continue
        ctx = NodeContext(builder, node, prepared.names[index], prepared.opset)
        convert = find_converter(node.op_type, prepared.opset, node.domain)
        assert convert is not None, "prepare() checked every node"
        convert(ctx)
        ctx.check_done()
    info = OnnxInfo(
        graph_name=graph.name,
        opset=prepared.opset,
        input_names=tuple(inputs),
        output_names=tuple(o.name for o in graph.output),
        input_shapes=tuple(prepared.infos[name].shape for name in inputs),
    )
    return builder.finish(info.output_names, info)


@dataclass(frozen=True)
class NodeSummary:
    """One ONNX node as ``qfx-onnx inspect`` lists it. ``status`` is "converted", "folded"
    (computed at import) or "unsupported"; ``output_shape`` is None when unknown."""

    name: str
    op_type: str
    output_shape: tuple[int | None, ...] | None
    status: str


def summarize_nodes(prepared: PreparedModel) -> list[NodeSummary]:
    """Every node of a prepared model, in graph order, with its support status."""
    unsupported = {name for u in prepared.unsupported for name in u.nodes}
    rows = []
    for index, node in enumerate(prepared.model.graph.node):
        name = prepared.names[index]
        status = "folded" if index in prepared.folded else "unsupported" if name in unsupported else "converted"
        info = prepared.infos.get(node.output[0]) if node.output else None
        rows.append(NodeSummary(name, node.op_type, info.shape if info else None, status))
    return rows


def _default_opset(model: onnx.ModelProto) -> int | None:
    versions = [o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS]
    return max(versions) if versions else None


def _infer_shapes(model: onnx.ModelProto, label: str) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception as exc:  # inference is a help, not a requirement
        log.warning("%s: shape inference failed (%s); continuing without it", label, exc)
        return model


def _node_names(graph: onnx.GraphProto) -> list[str]:
    names, seen = [], set()
    for index, node in enumerate(graph.node):
        name = node.name or f"{node.op_type}_{index}"
        if name in seen:
            name = f"{name}_{index}"
        seen.add(name)
        names.append(name)
    return names


def _initial_constants(graph: onnx.GraphProto, label: str) -> dict[str, np.ndarray]:
    if len(graph.sparse_initializer):
        raise OnnxModelError(f"{label}: sparse initializers are not supported")
    try:
        # One at a time, each a writable array of its own, not a view of the proto's bytes.
        return {t.name: onnx.numpy_helper.to_array(t).copy() for t in graph.initializer}
    except Exception as exc:
        raise OnnxModelError(f"{label}: cannot read an initializer ({exc})") from None


def _tensor_infos(graph: onnx.GraphProto, constants: dict[str, np.ndarray]) -> dict[str, TensorInfo]:
    infos = {}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        info = _info_of(value.type)
        if info.shape is not None or value.name not in infos:  # keep the most informative
            infos[value.name] = info
    for name, array in constants.items():
        infos[name] = TensorInfo(array.dtype, tuple(array.shape))
    return infos


def _info_of(type_proto: onnx.TypeProto) -> TensorInfo:
    if not type_proto.HasField("tensor_type"):
        return TensorInfo(None, None)
    tensor = type_proto.tensor_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type) if tensor.elem_type else None
    if not tensor.HasField("shape"):
        return TensorInfo(dtype, None)
    shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
    return TensorInfo(np.dtype(dtype) if dtype is not None else None, shape)
