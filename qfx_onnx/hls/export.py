"""From a :class:`~qfx_onnx.quant.quantize.FixedPointModel` to an :class:`~qfx_onnx.hls.model.HlsModel`.

Contract of :func:`build_hls_model`:

* Every value gets the type :func:`qfx_onnx.quant.typeprop.propagate` gives it: a quantizer's
  output its frozen type, every other op the lossless type HLS derives (sums of products in their
  full accumulator). The only conversion that can round or overflow is a quantizer cast, and it
  happens exactly once per cast node, from the exact value; so the C++ result cannot depend on
  summation order and equals the float64 emulation bit for bit.
* Layers are formed greedily in graph order. A layer has a head (dense, conv, pool, reduce, remap,
  concat, or an element-wise op on 1-3 data arrays) and a chain of element-wise steps fused after it
  (casts, BatchNorm's mul and add, activations, lookup tables): a step joins the chain of its only
  data input when that input has no other user and the shape does not change. Reshape-like ops are
  aliases of their input's array (flat, row-major, batch 1).
* Constants are exact integer codes; per-channel weights are stored in the union of their channel
  types (exact). K-hot weights are marked for shift-add emission (see :func:`khot_weight`).
* Everything the model uses that has no HLS form raises one :class:`~qfx_onnx.errors.ExportError`
  naming every offending node and op.
"""

from __future__ import annotations

import logging
import math
import operator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import fx

from qfx_onnx.errors import ExportError
from qfx_onnx.fixed.types import FixedType, OverflowMode, add_type, mul_type, union_type
from qfx_onnx.hls.model import Buffer, Constant, CType, HlsModel, Layer, Operand, Products, Step
from qfx_onnx.hls.names import Namer
from qfx_onnx.ir.ops import op_of, pool_padding
from qfx_onnx.quant.typeprop import ValueInfo, propagate

log = logging.getLogger(__name__)

ALIAS_OPS = {"reshape", "flatten", "squeeze", "unsqueeze", "identity", "cast"}
REMAP_OPS = {"transpose", "slice_axes", "pad", "resize", "gather"}
LINEAR_OPS = {"gemm", "matmul", "conv"}
POOL_OPS = {"max_pool", "sum_pool"}
REDUCE_OPS = {"reduce_sum", "global_max_pool"}
ARITH_OPS = {"add", "sub", "mul", "neg", "nary_sum", "relu", "leaky_relu", "prelu", "clip",
             "hard_sigmoid", "hard_swish"}
LUT_OPS = {"sigmoid", "tanh"}
SUPPORTED_OPS = ALIAS_OPS | REMAP_OPS | LINEAR_OPS | POOL_OPS | REDUCE_OPS | ARITH_OPS | LUT_OPS | {"split", "concat"}
MAX_LUT_WIDTH = 16
MAX_CONST_WIDTH = 53  # constants are written as decimal literals that are exact doubles
BIT = FixedType(1, 1, signed=False)


@dataclass
class ExportOptions:
    """What the generator is asked for (the CLI flags)."""

    top: str = "myproject"
    io: str = "parallel"
    reuse_factor: int = 1
    khot_max: int = 0

    def __post_init__(self) -> None:
        if self.io not in ("parallel", "stream"):
            raise ExportError(f"--io must be parallel or stream, not {self.io!r}")
        if self.reuse_factor < 1:
            raise ExportError(f"--reuse-factor must be at least 1, not {self.reuse_factor}")
        if self.khot_max < 0:
            raise ExportError(f"--khot-max must be 0 or more, not {self.khot_max}")


def label(node: fx.Node) -> str:
    """A one-line, quoted name of a node for messages (ONNX node name where known)."""
    return repr(str(node.meta.get("onnx_node") or node.meta.get("onnx_name") or node.name))


def _op_name(node: fx.Node) -> str:
    if node.target is operator.getitem:
        return "getitem"
    op = op_of(node.target)
    return op.name if op is not None else getattr(node.target, "__name__", str(node.target))


class _Recorder(fx.Interpreter):
    """Runs the graph once and keeps every node's value (constants, shape tensors, activations)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[fx.Node, object] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        self.values[n] = out
        return out


def record_values(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> dict[fx.Node, object]:
    """Every node's value for ``inputs`` (float64), computed by the emulation itself."""
    rec = _Recorder(gm)
    with torch.no_grad():
        rec.run(*inputs)
    return rec.values


def find_unsupported(gm: fx.GraphModule, const: set[fx.Node]) -> list[str]:
    """``op (node)`` for every computing node that has no HLS form."""
    bad = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node in const:
            continue
        if node.target is operator.getitem:
            if _op_name(node.args[0]) != "split":
                bad.append(f"getitem of {_op_name(node.args[0])} ({label(node)})")
            continue
        op = op_of(node.target)
        if op is None:
            bad.append(f"{_op_name(node)} ({label(node)})")
        elif op.kind == "shape":
            continue
        elif op.name not in SUPPORTED_OPS:
            bad.append(f"{op.onnx_op or op.name} [{op.name}] ({label(node)})")
    return bad


def _const_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose value does not depend on a graph input (parameters, their casts, shape math)."""
    const: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            const.add(node)
        elif node.op in ("call_module", "call_function"):
            deps = node.all_input_nodes
            op = op_of(node.target) if node.op == "call_function" else None
            if (deps and all(d in const for d in deps)) or (op is not None and op.kind == "shape" and not deps):
                const.add(node)
    return const


def _is_shape(node: fx.Node) -> bool:
    op = op_of(node.target) if node.op == "call_function" else None
    return op is not None and op.kind == "shape"


def bcast_index(out_shape: tuple[int, ...], in_shape: tuple[int, ...]) -> str:
    """C++ expression of ``i`` (flat index into ``out_shape``) giving the flat index of the
    numpy-broadcast element of an array of ``in_shape``."""
    n_in = int(np.prod(in_shape, dtype=np.int64)) if in_shape else 1
    if n_in == 1:
        return "0"
    rank = len(out_shape)
    if len(in_shape) > rank:
        raise ExportError(f"cannot broadcast shape {in_shape} to {out_shape}")
    padded = (1,) * (rank - len(in_shape)) + tuple(in_shape)
    if padded == tuple(out_shape):
        return "i"
    out_strides = [int(np.prod(out_shape[d + 1:], dtype=np.int64)) for d in range(rank)]
    in_strides = [int(np.prod(padded[d + 1:], dtype=np.int64)) for d in range(rank)]
    terms = []
    for d in range(rank):
        if padded[d] == 1:
            continue
        if padded[d] != out_shape[d]:
            raise ExportError(f"cannot broadcast shape {in_shape} to {out_shape}")
        term = "i" if out_strides[d] == 1 else f"(i / {out_strides[d]})"
        if d > 0 and any(out_shape[e] > 1 for e in range(d)):
            term = f"({term} % {out_shape[d]})"
        terms.append(term if in_strides[d] == 1 else f"{term} * {in_strides[d]}")
    return " + ".join(terms) if terms else "0"


def mixed_radix(var: str, dims: list[tuple[int, int]]) -> str:
    """C++ expression mapping ``var`` (flat over ``dims`` sizes, row-major) to ``sum(coord * stride)``."""
    terms, div = [], 1
    for size, stride in reversed(dims):
        if size > 1:
            t = var if div == 1 else f"({var} / {div})"
            if div * size < int(np.prod([s for s, _ in dims], dtype=np.int64)):
                t = f"({t} % {size})"
            terms.append(t if stride == 1 else f"{t} * {stride}")
        div *= size
    return " + ".join(reversed(terms)) if terms else "0"


@dataclass
class _Group:
    kind: str
    head: fx.Node | None
    data: list[fx.Node]
    shape: tuple[int, ...]
    steps: list[fx.Node] = field(default_factory=list)
    lut_casts: dict[fx.Node, fx.Node] = field(default_factory=dict)  # nonlinear node -> its cast

    @property
    def tail(self) -> fx.Node:
        if self.steps:
            last = self.steps[-1]
            return self.lut_casts.get(last, last)
        return self.head


class _Builder:
    def __init__(self, fpm, inputs: tuple[torch.Tensor, ...], options: ExportOptions) -> None:
        self.fpm = fpm
        self.gm: fx.GraphModule = fpm.graph_module
        self.options = options
        self.info: dict[fx.Node, ValueInfo] = propagate(self.gm, inputs)
        self.values = record_values(self.gm, inputs)
        self.const = _const_nodes(self.gm)
        self.names = Namer()
        self.names.reserve(options.top)
        self.ctypes: dict[object, CType] = {}
        self.constants: dict[fx.Node, Constant] = {}
        self.groups: list[_Group] = []
        self.tail_group: dict[fx.Node, _Group] = {}
        self.alias: dict[fx.Node, fx.Node] = {}
        self.buffers: dict[int, Buffer] = {}
        self.output_node = next(n for n in self.gm.graph.nodes if n.op == "output")

    # ------------------------------------------------------------------------------ helpers
    def shape(self, node: fx.Node) -> tuple[int, ...]:
        s = self.info[node].shape
        if s is None:
            raise ExportError(f"node {label(node)} has no static shape")
        return tuple(int(d) for d in s)

    def fixed(self, node: fx.Node) -> FixedType:
        t = self.info[node].type
        if t is None:
            raise ExportError(f"node {label(node)} ({_op_name(node)}) has no fixed-point type: "
                              "every value the HLS project computes must be quantized")
        return t

    def ctype(self, node: fx.Node, role: str, t: FixedType | None = None) -> CType:
        key = node  # one typedef per tensor, whatever role it is first met in
        if key not in self.ctypes:
            t = t if t is not None else self.fixed(node)
            if not t.signed and t.o is OverflowMode.WRAP_SM:
                raise ExportError(f"node {label(node)}: {t} cannot be simulated (the HLS headers reject "
                                  "unsigned AP_WRAP_SM and exit)")
            source = str(node.meta.get("onnx_name") or node.name)
            self.ctypes[key] = CType(self.names.name(source, "t_"), t, role, source)
        return self.ctypes[key]

    def extra_ctype(self, base: str, t: FixedType, role: str) -> CType:
        key = (base, str(t), role)
        if key not in self.ctypes:
            self.ctypes[key] = CType(self.names.name(base, "t_"), t, role, base)
        return self.ctypes[key]

    def quantizer(self, node: fx.Node):
        if node.op == "call_module":
            return self.gm.get_submodule(node.target)
        return None

    def constant(self, node: fx.Node, role: str = "constant") -> Constant:
        if node in self.constants:
            return self.constants[node]
        value = self.values.get(node)
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise ExportError(f"constant {label(node)} is not a floating-point tensor")
        t = self.fixed(node)
        if t.width > MAX_CONST_WIDTH:
            raise ExportError(f"constant {label(node)} has type {t} wider than {MAX_CONST_WIDTH} bits "
                              "(its values would not be exact C++ literals)")
        scaled = value.detach().to(torch.float64).reshape(-1).numpy() * math.ldexp(1.0, t.frac)
        codes = np.round(scaled)
        if not np.array_equal(codes, scaled) or codes.min(initial=0) < t.int_min or codes.max(initial=0) > t.int_max:
            raise ExportError(f"constant {label(node)} is not exactly representable in {t}")
        source = str(node.meta.get("onnx_name") or node.name)
        c = Constant(self.names.name(source, "w_"), self.ctype(node, role), codes.astype(np.int64),
                     tuple(value.shape), source)
        self.constants[node] = c
        return c

    def resolve(self, node: fx.Node) -> fx.Node:
        while node in self.alias:
            node = self.alias[node]
        return node

    def buffer(self, node: fx.Node) -> Buffer:
        tail = self.resolve(node)
        group = self.tail_group.get(tail)
        if group is None:
            raise ExportError(f"node {label(node)} is not computed by any layer")
        return self.buffers[id(group)]

    def is_output(self, node: fx.Node) -> bool:
        return node in self.output_node.all_input_nodes

    # ----------------------------------------------------------------------------- grouping
    def group_nodes(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op in ("placeholder", "output", "get_attr") or node in self.const or _is_shape(node):
                continue
            if any(node is cast for g in self.groups for cast in g.lut_casts.values()):
                continue
            if node.op == "call_module":
                self._cast_node(node)
            elif node.op == "call_function":
                self._function_node(node)
            else:
                raise ExportError(f"node {label(node)}: unsupported fx node kind {node.op}")

    def _new_group(self, kind: str, head: fx.Node | None, data: list[fx.Node], shape, steps=()) -> _Group:
        g = _Group(kind, head, data, tuple(shape), list(steps))
        self.groups.append(g)
        self.tail_group[g.tail] = g
        return g

    def _data_args(self, node: fx.Node) -> list[fx.Node]:
        out = []
        for a in node.all_input_nodes:
            if a not in self.const and not _is_shape(a) and a.op != "get_attr":
                out.append(a)
        return out

    def _cast_node(self, node: fx.Node) -> None:
        (src,) = node.all_input_nodes
        q = self.quantizer(node)
        if getattr(q, "per_channel_axis", None) is not None:
            raise ExportError(f"node {label(node)}: per-channel types on activations have no HLS form")
        if src.op == "placeholder":
            self._new_group("input", node, [], self.shape(node))
            return
        self._chain(node, src)

    def _chain(self, node: fx.Node, data: fx.Node) -> _Group:
        """Append ``node`` to the chain of ``data``'s layer, or start a map layer reading ``data``."""
        g = self.tail_group.get(data)
        if (g is not None and g.kind != "input" and len(data.users) == 1 and not self.is_output(data)
                and self.shape(node) == g.shape):
            del self.tail_group[data]
            g.steps.append(node)
            self.tail_group[g.tail] = g
            return g
        return self._new_group("map", None, [data], self.shape(node), [node])

    def _function_node(self, node: fx.Node) -> None:
        name = _op_name(node)
        if name == "split":
            return  # read through its getitem users
        data = self._data_args(node)
        if name == "getitem":  # one part of a split: a remap of the split's input
            self._move(node, self._data_args(node.args[0])[0])
        elif name in ALIAS_OPS:
            self.alias[node] = self.resolve(data[0])
        elif name in REMAP_OPS:
            self._move(node, data[0])
        elif name in LINEAR_OPS:
            if len(data) != 1 or node.args[0] is not data[0]:
                raise ExportError(f"node {label(node)} ({name}): only data x constant-weight products have an "
                                  "HLS form (the weight must be a constant, the data the first input)")
            self._new_group("dense" if name in ("gemm", "matmul") else "conv", node, data, self.shape(node))
        elif name in POOL_OPS:
            self._new_group("pool", node, data, self.shape(node))
        elif name in REDUCE_OPS:
            self._new_group("reduce", node, data, self.shape(node))
        elif name == "concat":
            self._new_group("concat", node, data, self.shape(node))
        elif name in ARITH_OPS:
            if len(data) == 1:
                self._chain(node, data[0])
            elif len(data) <= 3:
                self._new_group("map", node, data, self.shape(node))
            else:
                raise ExportError(f"node {label(node)} ({name}): at most 3 data inputs per element-wise op")
        elif name in LUT_OPS:
            users = list(node.users)
            if len(users) != 1 or users[0].op != "call_module":
                raise ExportError(f"node {label(node)} ({name}): a nonlinear op must be followed by exactly "
                                  "one quantizer cast (its lookup table holds the cast results)")
            g = self._chain(node, data[0])
            del self.tail_group[node]
            g.lut_casts[node] = users[0]
            self.tail_group[g.tail] = g
        else:
            raise ExportError(f"node {label(node)}: op {name} has no HLS form")

    def _move(self, node: fx.Node, data: fx.Node) -> None:
        table = self.index_map(node, data)
        if table.size == int(np.prod(self.shape(data))) and np.array_equal(table, np.arange(table.size)):
            self.alias[node] = self.resolve(data)
        else:
            self._new_group("remap", node, [data], self.shape(node))

    def value_arg(self, a):
        if isinstance(a, fx.Node):
            return self.values[a]
        if isinstance(a, (list, tuple)):
            return type(a)(self.value_arg(x) for x in a)
        return a

    def index_map(self, node: fx.Node, data: fx.Node) -> np.ndarray:
        """Flat source index of every output element of a move op (-1: a zero from padding),
        found by running the IR op itself on a tensor of indices."""
        in_shape = self.shape(data)
        idx = torch.arange(1, int(np.prod(in_shape)) + 1, dtype=torch.float64).reshape(in_shape)
        if node.target is operator.getitem:
            split, k = node.args
            out = split.target(idx, *[self.value_arg(a) for a in split.args[1:]], **split.kwargs)[k]
        else:
            args = [idx] + [self.value_arg(a) for a in node.args[1:]]
            out = node.target(*args, **node.kwargs)
        if tuple(out.shape) != self.shape(node):
            raise ExportError(f"node {label(node)}: index evaluation gave shape {tuple(out.shape)}, "
                              f"expected {self.shape(node)}")
        return out.reshape(-1).to(torch.int64).numpy() - 1

    # ------------------------------------------------------------------------------ layers
    def build(self) -> HlsModel:
        self.group_nodes()
        for g in self.groups:
            tail = g.tail
            role = "tensor" if self.quantizer(tail) is not None else "intermediate"
            ct = self.ctype(tail, role)
            source = str(tail.meta.get("onnx_name") or tail.name)
            self.buffers[id(g)] = Buffer(self.names.name(source, "x_"), ct, g.shape, source)
        layers = [self.layer(k, g) for k, g in enumerate(self.groups) if g.kind != "input"]
        inputs = [self.buffers[id(g)] for g in self.groups if g.kind == "input"]
        input_nodes = [g.head for g in self.groups if g.kind == "input"]
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        for p in placeholders:
            users = [u for u in p.users if not _is_shape(u)]
            if len(users) != 1 or users[0].op != "call_module":
                raise ExportError(f"graph input {label(p)} must be quantized by exactly one cast")
        outputs, copies = self.output_ports(layers)
        layers += copies
        ctypes = list(self.ctypes.values())
        return HlsModel(self.options.top, ctypes, list(self.constants.values()),
                        [self.buffers[id(g)] for g in self.groups] + [c.output for c in copies],
                        layers, inputs, outputs, input_nodes)

    def output_ports(self, layers: list[Layer]) -> tuple[list[Buffer], list[Layer]]:
        args = self.output_node.args[0]
        nodes = list(args) if isinstance(args, (tuple, list)) else [args]
        ports, copies, used = [], [], set()
        readers: dict[str, int] = {}
        for layer in layers:
            for b in layer.inputs:
                readers[b.ident] = readers.get(b.ident, 0) + 1
        for node in nodes:
            buf = self.buffer(node)
            group = self.tail_group[self.resolve(node)]
            if group.kind == "input" or buf.ident in used or readers.get(buf.ident, 0) > 0:
                out = Buffer(self.names.name(buf.source + "_out", "x_"), buf.ctype, buf.shape, buf.source)
                copies.append(Layer(self.names.name("copy_" + buf.source, "l_"), "map", [buf], out, buf.ctype,
                                    source=buf.source, op="copy"))
                buf = out
            used.add(buf.ident)
            ports.append(buf)
        return ports, copies

    def layer(self, k: int, g: _Group) -> Layer:
        out = self.buffers[id(g)]
        head_name = _op_name(g.head) if g.head is not None else "read"
        source = str((g.head or g.steps[0]).meta.get("onnx_node") or (g.head or g.steps[0]).name)
        ident = self.names.name(f"l{k}_{head_name}", "")
        builder = getattr(self, f"_layer_{g.kind}")
        layer = builder(ident, g, out)
        layer.source, layer.op = source, head_name
        layer.steps = self.steps(g, layer)
        return layer

    def steps(self, g: _Group, layer: Layer) -> list[Step]:
        steps = []
        value_type = layer.head_type.type
        n = int(np.prod(g.shape))
        for node in g.steps:
            if node.op == "call_module":
                steps.append(Step("cast", self.ctype(node, "tensor"), source=str(node.meta.get("onnx_name"))))
            elif _op_name(node) in LUT_OPS:
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
                raise ExportError(f"node {label(node)}: non-tensor argument {a!r} to {_op_name(node)}")
            elif a in self.const:
                c = self.constant(a)
                operands.append(Operand("const", bcast_index(out_shape, tuple(c.shape)), const=c))
            elif data is None:
                operands.append(Operand("value"))
            else:
                operands.append(Operand("data", bcast_index(out_shape, self.shape(a)), data=data.index(a)))
        out = self.ctype(node, "intermediate")
        extra = None
        if _op_name(node) == "hard_swish":
            x_t = self._operand_type(operands[0], data, node)
            h = union_type(add_type(mul_type(x_t, self._operand_type(operands[1], data, node)),
                                    self._operand_type(operands[2], data, node)), BIT)
            extra = self.extra_ctype(str(node.meta.get("onnx_name") or node.name) + "_hsig", h, "intermediate")
        return Step("op", out, _op_name(node), operands, source=str(node.meta.get("onnx_name") or node.name),
                    extra=extra)

    def _operand_type(self, operand: Operand, data, node: fx.Node) -> FixedType:
        if operand.kind == "const":
            return operand.const.ctype.type
        if operand.kind == "data":
            return self.fixed(data[operand.data])
        return self.fixed(node.args[0])

    def lut_step(self, node: fx.Node, cast: fx.Node, in_t: FixedType) -> Step:
        if in_t.width > MAX_LUT_WIDTH:
            raise ExportError(f"node {label(node)} ({_op_name(node)}): input type {in_t} is wider than "
                              f"{MAX_LUT_WIDTH} bits, too wide for a lookup table")
        q = self.quantizer(cast)
        raw = np.arange(1 << in_t.width, dtype=np.int64)
        codes = raw - ((raw >> (in_t.width - 1)) << in_t.width) if in_t.signed else raw
        x = torch.from_numpy(np.ldexp(codes.astype(np.float64), -in_t.frac))
        with torch.no_grad():
            y = q(node.target(x, **node.kwargs))
        out = self.ctype(cast, "tensor")
        t = out.type
        scaled = y.numpy() * math.ldexp(1.0, t.frac)
        if not np.array_equal(np.round(scaled), scaled):
            raise ExportError(f"node {label(node)}: lookup table values are not exact in {t}")
        source = str(cast.meta.get("onnx_name") or cast.name)
        table = Constant(self.names.name(source + "_lut", "w_"), out, np.round(scaled).astype(np.int64),
                         (1 << in_t.width,), source + " (table)")
        self.constants[cast] = table
        return Step("lut", out, _op_name(node), table=table, source=source)

    def step_products(self, node: fx.Node, n: int) -> list[Products]:
        name = _op_name(node)
        if name not in ("mul", "leaky_relu", "prelu", "hard_sigmoid", "hard_swish"):
            return []
        types = [self.info[a].type for a in node.all_input_nodes]
        if any(t is None for t in types) or len(types) < 2:
            return []
        count = n * (2 if name == "hard_swish" else 1)
        return [Products(count, count, 1, types[0], types[1])]

    # --- heads
    def _weight(self, node: fx.Node) -> Constant:
        c = self.constant(node, "weight")
        k = khot_weight(self.quantizer(node), c.codes, self.options.khot_max)
        if k is not None:
            c.khot = k
        return c

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
        name = _op_name(node)
        x_shape, out_shape = self.shape(x), self.shape(node)
        if name == "gemm" and node.kwargs.get("transA", 0):
            raise ExportError(f"node {label(node)}: Gemm with transA=1 has no HLS form")
        w = self._weight(w_node)
        if len(w.shape) != 2:
            raise ExportError(f"node {label(node)}: MatMul weight must be 2-D, got {w.shape}")
        trans_b = name == "gemm" and node.kwargs.get("transB", 0)
        n_in = x_shape[-1]
        n_out = out_shape[-1]
        codes = w.codes.reshape(w.shape)
        codes = codes if trans_b else codes.T
        if codes.shape != (n_out, n_in):
            raise ExportError(f"node {label(node)}: weight shape {w.shape} does not fit {x_shape} -> {out_shape}")
        w.codes, w.shape = np.ascontiguousarray(codes).reshape(-1), (n_out, n_in)
        bias = self._bias(c_node, n_out)
        rows = int(np.prod(out_shape[:-1]))
        acc = self.ctype(node, "accumulator")
        x_t = self.fixed(x)
        params = dict(n_rows=rows, n_in=n_in, n_out=n_out)
        prods = Products(rows * n_out * n_in, n_out * n_in, rows, x_t, w.ctype.type,
                         khot_terms=_khot_terms(w) * rows if w.khot else 0, acc_width=acc.type.width)
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
        params = dict(n_chan=n_chan, n_filt=n_filt, groups=groups, chan_per_group=n_chan // groups,
                      filt_per_group=n_filt // groups, **geo)
        bias = self._bias(b_node, n_filt)
        acc = self.ctype(node, "accumulator")
        taps = (n_chan // groups) * geo["k_h"] * geo["k_w"]
        pixels = geo["out_h"] * geo["out_w"]
        prods = Products(pixels * n_filt * taps, n_filt * taps, pixels, self.fixed(x), w.ctype.type,
                         khot_terms=_khot_terms(w) * pixels if w.khot else 0, acc_width=acc.type.width)
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
        params = dict(n_chan=x_shape[1], is_max=int(_op_name(node) == "max_pool"), **geo)
        return Layer(ident, "pool", [self.buffer(x)], out, self.ctype(node, "accumulator"), params=params)

    def _layer_reduce(self, ident: str, g: _Group, out: Buffer) -> Layer:
        node = g.head
        x = node.args[0]
        x_shape = self.shape(x)
        axes = node.kwargs.get("axes") if _op_name(node) == "reduce_sum" else list(range(2, len(x_shape)))
        axes = sorted(a % len(x_shape) for a in axes)
        strides = [int(np.prod(x_shape[d + 1:])) for d in range(len(x_shape))]
        kept = [(x_shape[d], strides[d]) for d in range(len(x_shape)) if d not in axes]
        red = [(x_shape[d], strides[d]) for d in axes]
        params = dict(n_in=int(np.prod(x_shape)), n_out=int(np.prod([s for s, _ in kept])),
                      n_red=int(np.prod([s for s, _ in red])), is_max=int(_op_name(node) == "global_max_pool"),
                      out_part=mixed_radix("o", kept), red_part=mixed_radix("r", red))
        return Layer(ident, "reduce", [self.buffer(x)], out, self.ctype(node, "accumulator"), params=params)

    def _layer_remap(self, ident: str, g: _Group, out: Buffer) -> Layer:
        node = g.head
        data = g.data[0]
        table = self.index_map(node, data)
        params = dict(n_in=int(np.prod(self.shape(data))), n_out=int(table.size), table=table)
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
        params = dict(n_out=int(flat.size), dst=dsts)
        return Layer(ident, "concat", inputs, out, self.ctype(node, "intermediate"), params=params)

    def _layer_map(self, ident: str, g: _Group, out: Buffer) -> Layer:
        inputs = [self.buffer(d) for d in g.data]
        n = int(np.prod(g.shape))
        if g.head is None:  # read one array, then the chain
            src = g.data[0]
            head_type = inputs[0].ctype
            params = dict(n_out=n, read_index=bcast_index(g.shape, self.shape(src)))
            return Layer(ident, "map", inputs, out, head_type, params=params)
        head = self.op_step(g.head, g, g.data)
        params = dict(n_out=n)
        layer = Layer(ident, "map", inputs, out, head.out, params=params, head=head)
        layer.products += self.step_products(g.head, n)
        return layer


def _geometry(in_sizes, out_sizes, kernel, strides, begins, dilations) -> dict:
    """2-D window geometry; a 1-D op becomes H = 1."""
    if len(in_sizes) == 1:
        in_sizes, out_sizes, kernel = (1, *in_sizes), (1, *out_sizes), (1, *kernel)
        strides, begins, dilations = (1, *strides), (0, *begins), (1, *dilations)
    return dict(in_h=int(in_sizes[0]), in_w=int(in_sizes[1]), out_h=int(out_sizes[0]), out_w=int(out_sizes[1]),
                k_h=int(kernel[0]), k_w=int(kernel[1]), stride_h=int(strides[0]), stride_w=int(strides[1]),
                pad_top=int(begins[0]), pad_left=int(begins[1]), dil_h=int(dilations[0]), dil_w=int(dilations[1]))


def _csd_weight(code: int) -> int:
    n = abs(int(code))
    return bin((3 * n) ^ n).count("1")


def csd_digits(code: int) -> list[tuple[int, int]]:
    """``[(sign, shift)]`` with ``sum(sign * 2**shift) == code``: the non-adjacent form (fewest
    signed digits), highest shift first."""
    try:
        from qfx_onnx.fixed.khot import khot_decompose
        return [(int(s), int(p)) for s, p in khot_decompose(int(code), None, signed_digits=True)]
    except ImportError:  # pragma: no cover - the K-hot module is another engineer's, may be absent
        pass
    n, sign, out, pos = abs(int(code)), (1 if code >= 0 else -1), [], 0
    while n:
        if n & 1:
            d = 2 - (n & 3)
            out.append((sign * d, pos))
            n -= d
        n >>= 1
        pos += 1
    return out[::-1]


def khot_weight(quant, codes: np.ndarray, khot_max: int) -> int | None:
    """K when the weight tensor is emitted as shift-adds, else None.

    A tensor qualifies when its quantizer says so (an integer attribute ``khot``, or a
    ``KHotQuantizer``'s ``k``), or when ``khot_max > 0`` and every code needs at most
    ``khot_max`` signed digits. A quantizer that claims K-hot but holds a code needing more
    digits is an error.
    """
    claimed = getattr(quant, "khot", None) if quant is not None else None
    if claimed is None and quant is not None and type(quant).__name__ == "KHotQuantizer":
        claimed = getattr(quant, "k", None)
    digits = max((_csd_weight(c) for c in np.unique(codes)), default=0)
    if claimed is not None and int(claimed) > 0:
        if digits > int(claimed):
            raise ExportError(f"a weight quantizer says khot={int(claimed)} but a code needs {digits} digits")
        return int(claimed)
    if khot_max > 0 and digits <= khot_max:
        return khot_max
    return None


def _khot_terms(c: Constant) -> int:
    return int(sum(_csd_weight(v) for v in c.codes))


def build_hls_model(fpm, inputs: tuple[torch.Tensor, ...], options: ExportOptions) -> HlsModel:
    """The HLS project content of ``fpm`` (see the module docstring). ``inputs``: one example per
    graph input (batch 1 is used for shapes)."""
    gm = fpm.graph_module
    example = tuple(x[:1].to(torch.float64) for x in inputs)
    const = _const_nodes(gm)
    bad = find_unsupported(gm, const)
    if bad:
        raise ExportError(f"{len(bad)} node(s) have no HLS form: " + "; ".join(bad))
    return _Builder(fpm, example, options).build()
