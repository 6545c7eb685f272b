"""Give every nonlinear op of a FixedPointModel its exact fixed-point definition (the ``fixed`` spec).

:func:`attach_nonlinear` runs after the casts are in (``quantize_graph``; again after finetune,
when binary points may have moved): for each op with an exact definition
(:data:`qfx_onnx.nonlinear.wiring.EXACT_OPS`) whose input comes from a cast and whose output
goes to exactly one cast, it writes ``node.kwargs["fixed"]`` from the policy's ``[nonlinear]``
settings and the types around the op (see :mod:`qfx_onnx.nonlinear.wiring`). An op it cannot
define (no cast before or after, softmax over a non-last axis of unknown size, layer_norm over
more than the last axis) keeps its float evaluation, logged; verify then reports it as not
guaranteed exact and export-hls refuses what has no HLS form.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import fx

from qfx_onnx.errors import ConfigError
from qfx_onnx.fixed.types import FixedType
from qfx_onnx.ir.ops import op_of
from qfx_onnx.nonlinear import wiring
from qfx_onnx.quant.quantize import CAST_MODULE_PREFIX, FixedPointModel, _cast_module_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NonlinearSettings:
    """The policy's ``[nonlinear]`` section (defaults chosen for the bounds in docs/nonlinear.md).

    ``exact``: give nonlinear ops their fixed-point definition (False: float64 then the cast, as
    before). ``table_bits``: index bits of one-input tables. ``guard_bits``: fractional bits of a
    table's or kernel's result beyond the following cast's (double rounding costs at most
    ``2**-guard_bits`` of that cast's LSB). ``exp_bits``/``reciprocal_bits``: softmax's tables;
    ``rsqrt_bits``: layer_norm's.
    """

    exact: bool = True
    table_bits: int = 10
    guard_bits: int = 8
    exp_bits: int = 10
    reciprocal_bits: int = 10
    rsqrt_bits: int = 10


def _single_type(q) -> FixedType | None:
    if q is None or q.per_channel_axis is not None:
        return None
    return q.frozen_types()[0]


def _output_cast(gm: fx.GraphModule, node: fx.Node):
    users = list(node.users)
    while len(users) == 1 and op_of(users[0].target) is not None and op_of(users[0].target).name == "identity":
        users = list(users[0].users)  # an imported quantizer: identity, then its cast (quantize.insert_quantizers)
    if len(users) == 1 and users[0].op == "call_module" and users[0].target.startswith(CAST_MODULE_PREFIX):
        return gm.get_submodule(users[0].target)
    return None


def spec_for(gm: fx.GraphModule, node: fx.Node, s: NonlinearSettings) -> str | None:
    """The ``fixed`` spec of one nonlinear op node, or None when it cannot be defined."""
    name = op_of(node.target).name
    x_t = _single_type(_cast_module_of(gm, node.args[0]))
    after = _single_type(_output_cast(gm, node))
    if x_t is None or after is None:
        return None
    fields = {"in": wiring.index_type(x_t)}
    if name in wiring.TABLE_OPS:
        # an input narrow enough for one entry per code: the entries are the following cast's values
        # of f(x), so op + cast equal float64 f then the cast (today's all-codes LUT) exactly
        narrow = x_t.width <= s.table_bits and _plain(after)
        fields.update(out=after if narrow else wiring.table_out_type(after, s.guard_bits), bits=s.table_bits)
    elif name == "softmax":
        n = _last_dim(node)
        if n is None:
            return None
        fields.update(n=n, out=wiring.table_out_type(after, s.guard_bits, signed=False),
                      exp_bits=s.exp_bits, recip_bits=s.reciprocal_bits)
    elif name == "layer_norm":
        n = _last_dim(node)
        gamma = _single_type(_cast_module_of(gm, node.args[1]))
        bias = node.args[2] if len(node.args) > 2 else None
        beta = _single_type(_cast_module_of(gm, bias)) if bias is not None else gamma
        if n is None or gamma is None or beta is None or node.kwargs.get("axis") != _rank(node) - 1:
            return None
        fields.update(n=n, eps=repr(float(node.kwargs.get("epsilon", 1e-5))), out=wiring.table_out_type(after, s.guard_bits),
                      rsqrt_bits=s.rsqrt_bits, gamma=gamma.with_modes("AP_RND", "AP_SAT", 0),
                      beta=beta.with_modes("AP_RND", "AP_SAT", 0))
    elif name == "div":
        b_t = _single_type(_cast_module_of(gm, node.args[1]))
        if b_t is None:
            return None
        fields = {"b": wiring.index_type(b_t), "recip": wiring.recip_type(b_t), "recip_bits": s.reciprocal_bits,
                  "out": wiring.table_out_type(after, s.guard_bits)}
    return wiring.spec_text(**fields)


def _plain(t: FixedType) -> bool:
    """Modes the ONNX form of a table's beyond-range cast supports (and no saturation bits)."""
    return t.q.value in ("AP_TRN", "AP_RND", "AP_RND_CONV") and t.o.value in ("AP_SAT", "AP_WRAP") and not t.n


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    value = node.args[0].meta.get("qfx_shape")
    return tuple(value) if value is not None else None


def _rank(node: fx.Node) -> int:
    shape = _shape(node)
    return len(shape) if shape is not None else -1


def _last_dim(node: fx.Node) -> int | None:
    shape = _shape(node)
    if shape is None:
        return None
    axis = node.kwargs.get("axis", -1)
    if axis % len(shape) != len(shape) - 1:
        return None
    return int(shape[-1])


def _record_shapes(model: FixedPointModel) -> None:
    """``meta["qfx_shape"]`` of every node, from one sample of batch 1 through the emulation."""
    gm = model.graph_module
    info = gm.onnx_info
    examples = [torch.zeros([1 if (d is None or isinstance(d, str)) else d for d in shape], dtype=torch.float64)
                for shape in info.input_shapes]
    shapes: dict[fx.Node, tuple[int, ...]] = {}

    class _Probe(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if isinstance(out, torch.Tensor):
                shapes[n] = tuple(out.shape)
            return out

    was = model.training
    model.eval()
    param = next(gm.parameters(), None)
    dtype, device = (param.dtype, param.device) if param is not None else (torch.float64, torch.device("cpu"))
    with torch.no_grad():
        _Probe(gm).run(*[x.to(device, dtype) for x in examples])
    model.train(was)
    for n, shape in shapes.items():
        n.meta["qfx_shape"] = shape


def settings_of(model: FixedPointModel) -> NonlinearSettings | None:
    """The settings the model's specs were made with (table sizes; ``guard_bits`` the default),
    None when it has no spec (a float-evaluated model stays so)."""
    found: dict[str, int] = {}
    for node in model.graph_module.graph.nodes:
        text = node.kwargs.get("fixed") if node.op == "call_function" else None
        if not text:
            continue
        f = wiring.parse_spec(text)
        name = op_of(node.target).name
        for key, field in (("bits", "table_bits"), ("exp_bits", "exp_bits"), ("recip_bits", "reciprocal_bits"),
                           ("rsqrt_bits", "rsqrt_bits")):
            if key in f and (key != "bits" or name in wiring.TABLE_OPS):
                found.setdefault(field, int(f[key]))
    return NonlinearSettings(**found) if found else None


def refresh_nonlinear(model: FixedPointModel) -> int:
    """Rebuild the specs of a model that has them for its current types (after finetune moved
    binary points or changed widths), with the table sizes it had; returns how many ops have one."""
    settings = settings_of(model)
    return attach_nonlinear(model, settings) if settings is not None else 0


def attach_nonlinear(model: FixedPointModel, settings: NonlinearSettings | None = None) -> int:
    """Write (or rewrite) the ``fixed`` spec of every definable nonlinear op of ``model``;
    returns how many ops have one. ``settings.exact=False`` removes the specs."""
    s = settings or NonlinearSettings()
    gm = model.graph_module
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and op_of(n.target) is not None
             and op_of(n.target).name in wiring.EXACT_OPS]
    if not nodes:
        return 0
    for node in nodes:  # evaluate the shapes with float ops, whatever the earlier specs
        node.kwargs = {k: v for k, v in node.kwargs.items() if k != "fixed"}
    gm.recompile()
    if not s.exact:
        return 0
    _record_shapes(model)
    count = 0
    for node in nodes:
        spec = spec_for(gm, node, s)
        if spec is None:
            log.info("%s (%s): no exact fixed-point form here; evaluated in float", node.name, op_of(node.target).name)
            continue
        try:  # build the tables now: a setting too small for this op is an error naming it
            wiring.build(op_of(node.target).name, spec, node.kwargs.get("approximate", "none"))
        except ConfigError as exc:
            raise ConfigError(f"node {node.meta.get('onnx_node') or node.name!r} ({op_of(node.target).name}): {exc} "
                              "(raise the [nonlinear] table bits)") from None
        node.kwargs = {**node.kwargs, "fixed": spec}
        count += 1
    gm.recompile()
    return count


__all__ = ["NonlinearSettings", "attach_nonlinear", "refresh_nonlinear", "settings_of", "spec_for"]
