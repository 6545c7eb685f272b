"""``load_onnx``: read, check, infer shapes, fold constants, convert node by node.

The stages, in order:

1. :func:`~qfx_onnx.importer.reader.read_model`: the file, its external data, the ONNX checker.
2. :func:`prepare`: opset range, shape inference, the folding plan, and then ONE check that every
   remaining node has a converter (all unsupported ops reported together), then ONE check that
   every imported quantizer (QONNX, QDQ) has an ``ap_fixed`` type (all reasons together).
3. :func:`~qfx_onnx.importer.fold.fold_constants`: evaluate the planned nodes.
4. :func:`build_graph`: one converter call per remaining node, building the fx graph, then
   :func:`~qfx_onnx.importer.fuse.fuse_decompositions` (exported GELU and LayerNorm as one op).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np
import onnx
from torch import fx

from qfx_onnx.errors import OnnxModelError
from qfx_onnx.importer import elementwise_ops, linear_ops, nonlinear_ops, pool_ops, quant_ops, shape_ops, spatial_ops  # noqa: F401 - registers converters
from qfx_onnx.importer.batch import generalize_batch
from qfx_onnx.importer.context import GraphBuilder, NodeContext, OnnxInfo, Producer, TensorInfo
from qfx_onnx.importer.fold import FoldResult, Partial, fold_constants
from qfx_onnx.importer.fuse import fuse_decompositions
from qfx_onnx.importer.quant_ops import QuantPlan, plan_quantizers
from qfx_onnx.importer.reader import copy_fields, read_model, weight_free
from qfx_onnx.importer.registry import DEFAULT_DOMAINS, Unsupported, check_opset, find_converter, find_unsupported, unsupported_error

log = logging.getLogger(__name__)

_MAX_FOLD_ROUNDS = 8


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
    producers: dict[str, Producer] = field(default_factory=dict)
    partials: dict[str, Partial] = field(default_factory=dict)
    fixed_batch: int | None = None
    domain_opsets: dict[str, int] = field(default_factory=dict)
    quant_plan: QuantPlan = field(default_factory=QuantPlan)


def load_onnx(source: str | os.PathLike | onnx.ModelProto, *, approximate_scales: int | None = None) -> fx.GraphModule:
    """Import a float ONNX model as a torch.fx GraphModule that reproduces onnxruntime's outputs.

    The graph follows the contract in :mod:`qfx_onnx.importer`. Raises OnnxModelError for an
    unreadable or invalid model, UnsupportedOpError (listing every unsupported op at once) before
    any conversion work, and UnsupportedAttributeError for an attribute value no converter handles.
    A QONNX or QDQ model's quantizers become fixed ``ap_fixed`` types
    (:mod:`qfx_onnx.importer.quant_ops`); one whose scale is not a power of two is an error unless
    ``approximate_scales`` gives the bits of the fixed-point multipliers that approximate it.
    What a qfx-onnx writer marked (IR ops tagged ``qfx.ir_op``, tensors annotated ``qfx.role =
    lossless``; export-qonnx keeps both) is restored: see
    :func:`~qfx_onnx.quant.annotated_read.restore_qfx_marks`.
    """
    prepared = prepare(source, approximate_scales=approximate_scales)
    gm = build_graph(prepared)
    graph = prepared.model.graph
    if graph.quantization_annotation or any(n.metadata_props for n in graph.node):
        from qfx_onnx.quant.annotated_read import restore_qfx_marks  # imports this module

        restore_qfx_marks(gm, prepared.model, prepared.label)
    return gm


def _collapse_exact_nonlinear(model: onnx.ModelProto) -> onnx.ModelProto:
    """An exact nonlinear op that a qfx-onnx writer emitted (Gathers on its tables, tagged
    ``qfx.nonlinear``) back to one node, which the ``qfx.nonlinear`` converters turn into the same
    IR op with the same spec: so a file export-qonnx wrote, which keeps the tags, imports again
    (:func:`~qfx_onnx.nonlinear.onnx_wiring.collapse_exact`; the annotated reader does the same)."""
    from qfx_onnx.nonlinear.onnx_wiring import NL_KEY, collapse_exact, restore_types

    if not any(p.key == NL_KEY for n in model.graph.node for p in n.metadata_props):
        return model
    collapsed, typed = collapse_exact(model)
    restore_types(collapsed, typed, {})
    return collapsed


def prepare(source: str | os.PathLike | onnx.ModelProto, *, raise_unsupported: bool = True,
            approximate_scales: int | None = None) -> PreparedModel:
    """Stages 1-2: read and check the model, infer shapes, plan folding, check op support."""
    model, label = read_model(source)
    model = _collapse_exact_nonlinear(model)
    opset = check_opset(_default_opset(model), label)
    domain_opsets = {o.domain: o.version for o in model.opset_import if o.domain not in DEFAULT_DOMAINS}
    constants = _initial_constants(model.graph, label)
    # From here on only a copy without the weights' data: the full model is freed on return
    # when the caller does not hold it.
    model = weight_free(model)
    model, fixed_batch = generalize_batch(model, constants, opset, label)
    model = _infer_shapes(model, label)
    names = _node_names(model.graph)
    infos = _tensor_infos(model.graph, constants)
    folding = _fold_to_fixpoint(model, names, infos, constants, opset, label)
    remaining = [(names[i], node) for i, node in enumerate(model.graph.node) if i not in folding.folded]
    unsupported = find_unsupported(remaining, opset, domain_opsets)
    if unsupported and raise_unsupported:
        raise unsupported_error(unsupported, opset, label)
    quant_plan = plan_quantizers(list(model.graph.node), names, constants, infos, label, approximate_scales,
                                 skip={name for u in unsupported for name in u.nodes})
    return PreparedModel(model, label, opset, names, infos, constants, folding.folded, unsupported,
                         folding.producers, folding.partials, fixed_batch, domain_opsets, quant_plan)


def _fold_to_fixpoint(model: onnx.ModelProto, names: list[str], infos: dict[str, TensorInfo],
                      constants: dict[str, np.ndarray], opset: int, label: str) -> FoldResult:
    """Fold, then infer shapes again with the folded values as initializers, until nothing new
    folds: a Slice whose bounds came from a Shape gets a static output shape only once its bounds
    are constants, and that can make the next Shape static."""
    total = FoldResult(set(), {}, {})
    for _ in range(_MAX_FOLD_ROUNDS):
        step = fold_constants(model.graph.node, names, constants, infos, opset, skip=total.folded)
        total.folded |= step.folded
        total.producers.update(step.producers)
        total.partials = step.partials
        if not step.folded or len(total.folded) == len(model.graph.node):
            break
        for name, info in _tensor_infos(_infer_shapes(_with_folded(model, total.folded, constants), label).graph, {}).items():
            known = infos.get(name)
            if info.shape is not None and (known is None or known.shape is None or None in known.shape):
                infos[name] = info
    return total


def _with_folded(model: onnx.ModelProto, folded: set[int], constants: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A weight-free copy of ``model`` without the ``folded`` nodes, their outputs given as
    initializers (small ones) or typed graph inputs (large float ones), for shape inference."""
    graph = model.graph
    kept = [node for i, node in enumerate(graph.node) if i not in folded]
    present = {t.name for t in graph.initializer} | {v.name for v in graph.input}
    needed = {name for node in kept for name in node.input} | {o.name for o in graph.output}
    initializers, inputs = list(graph.initializer), list(graph.input)
    for i in sorted(folded):
        for name in graph.node[i].output:
            if not name or name in present or name not in needed:
                continue
            array = constants[name]
            if array.dtype.kind == "f" and array.size > 1024:
                inputs.append(onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(array.dtype), array.shape))
            else:
                initializers.append(onnx.numpy_helper.from_array(array, name))
    new_graph = onnx.helper.make_graph(kept, graph.name, inputs, list(graph.output), initializers)
    copy = onnx.ModelProto()
    copy_fields(model, copy, skip={"graph"})
    copy.graph.CopyFrom(new_graph)
    return copy


def build_graph(prepared: PreparedModel) -> fx.GraphModule:
    """Stages 3-4: fold constants, then convert every other node into the fx graph."""
    graph = prepared.model.graph
    consumed = {name for node in graph.node for name in node.input if name} | {o.name for o in graph.output}
    builder = GraphBuilder(prepared.infos, prepared.constants, prepared.producers, prepared.partials, consumed)
    builder.quant_plan = prepared.quant_plan
    builder.pins.update(prepared.quant_plan.tensor_pins)
    for node in graph.node:
        for name in node.input:
            builder.readers.setdefault(name, []).append(node)
        for name in node.output:
            builder.producer_nodes[name] = node
    inputs = [i.name for i in graph.input if i.name not in prepared.constants]
    for name in inputs:
        builder.add_input(name)
    for index, node in enumerate(graph.node):
        if index in prepared.folded:
            continue
        ctx = NodeContext(builder, node, prepared.names[index], prepared.opset)
        convert = find_converter(node.op_type, prepared.opset, node.domain, prepared.domain_opsets)
        assert convert is not None, "prepare() checked every node"
        convert(ctx)
        ctx.check_done()
    info = OnnxInfo(
        graph_name=graph.name,
        opset=prepared.opset,
        input_names=tuple(inputs),
        output_names=tuple(o.name for o in graph.output),
        input_shapes=tuple(prepared.infos[name].shape for name in inputs),
        fixed_batch=prepared.fixed_batch,
    )
    gm = builder.finish(info.output_names, info)
    fuse_decompositions(gm, prepared.infos)
    return gm


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
    """``model`` with the shapes onnx infers. Custom-domain ops that keep their input's shape
    (QONNX quantizers) are seen by the inference as Identity, so shapes flow through them."""
    twin = _with_identity_twins(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(twin, check_type=False, strict_mode=False, data_prop=True)
    except Exception as exc:  # inference is a help, not a requirement
        log.warning("%s: shape inference failed (%s); continuing without it", label, exc)
        return model
    if twin is model:
        return inferred
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.value_info[:]
    out.graph.value_info.extend(inferred.graph.value_info)
    return out


def _with_identity_twins(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model``, or a copy whose shape-preserving custom-domain nodes are Identity nodes."""
    shape_kept = {n for n in ("Quant", "IntQuant", "BipolarQuant", "Trunc")}
    if not any(n.domain not in DEFAULT_DOMAINS and n.op_type in shape_kept for n in model.graph.node):
        return model
    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    for node in twin.graph.node:
        if node.domain not in DEFAULT_DOMAINS and node.op_type in shape_kept:
            node.CopyFrom(onnx.helper.make_node("Identity", [node.input[0]], list(node.output[:1]), name=node.name))
    return twin


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
    params = tuple(d.dim_param if d.HasField("dim_param") and d.dim_param else None for d in tensor.shape.dim)
    return TensorInfo(np.dtype(dtype) if dtype is not None else None, shape, params if any(params) else None)
