"""Layer heads: what each kind of layer computes before its fused element-wise chain, built from
the fx nodes of a group (see :mod:`qfx_onnx.hls.export`), and the chain's steps themselves.

Mixed into the export builder, whose state (types, constants, buffers, recorded values) they use.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import fx

from qfx_onnx.errors import ExportError
from qfx_onnx.fixed.types import FixedType
from qfx_onnx.hls.fxutil import bcast_index, label, mixed_radix, op_name
from qfx_onnx.hls.model import Buffer, Constant, Layer, Operand, Products, Step
from qfx_onnx.hls.shift_add import khot_terms, khot_weight
from qfx_onnx.hls.kinds import ConcatParams, ConvParams, DenseParams, MapParams, PoolParams, ReduceParams, RemapParams, Window
from qfx_onnx.ir.ops import op_of, pool_padding

if TYPE_CHECKING:  # export.py imports this module; the type is only for annotations
    from qfx_onnx.hls.export import _Group

MAX_LUT_WIDTH = 16


class HeadsMixin:
    """Builds :class:`Layer` objects; needs the builder's ``shape``, ``fixed``, ``ctype``,
    ``extra_ctype``, ``constant``, ``quantizer``, ``buffer``, ``index_map``, ``const`` and ``names``."""

    def steps(self, g: _Group, layer: Layer) -> list[Step]:
        steps = []
        value_type = layer.head_type.type
        n = int(np.prod(g.shape))
        for node in g.steps:
            if node.op == "call_module":
                steps.append(Step("cast", self.ctype(node, "tensor"), source=str(node.meta.get("onnx_name"))))
            elif node in g.lut_casts:
                steps.append(self.lut_step(node, g.lut_casts[node], value_type))
            else:
                steps.append(self.op_step(node, g, None))
                layer.products += self.step_products(node, n)
            value_type = steps[-1].out.type
        return steps

    def op_step(self, node: fx.Node, g: _Group, data: list[fx.Node] | None) -> Step:
        """An arith op: its chain input (data None) or its data inputs (a map head), constants."""
        operands = []
        out_shape = self.shape(node)
        for a in node.args:
            if a is None:
                operands.append(Operand("none"))
            elif not isinstance(a, fx.Node):
                raise ExportError(f"node {label(node)}: non-tensor argument {a!r} to {op_name(node)}")
            elif a in self.const:
                c = self.constant(a)
                operands.append(Operand("const", bcast_index(out_shape, tuple(c.shape)), const=c))
            elif data is None:
                operands.append(Operand("value"))
            else:
                operands.append(Operand("data", bcast_index(out_shape, self.shape(a)), data=data.index(a)))
        out = self.ctype(node, "intermediate")
        source = str(node.meta.get("onnx_name") or node.name)
        temps = {}
        rule = op_of(node.target).hls.temps
        if rule is not None:  # named intermediates of the op's C++ (hard_swish: its hard-sigmoid factor)
            types = [self._operand_type(o, data, node) for o in operands]
            temps = {key: self.extra_ctype(f"{source}_{key}", t, "intermediate") for key, t in rule(types).items()}
        return Step("op", out, op_name(node), operands, source=source, temps=temps)

    def _operand_type(self, operand: Operand, data, node: fx.Node) -> FixedType:
        if operand.kind == "const":
            return operand.const.ctype.type
        if operand.kind == "data":
            return self.fixed(data[operand.data])
        return self.fixed(node.args[0])

    def lut_step(self, node: fx.Node, cast: fx.Node, in_t: FixedType) -> Step:
        """A one-input op and its cast: the op's own compact table where it holds fewer bits than
        one entry of the cast's type per input code (or the input is too wide for that), else the
        all-codes table (``IrOp.hls.table_of``)."""
        form = op_of(node.target).hls
        compact = form.compact(node) if form.compact is not None else None
        out = self.ctype(cast, "tensor")
        all_codes_bits = (1 << in_t.width) * out.type.width if in_t.width <= MAX_LUT_WIDTH else None
        if compact is not None and (all_codes_bits is None or compact.bits < all_codes_bits):
            source = str(cast.meta.get("onnx_name") or cast.name)
            return Step("table", out, op_name(node), lookup=compact, ident=self.names.name(source + "_table", "t_"),
                        source=source)
        if in_t.width > MAX_LUT_WIDTH:
            raise ExportError(f"node {label(node)} ({op_name(node)}): input type {in_t} is wider than "
                              f"{MAX_LUT_WIDTH} bits, too wide for a lookup table")
        q = self.quantizer(cast)
        raw = np.arange(1 << in_t.width, dtype=np.int64)
        codes = raw - ((raw >> (in_t.width - 1)) << in_t.width) if in_t.signed else raw
        x = torch.from_numpy(np.ldexp(codes.astype(np.float64), -in_t.frac))
        fn = form.table or node.target  # the function the table holds (IrOp.hls.table)
        with torch.no_grad():
            y = q(fn(x, **node.kwargs))
        t = out.type
        scaled = y.numpy() * math.ldexp(1.0, t.frac)
        if not np.array_equal(np.round(scaled), scaled):
            raise ExportError(f"node {label(node)}: lookup table values are not exact in {t}")
        source = str(cast.meta.get("onnx_name") or cast.name)
        table = Constant(self.names.name(source + "_lut", "w_"), out, np.round(scaled).astype(np.int64),
                         (1 << in_t.width,), source + " (table)")
        self.constants[cast] = table
        return Step("lut", out, op_name(node), table=table, source=source)

    def step_products(self, node: fx.Node, n: int) -> list[Products]:
        """The multiplications of an element-wise op (``IrOp.hls.products`` per element)."""
        per_element = op_of(node.target).hls.products
        if not per_element:
            return []
        types = [self.info[a].type for a in node.all_input_nodes]
        if any(t is None for t in types) or len(types) < 2:
            return []
        count = n * per_element
        return [Products(count, count, 1, types[0], types[1])]

    # --- heads
    def _weight(self, node: fx.Node) -> Constant:
        c = self.constant(node, "weight")
        k = khot_weight(self.quantizer(node), c.codes, self.options.khot_max)
        if k is not None:
            c.khot = k
        return c

    def transposed(self, node: fx.Node, w: Constant) -> Constant:
        """The [n_out][n_in] copy of a [n_in][n_out] weight (a constant may be shared, so never in place)."""
        key = ("transposed", node)
        if key not in self.constants:
            codes = np.ascontiguousarray(w.codes.reshape(w.shape).T)
            self.constants[key] = Constant(self.names.name(w.source + "_T", "w_"), w.ctype, codes.reshape(-1),
                                           codes.shape, w.source + " (transposed)", w.khot)
        return self.constants[key]

    def _bias(self, node: fx.Node | None, n_out: int) -> Constant | None:
        if node is None:
            return None
        if node not in self.const:
            raise ExportError(f"node {label(node)}: a bias must be a constant")
        c = self.constant(node, "bias")
        if c.size not in (1, n_out):
            raise ExportError(f"bias {label(node)} of shape {c.shape} does not broadcast per output ({n_out})")
        return c

    def _layer_dense(self, ident: str, g: _Group, out: Buffer) -> Layer:
        node = g.head
        x, w_node = node.args[0], node.args[1]
        c_node = node.args[2] if len(node.args) > 2 else None
        x_shape, out_shape = self.shape(x), self.shape(node)
        if node.kwargs.get("transA", 0):  # gemm's keywords; matmul has none
            raise ExportError(f"node {label(node)}: Gemm with transA=1 has no HLS form")
        w = self._weight(w_node)
        if len(w.shape) != 2:
            raise ExportError(f"node {label(node)}: MatMul weight must be 2-D, got {w.shape}")
        trans_b = node.kwargs.get("transB", 0)
        n_in = x_shape[-1]
        n_out = out_shape[-1]
        if w.shape != ((n_out, n_in) if trans_b else (n_in, n_out)):
            raise ExportError(f"node {label(node)}: weight shape {w.shape} does not fit {x_shape} -> {out_shape}")
        if not trans_b:
            w = self.transposed(w_node, w)
        bias = self._bias(c_node, n_out)
        rows = int(np.prod(out_shape[:-1]))
        acc = self.ctype(node, "accumulator")
        x_t = self.fixed(x)
        params = DenseParams(rows, n_in, n_out)
        prods = Products(rows * n_out * n_in, n_out * n_in, rows, x_t, w.ctype.type,
                         khot_terms=khot_terms(w) * rows if w.khot else 0, acc_width=acc.type.width)
        return Layer(ident, "dense", [self.buffer(x)], out, acc, params=params, weight=w, bias=bias,
                     products=[prods])

    def _layer_conv(self, ident: str, g: _Group, out: Buffer) -> Layer:
        node = g.head
        x, w_node = node.args[0], node.args[1]
        b_node = node.args[2] if len(node.args) > 2 else None
        x_shape, out_shape = self.shape(x), self.shape(node)
        rank = len(x_shape) - 2
        if rank not in (1, 2):
            raise ExportError(f"node {label(node)}: {rank}-D convolution has no HLS form (1-D and 2-D only)")
        if x_shape[0] != 1:
            raise ExportError(f"node {label(node)}: the HLS project processes batch 1")
        w = self._weight(w_node)
        kw = node.kwargs
        geo = _geometry(x_shape[2:], out_shape[2:], w.shape[2:], kw["strides"], kw["pads"][:rank], kw["dilations"])
        n_filt, n_chan, groups = out_shape[1], x_shape[1], kw["group"]
        if n_chan % groups or n_filt % groups:
            raise ExportError(f"node {label(node)}: {n_chan} channels and {n_filt} filters in {groups} groups")
        params = ConvParams(n_chan, n_filt, groups, n_chan // groups, n_filt // groups, geo)
        bias = self._bias(b_node, n_filt)
        acc = self.ctype(node, "accumulator")
        taps = (n_chan // groups) * geo.k_h * geo.k_w
        pixels = geo.out_h * geo.out_w
        prods = Products(pixels * n_filt * taps, n_filt * taps, pixels, self.fixed(x), w.ctype.type,
                         khot_terms=khot_terms(w) * pixels if w.khot else 0, acc_width=acc.type.width)
        return Layer(ident, "conv", [self.buffer(x)], out, acc, params=params, weight=w, bias=bias,
                     products=[prods])

    def _layer_pool(self, ident: str, g: _Group, out: Buffer) -> Layer:
        node = g.head
        x = node.args[0]
        x_shape, out_shape = self.shape(x), self.shape(node)
        rank = len(x_shape) - 2
        if rank not in (1, 2):
            raise ExportError(f"node {label(node)}: {rank}-D pooling has no HLS form (1-D and 2-D only)")
        kw = node.kwargs
        begins, _ = pool_padding(x_shape[2:], kw["kernel_shape"], kw["strides"], kw["pads"], kw["dilations"],
                                 kw.get("ceil_mode", 0))
        geo = _geometry(x_shape[2:], out_shape[2:], tuple(kw["kernel_shape"]), kw["strides"], begins, kw["dilations"])
        params = PoolParams(x_shape[1], op_of(node.target).hls.options.get("is_max", False), geo)
        return Layer(ident, "pool", [self.buffer(x)], out, self.ctype(node, "accumulator"), params=params)

    def _layer_reduce(self, ident: str, g: _Group, out: Buffer) -> Layer:
        node = g.head
        x = node.args[0]
        x_shape = self.shape(x)
        axes = node.kwargs.get("axes") or list(range(2, len(x_shape)))  # no axes: every spatial axis (global pool)
        axes = sorted(a % len(x_shape) for a in axes)
        strides = [int(np.prod(x_shape[d + 1:])) for d in range(len(x_shape))]
        kept = [(x_shape[d], strides[d]) for d in range(len(x_shape)) if d not in axes]
        red = [(x_shape[d], strides[d]) for d in axes]
        params = ReduceParams(int(np.prod(x_shape)), int(np.prod([s for s, _ in kept])), int(np.prod([s for s, _ in red])),
                              op_of(node.target).hls.options.get("is_max", False), mixed_radix("o", kept),
                              mixed_radix("r", red))
        return Layer(ident, "reduce", [self.buffer(x)], out, self.ctype(node, "accumulator"), params=params)

    def _layer_remap(self, ident: str, g: _Group, out: Buffer) -> Layer:
        node = g.head
        data = g.data[0]
        table = self.index_map(node, data)
        params = RemapParams(int(np.prod(self.shape(data))), int(table.size), table)
        return Layer(ident, "remap", [self.buffer(data)], out, self.ctype(node, "intermediate"), params=params)

    def _layer_concat(self, ident: str, g: _Group, out: Buffer) -> Layer:
        node = g.head
        parts = list(node.args[0])
        sizes = [int(np.prod(self.shape(p))) for p in parts]
        offsets = np.cumsum([0] + sizes)
        tensors = [torch.arange(o + 1, o + s + 1, dtype=torch.float64).reshape(self.shape(p))
                   for p, o, s in zip(parts, offsets, sizes)]
        flat = node.target(tensors, **node.kwargs).reshape(-1).to(torch.int64).numpy() - 1
        where = np.empty_like(flat)
        where[flat] = np.arange(flat.size)
        inputs, dsts = [], []
        for p, o, s in zip(parts, offsets, sizes):
            inputs.append(self.constant(p) if p in self.const else self.buffer(p))
            dsts.append(where[o:o + s])
        params = ConcatParams(int(flat.size), dsts)
        return Layer(ident, "concat", inputs, out, self.ctype(node, "intermediate"), params=params)

    def _layer_map(self, ident: str, g: _Group, out: Buffer) -> Layer:
        inputs = [self.buffer(d) for d in g.data]
        n = int(np.prod(g.shape))
        if g.head is None:  # read one array, then the chain
            src = g.data[0]
            head_type = inputs[0].ctype
            params = MapParams(n, bcast_index(g.shape, self.shape(src)))
            return Layer(ident, "map", inputs, out, head_type, params=params)
        head = self.op_step(g.head, g, g.data)
        params = MapParams(n)
        layer = Layer(ident, "map", inputs, out, head.out, params=params, head=head)
        layer.products += self.step_products(g.head, n)
        return layer


def _geometry(in_sizes, out_sizes, kernel, strides, begins, dilations) -> Window:
    """2-D window geometry; a 1-D op becomes H = 1."""
    if len(in_sizes) == 1:
        in_sizes, out_sizes, kernel = (1, *in_sizes), (1, *out_sizes), (1, *kernel)
        strides, begins, dilations = (1, *strides), (0, *begins), (1, *dilations)
    return Window(in_h=int(in_sizes[0]), in_w=int(in_sizes[1]), out_h=int(out_sizes[0]), out_w=int(out_sizes[1]),
                  k_h=int(kernel[0]), k_w=int(kernel[1]), stride_h=int(strides[0]), stride_w=int(strides[1]),
                  pad_top=int(begins[0]), pad_left=int(begins[1]), dil_h=int(dilations[0]), dil_w=int(dilations[1]))
