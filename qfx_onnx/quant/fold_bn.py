"""Optional pass: fold BatchNorm's ``x*scale + shift`` into the convolution or Gemm before it.

Not the default: qfx-onnx keeps BatchNorm as an element-wise fixed-point affine with its own
formats, as it runs in HLS. Folding trades that layer for weights that absorb the scale.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from qfx_onnx.ir.ops import op_of


def _attr(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    value = gm
    for part in node.target.split("."):
        value = getattr(value, part)
    return value


def _new_param(gm: fx.GraphModule, anchor: fx.Node, name: str, value: torch.Tensor, meta: dict) -> fx.Node:
    attr = f"{name}_folded"
    i = 0
    while hasattr(gm, attr):
        i += 1
        attr = f"{name}_folded{i}"
    gm.register_parameter(attr, nn.Parameter(value.detach().clone(), requires_grad=False))
    with gm.graph.inserting_before(anchor):
        node = gm.graph.get_attr(attr)
    node.meta.update(meta)
    return node


def fold_batchnorm(gm: fx.GraphModule) -> int:
    """Fold every ``conv/gemm -> mul(scale) -> add(shift)`` chain whose intermediate results have no
    other users; the linear op takes over the BatchNorm output's name. Returns the number folded."""
    folded = 0
    for add in list(gm.graph.nodes):
        if add.op != "call_function" or getattr(op_of(add.target), "name", None) != "add":
            continue
        mul = add.args[0]
        if not (isinstance(mul, fx.Node) and getattr(op_of(mul.target), "name", None) == "mul"
                and "onnx_name" not in mul.meta and len(mul.users) == 1):
            continue
        linear = mul.args[0]
        scale, shift = _attr(gm, mul.args[1]), _attr(gm, add.args[1])
        kind = getattr(op_of(getattr(linear, "target", None)), "name", None)
        if scale is None or shift is None or kind not in ("conv", "gemm") or len(linear.users) != 1:
            continue
        weight = _attr(gm, linear.args[1])
        if weight is None or (kind == "gemm" and (linear.kwargs.get("transA") or not linear.kwargs.get("transB"))):
            continue
        per_channel = scale.reshape(-1)
        w_scaled = weight * per_channel.reshape((-1,) + (1,) * (weight.dim() - 1))
        bias_node = linear.args[2] if len(linear.args) > 2 else None
        bias = _attr(gm, bias_node) if bias_node is not None else torch.zeros_like(per_channel)
        b_new = bias.reshape(-1) * per_channel + shift.reshape(-1)
        bn_name = add.meta.get("onnx_node", "bn")
        w_node = _new_param(gm, linear, f"{linear.args[1].target}", w_scaled,
                            {**linear.args[1].meta, "onnx_name": f"{bn_name}::folded_weight", "role": "weight"})
        b_node = _new_param(gm, linear, f"{bn_name}_bias".replace("/", "_").replace(".", "_").replace(":", "_"), b_new,
                            {"onnx_name": f"{bn_name}::folded_bias", "onnx_dtype": "float32", "role": "bias",
                             "onnx_node": linear.meta.get("onnx_node")})
        linear.args = (linear.args[0], w_node, b_node)
        add.replace_all_uses_with(linear)
        linear.meta["onnx_name"] = add.meta["onnx_name"]
        gm.graph.erase_node(add)
        gm.graph.erase_node(mul)
        folded += 1
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return folded
