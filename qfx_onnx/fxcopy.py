"""Deep copies of modules that hold torch.fx graphs, at any graph depth.

``copy.deepcopy`` cannot copy a :class:`~qfx_onnx.quant.quantize.FixedPointModel` of a few
hundred nodes: torch copies the graph itself node by node, but every other reference to a node
(``FixedPointModel.sites``, the ``CastSite`` in a cast node's ``meta["qfx_site"]``) is a plain
object to deepcopy, which then copies that ``fx.Node`` field by field, following ``_next``,
``users`` and ``args`` through the whole graph, several Python frames per node: RecursionError
past about 300 nodes, and a second, detached copy of the graph below that.

:func:`copy_module` copies each graph first, in one loop over its node list, and seeds deepcopy's
memo with ``id(old node) -> new node`` (and ``id(old graph) -> new graph``). The rest of the
module is then deep-copied as usual, with every reference to a node or graph resolved to the
copy. Recursion depth is bounded by the nesting of the module tree and of node metadata, never
by the number of nodes.
"""

from __future__ import annotations

import copy
from typing import Any, TypeVar

import torch
from torch import fx, nn

M = TypeVar("M", bound=nn.Module)


def copy_module(module: M) -> M:
    """An independent deep copy of ``module`` and of every fx graph inside it.

    Guarantees: the copy computes exactly what ``module`` computes; it shares no parameter,
    buffer, submodule, graph or node with it (training the copy leaves ``module`` unchanged);
    its nodes keep their names, order and a deep copy of their ``meta``; attributes such as
    ``FixedPointModel.sites`` and ``onnx_info`` are copied, and any reference they hold to a
    node points at the copy's node. No step recurses deeper as the graph grows.
    """
    memo: dict[int, Any] = {}
    for sub in module.modules():
        if isinstance(sub, fx.GraphModule) and id(sub.graph) not in memo:
            _seed_graph_copy(sub.graph, memo)
    return copy.deepcopy(module, memo)


def _seed_graph_copy(graph: fx.Graph, memo: dict[int, Any]) -> None:
    """Copy ``graph`` node by node and record ``id(old) -> new`` for it and each node in ``memo``."""
    new = fx.Graph(tracer_cls=graph._tracer_cls)
    node_map: dict[fx.Node, fx.Node] = {}
    returned = new.graph_copy(graph, node_map, return_output_node=True)
    if returned is not None:
        value, old_output = returned
        node_map[old_output] = new.output(value, type_expr=old_output.type)
    new._codegen = copy.deepcopy(graph._codegen)
    memo[id(graph)] = new
    memo.update((id(old), copied) for old, copied in node_map.items())
    # metadata last: values may refer to other nodes (a CastSite's node), all in the memo by now
    for old, copied in node_map.items():
        copied.meta = copy.deepcopy(old.meta, memo)


def load_state(module: nn.Module, state: dict[str, Any]) -> None:
    """``module.load_state_dict(state)`` (strict) in time linear in the number of tensors.

    torch's version scans every key of ``state`` once per submodule, which is quadratic in the
    casts of a deep fixed-point graph (3.9 s per call at 3,500 casts). Here the keys and shapes
    must match exactly (RuntimeError naming the first difference, as strict loading does); values
    are copied in place (converted to each tensor's dtype and device), which also bumps each
    tensor's version, so caches keyed on it (a quantizer's binary-point plan) see the change.
    """
    own = module.state_dict(keep_vars=True)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise RuntimeError(f"state does not fit the module: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    for key, tensor in own.items():
        value = state[key]
        if tuple(tensor.shape) != tuple(value.shape):
            raise RuntimeError(f"state does not fit the module: {key} has shape {tuple(value.shape)}, expected {tuple(tensor.shape)}")
    with torch.no_grad():
        for key, tensor in own.items():
            tensor.copy_(state[key])


__all__ = ["copy_module", "load_state"]
