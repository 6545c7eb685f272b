"""``write_annotated``: a FixedPointModel as an annotated ONNX model (see :mod:`qfx_onnx.quant.annotated`).

Every fx node becomes ONNX in graph order: placeholders the graph inputs, ``get_attr`` nodes
initializers named by their ``onnx_name``, cast modules calls to the local cast function of their
type, IR ops the ONNX op(s) with exactly the op's semantics at opset 18. An IR op is emitted as
its ``onnx_op`` with its keyword attributes copied (checked against the opset-18 schema) unless its
definition gives an ``emit`` (:mod:`qfx_onnx.ir.defs`): those ops pass values as inputs at opset 18
or have no ONNX op of their own.
"""

from __future__ import annotations

import logging
import operator
import os
import weakref
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import torch
from onnx import defs, helper, numpy_helper
from torch import fx

import qfx_onnx
from qfx_onnx.atomic import write_atomic
from qfx_onnx.errors import ExportError
from qfx_onnx.fixed.quantizer import FixedQuantizer
from qfx_onnx.fixed.types import OverflowMode, QuantMode
from qfx_onnx.importer.reader import weight_free
from qfx_onnx.ir import ops
from qfx_onnx.ir.ops import IR_OPS, op_of
from qfx_onnx.quant.annotated import (
    FORMAT_VERSION, INV_SCALE_SUFFIX, KEY_ROLE, KEY_TYPE, LOSSLESS, META_SOURCE, META_VERSION, NODE_IR_OP, QUANT_SUFFIX, RAW_SUFFIX,
    SCALE_SUFFIX, imported_entries, khot_entries, type_entries,
)
from qfx_onnx.quant.onnx_cast import (
    DOMAIN, IR_VERSION, OPSET, cast_function, cast_function_per_channel, channel_function_name, channel_scales,
    check_channel_types, check_onnx_castable,
)
from qfx_onnx.quant.quantize import CAST_MODULE_PREFIX, FixedPointModel
from qfx_onnx.quant.typeprop import ValueInfo, propagate

log = logging.getLogger(__name__)

READ_FROM: "weakref.WeakKeyDictionary[FixedPointModel, tuple[str | None, str | None]]" = weakref.WeakKeyDictionary()
"""Models made by ``read_annotated``: the path they were read from and their ``qfx.source``."""


Examples = torch.Tensor | Sequence[torch.Tensor] | None
Values = dict[fx.Node, ValueInfo]


def write_annotated(model: FixedPointModel, path: str | os.PathLike, *, example_input: Examples = None,
                    source: str | None = None, values: Values | None = None) -> onnx.ModelProto:
    """Write ``model`` to ``path`` as an annotated ONNX model and return it.

    The model passes ``onnx.checker.check_model(full_check=True)``; graph inputs and outputs keep
    their names and shapes (dynamic dims stay dynamic). ``example_input`` (default: zeros of the
    input shapes with dynamic dims 1) fixes the static shapes that typing the lossless
    intermediates and some emissions need. ``source`` names the original file (stored as
    ``qfx.source``; by default the one recorded when ``model`` was read from an annotated file).
    The file is written atomically; the file ``model`` was read from, or ``source``, is never
    overwritten. ``values`` may pass type propagation's result from an earlier call (see
    :func:`lossless_values`). Raises ExportError for what the format cannot express.
    """
    read_path, read_source = READ_FROM.get(model, (None, None))
    _refuse_overwrite(path, [p for p in (read_path, source) if p])
    proto = build_annotated(model, example_input=example_input, source=source or read_source, values=values)
    _save_atomically(proto, Path(path))
    return proto


def save_annotated(proto: onnx.ModelProto, model: FixedPointModel, path: str | os.PathLike) -> None:
    """Write ``proto`` (from :func:`build_annotated` of ``model``) to ``path`` atomically, with
    :func:`write_annotated`'s guarantee that the file ``model`` was read from is never
    overwritten. For callers that verify the model before writing it."""
    read_path, _ = READ_FROM.get(model, (None, None))
    _refuse_overwrite(path, [p for p in (read_path,) if p])
    _save_atomically(proto, Path(path))


def build_annotated(model: FixedPointModel, *, example_input: Examples = None, source: str | None = None,
                    values: Values | None = None) -> onnx.ModelProto:
    """The annotated ModelProto of ``model`` (what :func:`write_annotated` writes), checked.

    The graph is built in place in the returned ModelProto, so each weight is held once (as its
    initializer); the checker and shape inference see a copy without the large weights
    (:func:`~qfx_onnx.importer.reader.weight_free`), and each of those is checked on its own.
    """
    gm = model.graph_module
    info = gm.onnx_info
    values = lossless_values(gm, _example_inputs(model, example_input), values)
    proto = onnx.ModelProto(ir_version=IR_VERSION, producer_name="qfx-onnx", producer_version=qfx_onnx.__version__)
    writer = _Writer(gm, values, proto.graph)
    writer.run()
    proto.opset_import.extend([helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)])
    proto.functions.extend(writer.functions[k] for k in sorted(writer.functions))
    meta = {META_VERSION: FORMAT_VERSION}
    if source:
        meta[META_SOURCE] = os.path.basename(source)
    helper.set_model_props(proto, meta)
    _set_output_shapes(proto, info.graph_name)
    try:
        light = weight_free(proto)
        kept = {t.name for t in light.graph.initializer}
        for tensor in proto.graph.initializer:
            if tensor.name not in kept:
                onnx.checker.check_tensor(tensor)
        onnx.checker.check_model(light, full_check=True)
    except Exception as exc:
        reason = " ".join(str(exc).split())[:300]
        raise ExportError(f"{info.graph_name}: the annotated model is invalid ONNX ({reason})") from None
    return proto


def lossless_values(gm: fx.GraphModule, examples: Sequence[torch.Tensor], values: Values | None = None) -> Values:
    """Type propagation (:func:`~qfx_onnx.quant.typeprop.propagate`) of ``gm`` on ``examples``
    (floating ones in the parameters' dtype). ``values`` from an earlier call on the same model,
    its casts unchanged since, is returned as it is when its inputs had the shapes of ``examples``:
    types and shapes depend only on those and on the casts. Otherwise it is computed afresh.
    """
    examples = tuple(examples)
    if values is not None:
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if [values[n].shape if n in values else None for n in placeholders] == [tuple(x.shape) for x in examples]:
            return values
    dtype = next((p.dtype for p in gm.parameters()), torch.float64)
    return propagate(gm, tuple(x.to(dtype) if x.is_floating_point() else x for x in examples))


# --------------------------------------------------------------------------------------------------
# graph construction


class _Writer:
    """Builds the ONNX graph of one fx GraphModule; ``values`` is typeprop's view of every node."""

    def __init__(self, gm: fx.GraphModule, values: dict[fx.Node, ValueInfo], graph: onnx.GraphProto) -> None:
        self.gm = gm
        self.values = values
        self.graph = graph  # filled by run(); initializers go straight in, never held twice
        self.names: dict[fx.Node, str] = {}
        self.nodes: list[onnx.NodeProto] = []
        self.functions: dict[str, onnx.FunctionProto] = {}
        self.annotations: list[tuple[str, dict[str, str]]] = []
        self._tensors: set[str] = set()
        self._node_names: set[str] = set()

    # ------------------------------------------------------------------------------------ helpers
    def fresh(self, name: str) -> str:
        """``name``, or ``name::<k>`` if a tensor of that name exists; reserved on return."""
        out, k = name, 2
        while out in self._tensors:
            out, k = f"{name}::{k}", k + 1
        self._tensors.add(out)
        return out

    def node(self, op_type: str, inputs: Sequence[str], outputs: Sequence[str], name: str, *, domain: str = "",
             ir_op: str | None = None, **attrs) -> None:
        """Append one ONNX node (trailing absent inputs dropped); ``ir_op`` tags a non one-to-one emission."""
        inputs = list(inputs)
        while inputs and not inputs[-1]:
            inputs.pop()
        base, k = name, 2
        while name in self._node_names:
            name, k = f"{base}::{k}", k + 1
        self._node_names.add(name)
        node = helper.make_node(op_type, inputs, list(outputs), name=name, domain=domain or None, **attrs)
        if ir_op is not None:
            if getattr(IR_OPS.get(ir_op), "restore", None) is None:  # the reader could not turn it back
                raise ExportError(f"{name!r}: emission tagged {ir_op!r}, an IR op without a restore rule")
            entry = node.metadata_props.add()
            entry.key, entry.value = NODE_IR_OP, ir_op
        self.nodes.append(node)

    def const(self, name: str, array: np.ndarray) -> str:
        """A new initializer (name made unique) holding ``array``."""
        name = self.fresh(name)
        self.graph.initializer.append(numpy_helper.from_array(np.array(array, order="C"), name))  # keeps 0-d shapes
        return name

    def extend(self, nodes: Sequence[onnx.NodeProto], initializers: Sequence[onnx.TensorProto]) -> None:
        """Append nodes and initializers built elsewhere (an OnnxBuilder's), their names unique."""
        for tensor in initializers:
            if tensor.name in self._tensors:
                raise ExportError(f"tensor name {tensor.name!r} used twice")
            self._tensors.add(tensor.name)
            self.graph.initializer.append(tensor)
        for node in nodes:
            if node.name in self._node_names:
                raise ExportError(f"node name {node.name!r} used twice")
            self._node_names.add(node.name)
            self._tensors.update(node.output)
            self.nodes.append(node)

    def arg(self, value) -> str:
        """The ONNX tensor name of an fx argument ("" for None)."""
        if value is None:
            return ""
        if not isinstance(value, fx.Node):
            raise ExportError(f"cannot pass the Python value {value!r} as an ONNX input")
        return self.names[value]

    def shape(self, node: fx.Node, why: str) -> tuple[int, ...]:
        shape = self.values[node].shape
        if shape is None:
            raise ExportError(f"{why}: the shape of {node.name!r} is unknown")
        return shape

    def output_name(self, node: fx.Node) -> str:
        """The ONNX name of a call's output: its onnx_name, else ``<onnx_node>::<ir op>``."""
        name = node.meta.get("onnx_name")
        if name is None:
            op = op_of(node.target)
            name = f"{node.meta.get('onnx_node') or node.name}::{op.name if op else 'out'}"
        return self.fresh(name)

    def node_name(self, node: fx.Node, output: str) -> str:
        """Named after the ONNX node it came from; steps of a decomposition after their output."""
        if node.meta.get("onnx_name") is None:
            return output
        return node.meta.get("onnx_node") or output

    # --------------------------------------------------------------------------------------- walk
    def run(self) -> None:
        """Fill ``self.graph`` (as ``helper.make_graph`` would) from the fx graph."""
        info = self.gm.onnx_info
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(info.input_names):
            raise ExportError(f"{info.graph_name}: {len(placeholders)} graph inputs but onnx_info names {len(info.input_names)}")
        inputs = []
        for node, name, shape in zip(placeholders, info.input_names, info.input_shapes):
            self.names[node] = self.fresh(name)
            dims = None if shape is None else [_dim(d, i) for i, d in enumerate(shape)]
            inputs.append(helper.make_tensor_value_info(name, _elem_type(node), dims))
        outputs: list[onnx.ValueInfoProto] = []
        for node in self.gm.graph.nodes:
            if node.op == "get_attr":
                self.emit_constant(node)
            elif node.op == "call_module":
                self.emit_cast(node)
            elif node.op == "call_function":
                self.emit_call(node)
            elif node.op == "output":
                outputs = self.emit_outputs(node, info.output_names)
        graph = self.graph
        graph.node.extend(self.nodes)
        graph.name = info.graph_name
        graph.input.extend(inputs)
        graph.output.extend(outputs)
        graph.quantization_annotation.extend(_annotation(n, e) for n, e in self.annotations)

    def emit_constant(self, node: fx.Node) -> None:
        value = operator.attrgetter(node.target)(self.gm).detach().cpu()
        name = node.meta.get("onnx_name") or node.target
        if not value.is_floating_point():
            self.names[node] = self.const(name, value.numpy())
            return
        exact = value.to(torch.float64)
        stored = exact.to(torch.float32)
        quantizers = [self.gm.get_submodule(u.target) for u in node.users if u.op == "call_module"]
        if len(quantizers) == 1 and len(node.users) == 1:
            # float32 rounding of a float64 parameter can move it onto a rounding tie: store the
            # quantized value (a fixed point of the cast) wherever the cast would change. Where
            # float32 holds every value exactly (always, for weights read from an ONNX file) the
            # cast sees the same values and nothing changes.
            if not torch.equal(stored.to(torch.float64), exact):
                q = quantizers[0]
                want = q.quantize_frozen(exact)
                stored = torch.where(q.quantize_frozen(stored.to(torch.float64)) == want, stored, want.to(torch.float32))
        elif not torch.equal(stored.to(torch.float64), exact):
            log.warning("constant %s is not exactly a float32; onnxruntime sees it rounded", name)
        self.names[node] = self.const(name, stored.numpy())

    def emit_cast(self, node: fx.Node) -> None:
        if not node.target.startswith(CAST_MODULE_PREFIX):
            raise ExportError(f"module call {node.target!r} is not a fixed-point cast")
        quant: FixedQuantizer = self.gm.get_submodule(node.target)
        tensor = node.meta["onnx_name"]
        if not quant.enabled:
            raise ExportError(f"tensor {tensor!r}: its cast is disabled; enable casts before export")
        producer = node.args[0]
        raw = self.names[producer]
        if raw == tensor + RAW_SUFFIX:
            out = self.fresh(tensor)
        elif producer.op == "placeholder" and raw == tensor:
            out = self.fresh(tensor + QUANT_SUFFIX)
        else:
            raise ExportError(f"tensor {tensor!r}: its producer is named {raw!r}, expected {tensor}{RAW_SUFFIX}")
        self.names[node] = out
        types = quant.frozen_types()
        role = node.meta.get("role", "act")
        imported = imported_entries(node.meta.get("qfx_site"))
        if quant.per_channel_axis is None:
            check_onnx_castable(types[0], f"tensor {tensor!r}")
            fn = cast_function(types[0])
            self.node(fn.name, [raw], [out], f"{tensor}::cast", domain=DOMAIN)
            self.annotations.append((out, {**type_entries(types[0], role), **khot_entries(quant), **imported}))
        else:
            check_channel_types(types, f"tensor {tensor!r}")
            rank = len(self.shape(node, f"per-channel tensor {tensor!r}"))
            axis = quant.per_channel_axis % rank
            fn = cast_function_per_channel(types[0])
            scale, inv_scale = channel_scales(types, axis, rank)
            scales = [self.const(tensor + SCALE_SUFFIX, scale), self.const(tensor + INV_SCALE_SUFFIX, inv_scale)]
            self.node(channel_function_name(types[0]), [raw, *scales], [out], f"{tensor}::cast", domain=DOMAIN)
            self.annotations.append((out, {**type_entries(types, role, axis), **khot_entries(quant), **imported}))
        self.functions[fn.name] = fn

    def emit_call(self, node: fx.Node) -> None:
        op = op_of(node.target)
        if node.target is operator.getitem:
            if node not in self.names:
                raise ExportError(f"{node.name!r}: getitem on something other than a split")
        elif op is None:
            raise ExportError(f"{node.name!r}: {getattr(node.target, '__name__', node.target)} is not an IR op")
        elif op.multi_output:  # its ONNX outputs are the getitem nodes: the op's node is the ONNX node
            op.emit(self, node, None, node.meta.get("onnx_node") or node.name)
            return
        elif node.target is ops.identity and self.names.get(node.args[0]) == node.meta.get("onnx_name"):
            # an imported cast (now identity) whose input already has the raw name it would take
            # (a QONNX model qfx-onnx exported): nothing to emit
            self.names[node] = self.names[node.args[0]]
            return
        else:
            out = self.output_name(node)
            self.names[node] = out
            (op.emit or _emit_default)(self, node, out, self.node_name(node, out))
        value = self.values.get(node)
        if value is not None and value.type is not None and (op is None or op.kind != "shape"):
            # the value's type; modes only matter where a cast rounds
            lossless = value.type.with_modes(QuantMode.TRN, OverflowMode.WRAP, 0)
            self.annotations.append((self.names[node], {KEY_TYPE: str(lossless), KEY_ROLE: LOSSLESS}))

    def emit_outputs(self, node: fx.Node, names: Sequence[str]) -> list[onnx.ValueInfoProto]:
        args = node.args[0]
        results = list(args) if isinstance(args, (tuple, list)) else [args]
        outputs = []
        for result, name in zip(results, names):
            have = self.names[result]
            if have != name:
                if name in self._tensors:
                    raise ExportError(f"graph output {name!r} would clash with the tensor of that name")
                self.node("Identity", [have], [self.fresh(name)], name)
            outputs.append(helper.make_tensor_value_info(name, _elem_type(result), None))
        return outputs


# --------------------------------------------------------------------------------------------------
# the default emission (ops with their own emission define ``emit`` in qfx_onnx.ir.defs)


def _emit_default(w: _Writer, node: fx.Node, out: str, name: str) -> None:
    """The op's ``onnx_op`` with tensor args as inputs and keyword attributes as ONNX attributes."""
    op = op_of(node.target)
    if op.onnx_op is None:
        raise ExportError(f"{node.name!r}: IR op {op.name} has no ONNX emission")
    w.node(op.onnx_op, [w.arg(a) for a in node.args], [out], name, **_attributes(op.onnx_op, node.kwargs, node.name))


def _attributes(op_type: str, kwargs: dict, where: str) -> dict:
    """``kwargs`` (None values dropped) as ONNX attributes typed by the opset-18 schema of ``op_type``."""
    schema = defs.get_schema(op_type, OPSET)
    kinds = defs.OpSchema.AttrType
    out = {}
    for key, value in kwargs.items():
        if value is None:
            continue
        if key not in schema.attributes:
            raise ExportError(f"{where!r}: {op_type} (opset {OPSET}) has no attribute {key!r}")
        kind = schema.attributes[key].type
        if kind == kinds.INT:
            value = int(value)
        elif kind == kinds.FLOAT:
            value = float(value)
        elif kind == kinds.INTS:
            value = [int(v) for v in value]
        elif kind == kinds.FLOATS:
            value = [float(v) for v in value]
        out[key] = value
    return out


# --------------------------------------------------------------------------------------------------
# model-level helpers


def _dim(size: int | None, axis: int) -> int | str:
    """A static size, or the symbolic name of a dynamic one ("batch" on axis 0)."""
    if size is not None:
        return size
    return "batch" if axis == 0 else f"dim{axis}"


def _elem_type(node: fx.Node) -> int:
    dtype = node.meta.get("onnx_dtype") or "float32"
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def _annotation(tensor: str, entries: dict[str, str]) -> onnx.TensorAnnotation:
    ann = onnx.TensorAnnotation(tensor_name=tensor)
    for key, value in entries.items():
        ann.quant_parameter_tensor_names.add(key=key, value=value)
    return ann


def _example_inputs(model: FixedPointModel, given) -> tuple[torch.Tensor, ...]:
    if given is not None:
        return tuple(given) if isinstance(given, (tuple, list)) else (given,)
    info = model.graph_module.onnx_info
    placeholders = [n for n in model.graph_module.graph.nodes if n.op == "placeholder"]
    examples = []
    for name, shape, node in zip(info.input_names, info.input_shapes, placeholders):
        if shape is None:
            raise ExportError(f"input {name!r} has an unknown shape; pass example_input")
        dtype = ops.torch_dtype(_elem_type(node))
        examples.append(torch.zeros([1 if d is None else d for d in shape], dtype=dtype))
    return tuple(examples)


def _set_output_shapes(proto: onnx.ModelProto, label: str) -> None:
    """Graph output shapes from ONNX shape inference (dynamic dims stay symbolic)."""
    try:  # on a copy without the large weights: inference would serialize and parse them twice
        inferred = onnx.shape_inference.infer_shapes(weight_free(proto), strict_mode=True, data_prop=True)
    except Exception as exc:
        log.warning("%s: output shapes left unset (shape inference failed: %s)", label, exc)
        return
    shapes = {v.name: v.type for v in [*inferred.graph.output, *inferred.graph.value_info]}
    for output in proto.graph.output:
        inferred_type = shapes.get(output.name)
        if inferred_type is not None and inferred_type.tensor_type.HasField("shape"):
            output.type.tensor_type.shape.CopyFrom(inferred_type.tensor_type.shape)


def _refuse_overwrite(path: str | os.PathLike, inputs: Sequence[str]) -> None:
    target = Path(path).resolve()
    for source in inputs:
        other = Path(source).resolve()
        if target == other or (target.exists() and other.exists() and os.path.samefile(target, other)):
            raise ExportError(f"{Path(path).name}: refusing to overwrite the model's own input file")


def _save_atomically(proto: onnx.ModelProto, path: Path) -> None:
    """Write to a temp file beside ``path``, then rename it over ``path`` (mode from the umask)."""
    write_atomic(path, proto.SerializeToString(), what="annotated ONNX model", error=ExportError)


__all__ = ["build_annotated", "lossless_values", "save_annotated", "write_annotated"]
