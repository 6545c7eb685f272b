"""Layer kinds: what the HLS exporter, the code generator and the estimator know of one kind of
layer, registered in one place (:data:`LAYER_KINDS`), with the typed parameters of each kind.

An IR op whose definition says ``hls=HlsForm.head("<kind>")`` heads a layer of that kind. A
:class:`LayerKind` gives

* ``build(builder, ident, group, out) -> Layer``: the layer from its fx nodes (the builder of
  :mod:`qfx_onnx.hls.export` offers ``shape``, ``fixed``, ``ctype``, ``constant``, ``buffer``,
  ``index_map`` ...); ``check(builder, node, data)`` may refuse a head when the graph is grouped;
* ``config(layer, options) -> (members, extra structs, K-hot sign patterns)``: the C++ members of
  the layer's ``config_<layer>`` struct beyond ``head_t``, ``res_t``, ``reuse_factor`` and the
  fused ``epilogue``, which every kind gets;
* ``call(layer, cfg, array) -> [statements]``: the layer's call in the top function (``array``
  names a buffer there);
* ``iterations(layer)``: pipelined iterations of its outer loop (the estimate's latency);
* ``header``: the C++ file under ``qfx_onnx/hls/templates/`` that holds its template, copied into
  ``firmware/`` and included by ``parameters.h`` (the built-in kinds live in ``layers.h``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from qfx_onnx.errors import ExportError
from qfx_onnx.hls.cpp import WINDOW, indent, ints, render_mac, render_op, table_fn
from qfx_onnx.hls.fxutil import label, op_name
from qfx_onnx.hls.model import Buffer, Layer, Products

Config = tuple[list[str], list[str], set[str]]


@dataclass(frozen=True)
class LayerKind:
    """One kind of layer (see the module docstring)."""

    name: str
    build: Callable[[Any, str, Any, Buffer], Layer] | None
    config: Callable[[Layer, dict], Config] | None
    call: Callable[[Layer, str, Callable[[Buffer], str]], list[str]]
    iterations: Callable[[Layer], int] = lambda layer: layer.output.size
    check: Callable[[Any, Any, list], None] | None = None
    header: str | None = None


LAYER_KINDS: dict[str, LayerKind] = {}


def layer_kind(kind: LayerKind) -> LayerKind:
    """Register ``kind`` (a name registered twice is a ValueError)."""
    if kind.name in LAYER_KINDS:
        raise ValueError(f"layer kind {kind.name!r} registered twice")
    LAYER_KINDS[kind.name] = kind
    return kind


# ------------------------------------------------------------------------------------ typed parameters
@dataclass
class Window:
    """2-D window geometry (a 1-D op is H = 1); the names are the ``CONFIG_T`` members."""

    in_h: int
    in_w: int
    out_h: int
    out_w: int
    k_h: int
    k_w: int
    stride_h: int
    stride_w: int
    pad_top: int
    pad_left: int
    dil_h: int
    dil_w: int


@dataclass
class DenseParams:
    n_rows: int
    n_in: int
    n_out: int


@dataclass
class ConvParams:
    n_chan: int
    n_filt: int
    groups: int
    chan_per_group: int
    filt_per_group: int
    window: Window


@dataclass
class PoolParams:
    n_chan: int
    is_max: bool
    window: Window


@dataclass
class ReduceParams:
    n_in: int
    n_out: int
    n_red: int
    is_max: bool
    out_part: str  # C++ expression of o: the offset of output o's first term
    red_part: str  # C++ expression of r: the offset of term r


@dataclass
class RemapParams:
    n_in: int
    n_out: int
    table: np.ndarray  # flat source index of each output element, -1 for a padding zero


@dataclass
class ConcatParams:
    n_out: int
    dst: list[np.ndarray] = field(default_factory=list)  # per input: destination of each element


@dataclass
class MapParams:
    n_out: int
    read_index: str = "i"  # no head op: the C++ index read from input 0


@dataclass
class FanoutParams:
    copies: list[Buffer]


def _members(p, names: tuple[str, ...]) -> list[str]:
    values = {**vars(p), **(vars(p.window) if hasattr(p, "window") else {})}
    return ints(names, values)


# ------------------------------------------------------------------------------------ built-in kinds
def _linear_config(layer: Layer, options: dict) -> Config:
    """dense/conv: types, sizes, partitioning, and the K-hot ``mac`` (with its sign patterns)."""
    p, w, b = layer.params, layer.weight, layer.bias
    rf = options["reuse_factor"]
    members = [f"typedef {layer.head_type.ident} accum_t;", f"typedef {w.ctype.ident} weight_t;",
               f"typedef {b.ctype.ident if b else 'ap_ufixed<1, 1>'} bias_t;",
               f"static const bool has_bias = {'true' if b else 'false'};", f"static const int n_bias = {b.size if b else 1};"]
    dense = layer.kind == "dense"
    per_iter = p.n_in * p.n_out if dense else p.n_filt * p.chan_per_group * p.window.k_h * p.window.k_w
    members += [f"static const int unroll_factor = {max(1, math.ceil(per_iter / rf))};",
                f"static const int n_partition = {max(1, math.ceil(w.size / rf))};"]
    members += _members(p, ("n_rows", "n_in", "n_out") if dense else
                        ("n_chan", "n_filt", "groups", "chan_per_group", "filt_per_group") + WINDOW)
    if not w.khot:
        return members, [], set()
    mac, patterns = render_mac(layer, options["term_types"][layer.ident].ident, "x")
    n_acc, n_x = (p.n_out, p.n_in) if dense else (p.n_filt, p.n_chan * p.window.k_h * p.window.k_w)
    members.append(f"static void mac(const {layer.inputs[0].ctype.ident} x[{n_x}], accum_t acc[{n_acc}]) {{\n"
                   f"#pragma HLS INLINE\n{indent(mac, 2)}\n}}")
    return members, [], patterns


def _linear_call(fn: str):
    def call(layer: Layer, cfg: str, array) -> list[str]:
        x, y = layer.inputs[0], layer.output
        b = array(layer.bias) if layer.bias else "qfx::zero_bias"
        if layer.weight.khot:
            return [f"qfx::{fn}_khot<{x.ctype.ident}, {y.ctype.ident}, {cfg}>({array(x)}, {array(y)}, {b});"]
        return [f"qfx::{fn}<{x.ctype.ident}, {y.ctype.ident}, {cfg}>({array(x)}, {array(y)}, "
                f"{array(layer.weight)}, {b});"]
    return call


def _unary_call(fn: str):
    def call(layer: Layer, cfg: str, array) -> list[str]:
        x, y = layer.inputs[0], layer.output
        return [f"qfx::{fn}<{x.ctype.ident}, {y.ctype.ident}, {cfg}>({array(x)}, {array(y)});"]
    return call


def _window_config(layer: Layer, options: dict) -> Config:
    p = layer.params
    members = [f"typedef {layer.head_type.ident} accum_t;", f"static const bool is_max = {'true' if p.is_max else 'false'};"]
    return members + _members(p, ("n_chan",) + WINDOW), [], set()


def _reduce_config(layer: Layer, options: dict) -> Config:
    p = layer.params
    members = [f"typedef {layer.head_type.ident} accum_t;", f"static const bool is_max = {'true' if p.is_max else 'false'};"]
    members += _members(p, ("n_in", "n_out", "n_red"))
    members.append(f"static int in_index(int o, int r) {{ return {p.out_part} + {p.red_part}; }}")
    return members, [], set()


def _remap_config(layer: Layer, options: dict) -> Config:
    return _members(layer.params, ("n_in", "n_out")) + [table_fn("src", "i", layer.params.table)], [], set()


def _concat_config(layer: Layer, options: dict) -> Config:
    p, name, extra = layer.params, f"config_{layer.ident}", []
    for k, (src, dst) in enumerate(zip(layer.inputs, p.dst)):
        extra.append(f"struct {name}_p{k} : {name} {{\n  static const int n_in = {src.size};\n"
                     f"  {table_fn('dst', 'j', dst)}\n}};")
    parts = [f"typedef {name}_p{k} p{k};" for k in range(len(layer.inputs))]  # for concat2/3/4
    extra.append(f"struct {name}_all : {name} {{\n{indent(parts, 2)}\n}};")
    return _members(p, ("n_out",)), extra, set()


def _concat_call(layer: Layer, cfg: str, array) -> list[str]:
    ins, y = layer.inputs, layer.output
    if len(ins) > 4:  # no single-call template: one scatter per part
        return [f"qfx::scatter<{x.ctype.ident}, {y.ctype.ident}, {cfg}_p{k}>({array(x)}, {array(y)});"
                for k, x in enumerate(ins)]
    types = ", ".join(x.ctype.ident for x in ins)
    return [f"qfx::concat{len(ins)}<{types}, {y.ctype.ident}, {cfg}_all>({', '.join(array(x) for x in ins)}, "
            f"{array(y)});"]


def _map_config(layer: Layer, options: dict) -> Config:
    """map: sizes and ``head(i, a, b, c)``, the element-wise op on the data inputs (or a read)."""
    p = layer.params
    names = ("a", "b", "c")
    args = ", ".join(f"const {b.ctype.ident} {nm}[{b.size}]" for nm, b in zip(names, layer.inputs))
    members = [f"static const int n_out = {p.n_out};"]
    members += [f"static const int n_{nm} = {b.size};" for nm, b in zip(names, layer.inputs)]
    body = [f"return a[{p.read_index}];"] if layer.head is None else render_op(layer.head, "h", "a") + ["return h;"]
    members.append(f"static head_t head(int i, {args}) {{\n#pragma HLS INLINE\n{indent(body, 2)}\n}}")
    return members, [], set()


def _map_call(layer: Layer, cfg: str, array) -> list[str]:
    ins, y = layer.inputs, layer.output
    types = ", ".join(x.ctype.ident for x in ins)
    return [f"qfx::map{len(ins)}<{types}, {y.ctype.ident}, {cfg}>({', '.join(array(x) for x in ins)}, {array(y)});"]


def _fanout_call(layer: Layer, cfg: str, array) -> list[str]:
    x, (a, b) = layer.inputs[0], layer.params.copies
    return [f"qfx::fanout2<{x.ctype.ident}, {x.size}>({array(x)}, {array(a)}, {array(b)});"]


def _check_linear(builder, node, data) -> None:
    if len(data) != 1 or node.args[0] is not data[0]:
        raise ExportError(f"node {label(node)} ({op_name(node)}): only data x constant-weight products have an "
                          "HLS form (the weight must be a constant, the data the first input)")


def _method(name: str):
    return lambda builder, ident, group, out: getattr(builder, name)(ident, group, out)


layer_kind(LayerKind("dense", _method("_layer_dense"), _linear_config, _linear_call("dense"),
                     iterations=lambda layer: layer.params.n_rows, check=_check_linear))
layer_kind(LayerKind("conv", _method("_layer_conv"), _linear_config, _linear_call("conv2d"),
                     iterations=lambda layer: layer.params.window.out_h * layer.params.window.out_w,
                     check=_check_linear))
# pool: channels unrolled inside the pixel loop, as in conv
layer_kind(LayerKind("pool", _method("_layer_pool"), _window_config, _unary_call("pool2d"),
                     iterations=lambda layer: layer.params.window.out_h * layer.params.window.out_w))
layer_kind(LayerKind("reduce", _method("_layer_reduce"), _reduce_config, _unary_call("reduce")))
layer_kind(LayerKind("remap", _method("_layer_remap"), _remap_config, _unary_call("remap")))
layer_kind(LayerKind("concat", _method("_layer_concat"), _concat_config, _concat_call,
                     iterations=lambda layer: sum(x.size for x in layer.inputs)))
layer_kind(LayerKind("map", _method("_layer_map"), _map_config, _map_call))
layer_kind(LayerKind("fanout", None, None, _fanout_call))  # --io stream copies; needs no configuration


# ------------------------------------------------------------------------------------ matmul of two activations
@dataclass
class MatMulParams:
    """A batched product ``y[b] = a[b] @ b[b]`` (numpy matmul, batch dims broadcast) of two arrays
    that are not both constants: ``n_batch`` products of ``[n_rows][n_inner] x [n_inner][n_cols]``.
    ``a_part``/``b_part``: C++ expressions of the batch index ``bi`` giving the offset of that
    batch's matrix in ``a``/``b`` (a broadcast batch dim contributes 0)."""

    n_batch: int
    n_rows: int
    n_inner: int
    n_cols: int
    a_part: str
    b_part: str


def _batch_part(out_batch: tuple[int, ...], shape: tuple[int, ...]) -> str:
    """Offset of batch ``bi`` (flat over ``out_batch``) in an array of ``shape`` (numpy broadcast)."""
    matrix = int(np.prod(shape[-2:]))
    batch = (1,) * (len(out_batch) - len(shape[:-2])) + tuple(shape[:-2])
    total = int(np.prod(out_batch))
    terms, div = [], 1
    for d in reversed(range(len(out_batch))):
        if out_batch[d] > 1 and batch[d] > 1:
            t = "bi" if div == 1 else f"(bi / {div})"
            t = f"({t} % {out_batch[d]})" if div * out_batch[d] < total else t
            terms.append(f"{t} * {int(np.prod(batch[d + 1:])) * matrix}")
        div *= out_batch[d]
    return " + ".join(reversed(terms)) if terms else "0"


def _build_matmul_act(builder, ident: str, group, out: Buffer) -> Layer:
    """The layer of ``matmul(a, b)`` with an activation operand: the accumulator type is the
    lossless sum of products type propagation gives the node; the chain's first cast rounds it."""
    node = group.head
    a, b = node.args[0], node.args[1]
    a_shape, b_shape, out_shape = builder.shape(a), builder.shape(b), builder.shape(node)
    params = MatMulParams(int(np.prod(out_shape[:-2])), a_shape[-2], a_shape[-1], b_shape[-1],
                          _batch_part(out_shape[:-2], a_shape), _batch_part(out_shape[:-2], b_shape))
    inputs = [builder.constant(x) if x in builder.const else builder.buffer(x) for x in (a, b)]
    acc = builder.ctype(node, "accumulator")
    rows = params.n_batch * params.n_rows
    per_row = params.n_cols * params.n_inner
    prods = Products(rows * per_row, per_row, rows, builder.fixed(a), builder.fixed(b), acc_width=acc.type.width)
    return Layer(ident, "matmul_act", inputs, out, acc, params=params, products=[prods])


def _check_matmul_act(builder, node, data) -> None:
    shapes = [builder.shape(x) for x in node.args[:2]]
    if any(len(s) < 2 for s in shapes):
        raise ExportError(f"node {label(node)} (matmul): a product of activations needs both operands of rank 2 "
                          f"or more, got {shapes[0]} x {shapes[1]}")


def _matmul_act_config(layer: Layer, options: dict) -> Config:
    p = layer.params
    per_row = p.n_cols * p.n_inner
    members = [f"typedef {layer.head_type.ident} accum_t;",
               f"static const int unroll_factor = {max(1, math.ceil(per_row / options['reuse_factor']))};",
               f"static const int n_a = {layer.inputs[0].size};", f"static const int n_b = {layer.inputs[1].size};"]
    members += _members(p, ("n_batch", "n_rows", "n_inner", "n_cols"))
    members += [f"static int a_base(int bi) {{ return {p.a_part}; }}",
                f"static int b_base(int bi) {{ return {p.b_part}; }}"]
    return members, [], set()


def _matmul_act_call(layer: Layer, cfg: str, array) -> list[str]:
    a, b, y = layer.inputs[0], layer.inputs[1], layer.output
    return [f"qfx::matmul<{a.ctype.ident}, {b.ctype.ident}, {y.ctype.ident}, {cfg}>({array(a)}, {array(b)}, "
            f"{array(y)});"]


# one pipelined iteration per output row (batch x rows), every product of the row unrolled, as dense
layer_kind(LayerKind("matmul_act", _build_matmul_act, _matmul_act_config, _matmul_act_call,
                     iterations=lambda layer: layer.params.n_batch * layer.params.n_rows,
                     check=_check_matmul_act, header="matmul.h"))

# the exact nonlinear kernels' kinds (softmax) register themselves in their own module
from qfx_onnx.hls import nonlinear_kinds  # noqa: E402,F401
