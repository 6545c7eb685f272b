"""From a :class:`~qfx_onnx.quant.quantize.FixedPointModel` to an :class:`~qfx_onnx.hls.model.HlsModel`.

Contract of :func:`build_hls_model`:

* Every value gets the type :func:`qfx_onnx.quant.typeprop.propagate` gives it: a quantizer's
  output its frozen type, every other op the lossless type HLS derives (sums of products in their
  full accumulator). The only conversion that can round or overflow is a quantizer cast, and it
  happens exactly once per cast node, from the exact value; so the C++ result cannot depend on
  summation order and equals the float64 emulation bit for bit.
* Each op is placed by its definition's HLS form (``IrOp.hls``: alias, remap, split parts, the
  head of a registered layer kind, an element-wise step, a lookup table, or refused with a reason).
* Layers are formed greedily in graph order. A layer has a head (dense, matmul_act, conv, pool,
  reduce, remap, concat, or an element-wise op on 1-3 data arrays) and a chain of element-wise steps fused after it
  (casts, BatchNorm's mul and add, activations, lookup tables): a step joins the chain of its only
  data input when that input has no other user and the shape does not change. Reshape-like ops are
  aliases of their input's array (flat, row-major, batch 1).
* Constants are exact integer codes; per-channel weights are stored in the union of their channel
  types (exact). K-hot weights are marked for shift-add emission (:mod:`qfx_onnx.hls.shift_add`).
* Everything the model uses that has no HLS form raises one :class:`~qfx_onnx.errors.ExportError`
  naming every offending node and op.
"""

from __future__ import annotations

import logging
import math
import operator
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
import torch
from torch import fx

from qfx_onnx.errors import ExportError
from qfx_onnx.fixed.types import FixedType, OverflowMode
from qfx_onnx.hls.fxutil import const_nodes, is_shape, label, op_name, record_values
from qfx_onnx.hls.heads import HeadsMixin
from qfx_onnx.hls.kinds import LAYER_KINDS, FanoutParams, MapParams
from qfx_onnx.hls.model import Buffer, Constant, CType, HlsModel, Layer
from qfx_onnx.hls.names import Namer
from qfx_onnx.ir.ops import NoHls, op_of
from qfx_onnx.quant.typeprop import ValueInfo, propagate

log = logging.getLogger(__name__)

MAX_CONST_WIDTH = 53  # constants are written as decimal literals that are exact doubles
EXACT_FLOAT64_BITS = 53


class IoMode(str, Enum):
    """How the top function's ports carry data."""

    PARALLEL = "parallel"  # arrays, partitioned
    STREAM = "stream"  # hls::stream ports, DATAFLOW


@dataclass
class ExportOptions:
    """What the generator is asked for (the CLI flags)."""

    top: str = "myproject"
    io: str = "parallel"
    reuse_factor: int = 1
    khot_max: int = 0

    def __post_init__(self) -> None:
        if self.io not in {m.value for m in IoMode}:
            raise ExportError(f"--io must be {' or '.join(m.value for m in IoMode)}, not {self.io!r}")
        if self.reuse_factor < 1:
            raise ExportError(f"--reuse-factor must be at least 1, not {self.reuse_factor}")
        if self.khot_max < 0:
            raise ExportError(f"--khot-max must be 0 or more, not {self.khot_max}")


def find_unsupported(gm: fx.GraphModule, const: set[fx.Node]) -> list[str]:
    """``op [ir op] (node): reason`` for every computing node whose op has no HLS form
    (:class:`~qfx_onnx.ir.opdef.NoHls`, or a head of an unregistered layer kind)."""
    bad = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node in const:
            continue
        if node.target is operator.getitem:
            source = op_of(getattr(node.args[0], "target", None))
            if source is None or not source.multi_output:
                bad.append(f"getitem of {op_name(node.args[0])} ({label(node)})")
            continue
        op = op_of(node.target)
        if op is None:
            bad.append(f"{op_name(node)} ({label(node)})")
        elif isinstance(op.hls, NoHls):
            bad.append(f"{op.onnx_op or op.name} [{op.name}] ({label(node)}): {op.hls.reason}")
        elif op.hls.place == "head" and isinstance(op.hls.layer, str) and op.hls.layer not in LAYER_KINDS:
            bad.append(f"{op.onnx_op or op.name} [{op.name}] ({label(node)}): layer kind {op.hls.layer!r} is not registered")
    return bad


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


class _Builder(HeadsMixin):
    def __init__(self, fpm, inputs: tuple[torch.Tensor, ...], options: ExportOptions) -> None:
        self.fpm = fpm
        self.gm: fx.GraphModule = fpm.graph_module
        self.options = options
        self.info: dict[fx.Node, ValueInfo] = propagate(self.gm, inputs)
        self.values = record_values(self.gm, inputs)
        self.const = const_nodes(self.gm)
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
            raise ExportError(f"node {label(node)} ({op_name(node)}) has no fixed-point type: "
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
            if node.op in ("placeholder", "output", "get_attr") or node in self.const or is_shape(node):
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
            if a not in self.const and not is_shape(a) and a.op != "get_attr":
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
        """Place ``node`` by its op's HLS form (``IrOp.hls``)."""
        if node.target is operator.getitem:  # one part of a split: a remap of the split's input
            self._move(node, self._data_args(node.args[0])[0])
            return
        op = op_of(node.target)
        form = op.hls if op is not None else NoHls("not an IR op")
        if isinstance(form, NoHls):
            raise ExportError(f"node {label(node)}: op {op_name(node)} has no HLS form ({form.reason})")
        data = self._data_args(node)
        if form.place == "split":
            return  # read through its getitem users
        if form.place == "alias":
            self.alias[node] = self.resolve(data[0])
        elif form.place == "remap":
            self._move(node, data[0])
        elif form.place == "head":
            name = form.layer(self, node, data) if callable(form.layer) else form.layer
            kind = LAYER_KINDS.get(name)
            if kind is None:
                raise ExportError(f"node {label(node)}: op {op.name} heads a layer of kind {name!r}, which is not registered")
            if kind.check is not None:
                kind.check(self, node, data)
            self._new_group(name, node, data, self.shape(node))
        elif form.place == "step":
            if len(data) == 1:
                self._chain(node, data[0])
            elif len(data) <= 3:
                self._new_group("map", node, data, self.shape(node))
            else:
                raise ExportError(f"node {label(node)} ({op.name}): at most 3 data inputs per element-wise op")
        elif form.place == "table":
            users = list(node.users)
            if len(users) != 1 or users[0].op != "call_module":
                raise ExportError(f"node {label(node)} ({op.name}): a nonlinear op must be followed by exactly "
                                  "one quantizer cast (its lookup table holds the cast results)")
            g = self._chain(node, data[0])
            del self.tail_group[node]
            g.lut_casts[node] = users[0]
            self.tail_group[g.tail] = g
        else:
            raise ExportError(f"node {label(node)}: op {op.name} has no HLS form (place {form.place!r})")

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
            users = [u for u in p.users if not is_shape(u)]
            if len(users) != 1 or users[0].op != "call_module":
                raise ExportError(f"graph input {label(p)} must be quantized by exactly one cast")
        outputs, copies = self.output_ports(layers)
        layers += copies
        extra_buffers = [c.output for c in copies]
        if self.options.io == "stream":
            layers = self.add_fanouts(layers, extra_buffers)
        aux = {f"{b.ident}:{kind}": self.names.name(f"{b.ident}_{kind}") for b in inputs + outputs
               for kind in ("buf", "stream")}
        self.warn_inexact()
        ctypes = list(self.ctypes.values())
        return HlsModel(self.options.top, ctypes, list(self.constants.values()),
                        [self.buffers[id(g)] for g in self.groups] + extra_buffers,
                        layers, inputs, outputs, input_nodes, aux)

    def add_fanouts(self, layers: list[Layer], new_buffers: list[Buffer]) -> list[Layer]:
        """DATAFLOW wants one reader per array: an array read by k layers goes through a chain of
        k - 1 ``fanout2`` copies placed right after its producer (``--io stream`` only)."""
        readers: dict[str, list[tuple[Layer, int]]] = {}
        for layer in layers:
            for j, x in enumerate(layer.inputs):
                if isinstance(x, Buffer):
                    readers.setdefault(x.ident, []).append((layer, j))
        after: dict[str, list[Layer]] = {}
        for ident, uses in readers.items():
            if len(uses) < 2:
                continue
            src = uses[0][0].inputs[uses[0][1]]
            current, chain = src, []
            for n, (layer, j) in enumerate(uses[:-1]):
                a = Buffer(self.names.name(f"{src.ident}_f{n}"), src.ctype, src.shape, src.source)
                b = Buffer(self.names.name(f"{src.ident}_r{n}"), src.ctype, src.shape, src.source)
                chain.append(Layer(self.names.name(f"fanout_{src.ident}_{n}"), "fanout", [current], a, src.ctype,
                                   params=FanoutParams([a, b]), op="fanout"))
                new_buffers += [a, b]
                layer.inputs[j] = a
                current = b
            last, j = uses[-1]
            last.inputs[j] = current
            after[ident] = chain
        ordered = [f for ident in after if ident not in {x.output.ident for x in layers} for f in after[ident]]
        for layer in layers:
            ordered.append(layer)
            ordered += after.get(layer.output.ident, [])
        return ordered

    def warn_inexact(self) -> None:
        """The float64 emulation is exact only while every lossless value fits 53 bits; the C++ is
        exact regardless, so a wider accumulator may make the two differ."""
        wide = [n for n, v in self.info.items() if v.type is not None and v.type.width > EXACT_FLOAT64_BITS]
        if wide:
            log.warning("%d value(s) are wider than %d bits (e.g. %s: %s): the float64 emulation may round "
                        "there and differ from the C++", len(wide), EXACT_FLOAT64_BITS, label(wide[0]),
                        self.info[wide[0]].type)

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
                                    params=MapParams(buf.size), source=buf.source, op="copy"))
                buf = out
            used.add(buf.ident)
            ports.append(buf)
        return ports, copies

    def layer(self, k: int, g: _Group) -> Layer:
        out = self.buffers[id(g)]
        head_name = op_name(g.head) if g.head is not None else "read"
        source = str((g.head or g.steps[0]).meta.get("onnx_node") or (g.head or g.steps[0]).name)
        ident = self.names.name(f"l{k}_{head_name}", "")
        layer = LAYER_KINDS[g.kind].build(self, ident, g, out)
        layer.source, layer.op = source, head_name
        layer.steps = self.steps(g, layer)
        return layer

def build_hls_model(fpm, inputs: tuple[torch.Tensor, ...], options: ExportOptions) -> HlsModel:
    """The HLS project content of ``fpm`` (see the module docstring). ``inputs``: one example per
    graph input (batch 1 is used for shapes)."""
    gm = fpm.graph_module
    example = tuple(x[:1].to(torch.float64) for x in inputs)
    const = const_nodes(gm)
    bad = find_unsupported(gm, const)
    if bad:
        raise ExportError(f"{len(bad)} node(s) have no HLS form: " + "; ".join(bad))
    return _Builder(fpm, example, options).build()
