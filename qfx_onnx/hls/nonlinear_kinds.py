"""Layer kinds of the exact nonlinear kernels: ``softmax``, ``layer_norm`` and ``div`` (one shared header).

A softmax layer runs :func:`~qfx_onnx.nonlinear.kernels.softmax_exact` row by row over the last
axis with ``qfx_nl::softmax_stable`` (``qfx_onnx/nonlinear/cpp/nnet_qfx_nonlinear.h``): each row
is first assigned to the kernel's ``in_t`` (the op's index cast, an identity while the input type
is the one the spec was made for), and each result goes through the layer's fused epilogue (the
cast after the op). The kernel's config struct (types and tables) comes from
:func:`~qfx_onnx.nonlinear.cpp_emit.softmax_struct` of the op's spec, so the C++ is the emulation's
definition bit for bit. The estimate counts its tables (``params.tables``) and its ``n``
products per row. A layer_norm layer runs ``qfx_nl::layer_norm`` the same way, with its scale
and bias (weights) copied into the kernel's ``gamma_t``/``beta_t`` (the spec's casts of them).
A div layer (division by an activation of the same shape) casts each divisor to the spec's index
type, reads its reciprocal table and casts the exact product to the spec's ``out`` type.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qfx_onnx.errors import ExportError
from qfx_onnx.fixed.types import FixedType
from qfx_onnx.hls.fxutil import label, op_name
from qfx_onnx.hls.kinds import LayerKind, layer_kind
from qfx_onnx.hls.model import Layer, Products
from qfx_onnx.nonlinear import wiring
from qfx_onnx.nonlinear.cpp_emit import layer_norm_struct, softmax_struct, table_struct

HEADER = "nnet_qfx_nonlinear.h"  # found beside the templates by qfx_onnx.hls.files.header


@dataclass
class SoftmaxParams:
    rows: int
    n: int
    spec: str  # the op's ``fixed`` spec (qfx_onnx.nonlinear.wiring)

    @property
    def config(self):
        return wiring.build("softmax", self.spec)

    @property
    def tables(self) -> list:
        """The LookupTables the layer stores (the estimate counts their bits, BRAM or LUT)."""
        return [self.config.exp, self.config.reciprocal]


def _check_softmax(builder, node, data) -> None:
    spec = node.kwargs.get("fixed")
    if not spec:
        raise ExportError(f"node {label(node)} ({op_name(node)}): no HLS form for a Softmax without its exact "
                          "fixed-point definition (over the last axis, quantized with [nonlinear] exact = true)")
    shape = builder.shape(node.args[0])
    if node.kwargs.get("axis", -1) % len(shape) != len(shape) - 1:
        raise ExportError(f"node {label(node)} (softmax): only a softmax over the last axis has an HLS form")


def _build_softmax(builder, ident, group, out) -> Layer:
    node = group.head
    x = node.args[0]
    shape = builder.shape(x)
    spec = node.kwargs["fixed"]
    params = SoftmaxParams(int(np.prod(shape[:-1])), int(shape[-1]), spec)
    cfg = params.config
    head = builder.ctype(node, "accumulator", cfg.out_type)
    size = params.rows * params.n  # one product e_j * r per element
    products = [Products(size, params.n, params.rows, cfg.exp.out_type, cfg.reciprocal.out_type)]
    return Layer(ident, "softmax", [builder.buffer(x)], out, head, params=params, products=products)


def _softmax_config(layer: Layer, options: dict):
    p = layer.params
    kernel = f"{layer.ident}_softmax"
    x_t = layer.inputs[0].ctype.ident
    size = p.rows * p.n
    # the row loop lives in a struct after the kernel's (extra structs follow the config struct)
    run = (f"struct config_{layer.ident}_run : config_{layer.ident} {{\n"
           f"static void run(const {x_t} x[{size}], res_t y[{size}]) {{\n"
           f"  for (int r = 0; r < {p.rows}; r++) {{\n"
           f"    {kernel}::in_t xi[{p.n}];\n    {kernel}::out_t yo[{p.n}];\n"
           f"    for (int j = 0; j < {p.n}; j++) xi[j] = x[r * {p.n} + j];\n"
           f"    qfx_nl::softmax_stable<{kernel}>(xi, yo);\n"
           f"    for (int j = 0; j < {p.n}; j++) y[r * {p.n} + j] = epilogue(head_t(yo[j]), r * {p.n} + j);\n"
           f"  }}\n}}\n}};")
    return [], [softmax_struct(p.config, kernel), run], set()


def _run_call(layer: Layer, cfg: str, array) -> list[str]:
    """``<cfg>_run::run(inputs..., output)``: the call of every kind here (softmax, layer_norm, div)."""
    args = ", ".join(array(b) for b in layer.inputs)
    return [f"{cfg}_run::run({args}, {array(layer.output)});"]


layer_kind(LayerKind("softmax", _build_softmax, _softmax_config, _run_call,
                     iterations=lambda layer: layer.params.rows, check=_check_softmax, header=HEADER))


# ------------------------------------------------------------------------------------ layer_norm
@dataclass
class LayerNormParams:
    rows: int
    n: int
    spec: str
    has_bias: bool

    @property
    def config(self):
        return wiring.build("layer_norm", self.spec)

    @property
    def tables(self) -> list:
        return [self.config.rsqrt]


def _check_layer_norm(builder, node, data) -> None:
    if not node.kwargs.get("fixed"):
        raise ExportError(f"node {label(node)} ({op_name(node)}): no HLS form for a LayerNormalization without "
                          "its exact fixed-point definition (over the last axis, scale and bias constant)")
    if len(data) != 1 or node.args[0] is not data[0]:
        raise ExportError(f"node {label(node)} (layer_norm): the scale and bias must be constants")


def _build_layer_norm(builder, ident, group, out) -> Layer:
    node = group.head
    x = node.args[0]
    shape = builder.shape(x)
    bias = node.args[2] if len(node.args) > 2 else None
    params = LayerNormParams(int(np.prod(shape[:-1])), int(shape[-1]), node.kwargs["fixed"], bias is not None)
    cfg = params.config
    head = builder.ctype(node, "accumulator", cfg.out_type)
    inputs = [builder.buffer(x), builder.constant(node.args[1], "weight")]
    if bias is not None:
        inputs.append(builder.constant(bias, "bias"))
    size = params.rows * params.n
    products = [Products(size, params.n, params.rows, cfg.centered_type, cfg.centered_type),  # c * c
                Products(size, params.n, params.rows, cfg.centered_type, cfg.rsqrt.out_type),  # c * r
                Products(size, params.n, params.rows, cfg.norm_type, cfg.gamma_type)]  # z * gamma
    return Layer(ident, "layer_norm", inputs, out, head, params=params, products=products)


def _layer_norm_config(layer: Layer, options: dict):
    p = layer.params
    kernel = f"{layer.ident}_layer_norm"
    x, gamma = layer.inputs[0], layer.inputs[1]
    beta = layer.inputs[2] if p.has_bias else None
    size = p.rows * p.n
    beta_arg = f", const {beta.ctype.ident} b[{p.n}]" if beta is not None else ""
    beta_val = "b[j]" if beta is not None else "0"
    run = (f"struct config_{layer.ident}_run : config_{layer.ident} {{\n"
           f"static void run(const {x.ctype.ident} x[{size}], const {gamma.ctype.ident} g[{p.n}]{beta_arg}, "
           f"res_t y[{size}]) {{\n"
           f"  {kernel}::gamma_t gk[{p.n}];\n  {kernel}::beta_t bk[{p.n}];\n"
           f"  for (int j = 0; j < {p.n}; j++) {{ gk[j] = g[j]; bk[j] = {beta_val}; }}\n"
           f"  for (int r = 0; r < {p.rows}; r++) {{\n"
           f"    {kernel}::in_t xi[{p.n}];\n    {kernel}::out_t yo[{p.n}];\n"
           f"    for (int j = 0; j < {p.n}; j++) xi[j] = x[r * {p.n} + j];\n"
           f"    qfx_nl::layer_norm<{kernel}>(xi, gk, bk, yo);\n"
           f"    for (int j = 0; j < {p.n}; j++) y[r * {p.n} + j] = epilogue(head_t(yo[j]), r * {p.n} + j);\n"
           f"  }}\n}}\n}};")
    return [], [layer_norm_struct(p.config, kernel), run], set()


layer_kind(LayerKind("layer_norm", _build_layer_norm, _layer_norm_config, _run_call,
                     iterations=lambda layer: layer.params.rows, check=_check_layer_norm, header=HEADER))


# ------------------------------------------------------------------------------------ div by an activation
@dataclass
class DivParams:
    size: int
    spec: str

    @property
    def config(self):
        """The divisor's reciprocal LookupTable (its in_t is the spec's index cast ``b``)."""
        return wiring.build("div", self.spec)

    @property
    def tables(self) -> list:
        return [self.config]


def _check_div(builder, node, data) -> None:
    if not node.kwargs.get("fixed"):
        raise ExportError(f"node {label(node)} ({op_name(node)}): no HLS form for a division by an activation "
                          "without its exact fixed-point definition")
    a, b = (builder.shape(x) for x in node.args[:2])
    if a != b or len(data) != 2:
        raise ExportError(f"node {label(node)} (div): only a division of two activations of one shape has an HLS "
                          f"form, got {a} / {b}")


def _build_div(builder, ident, group, out) -> Layer:
    node = group.head
    a, b = node.args[0], node.args[1]
    params = DivParams(int(np.prod(builder.shape(a))), node.kwargs["fixed"])
    out_t = FixedType.parse(wiring.parse_spec(params.spec)["out"])
    head = builder.ctype(node, "accumulator", out_t)
    products = [Products(params.size, 1, params.size, builder.fixed(a), params.config.out_type)]
    return Layer(ident, "div", [builder.buffer(a), builder.buffer(b)], out, head, params=params, products=products)


def _div_config(layer: Layer, options: dict):
    p = layer.params
    table = f"{layer.ident}_recip"
    a, b = layer.inputs
    run = (f"struct config_{layer.ident}_run : config_{layer.ident} {{\n"
           f"static void run(const {a.ctype.ident} a[{p.size}], const {b.ctype.ident} b[{p.size}], res_t y[{p.size}]) {{\n"
           f"  for (int i = 0; i < {p.size}; i++) {{\n"
           f"    {table}::in_t bi = b[i];  // the op's index cast\n"
           f"    {table}::out_t r = qfx_nl::table_lookup<{table}>(bi);\n"
           f"    head_t q = a[i] * r;  // the exact product, cast to the spec's out type\n"
           f"    y[i] = epilogue(q, i);\n  }}\n}}\n}};")
    return [], [table_struct(p.config, table), run], set()


layer_kind(LayerKind("div", _build_div, _div_config, _run_call, iterations=lambda layer: layer.params.size,
                     check=_check_div, header=HEADER))
