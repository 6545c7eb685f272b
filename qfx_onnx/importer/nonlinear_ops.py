"""Converters of the ops transformer encoders add: LayerNormalization, Gelu, Erf, Exp, Sqrt,
Reciprocal and Pow (ReduceMax is with the other reductions in pool_ops.py).

Both PyTorch exporters are covered: TorchScript writes LayerNorm as LayerNormalization from opset
17 (below it as ReduceMean, Sub, Pow 2, Add, Sqrt, Div) and GELU as Div, Erf, Add, Mul, Mul; the
dynamo exporter writes LayerNormalization and, from opset 20, Gelu. The decompositions import op
by op; :mod:`qfx_onnx.importer.fuse` then recognises them as ``layer_norm`` and ``gelu``.
"""

from __future__ import annotations

import numpy as np

from qfx_onnx.importer.context import NodeContext
from qfx_onnx.importer.registry import converter
from qfx_onnx.ir import ops


@converter("LayerNormalization", since=17)
def convert_layer_norm(ctx: NodeContext) -> None:
    """LayerNormalization over the dims from ``axis`` on; Scale is a weight, B (optional) a bias.
    Its Mean and InvStdDev outputs (training only) must not be read by the graph."""
    rank = ctx.rank(0)
    axis = ctx.axes([ctx.attr("axis", -1)], rank)[0]
    epsilon = float(ctx.attr("epsilon", 1e-5))
    ctx.attr("stash_type", 1, allowed=(1,))  # float32 statistics; the emulation computes in float64
    for i, what in ((1, "Mean"), (2, "InvStdDev")):
        if ctx.is_consumed(i):
            raise ctx.error(f"the {what} output {ctx.output_name(i)!r} is read by the graph; only the normalized output Y is supported")
    x, scale, bias = ctx.input(0), ctx.input(1, role="weight"), ctx.input(2, role="bias")
    ctx.emit(ops.layer_norm, x, scale, bias, axis=axis, epsilon=epsilon)


@converter("Gelu", since=20)
def convert_gelu(ctx: NodeContext) -> None:
    """Gelu, exact (``approximate="none"``) or tanh form."""
    approximate = ctx.attr("approximate", "none", allowed=("none", "tanh"))
    ctx.emit(ops.gelu, ctx.input(0), approximate=approximate)


for _op_type, _fn, _since in [
    ("Erf", ops.erf, 9),
    ("Exp", ops.exp, 6),
    ("Sqrt", ops.sqrt, 6),
    ("Reciprocal", ops.reciprocal, 6),
]:
    def _convert(ctx: NodeContext, fn=_fn) -> None:
        ctx.emit(fn, ctx.input(0))

    _convert.__name__ = f"convert_{_fn.__name__}"
    converter(_op_type, since=_since)(_convert)


POW_EXPONENTS = (0.5, 1.0, 2.0, 3.0, -1.0)
"""Constant exponents Pow imports with: powers 1 to 3 as exact products, 0.5 as ``sqrt``, -1 as
``reciprocal``. Other powers have no fixed-point form yet."""


@converter("Pow", since=7)
def convert_pow(ctx: NodeContext) -> None:
    """Pow by a one-element constant exponent from :data:`POW_EXPONENTS`: ``x^2`` is
    ``mul(x, x)`` (the variance in TorchScript's LayerNorm), ``x^3`` ``mul(mul(x, x), x)``."""
    value = ctx.const(1, "Y (the exponent)")
    exponent = np.unique(value.astype(np.float64))
    if exponent.size != 1 or float(exponent[0]) not in POW_EXPONENTS:
        shown = ", ".join(f"{v:g}" for v in exponent[:4])
        raise ctx.error(f"exponent {shown} is not supported (supported: one constant value among "
                        f"{', '.join(f'{v:g}' for v in POW_EXPONENTS)})")
    if value.ndim > ctx.rank(0) or any(d != 1 for d in value.shape):
        raise ctx.error(f"an exponent of shape {value.shape} would broadcast the base; only a single value is supported")
    power, x = float(exponent[0]), ctx.input(0)
    if power == 0.5:
        ctx.emit(ops.sqrt, x)
    elif power == -1.0:
        ctx.emit(ops.reciprocal, x)
    elif power == 1.0:
        ctx.emit(ops.identity, x)
    elif power == 2.0:
        ctx.emit(ops.mul, x, x)
    else:
        ctx.emit(ops.mul, ctx.internal(ops.mul, x, x), x)


# Exact nonlinear ops read back from an annotated model: :func:`qfx_onnx.nonlinear.onnx_wiring.collapse_exact`
# turns each tagged emission into one node of the ``qfx.nonlinear`` domain whose op type is the
# IR op and whose attributes are its keywords (the ``fixed`` spec included).
def _convert_exact(ctx: NodeContext, fn) -> None:
    roles = {"layer_norm": (None, "weight", "bias")}.get(fn.__name__, ())
    args = [ctx.input(i, role=roles[i]) if i < len(roles) and roles[i] else ctx.input(i)
            for i in range(len(ctx.node.input))]
    kwargs = {a.name: ctx.attr(a.name) for a in ctx.node.attribute}
    ctx.emit(fn, *args, **kwargs)


for _fn in (ops.sigmoid, ops.tanh, ops.exp, ops.erf, ops.gelu, ops.sqrt, ops.reciprocal, ops.div, ops.softmax,
            ops.layer_norm):
    converter(_fn.__name__, since=1, domain="qfx.nonlinear")(lambda ctx, fn=_fn: _convert_exact(ctx, fn))
