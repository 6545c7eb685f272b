"""Constant folding at import: every node whose outputs are known before the model runs.

Known means: initializers (and graph inputs that have one), Constant nodes, outputs of folded
nodes, and shape arithmetic on static dims. Integer shape values are tracked *in part*
(:class:`Partial`): ``Shape`` of a tensor whose batch is dynamic is known except for that dim, and
``Gather``/``Slice``/``Concat``/arithmetic on it stay known wherever their inputs are. So the
channel split ``x[:, :x.shape[1] // 2]`` and the shuffle ``x.view(b, g, c // g, h, w)`` of a
dynamic-batch export fold to constants (``Slice`` bounds) or to targets with a single unknown dim
(``Reshape``), which the converters need.

Folded nodes are evaluated with onnx's reference implementation and never reach a converter, so
they need none. The folding runs in one pass in graph order; no recursion.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator

from qfx_onnx.errors import OnnxModelError
from qfx_onnx.importer.context import Producer, TensorInfo
from qfx_onnx.importer.registry import DEFAULT_DOMAINS

# Ops whose value changes from run to run, or that read outer-scope values through subgraphs.
_NEVER_FOLD = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}

# Ops on integer tensors whose known entries follow from the known entries of their inputs.
# Movement ops move the "known" mask exactly as they move the values; arithmetic ops know an entry
# when both operands know theirs (the mask is then the product of the broadcast masks).
_PARTIAL_MOVE = {"Gather", "Slice", "Concat", "Unsqueeze", "Squeeze", "Reshape", "Identity", "Cast", "Flatten"}
_PARTIAL_ARITH = {"Add", "Sub", "Mul", "Div", "Mod", "Max", "Min"}


@dataclass(frozen=True)
class Partial:
    """An integer tensor known in part at import: ``value`` holds the entries where ``known``.

    Entries not known hold a placeholder 1 (so that arithmetic on them cannot fail); both arrays
    have the tensor's shape, ``value`` is int64 and ``known`` bool.
    """

    value: np.ndarray
    known: np.ndarray
    symbols: np.ndarray
    """int64, the tensor's shape: for an unknown entry that is a symbolic dim of some tensor, the
    id of that dim's name (:data:`SYMBOL_IDS`), else 0."""

    def reshape_target(self, data_dim_params: Sequence[str | None] | None, allowzero: int) -> tuple[int, ...] | None:
        """This value as a constant Reshape target for data whose dims have ``data_dim_params``,
        or None when it cannot be one.

        An unknown entry that is the same symbolic dim as the data's dim at that index becomes 0
        ("copy", unless ``allowzero``); then at most one unknown entry may remain, which becomes
        -1 when no known entry is -1 already."""
        if self.value.ndim != 1:
            return None
        params = list(data_dim_params or [])
        target = []
        for i, (v, k, sym) in enumerate(zip(self.value, self.known, self.symbols)):
            if k:
                target.append(int(v))
            elif not allowzero and sym and i < len(params) and params[i] and SYMBOL_IDS.get(params[i]) == sym:
                target.append(0)
            else:
                target.append(None)
        if target.count(None) > 1 or (None in target and -1 in target):
            return None
        return tuple(-1 if t is None else t for t in target)


SYMBOL_IDS: dict[str, int] = {}
"""A positive id per symbolic dim name seen by :func:`fold_constants` (ids only compare names)."""


def _symbol_id(name: str | None) -> int:
    if not name:
        return 0
    return SYMBOL_IDS.setdefault(name, len(SYMBOL_IDS) + 1)


@dataclass
class FoldResult:
    """What :func:`fold_constants` found: the folded node indices, the producer of each folded
    constant, and the partly known integer tensors (name -> :class:`Partial`)."""

    folded: set[int]
    producers: dict[str, Producer]
    partials: dict[str, Partial]


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def fold_constants(
    nodes: Sequence[onnx.NodeProto],
    names: Sequence[str],
    constants: dict[str, np.ndarray],
    infos: dict[str, TensorInfo],
    opset: int,
    skip: set[int] = frozenset(),
) -> FoldResult:
    """Evaluate every node (not in ``skip``) whose outputs are all known, in graph order.

    Adds their outputs to ``constants`` and ``infos``. A node the reference implementation cannot
    evaluate is an OnnxModelError naming it.
    """
    result = FoldResult(set(), {}, {})
    for index, node in enumerate(nodes):
        if index in skip or node.domain not in DEFAULT_DOMAINS or node.op_type in _NEVER_FOLD or _has_subgraph(node):
            continue
        try:
            values = _fold_node(node, constants, result.partials, infos, opset)
        except Exception as exc:
            raise OnnxModelError(f"cannot fold constant node {names[index]!r} ({node.op_type}): {' '.join(str(exc).split())[:200]}") from None
        if values is None:
            continue
        if all(isinstance(v, np.ndarray) for v in values):
            result.folded.add(index)
            for output, value in zip(node.output, values):
                if output:
                    constants[output] = value
                    infos[output] = TensorInfo(value.dtype, tuple(value.shape))
                    result.producers[output] = Producer(names[index], node.op_type)
        else:
            for output, value in zip(node.output, values):
                if output:
                    result.partials[output] = value
    return result


def _fold_node(node: onnx.NodeProto, constants: dict[str, np.ndarray], partials: dict[str, Partial],
               infos: dict[str, TensorInfo], opset: int) -> list[np.ndarray | Partial] | None:
    """The node's outputs: arrays when fully known, one Partial when partly known, else None."""
    inputs = [name for name in node.input if name]
    if all(name in constants for name in inputs):
        return [np.asarray(v) for v in _evaluate(node, {n: constants[n] for n in inputs}, opset)]
    if node.op_type == "Shape":
        return _shape_value(node, infos.get(inputs[0], TensorInfo(None, None)))
    if node.op_type not in _PARTIAL_MOVE | _PARTIAL_ARITH or not all(n in constants or n in partials for n in inputs):
        return None
    parts = {n: partials.get(n) or Partial(constants[n], np.ones(np.shape(constants[n]), bool), np.zeros(np.shape(constants[n]), np.int64))
             for n in inputs}
    if any(p.value.dtype.kind not in "iu" for p in parts.values()):
        return None
    if node.op_type == "Cast" and not _casts_to_integer(node):
        return None
    data_names = inputs[:1] if node.op_type in ("Gather", "Slice", "Reshape", "Unsqueeze", "Squeeze") else inputs
    value = _evaluate(node, {n: parts[n].value for n in inputs}, opset)[0]
    # the mask: the same movement applied to 0/1 masks (index inputs stay as they are); for
    # arithmetic, the product of the masks, broadcast as the op broadcasts
    masks = {n: (parts[n].known.astype(np.int64) if n in data_names else parts[n].value) for n in inputs}
    if node.op_type in _PARTIAL_ARITH:
        known = np.ones(np.shape(value), bool)
        for n in inputs:
            known &= np.broadcast_to(parts[n].known, np.shape(value))
        symbols = np.zeros(np.shape(value), np.int64)
    else:
        mask_node = node if node.op_type != "Cast" else onnx.helper.make_node("Identity", [node.input[0]], [node.output[0]])
        known = np.asarray(_evaluate(mask_node, masks, opset)[0]).astype(bool)
        ids = {n: (parts[n].symbols if n in data_names else parts[n].value) for n in inputs}
        symbols = np.asarray(_evaluate(mask_node, ids, opset)[0]).astype(np.int64)
    value = np.asarray(value)
    if known.all():
        return [value]
    return [Partial(np.where(known, value, 1).astype(np.int64), known, np.where(known, 0, symbols))]


def _casts_to_integer(node: onnx.NodeProto) -> bool:
    to = next((a.i for a in node.attribute if a.name == "to"), None)
    return to is not None and np.dtype(onnx.helper.tensor_dtype_to_np_dtype(to)).kind in "iu"


def _shape_value(node: onnx.NodeProto, info: TensorInfo) -> list[np.ndarray | Partial] | None:
    """``Shape`` of a tensor of (partly) static shape: an array, or a Partial for dynamic dims."""
    if info.shape is None:
        return None
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    window = slice(attrs.get("start", 0), attrs.get("end", None))
    dims = info.shape[window]
    params = (info.dim_params or (None,) * len(info.shape))[window]
    known = np.array([d is not None for d in dims], dtype=bool)
    value = np.array([1 if d is None else d for d in dims], dtype=np.int64)
    symbols = np.array([_symbol_id(p) for p in params], dtype=np.int64)
    return [value] if known.all() else [Partial(value, known, symbols)]


def _evaluate(node: onnx.NodeProto, feeds: dict[str, np.ndarray], opset: int) -> list[np.ndarray]:
    feeds = {name: np.asarray(value) for name, value in feeds.items()}
    graph = onnx.helper.make_graph(
        [node],
        "fold",
        [onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for n, v in feeds.items()],
        [onnx.helper.make_empty_tensor_value_info(n) for n in node.output if n],
    )
    # onnx's reference implements QuantizeLinear/DequantizeLinear from opset 19 only; on the
    # integer types of the earlier versions 19 computes the same
    if node.op_type in _QDQ_OPS:
        opset = max(opset, 19)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    return ReferenceEvaluator(model).run(None, feeds)


_QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}
