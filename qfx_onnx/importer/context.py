"""The graph under construction and the per-node view that converters use.

:class:`GraphBuilder` owns the fx graph, the root module holding constants, and the map from ONNX
tensor names to fx nodes; it writes the metadata that later passes read (see
:mod:`qfx_onnx.importer`). :class:`NodeContext` is what one converter sees of one ONNX node: its
attributes and inputs, each access recorded so that anything left unread is an error.
"""

from __future__ import annotations

import keyword
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import onnx
import torch
from torch import fx, nn

from qfx_onnx.errors import OnnxModelError, UnsupportedAttributeError
from qfx_onnx.ir.ops import SHAPE_TWINS, op_of

ROLES = ("input", "weight", "bias", "constant", "shape", "activation", "internal")

_REQUIRED = object()
_RESERVED = set(dir(fx.GraphModule)) | {"training", "onnx_info"}


@dataclass(frozen=True)
class TensorInfo:
    """What is known of an ONNX tensor before it runs: element dtype and shape.

    ``shape`` is None when even the rank is unknown; a dim is None when it is symbolic or unknown.
    ``dim_params`` holds, where shape inference named a symbolic dim, its name (equal names are
    equal sizes), else None.
    """

    dtype: np.dtype | None
    shape: tuple[int | None, ...] | None
    dim_params: tuple[str | None, ...] | None = None


@dataclass(frozen=True)
class Producer:
    """The ONNX node that made a tensor: its (possibly synthesized) name and op type."""

    name: str
    op_type: str


@dataclass(frozen=True)
class OnnxInfo:
    """Facts about the source model, attached to the imported GraphModule as ``gm.onnx_info``."""

    graph_name: str
    opset: int
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    input_shapes: tuple[tuple[int | None, ...] | None, ...]
    fixed_batch: int | None = None
    """The declared batch of a fixed-batch export that could not be generalised to any batch
    (see :mod:`qfx_onnx.importer.batch`): the graph then runs only on chunks of this many
    samples, and every stage feeds it through :func:`qfx_onnx.batching.run_in_chunks`. None when
    the graph takes any batch."""


def identifier(text: str, taken: set[str]) -> str:
    """An ASCII Python identifier made from ``text``, not in ``taken`` (and added to it)."""
    base = re.sub(r"[^0-9A-Za-z_]", "_", text) or "t"
    if base[0].isdigit():
        base = f"t_{base}"
    if keyword.iskeyword(base) or base in _RESERVED or base.startswith("__"):
        base = f"t_{base}"
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


def is_float(dtype: np.dtype | None) -> bool:
    """Whether ``dtype`` is a floating-point dtype (False when unknown)."""
    return dtype is not None and np.issubdtype(dtype, np.floating)


def _is_integer(dtype: np.dtype | None) -> bool:
    return dtype is not None and not is_float(dtype)


def _for_dtype(fn: Callable, dtype: np.dtype | None) -> Callable:
    """``fn``, or its "shape"-kind twin when the value it makes is known to be an integer tensor."""
    return SHAPE_TWINS.get(fn, fn) if _is_integer(dtype) else fn


def _check_values(array: np.ndarray, onnx_name: str, producer: Producer | None) -> None:
    """Every float constant the graph uses must be non-empty and finite: no ``ap_fixed`` holds NaN
    or infinity, and an empty weight leaves nothing to compute with."""
    if array.dtype.kind != "f":
        return
    where = f" (from node {producer.name!r}, {producer.op_type})" if producer is not None else ""
    if array.size == 0:
        raise OnnxModelError(f"constant {onnx_name!r}{where} is empty (shape {tuple(array.shape)})")
    bad = ~np.isfinite(array)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise OnnxModelError(f"constant {onnx_name!r}{where} holds {int(bad.sum())} non-finite value(s) "
                             f"(first: {array[first]} at index {first}); a fixed-point model cannot represent NaN or infinity")


class GraphBuilder:
    """Builds the fx graph: placeholders, one ``get_attr`` per used constant, op calls, output.

    ``infos`` describes every ONNX tensor known after shape inference and folding; ``constants``
    holds the value of every compile-time constant; ``producers`` names the node behind each folded
    constant; ``partials`` the integer tensors known in part (see :mod:`qfx_onnx.importer.fold`);
    ``consumed`` the tensor names some node or the graph output reads (None: assume all are).
    """

    def __init__(self, infos: dict[str, TensorInfo], constants: dict[str, np.ndarray], producers: dict[str, Producer],
                 partials: dict[str, Any] | None = None, consumed: set[str] | None = None) -> None:
        self.graph = fx.Graph()
        self.root = nn.Module()
        self.infos = infos
        self.constants = constants
        self.producers = producers
        self.partials = partials or {}
        self.consumed = consumed
        self.values: dict[str, fx.Node] = {}
        self._attr_names: set[str] = set()
        # imported quantizers (see qfx_onnx.importer.quant_ops): their plan, the pins of constants
        # they produce, and the ONNX nodes around each tensor (set by loader.build_graph)
        self.quant_plan: Any = None
        self.pins: dict[str, Any] = {}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        self.producer_nodes: dict[str, onnx.NodeProto] = {}

    def add_input(self, name: str) -> fx.Node:
        """A placeholder for graph input ``name`` (role input)."""
        node = self.graph.placeholder(identifier(name, self._attr_names))
        self._set_meta(node, onnx_name=name, producer=None, dtype=self.infos[name].dtype, role="input")
        self.values[name] = node
        return node

    def value(self, name: str, role: str | None = None) -> fx.Node:
        """The fx node of ONNX tensor ``name``; a constant gets its get_attr node on first use,
        with ``role`` (default: "constant" for floats, "shape" otherwise)."""
        if name not in self.values:
            if name not in self.constants:
                raise OnnxModelError(f"tensor {name!r} is used before any node produces it")
            array = self.constants[name]
            role = role or ("constant" if is_float(array.dtype) else "shape")
            self.values[name] = self.add_constant(array, name, self.producers.get(name), role)
        return self.values[name]

    def add_constant(self, array: np.ndarray, onnx_name: str, producer: Producer | None, role: str) -> fx.Node:
        """Register ``array`` on the root module (float: trainable Parameter; else buffer) and
        return its get_attr node."""
        if array.dtype == object or array.dtype.kind in "SUO":
            raise OnnxModelError(f"constant {onnx_name!r} holds strings, which no op here can use")
        _check_values(array, onnx_name, producer)
        attr = identifier(onnx_name.replace("::", "_"), self._attr_names)
        tensor = torch.from_numpy(np.array(array, copy=True))
        if tensor.is_floating_point():
            self.root.register_parameter(attr, nn.Parameter(tensor))
        else:
            self.root.register_buffer(attr, tensor)
        node = self.graph.get_attr(attr)
        self._set_meta(node, onnx_name=onnx_name, producer=producer, dtype=array.dtype, role=role)
        if onnx_name in self.pins:  # a constant an imported quantizer made: its type is fixed
            node.meta.update(self.pins[onnx_name].meta())
        return node

    def call(self, fn: Callable, args: tuple, kwargs: dict, *, name: str, meta: dict[str, Any]) -> fx.Node:
        """A call_function node of ``fn`` named after ``name`` (made unique), with its metadata."""
        node = self.graph.create_node("call_function", fn, args, kwargs, name=name)
        self._set_meta(node, **meta)
        return node

    def finish(self, output_names: Sequence[str], info: OnnxInfo) -> fx.GraphModule:
        """Close the graph: one output node returning a single node, or a tuple when several."""
        outputs = [self.value(name) for name in output_names]
        out = self.graph.output(outputs[0] if len(outputs) == 1 else tuple(outputs))
        self._set_meta(out, onnx_name=None, producer=None, dtype=None, role="internal")
        # shape arithmetic whose result folding turned into a constant (a Reshape target known but
        # for the input's own dims) is left without users: drop it (IR ops are pure)
        self.graph.eliminate_dead_code()
        self.graph.lint()
        gm = fx.GraphModule(self.root, self.graph, class_name=identifier(info.graph_name or "onnx_graph", set()))
        gm.onnx_info = info
        # GraphModule.__deepcopy__ restores attributes listed under this key of gm.meta
        gm.meta["_user_preserved_attributes"] = {"onnx_info": info}
        return gm

    @staticmethod
    def _set_meta(node: fx.Node, *, onnx_name: str | None, producer: Producer | None, dtype: np.dtype | None, role: str) -> None:
        assert role in ROLES, role
        if onnx_name is not None:
            node.meta["onnx_name"] = onnx_name
        node.meta["onnx_node"] = producer.name if producer else None
        node.meta["onnx_op"] = producer.op_type if producer else None
        node.meta["onnx_dtype"] = np.dtype(dtype).name if dtype is not None else None
        node.meta["role"] = role


class NodeContext:
    """One ONNX node as its converter sees it.

    Every attribute and input read goes through this object; :meth:`check_done` then raises
    :class:`UnsupportedAttributeError` for any attribute or input present but never read, and for
    any output no fx node was bound to.
    """

    def __init__(self, builder: GraphBuilder, node: onnx.NodeProto, name: str, opset: int) -> None:
        self.builder = builder
        self.node = node
        self.name = name
        self.op_type = node.op_type
        self.opset = opset
        self.producer = Producer(name, node.op_type)
        self._attrs = {a.name: a for a in node.attribute}
        self._read_attrs: set[str] = set()
        self._read_inputs: set[int] = set()
        self._bound: set[int] = set()

    # ---------------------------------------------------------------------------------------------
    # errors and attributes

    def error(self, message: str) -> UnsupportedAttributeError:
        """An UnsupportedAttributeError naming this node and op (for the caller to raise)."""
        return UnsupportedAttributeError(f"node {self.name!r} ({self.op_type}, opset {self.opset}): {message}")

    def attr(self, name: str, default: Any = _REQUIRED, allowed: Sequence[Any] | None = None) -> Any:
        """Attribute ``name`` as a Python value (str, int, float, list, numpy array), or ``default``
        when absent. A value outside ``allowed`` raises UnsupportedAttributeError."""
        self._read_attrs.add(name)
        if name not in self._attrs:
            if default is _REQUIRED:
                raise OnnxModelError(f"node {self.name!r} ({self.op_type}): required attribute {name!r} is missing")
            return default
        value = onnx.helper.get_attribute_value(self._attrs[name])
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, onnx.TensorProto):
            value = onnx.numpy_helper.to_array(value)
        elif isinstance(value, list):
            value = [v.decode() if isinstance(v, bytes) else v for v in value]
        if allowed is not None and value not in allowed:
            choices = ", ".join(repr(a) for a in allowed)
            raise self.error(f"attribute {name}={value!r} is not supported (supported: {choices})")
        return value

    # ---------------------------------------------------------------------------------------------
    # inputs

    def input_name(self, i: int) -> str:
        """The ONNX name of input ``i``; empty when absent."""
        return self.node.input[i] if i < len(self.node.input) else ""

    def has_input(self, i: int) -> bool:
        """Whether input ``i`` is present (not omitted or empty)."""
        return bool(self.input_name(i))

    def is_const(self, i: int) -> bool:
        """Whether input ``i`` is known at import (initializer, Constant or folded)."""
        return self.input_name(i) in self.builder.constants

    def input(self, i: int, role: str | None = None) -> fx.Node | None:
        """The fx node of input ``i`` (None when absent); a constant becomes a get_attr with ``role``."""
        self._read_inputs.add(i)
        if not self.has_input(i):
            return None
        return self.builder.value(self.input_name(i), role)

    def const(self, i: int, what: str | None = None) -> np.ndarray | None:
        """The value of constant input ``i`` (None when absent); a runtime input is an error."""
        self._read_inputs.add(i)
        if not self.has_input(i):
            return None
        if not self.is_const(i):
            raise self.error(f"input {what or i!r} ({self.input_name(i)!r}) must be a constant")
        return self.builder.constants[self.input_name(i)]

    def partial(self, i: int):
        """The :class:`~qfx_onnx.importer.fold.Partial` value of integer input ``i`` when shape
        folding knows some but not all of its entries, else None (marks the input read)."""
        self._read_inputs.add(i)
        return self.builder.partials.get(self.input_name(i))

    def is_consumed(self, i: int) -> bool:
        """Whether output ``i`` is read by another node or is a graph output."""
        name = self.output_name(i)
        return bool(name) and (self.builder.consumed is None or name in self.builder.consumed)

    def info(self, i: int) -> TensorInfo:
        """What shape inference knows of input ``i``."""
        return self.builder.infos.get(self.input_name(i), TensorInfo(None, None))

    def rank(self, i: int = 0) -> int:
        """The rank of input ``i``; an error when shape inference could not tell."""
        shape = self.info(i).shape
        if shape is None:
            raise self.error(f"the rank of input {self.input_name(i)!r} is unknown (shape inference failed)")
        return len(shape)

    def static_dims(self, i: int, why: str, start: int = 0, axes: Sequence[int] | None = None) -> tuple[int, ...]:
        """The dims of input ``i`` at ``axes`` (default: from ``start`` on), all known; raises
        naming ``why`` otherwise."""
        shape = self.info(i).shape
        if shape is not None:
            dims = tuple(shape[a] for a in axes) if axes is not None else shape[start:]
            if None not in dims:
                return dims  # type: ignore[return-value]
        raise self.error(f"{why} needs static dims of input {self.input_name(i)!r}, got shape {shape}")

    def axes(self, axes: Sequence[int], rank: int) -> list[int]:
        """``axes`` made non-negative for a tensor of ``rank``; out of range is an error."""
        out = []
        for a in axes:
            if not -rank <= a < rank:
                raise self.error(f"axis {a} is out of range for rank {rank}")
            out.append(int(a) % rank)
        return out

    # ---------------------------------------------------------------------------------------------
    # emitting fx nodes

    def output_name(self, i: int = 0) -> str:
        """The ONNX name of output ``i``; empty when absent."""
        return self.node.output[i] if i < len(self.node.output) else ""

    def emit(self, fn: Callable, *args: Any, out: int = 0, **kwargs: Any) -> fx.Node:
        """Call ``fn`` and bind the result to ONNX output ``out`` (meta onnx_name = its name).

        An IR op whose output is an integer tensor is replaced by its "shape"-kind twin, and the
        node's role is "shape"; otherwise the role is "activation".
        """
        name = self.output_name(out)
        dtype = self._dtype_of(name, args)
        fn = _for_dtype(fn, dtype)
        role = "shape" if _is_integer(dtype) else "activation"
        meta = dict(onnx_name=name, producer=self.producer, dtype=dtype, role=role)
        node = self.builder.call(fn, args, kwargs, name=name, meta=meta)
        self.builder.values[name] = node
        self._bound.add(out)
        return node

    def internal(self, fn: Callable, *args: Any, **kwargs: Any) -> fx.Node:
        """Call ``fn`` as a step inside this node's decomposition: no onnx_name, role "internal"
        ("shape" for a shape-kind op)."""
        dtype = self._dtype_of(self.output_name(0), args)
        fn = _for_dtype(fn, dtype)
        op = op_of(fn)
        role = "internal"
        if op is not None and op.kind == "shape":
            dtype, role = np.dtype(np.int64), "shape"
        meta = dict(onnx_name=None, producer=self.producer, dtype=dtype, role=role)
        return self.builder.call(fn, args, kwargs, name=f"{self.name}_{op.name if op else 'step'}", meta=meta)

    def const_output(self, array: np.ndarray, pin: Any, out: int = 0) -> None:
        """Bind output ``out`` to a constant computed at import, whose type ``pin`` fixes (an
        imported quantizer of a weight); its ``get_attr`` node is made where a consumer reads it,
        with that consumer's role."""
        name = self.output_name(out)
        self.builder.constants[name] = array
        self.builder.producers[name] = self.producer
        self.builder.infos[name] = TensorInfo(array.dtype, tuple(array.shape))
        self.builder.pins[name] = pin
        self._bound.add(out)

    def alias_output(self, node: fx.Node, out: int = 0) -> None:
        """Bind output ``out`` to an existing fx node (the value passes through unchanged)."""
        self.builder.values[self.output_name(out)] = node
        self._bound.add(out)

    def named_internal(self, fn: Callable, *args: Any, what: str, **kwargs: Any) -> fx.Node:
        """A step inside this node's decomposition that gets a name of its own,
        ``"{node}::{what}"`` (role "activation"), so that it can carry a cast."""
        name = f"{self.name}::{what}"
        meta = dict(onnx_name=name, producer=self.producer, dtype=np.dtype(np.float32), role="activation")
        return self.builder.call(fn, args, kwargs, name=name, meta=meta)

    def synth_pinned(self, what: str, value: float, pin: Any) -> fx.Node:
        """A synthesized float constant (see :meth:`synth`) whose type ``pin`` fixes."""
        self.builder.pins[f"{self.name}::{what}"] = pin
        return self.synth(what, value)

    def synth(self, what: str, array: np.ndarray | float, role: str = "constant", dtype: np.dtype | None = None) -> fx.Node:
        """A synthesized constant named ``"{node}::{what}"`` (float32 unless ``dtype``)."""
        value = np.asarray(array, dtype=dtype or np.float32)
        return self.builder.add_constant(value, f"{self.name}::{what}", self.producer, role)

    def _dtype_of(self, name: str, args: Sequence[Any]) -> np.dtype | None:
        info = self.builder.infos.get(name)
        if info is not None and info.dtype is not None:
            return info.dtype
        for arg in args:  # shape inference gave no type: the first tensor argument's
            if isinstance(arg, fx.Node) and arg.meta.get("onnx_dtype"):
                return np.dtype(arg.meta["onnx_dtype"])
        return None

    def check_done(self) -> None:
        """Raise for every attribute or input that was present but not read, and for unbound outputs."""
        for name in self._attrs:
            if name not in self._read_attrs:
                raise self.error(f"attribute {name!r} is not supported")
        for i, name in enumerate(self.node.input):
            if name and i not in self._read_inputs:
                raise self.error(f"input #{i} ({name!r}) is not supported")
        for i, name in enumerate(self.node.output):
            # an optional output that nothing reads (Dropout's mask in old zoo files) is fine
            if name and i not in self._bound and self.is_consumed(i):
                raise self.error(f"output #{i} ({name!r}) is read by the graph but not supported")
