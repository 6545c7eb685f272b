"""Imported quantizers: QONNX ``Quant``/``IntQuant``/``BipolarQuant`` and ONNX QDQ pairs.

:func:`plan_quantizers` runs before any conversion (from ``loader.prepare``): it reads every
quantizer's constant scale, zero point and bit width, and either finds the ``ap_fixed`` type it
stands for (:mod:`qfx_onnx.importer.quant_types`) or records why not; all reasons are reported in
one :class:`~qfx_onnx.errors.OnnxModelError`, one per tensor, each naming the node, the tensor and
the value. The converters then only apply the plan:

* a quantizer of a constant (a weight) is computed at import; the constant's ``get_attr`` node
  carries the type in ``meta["pinned_type"]`` (and ``meta["pinned_axis"]`` per channel);
* a quantizer of a runtime tensor becomes :func:`~qfx_onnx.ir.ops.fixed_cast` (so the float
  graph computes what QONNX's executor does) with the same metadata; ``BipolarQuant`` becomes
  ``s * (2 * fixed_cast(x, ap_fixed<1,1,AP_TRN,AP_SAT>) + 1)``: the 1-bit cast is -1 below zero and
  0 from zero on, so the result is ``x >= 0 ? s : -s`` as the executor defines it;
* ``QuantizeLinear`` passes its input through; the ``DequantizeLinear`` reading it casts.

The quantizer (:func:`qfx_onnx.quant.quantize.build_quantizers`) keeps a pinned type instead of
calibrating one, unless asked to recalibrate.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx

from qfx_onnx.errors import OnnxModelError
from qfx_onnx.fixed.reference import reference_cast
from qfx_onnx.importer.context import NodeContext, TensorInfo
from qfx_onnx.importer.quant_types import (
    Approximation, Pin, QuantTypeError, ScaleNotPowerOfTwo, approximate, bipolar_pin, power_of_two_exponents, quant_pin, rounding_of,
)
from qfx_onnx.importer.registry import DEFAULT_DOMAINS, QONNX_DOMAIN, canonical_domain, converter
from qfx_onnx.fixed.types import FixedType, OverflowMode, QuantMode
from qfx_onnx.ir import ops
from qfx_onnx.quant.annotated import QUANT_SUFFIX

log = logging.getLogger(__name__)

QONNX_QUANT_OPS = ("Quant", "IntQuant")
_SIGN_TYPE = FixedType.parse("ap_fixed<1,1,AP_TRN,AP_SAT>")  # -1 below zero, 0 from zero on
# ONNX integer element types of QuantizeLinear outputs: (width, signed)
_QDQ_INT_TYPES = {
    onnx.TensorProto.INT8: (8, True), onnx.TensorProto.UINT8: (8, False),
    onnx.TensorProto.INT16: (16, True), onnx.TensorProto.UINT16: (16, False),
    onnx.TensorProto.INT4: (4, True), onnx.TensorProto.UINT4: (4, False),
    onnx.TensorProto.INT32: (32, True),
}


@dataclass
class QuantPlan:
    """What :func:`plan_quantizers` found: the pin of each quantizer node (by node name) and of
    each constant an imported quantizer produced at folding (by tensor name)."""

    node_pins: dict[str, Pin] = field(default_factory=dict)
    tensor_pins: dict[str, Pin] = field(default_factory=dict)
    bipolar: set[str] = field(default_factory=set)  # node names whose pin is a BipolarQuant's
    approximations: dict[str, Approximation] = field(default_factory=dict)  # by node name
    trunc_inputs: dict[str, FixedType] = field(default_factory=dict)  # Trunc: the input grid's type


def _is_qonnx(node: onnx.NodeProto) -> bool:
    return canonical_domain(node.domain) == QONNX_DOMAIN


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            value = onnx.helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


def is_quantizer(node: onnx.NodeProto) -> bool:
    """Whether ``node`` is a quantizer this module plans: a QONNX one, or DequantizeLinear."""
    if _is_qonnx(node):
        return node.op_type in (*QONNX_QUANT_OPS, "BipolarQuant", "Trunc")
    return node.domain in DEFAULT_DOMAINS and node.op_type == "DequantizeLinear"


def plan_quantizers(nodes: list[onnx.NodeProto], names: list[str], constants: dict[str, np.ndarray],
                    infos: dict[str, TensorInfo], label: str, approximate_scales: int | None = None,
                    skip: set[str] = frozenset()) -> QuantPlan:
    """The type of every QONNX and QDQ quantizer in ``nodes`` (folded ones too: a folded
    DequantizeLinear leaves a pinned weight; nodes named in ``skip``, those without a converter,
    are left out). Raises one OnnxModelError listing every quantizer that has no ``ap_fixed`` type.

    ``approximate_scales`` (bits): a scale that is not a power of two is then approximated by
    ``approximate_scales``-bit multipliers (:func:`~qfx_onnx.importer.quant_types.approximate`);
    a folded weight's values become ``code * s~`` in ``constants``. A warning names the largest
    relative error introduced."""
    if approximate_scales is not None and not 2 <= approximate_scales <= 24:
        raise OnnxModelError(f"{label}: approximate_scales={approximate_scales}: the multipliers take 2 to 24 bits")
    plan, errors, scale_errors = QuantPlan(), [], 0
    for name, node in zip(names, nodes):
        if name in skip or not is_quantizer(node):
            continue
        where = f"node {name!r} ({node.op_type}) tensor {node.output[0]!r}"
        try:
            result = _plan_node(node, constants, infos, approximate_scales)
        except QuantTypeError as exc:
            errors.append(f"{where}: {exc}")
            scale_errors += isinstance(exc, ScaleNotPowerOfTwo)
            continue
        if isinstance(result, Pin) and len(set(result.types)) > 1 and node.input[0] not in constants:
            errors.append(f"{where}: per-channel scales on a runtime tensor (not a weight) are not supported")
            continue
        _record(plan, name, node, result, constants)
    if plan.approximations:
        worst_name, worst = max(plan.approximations.items(), key=lambda item: item[1].max_rel_error)
        log.warning("%s: %d scale(s) that are not powers of two approximated by %d-bit fixed-point multipliers; "
                    "largest relative error %.3g (node %r)", label, len(plan.approximations), worst.bits,
                    worst.max_rel_error, worst_name)
    if errors:
        shown = "; ".join(errors[:20]) + (f"; and {len(errors) - 20} more" if len(errors) > 20 else "")
        hint = " (approximate_scales= / --approximate-scales BITS approximates scales that are not powers of two)" \
            if scale_errors else ""
        raise OnnxModelError(f"{label}: {len(errors)} quantizer(s) have no ap_fixed type: {shown}{hint}")
    return plan


def _record(plan: QuantPlan, name: str, node: onnx.NodeProto, result, constants: dict[str, np.ndarray]) -> None:
    """File one node's plan: a Pin, a Trunc's ``(input grid, Pin)`` or an Approximation."""
    folded = node.output[0] in constants  # computed at import (a weight's DequantizeLinear)
    if isinstance(result, Approximation):
        plan.approximations[name] = result
        if folded:
            constants[node.output[0]] = _approximated_weight(node, result, constants)
            plan.tensor_pins[node.output[0]] = result.out_pin()
        return
    if isinstance(result, tuple):
        plan.trunc_inputs[name], result = result
    plan.node_pins[name] = result
    if node.op_type == "BipolarQuant" or (node.op_type in QONNX_QUANT_OPS and _is_one_bit_signed(node, constants)):
        plan.bipolar.add(name)
    if folded:
        plan.tensor_pins[node.output[0]] = result


def _is_one_bit_signed(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> bool:
    """A signed 1-bit IntQuant, which the executor runs as bipolar (``x >= 0 ? s : -s``)."""
    return bool(_attr(node, "signed", 1)) and np.asarray(constants[node.input[3]]).ravel()[0] == 1


def _const(node: onnx.NodeProto, i: int, what: str, constants: dict[str, np.ndarray]) -> np.ndarray | None:
    name = node.input[i] if i < len(node.input) else ""
    if not name:
        return None
    if name not in constants:
        raise QuantTypeError(f"{what} {name!r} must be a constant")
    return constants[name]


def _rank(name: str, constants: dict[str, np.ndarray], infos: dict[str, TensorInfo]) -> int | None:
    if name in constants:
        return constants[name].ndim
    info = infos.get(name)
    return len(info.shape) if info is not None and info.shape is not None else None


def _plan_node(node: onnx.NodeProto, constants: dict[str, np.ndarray], infos: dict[str, TensorInfo],
               approx_bits: int | None) -> Pin | Approximation:
    rank = _rank(node.input[0], constants, infos)
    if node.op_type == "Trunc":
        return _plan_trunc(node, constants, rank)
    if node.op_type == "BipolarQuant":
        return bipolar_pin(_const(node, 1, "scale", constants), rank)
    if node.op_type in QONNX_QUANT_OPS:
        scale, zero_point = _const(node, 1, "scale", constants), _const(node, 2, "zero point", constants)
        bits = np.asarray(_const(node, 3, "bit width", constants), dtype=np.float64)
        if bits.size != 1 or bits.ravel()[0] != int(bits.ravel()[0]):
            raise QuantTypeError(f"bit width {bits.ravel()[:3].tolist()} is not one integer")
        width = int(bits.ravel()[0])
        # defaults of the QONNX spec (docs/qonnx-custom-ops/quant_op.md); qonnx 1.0's executor
        # requires both attributes instead
        signed, narrow = _attr(node, "signed", 1), _attr(node, "narrow", 0)
        q = rounding_of(_attr(node, "rounding_mode", "ROUND"))
        if width == 1 and signed:  # the executor runs a signed 1-bit IntQuant as bipolar
            if np.any(np.asarray(zero_point) != 0):
                raise QuantTypeError("a signed 1-bit Quant with a zero point has no defined meaning")
            return bipolar_pin(scale, rank)
        if approx_bits and power_of_two_exponents(scale) is None:
            return approximate(scale, zero_point, width, bool(signed), bool(narrow), q, rank, approx_bits)
        return quant_pin(scale, zero_point, width, bool(signed), bool(narrow), q, rank)
    return _plan_dequantize(node, constants, infos, rank, approx_bits)


def _plan_trunc(node: onnx.NodeProto, constants: dict[str, np.ndarray], rank: int | None) -> tuple[FixedType, Pin]:
    """Trunc (version 2, ``qonnx.custom_op.general.trunc.trunc_v2``): ``x`` rounded half to even
    onto the input grid ``scale``, then onto ``output_scale`` with ``rounding_mode``, clamped to
    ``output_bit_width`` (signed, narrow). Two casts: a wide saturating one on the input grid
    (the executor does not clamp there; saturating beyond every value the output clamp keeps
    changes nothing), then the output type."""
    scale, zero_point = _const(node, 1, "scale", constants), _const(node, 2, "zero point", constants)
    in_bits, out_scale = _const(node, 3, "input bit width", constants), _const(node, 4, "output scale", constants)
    out_bits = _const(node, 5, "output bit width", constants)
    if np.any(np.asarray(zero_point) != 0):
        raise QuantTypeError(f"zero point {np.asarray(zero_point).ravel()[:3].tolist()} is not zero")
    for what, value in (("scale", scale), ("output scale", out_scale)):
        if np.asarray(value).size != 1 or power_of_two_exponents(value) is None:
            raise QuantTypeError(f"{what} {np.asarray(value, dtype=np.float64).ravel()[:3].tolist()} is not one power of two")
    e_in, e_out = int(power_of_two_exponents(scale).ravel()[0]), int(power_of_two_exponents(out_scale).ravel()[0])
    width_in, width_out = int(np.asarray(in_bits).ravel()[0]), int(np.asarray(out_bits).ravel()[0])
    q = rounding_of(_attr(node, "rounding_mode", "FLOOR"))
    pin = quant_pin(out_scale, np.zeros(1), width_out, bool(_attr(node, "signed", 1)), bool(_attr(node, "narrow", 0)), q, rank)
    wide = max(width_in, width_out + max(e_out - e_in, 0)) + 2
    if wide > 64:
        raise QuantTypeError(f"input bit width {width_in} is too wide")
    return FixedType(wide, wide + e_in, True, QuantMode.RND_CONV, OverflowMode.SAT), pin


def _plan_dequantize(node, constants, infos, rank, approx_bits) -> Pin | Approximation:
    """A DequantizeLinear: of an integer constant (a weight stored quantized) or of a QuantizeLinear."""
    if _attr(node, "block_size", 0):
        raise QuantTypeError("blocked quantization (block_size) is not supported")
    scale = _const(node, 1, "scale", constants)
    zero_point = _const(node, 2, "zero point", constants)
    dtype = _elem_type(node.input[0], constants, infos)
    if dtype not in _QDQ_INT_TYPES:
        raise QuantTypeError(f"input element type {onnx.TensorProto.DataType.Name(dtype) if dtype else 'unknown'} is not an integer type")
    width, signed = _QDQ_INT_TYPES[dtype]
    axis = _attr(node, "axis", 1)
    if np.asarray(scale).ndim == 1 and np.asarray(scale).size > 1 and rank is not None:
        scale = np.asarray(scale).reshape([-1 if d == axis % rank else 1 for d in range(rank)])
    zp = np.zeros(1) if zero_point is None else zero_point
    if approx_bits and power_of_two_exponents(scale) is None:
        return approximate(scale, zp, width, signed, False, QuantMode.RND_CONV, rank, approx_bits, round_then_shift=True)
    return quant_pin(scale, zp, width, signed, False, QuantMode.RND_CONV, rank, round_then_shift=True)


def _approximated_weight(node: onnx.NodeProto, approx: Approximation, constants: dict[str, np.ndarray]) -> np.ndarray:
    """A folded DequantizeLinear's weight as ``(q - z) * s~``, one ``s~`` per channel."""
    codes = constants[node.input[0]].astype(np.float64)
    if len(node.input) > 2 and node.input[2]:
        zp = np.asarray(constants[node.input[2]], dtype=np.float64)
        codes = codes - (zp.reshape(_channel_shape(approx.axis, codes.ndim)) if zp.size > 1 else zp.ravel()[0])
    return (codes * _multipliers(approx.scale, approx.axis, codes.ndim)).astype(np.float32)


def _channel_shape(axis: int | None, rank: int) -> list[int]:
    return [-1 if d == axis else 1 for d in range(rank)]


def _multipliers(pairs: tuple[tuple[int, int], ...], axis: int | None, rank: int) -> np.ndarray | float:
    values = np.array([np.ldexp(float(m), -f) for m, f in pairs])
    return values.reshape(_channel_shape(axis, rank)) if axis is not None else float(values[0])


def _elem_type(name: str, constants: dict[str, np.ndarray], infos: dict[str, TensorInfo]) -> int | None:
    if name in constants:
        dtype = constants[name].dtype
    else:
        info = infos.get(name)
        dtype = info.dtype if info is not None else None
    if dtype is None:
        return None
    try:
        return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    except Exception:  # int4 and friends come as custom numpy dtypes
        return {"int4": onnx.TensorProto.INT4, "uint4": onnx.TensorProto.UINT4}.get(np.dtype(dtype).name)


# --------------------------------------------------------------------------------------------------
# converters


def _pin(ctx: NodeContext) -> Pin:
    return ctx.builder.quant_plan.node_pins[ctx.name]


def _apply(ctx: NodeContext, x_index: int = 0) -> None:
    """Bind the node's output: the quantized constant, or ``fixed_cast`` of the runtime input."""
    approx = ctx.builder.quant_plan.approximations.get(ctx.name)
    if approx is not None:
        _apply_approximation(ctx, approx, x_index)
        return
    pin = _pin(ctx)
    grid = ctx.builder.quant_plan.trunc_inputs.get(ctx.name)
    if grid is not None:
        _trunc(ctx, grid, pin)
        return
    if ctx.name in ctx.builder.quant_plan.bipolar:
        _bipolar(ctx, pin)
        return
    if ctx.is_const(x_index):
        ctx.const_output(_cast_array(ctx.const(x_index), pin), pin)
        return
    pin = _runtime_pin(ctx, pin)
    x = ctx.input(x_index)
    if x.op == "placeholder" and len(ctx.builder.readers.get(ctx.input_name(x_index), [])) == 1:
        x.meta.update(pin.meta())  # a graph input only this quantizer reads enters in its type
        if ctx.output_name() == ctx.input_name(x_index) + QUANT_SUFFIX:
            ctx.alias_output(x)  # named as a qfx-onnx input cast (export-qonnx): that cast is this Quant
            return
    node = ctx.emit(ops.fixed_cast, x, types=pin.type_text(), axis=pin.axis)
    node.meta.update(pin.meta())


def _runtime_pin(ctx: NodeContext, pin: Pin) -> Pin:
    """The pin of a runtime tensor: one type (per-channel casts are for weights)."""
    if pin.axis is not None and len(set(pin.types)) > 1:
        raise ctx.error(f"tensor {ctx.output_name()!r}: per-channel scales on a runtime tensor (not a weight) are not supported")
    return Pin(pin.types[:1])


def _cast_array(values: np.ndarray, pin: Pin) -> np.ndarray:
    """``values`` cast to the pinned type(s), as float32 (the QONNX executor's dtype; exact for W <= 24)."""
    x = np.asarray(values, dtype=np.float64)
    if pin.axis is None:
        return reference_cast(x, pin.types[0]).astype(np.float32)
    out = np.empty_like(x)
    for c, t in enumerate(pin.types):
        index = tuple(c if d == pin.axis else slice(None) for d in range(x.ndim))
        out[index] = reference_cast(x[index], t)
    return out.astype(np.float32)


def _apply_approximation(ctx: NodeContext, approx: Approximation, x_index: int) -> None:
    """``code = T_code(x * (1/s)~)``, ``y = code * s~`` (see :class:`Approximation`); a constant
    is computed at import from the codes the executor would give it."""
    if ctx.is_const(x_index):
        x = np.asarray(ctx.const(x_index), dtype=np.float32)
        scale = np.asarray(ctx.const(1), dtype=np.float32)
        codes = reference_cast((x / scale).astype(np.float64), approx.code)  # x / s in float32, as the executor
        ctx.const_output((codes * _multipliers(approx.scale, approx.axis, x.ndim)).astype(np.float32), approx.out_pin())
        return
    if approx.axis is not None:
        raise ctx.error(f"tensor {ctx.output_name()!r}: per-channel scales on a runtime tensor (not a weight) are not supported")
    (inverse,), (scale,) = approx.inverse, approx.scale
    m = ctx.synth_pinned("inverse_scale", np.ldexp(float(inverse[0]), -inverse[1]), Pin((approx.multiplier_type(inverse, approx.bits),)))
    scaled = ctx.internal(ops.mul, ctx.input(x_index), m)
    code = ctx.named_internal(ops.fixed_cast, scaled, what="code", types=str(approx.code), axis=None)
    code.meta.update(Pin((approx.code,)).meta())
    s = ctx.synth_pinned("scale", np.ldexp(float(scale[0]), -scale[1]), Pin((approx.multiplier_type(scale, approx.bits),)))
    out = ctx.emit(ops.mul, code, s)
    out.meta.update(Pin(approx.out).meta())


def _trunc(ctx: NodeContext, grid: FixedType, pin: Pin) -> None:
    """Trunc: the input-grid cast, then the output cast (see :func:`_plan_trunc`)."""
    if ctx.is_const(0):
        ctx.const_output(_cast_array(reference_cast(np.asarray(ctx.const(0), dtype=np.float64), grid), pin), pin)
        return
    pin = _runtime_pin(ctx, pin)
    first = ctx.named_internal(ops.fixed_cast, ctx.input(0), what="input_grid", types=str(grid), axis=None)
    first.meta.update(Pin((grid,)).meta())
    out = ctx.emit(ops.fixed_cast, first, types=pin.type_text(), axis=None)
    out.meta.update(pin.meta())


def _bipolar(ctx: NodeContext, pin: Pin) -> None:
    """``x >= 0 ? s : -s`` (qonnx ``binary_quant``), on a constant or a runtime tensor."""
    scale = np.asarray([float(t.lsb) for t in pin.types], dtype=np.float64)
    if ctx.is_const(0):
        x = np.asarray(ctx.const(0), dtype=np.float64)
        s = scale[0] if pin.axis is None else scale.reshape([-1 if d == pin.axis else 1 for d in range(x.ndim)])
        ctx.const_output(np.where(x >= 0, s, -s).astype(np.float32), pin)
        return
    if pin.axis is not None and len(set(scale.tolist())) > 1:
        raise ctx.error(f"tensor {ctx.output_name()!r}: per-channel scales on a runtime tensor (not a weight) are not supported")
    s = float(scale[0])
    sign = ctx.named_internal(ops.fixed_cast, ctx.input(0), what="sign", types=str(_SIGN_TYPE), axis=None)
    sign.meta.update(Pin((_SIGN_TYPE,)).meta())
    two_s = ctx.synth_pinned("two_scale", 2 * s, Pin((FixedType(1, 2 + int(np.log2(s)), False),)))
    s_node = ctx.synth_pinned("scale", s, Pin((FixedType(1, 1 + int(np.log2(s)), False),)))
    doubled = ctx.internal(ops.mul, sign, two_s)
    out = ctx.emit(ops.add, doubled, s_node)
    out.meta.update(Pin(pin.types[:1]).meta())


def _read_quant_attrs(ctx: NodeContext) -> None:
    ctx.attr("signed", 1)
    ctx.attr("narrow", 0)
    ctx.attr("rounding_mode", "ROUND")
    for i in (1, 2, 3):
        ctx.const(i)


@converter("Quant", since=1, domain=QONNX_DOMAIN)
def _quant(ctx: NodeContext) -> None:
    _read_quant_attrs(ctx)
    _apply(ctx)


@converter("IntQuant", since=1, domain=QONNX_DOMAIN)
def _int_quant(ctx: NodeContext) -> None:
    _read_quant_attrs(ctx)
    _apply(ctx)


@converter("Trunc", since=2, domain=QONNX_DOMAIN)
def _trunc_v2(ctx: NodeContext) -> None:
    ctx.attr("rounding_mode", "FLOOR")
    ctx.attr("signed", 1)
    ctx.attr("narrow", 0)
    for i in range(1, 6):
        ctx.const(i)
    _apply(ctx)


@converter("BipolarQuant", since=1, domain=QONNX_DOMAIN)
def _bipolar_quant(ctx: NodeContext) -> None:
    ctx.const(1)
    _apply(ctx)


def _read_qdq_attrs(ctx: NodeContext, quantize: bool) -> None:
    ctx.attr("axis", 1)
    ctx.attr("block_size", 0, allowed=(0,))
    if quantize:
        ctx.attr("saturate", 1)
        ctx.attr("output_dtype", 0)
        ctx.attr("precision", 0)
    else:
        ctx.attr("output_dtype", 0)


@converter("QuantizeLinear", since=10)
def _quantize_linear(ctx: NodeContext) -> None:
    """The integer tensor is only an operand of DequantizeLinear, which casts: pass ``x`` on."""
    _read_qdq_attrs(ctx, quantize=True)
    ctx.const(1)
    ctx.const(2)
    readers = ctx.builder.readers.get(ctx.output_name(), [])
    if not readers or any(r.op_type != "DequantizeLinear" for r in readers):
        raise ctx.error(f"tensor {ctx.output_name()!r}: a QuantizeLinear output must be read only by DequantizeLinear "
                        "(integer tensors are not part of a fixed-point graph)")
    ctx.alias_output(ctx.input(0))


@converter("DequantizeLinear", since=10)
def _dequantize_linear(ctx: NodeContext) -> None:
    _read_qdq_attrs(ctx, quantize=False)
    ctx.const(1)
    ctx.const(2)
    source = ctx.builder.producer_nodes.get(ctx.input_name(0))
    if ctx.is_const(0):
        raise ctx.error(f"tensor {ctx.input_name(0)!r}: an integer constant should have been folded")
    if source is None or source.op_type != "QuantizeLinear":
        raise ctx.error(f"input {ctx.input_name(0)!r} must come from a QuantizeLinear")
    for i, what in ((1, "scale"), (2, "zero point")):
        theirs = ctx.builder.constants.get(source.input[i]) if i < len(source.input) and source.input[i] else None
        ours = ctx.const(i)
        if (theirs is None) != (ours is None) or (ours is not None and not np.array_equal(theirs, ours)):
            raise ctx.error(f"{what} differs from that of the QuantizeLinear producing {ctx.input_name(0)!r}")
    _apply(ctx)
