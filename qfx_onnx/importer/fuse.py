"""Recognise exporter decompositions of GELU and LayerNorm as one ``gelu`` / ``layer_norm`` op.

The TorchScript exporter writes ``nn.GELU()`` as ``Mul(Mul(x, Add(Erf(Div(x, 1.4142135)), 1)), 0.5)``
at every opset below 20, and the dynamo exporter the same product in another order (the tanh form
likewise, with ``Tanh(0.7978846 * (x + 0.044715 * x^3))``); below opset
17 TorchScript writes ``nn.LayerNorm`` as ``ReduceMean, Sub, Pow 2, ReduceMean, Add eps, Sqrt,
Div, Mul scale, Add bias``. Imported op by op these are correct but give the fixed-point graph
five or ten rounding points where one table op is meant; :func:`fuse_decompositions` rewrites
them in place.

Contract: a match is replaced only when every intermediate value has no other user, every
constant has the expected value (1/sqrt(2), sqrt(2/pi), 0.044715, 1 and 0.5 to float32 rounding; 1/n for the means),
and the LayerNorm reduction axes are the trailing dims of its input. The fused node keeps the
metadata of the node it replaces (its ONNX output name and producer); ``meta["fused_from"]``
lists the ONNX nodes the match covered. Anything else is left as imported.
"""

from __future__ import annotations

import math
from typing import Callable

from torch import fx

from qfx_onnx.importer.context import TensorInfo
from qfx_onnx.ir import ops


def fuse_decompositions(gm: fx.GraphModule, infos: dict[str, TensorInfo]) -> int:
    """Fuse every GELU and LayerNorm decomposition of ``gm`` (see the module docstring); ``infos``
    gives the rank of imported tensors by ONNX name. Returns the number of fused ops."""
    fused = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.graph is None:
            continue
        if node.target is ops.erf:
            fused += _fuse_gelu(gm, node)
        elif node.target is ops.tanh:
            fused += _fuse_tanh_gelu(gm, node)
        elif node.target is ops.sqrt:
            fused += _fuse_layer_norm(gm, node, infos)
    if fused:
        gm.graph.eliminate_dead_code()
        _drop_unused_attributes(gm)
        gm.graph.lint()
        gm.recompile()
    return fused


# ------------------------------------------------------------------------------------------ helpers
def _is(node: object, fn: Callable) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is fn


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _scalar(gm: fx.GraphModule, node: object) -> float | None:
    """The value of a one-element constant (a get_attr), else None."""
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return None
    value = getattr(gm, node.target)
    return float(value.detach().reshape(-1)[0]) if value.numel() == 1 else None


def _near(value: float | None, target: float) -> bool:
    """Equal to ``target`` up to float32 rounding of a constant."""
    return value is not None and abs(value - target) <= 1e-6 * abs(target)


def _other(node: fx.Node, one: fx.Node) -> object:
    """The argument of binary ``node`` that is not ``one`` (None when ``one`` is neither)."""
    a, b = node.args[:2]
    return b if a is one else a if b is one else None


def _replace(node: fx.Node, fn: Callable, args: tuple, kwargs: dict, covered: list[fx.Node]) -> None:
    """Turn ``node`` (the last of the match) into a call of ``fn``, keeping its metadata."""
    node.target, node.args, node.kwargs = fn, args, kwargs
    node.meta["fused_from"] = sorted({n.meta.get("onnx_node") for n in covered + [node] if n.meta.get("onnx_node")})


def _drop_unused_attributes(gm: fx.GraphModule) -> None:
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters(recurse=False)) + list(gm.named_buffers(recurse=False)):
        if name not in used:
            delattr(gm, name)


# ------------------------------------------------------------------------------------------ GELU
def _fuse_gelu(gm: fx.GraphModule, erf: fx.Node) -> int:
    """``x * 0.5 * (1 + erf(x * (1/sqrt 2)))`` in any association of the three factors."""
    scaled = erf.args[0]
    if not _is(scaled, ops.mul) or _only_user(scaled) is not erf:
        return 0
    x = _times_constant(gm, scaled, 1 / math.sqrt(2))
    return _fuse_gelu_tail(gm, x, erf, [scaled], "none")


def _fuse_tanh_gelu(gm: fx.GraphModule, tanh: fx.Node) -> int:
    """``x * 0.5 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))``, ``x^3`` as ``x * (x * x)``
    in either order (the exporters' Pow 3, or a user's products)."""
    scaled = tanh.args[0]
    if not _is(scaled, ops.mul) or _only_user(scaled) is not tanh:
        return 0
    inner = _times_constant(gm, scaled, SQRT_2_OVER_PI)
    if not _is(inner, ops.add) or _only_user(inner) is not scaled:
        return 0
    for x, cubic in (inner.args, tuple(reversed(inner.args))):
        cube = _times_constant(gm, cubic, GELU_TANH_CUBIC)
        square = _other(cube, x) if _is(cube, ops.mul) else None
        if (_is(square, ops.mul) and square.args == (x, x) and _only_user(cubic) is inner
                and _only_user(cube) is cubic and _only_user(square) is cube):
            return _fuse_gelu_tail(gm, x, tanh, [scaled, inner, cubic, cube, square], "tanh")
    return 0


def _times_constant(gm: fx.GraphModule, node: object, value: float) -> object:
    """``y`` when ``node`` is ``mul(y, c)`` or ``mul(c, y)`` with the constant ``c`` equal to
    ``value``, else None."""
    if not _is(node, ops.mul):
        return None
    a, b = node.args
    return a if _near(_scalar(gm, b), value) else b if _near(_scalar(gm, a), value) else None


GELU_TANH_CUBIC = 0.044715
SQRT_2_OVER_PI = math.sqrt(2 / math.pi)
"""The constants of GELU's tanh form (ONNX Gelu-20; Hendrycks and Gimpel 2016)."""


def _fuse_gelu_tail(gm: fx.GraphModule, x: object, gate: fx.Node, covered: list[fx.Node], approximate: str) -> int:
    """The common end of both GELU forms: ``x * 0.5 * (1 + gate)`` in any association; fuses the
    whole match into ``gelu(x, approximate)`` when found."""
    plus = _only_user(gate)
    if x is None or not _is(plus, ops.add) or not _near(_scalar(gm, _other(plus, gate)), 1.0):
        return 0
    product = _only_user(plus)
    if not _is(product, ops.mul):
        return 0
    factor = _other(product, plus)
    covered = covered + [gate, plus]
    if factor is x or _near(_scalar(gm, factor), 0.5):  # (x * g) * 0.5 or (0.5 * g) * x
        last = _only_user(product)
        if not _is(last, ops.mul):
            return 0
        rest = _other(last, product)
        if not (_near(_scalar(gm, rest), 0.5) if factor is x else rest is x):
            return 0
        covered.append(product)
    elif _is(factor, ops.mul) and _only_user(factor) is product and _near(_scalar(gm, _other(factor, x)), 0.5):
        last = product  # (x * 0.5) * g
        covered.append(factor)
    else:
        return 0
    _replace(last, ops.gelu, (x,), {"approximate": approximate}, covered)
    return 1


# ------------------------------------------------------------------------------------------ LayerNorm
def _mean_of(gm: fx.GraphModule, node: object) -> tuple[fx.Node, list[int], float] | None:
    """``(x, axes, 1/n)`` when ``node`` is ``reduce_sum(x, axes, keepdims=1) * (1/n)``, the
    imported ReduceMean, with the sum used only there."""
    if not _is(node, ops.mul):
        return None
    for total, recip in (node.args, tuple(reversed(node.args))):
        if _is(total, ops.reduce_sum) and _only_user(total) is node and total.kwargs.get("keepdims", 1) == 1:
            factor = _scalar(gm, recip)
            return (total.args[0], list(total.kwargs["axes"]), factor) if factor is not None else None
    return None


def _rank(node: fx.Node, infos: dict[str, TensorInfo]) -> int | None:
    info = infos.get(node.meta.get("onnx_name", ""))
    return None if info is None or info.shape is None else len(info.shape)


def _fuse_layer_norm(gm: fx.GraphModule, sqrt: fx.Node, infos: dict[str, TensorInfo]) -> int:
    """``(x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps) * scale (+ bias)`` over trailing axes."""
    shifted = sqrt.args[0]
    if not _is(shifted, ops.add) or _only_user(shifted) is not sqrt:
        return 0
    for var, eps_node in (shifted.args, tuple(reversed(shifted.args))):
        variance, epsilon = _mean_of(gm, var), _scalar(gm, eps_node)
        if variance is not None and epsilon is not None and _only_user(var) is shifted:
            break
    else:
        return 0
    square, axes, var_factor = variance
    if not _is(square, ops.mul) or square.args[0] is not square.args[1] or _only_user(square) is None:
        return 0
    centred = square.args[0]
    mean = _mean_of(gm, centred.args[1]) if _is(centred, ops.sub) else None
    if mean is None or mean[0] is not centred.args[0] or mean[1] != axes or _only_user(centred.args[1]) is not centred:
        return 0
    x = centred.args[0]
    rank = _rank(x, infos)
    if rank is None or axes != list(range(axes[0], rank)):
        return 0
    dims = infos[x.meta["onnx_name"]].shape[axes[0]:]
    if None in dims or not (_near(mean[2], 1 / math.prod(dims)) and _near(var_factor, 1 / math.prod(dims))):
        return 0
    normed = _only_user(sqrt)
    if not _is(normed, ops.div) or normed.args != (centred, sqrt) or set(centred.users) != {square, normed}:
        return 0
    scaled = _only_user(normed)
    scale = _other(scaled, normed) if _is(scaled, ops.mul) else None
    if not _affine_constant(gm, scale, rank - axes[0]):
        return 0
    last, bias = scaled, None
    after = _only_user(scaled)
    if _is(after, ops.add) and _affine_constant(gm, _other(after, scaled), rank - axes[0]):
        last, bias = after, _other(after, scaled)
    covered = [centred.args[1], var, shifted, sqrt, square, centred, normed, scaled]
    _replace(last, ops.layer_norm, (x, scale, bias), {"axis": axes[0], "epsilon": epsilon}, covered)
    for node, role in ((scale, "weight"), (bias, "bias")):
        if node is not None and node.meta.get("role") == "constant":
            node.meta["role"] = role
    return 1


def _affine_constant(gm: fx.GraphModule, node: object, normalized_rank: int) -> bool:
    """Whether ``node`` is a float constant that broadcasts over the normalized dims only."""
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return False
    value = getattr(gm, node.target)
    return value.is_floating_point() and value.dim() <= normalized_rank
