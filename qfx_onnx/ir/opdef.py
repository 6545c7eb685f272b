"""The IR op registry: one :class:`IrOp` record per op, holding what the op means to every back end.

An IR op is registered once, beside its torch function, with :func:`ir_op`; every back end looks its
rule up from the op (``op_of(node.target).type_rule`` ...), never from a set of op names:

==================  =================================================================================
field               used by
==================  =================================================================================
``kind``            the op's arithmetic class (see :mod:`qfx_onnx.ir.ops`); sets the defaults below
``type_rule``       :mod:`qfx_onnx.quant.typeprop`: the lossless ``ap_fixed`` type of the result
``cast_role``       :mod:`qfx_onnx.quant.quantize`: the role of the cast put after the op
                    (``"act"``, ``"elementwise"``), None: no cast (data movement, shape ints)
``onnx_op``/``emit``  :mod:`qfx_onnx.quant.annotated_write`: the ONNX node(s) the op is written as
``restore``         :mod:`qfx_onnx.quant.annotated_read`: the op back from a tagged emission
``hls``             :mod:`qfx_onnx.hls.export` / ``heads`` / ``codegen`` / ``estimate``: how the op
                    is placed in a layer, its C++ and its cost; or :class:`NoHls` with the reason
``weight_axis``     :mod:`qfx_onnx.quant.quantize`: the output-channel axis of a weight input
``multi_output``    the writer and the HLS exporter: a tuple result read by getitem (split)
==================  =================================================================================

How to add an IR op
-------------------
Write one module in :mod:`qfx_onnx.ir.defs` (and name it in ``qfx_onnx/ir/defs/__init__.py``'s
import list), holding, side by side:

1. the torch function with ONNX semantics, decorated ``@ir_op(kind, "OnnxOp", ...)`` (see the
   contract in :mod:`qfx_onnx.ir.ops`; numbers that scale data are constant-tensor inputs);
2. ``type_rule=``: ``rule(q: TypeQuery) -> (FixedType | None, terms)``, the exact type HLS derives
   for the result from ``q.types`` (the tensor arguments' types) and ``q.shape(arg)``. Required for
   ``linear`` and ``arith`` ops; ``move`` ops default to their input's type, ``nonlinear`` and
   ``shape`` ops to None (a float result, meaningful only after the cast that follows);
3. ``cast_role=`` when the kind's default is wrong (``arith`` defaults to ``"elementwise"``, an
   activation such as relu says ``"act"``); ``weight_axis=`` for an op whose second input may be
   a weight: ``kwargs -> axis`` of its output channels (per-channel weight types);
4. ``emit=`` when the op is not its ``onnx_op`` with its keyword attributes copied
   (``emit(w, node, out, name)``, writing ONNX nodes through the writer ``w``: ``w.node``,
   ``w.arg``, ``w.const``, ``w.fresh``, ``w.shape``). An emission of several nodes tags its last
   node ``ir_op=<name>`` and gives ``restore=``: ``restore(gm, node) -> bool`` turning the imported
   last node back into the op (False: not this op's emission);
5. ``hls=``: one of

   * ``HlsForm.step(cpp, products=k, temps=...)``: an element-wise op fused into a layer's chain
     (or the head of a map layer on 1-3 arrays); ``cpp(T, var, args, temps) -> [C++ statements]``
     computing ``T var`` from the operand expressions ``args`` (None: an absent optional input);
     ``products``: multiplications per output element (the resource estimate);
   * ``HlsForm.table_of(fn)``: a one-input op followed by one cast, evaluated in HLS through a
     lookup table indexed by the raw bits of its input (at most 16): ``fn(x, **kwargs)`` (default
     the op itself, float64 values of every code of the input type) then the cast give the table
     entries (exact ``FixedType`` codes, computed once), so the C++ equals the emulation whatever
     ``fn`` computes, including an exact fixed-point kernel with tables of its own; the table is
     counted in the estimate as a constant array (LUT or BRAM by its size).
     ``HlsForm.table_of(fn, compact=rule)``: ``rule(node) -> LookupTable | None`` is the op's own
     table (its ``fixed`` spec's, :mod:`qfx_onnx.nonlinear.wiring`); where it holds fewer bits
     than the all-codes table (or the input is wider than 16 bits) the C++ reads it instead, as the
     emulation does: the index cast, then ``qfx_nl::table_lookup`` (clamp and shift, or the log2
     index), then the cast; the estimate counts ``LookupTable.bits`` as one ROM;
   * ``HlsForm.head("kind")``: the op heads a layer of a layer kind registered with
     :func:`qfx_onnx.hls.kinds.layer_kind` (``build``, ``config``, ``call``, ``iterations`` and
     the C++ ``header`` file under ``qfx_onnx/hls/templates/``). A new layer kind is defined in
     the op's own module with its header file beside the others. ``"kind"`` may be a function
     ``(builder, node, data nodes) -> kind`` choosing by the graph (a MatMul of a weight is a
     dense layer, of two activations another kind);
   * ``HlsForm.alias()`` / ``HlsForm.remap()``: data movement (an alias of the input array, or an
     index table found by running the op on indices);
   * ``NoHls("reason")``: refused by design; export-hls names the node, the op and the reason.

Nothing else changes: tests/test_op_definitions.py walks every op and checks every back end.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Literal, Mapping

KINDS = ("linear", "arith", "move", "shape", "nonlinear")
CAST_ROLES = ("act", "elementwise")

IR_OPS: dict[str, "IrOp"] = {}


@dataclass(frozen=True)
class TypeQuery:
    """What a type rule sees of one fx call: the node, its tensor arguments' fixed types in order
    (``types``, None where not fixed point) and ``info`` (fx node -> typeprop's ValueInfo, with
    ``.type`` and ``.shape``) for every earlier node."""

    node: Any
    types: list
    info: Mapping

    def shape(self, arg) -> tuple[int, ...]:
        return self.info[arg].shape

    def type(self, arg):
        return self.info[arg].type

    @property
    def args(self) -> tuple:
        return self.node.args

    @property
    def kwargs(self) -> dict:
        return self.node.kwargs


TypeRule = Callable[[TypeQuery], tuple[Any, int]]
Emitter = Callable[[Any, Any, str, str], None]
Restorer = Callable[[Any, Any], bool]
CppRule = Callable[[str, str, list, dict], list[str]]


@dataclass(frozen=True)
class HlsForm:
    """How the HLS exporter places an op (see the module docstring, step 5)."""

    place: Literal["alias", "remap", "split", "head", "step", "table", "shape"]
    layer: str | Callable | None = None  # head: the layer kind, or (builder, node, data nodes) -> kind
    cpp: CppRule | None = None  # step: C++ statements
    temps: Callable[[list], dict] | None = None  # step: operand types -> {name: FixedType} of its temporaries
    products: int = 0  # step: multiplications per output element
    table: Callable | None = None  # table: the function tabulated (None: the op's own)
    compact: Callable | None = None  # table: node -> the op's own LookupTable (or None), read when smaller
    options: dict = field(default_factory=dict, hash=False)  # head: what its layer kind reads (pool: is_max)

    @staticmethod
    def alias() -> "HlsForm":
        return HlsForm("alias")

    @staticmethod
    def remap() -> "HlsForm":
        return HlsForm("remap")

    @staticmethod
    def head(layer: str | Callable, **options) -> "HlsForm":
        return HlsForm("head", layer=layer, options=options)

    @staticmethod
    def step(cpp: CppRule, *, products: int = 0, temps: Callable[[list], dict] | None = None) -> "HlsForm":
        return HlsForm("step", cpp=cpp, temps=temps, products=products)

    @staticmethod
    def table_of(fn: Callable | None = None, *, compact: Callable | None = None) -> "HlsForm":
        return HlsForm("table", table=fn, compact=compact)


@dataclass(frozen=True)
class NoHls:
    """The op has no HLS form, by design; ``reason`` is shown with the node in the ExportError."""

    reason: str


@dataclass(frozen=True)
class IrOp:
    """One IR op and its rule for every back end (see the module docstring)."""

    name: str
    fn: Callable
    kind: str
    onnx_op: str | None
    type_rule: TypeRule | None = None
    cast_role: str | None = None
    emit: Emitter | None = None
    restore: Restorer | None = None
    hls: HlsForm | NoHls = field(default_factory=lambda: NoHls("no HLS form defined"))
    multi_output: bool = False  # returns a tuple read by operator.getitem nodes (split)
    weight_axis: Callable[[dict], int] | None = None  # kwargs -> output-channel axis of input 1 (a weight)


OpDef = IrOp


def _same_as_input(q: TypeQuery) -> tuple[Any, int]:
    return (q.types[0] if q.types else None), 1


def _no_type(q: TypeQuery) -> tuple[Any, int]:
    return None, 1


_DEFAULT_ROLE = {"linear": "act", "nonlinear": "act", "arith": "elementwise", "move": None, "shape": None}
_DEFAULT_TYPE = {"move": _same_as_input, "shape": _no_type, "nonlinear": _no_type}


def ir_op(kind: str, onnx_op: str | None = None, *, type_rule: TypeRule | None = None, cast_role: str | None = "",
          emit: Emitter | None = None, restore: Restorer | None = None,
          hls: HlsForm | NoHls | None = None, multi_output: bool = False,
          weight_axis: Callable[[dict], int] | None = None) -> Callable[[Callable], Callable]:
    """Register ``fn`` as an IR op of ``kind`` with its back-end rules; the function itself is the
    fx call target. ``cast_role=""`` takes the kind's default. Raises ValueError for an unknown
    kind or role, a name registered twice, or a linear/arith op without a type rule."""
    if kind not in KINDS:
        raise ValueError(f"unknown IR op kind {kind!r}")
    role = _DEFAULT_ROLE[kind] if cast_role == "" else cast_role
    if role is not None and role not in CAST_ROLES:
        raise ValueError(f"unknown cast role {role!r}")
    rule = type_rule or _DEFAULT_TYPE.get(kind)
    if rule is None:
        raise ValueError(f"a {kind} IR op needs a type_rule")
    if hls is None:
        hls = HlsForm("shape") if kind == "shape" else NoHls("no HLS form defined")

    def register(fn: Callable) -> Callable:
        op = IrOp(fn.__name__, fn, kind, onnx_op, rule, role, emit, restore, hls, multi_output, weight_axis)
        add(op)
        fn.ir_op = op
        return fn

    return register


def add(op: IrOp) -> None:
    """Put ``op`` in the registry (``ir_op`` does this; tests add and :func:`remove` toy ops)."""
    if op.name in IR_OPS:
        raise ValueError(f"IR op {op.name!r} registered twice")
    IR_OPS[op.name] = op


def remove(name: str) -> None:
    """Take op ``name`` out of the registry (for tests that register a toy op)."""
    op = IR_OPS.pop(name)
    if getattr(op.fn, "ir_op", None) is op:
        del op.fn.ir_op


def op_of(target: object) -> IrOp | None:
    """The IR op behind an fx ``call_function`` target, or None for anything else."""
    return getattr(target, "ir_op", None)


def shape_twin_of(op: IrOp, fn: Callable) -> IrOp:
    """The ``"shape"``-kind twin record of ``op`` for ``fn``: same emission, no type, no cast, no HLS."""
    return replace(op, name=fn.__name__, fn=fn, kind="shape", type_rule=_no_type, cast_role=None,
                   hls=HlsForm("shape"))
