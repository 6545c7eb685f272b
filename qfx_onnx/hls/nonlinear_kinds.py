"""Layer kinds of the exact nonlinear kernels: ``softmax`` (and the header they share).

A softmax layer runs :func:`~qfx_onnx.nonlinear.kernels.softmax_exact` row by row over the last
axis with ``qfx_nl::softmax_stable`` (``qfx_onnx/nonlinear/cpp/nnet_qfx_nonlinear.h``): each row
is first assigned to the kernel's ``in_t`` (the op's index cast, an identity while the input type
is the one the spec was made for), and each result goes through the layer's fused epilogue (the
cast after the op). The kernel's config struct (types and tables) comes from
:func:`~qfx_onnx.nonlinear.cpp_emit.softmax_struct` of the op's spec, so the C++ is the emulation's
definition bit for bit. The estimate counts its tables (``params.tables``) and its ``n``
products per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qfx_onnx.errors import ExportError
from qfx_onnx.hls.fxutil import label, op_name
from qfx_onnx.hls.kinds import LayerKind, layer_kind
from qfx_onnx.hls.model import Layer, Products
from qfx_onnx.nonlinear import wiring
from qfx_onnx.nonlinear.cpp_emit import softmax_struct

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
        raise ExportError(f"node {label(node)} ({op_name(node)}): a softmax needs its exact fixed-point "
                          "definition (quantize with [nonlinear] exact = true)")
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


def _softmax_call(layer: Layer, cfg: str, array) -> list[str]:
    return [f"{cfg}_run::run({array(layer.inputs[0])}, {array(layer.output)});"]


layer_kind(LayerKind("softmax", _build_softmax, _softmax_config, _softmax_call,
                     iterations=lambda layer: layer.params.rows, check=_check_softmax, header=HEADER))
