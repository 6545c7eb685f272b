"""An annotated ONNX model as a QONNX model: every ``ap_fixed`` cast becomes a QONNX ``Quant`` node.

QONNX (FINN, hls4ml, Brevitas, QKeras) writes a quantizer as ``Quant(x, scale, zero_point,
bitwidth)`` in the domain :data:`QONNX_DOMAIN`, with attributes ``signed``, ``narrow`` and
``rounding_mode`` (spec: qonnx ``docs/qonnx-custom-ops/quant_op.md``; executor:
``qonnx.custom_op.general.intquant.int_quant``; the newest spec calls the op ``IntQuant`` and
still reads ``Quant``, the name hls4ml 1.3 and FINN read, so ``Quant`` is written). It computes::

    y = clip(x / scale + zero_point, min_int(signed, narrow, W), max_int(signed, narrow, W))
    y = (rounding_mode(y) - zero_point) * scale

A cast to ``ap_fixed<W,I,Q,O>`` (F = W - I) is that Quant with ``scale = 2**-F`` (per tensor, or
per channel shaped to broadcast along the channel axis), ``zero_point = 0``, ``bitwidth = W`` and
``signed``, ``narrow`` and ``rounding_mode`` from the mode table, :mod:`qfx_onnx.qonnx_modes`
(checked value by value, ties included, against qonnx's own executor).

What QONNX cannot express (the table's "none" rows: signed ``AP_RND`` and ``AP_RND_MIN_INF``,
``AP_WRAP``, ``AP_SAT_ZERO``, signed ``AP_WRAP_SM``, signed 1-bit types) is exported anyway when it
provably gives the same values as an expressible type: a constant whose values cast identically, or
a tensor whose lossless input type (annotated ``qfx.role = lossless``) has no bits below the LSB (no
rounding) or fits the range (no overflow). Otherwise :class:`~qfx_onnx.errors.ExportError` names
every such tensor at once, with the nearest expressible type and the quantize command that avoids
it (:data:`REQUANTIZE`). :func:`export_qonnx_nearest` (``export-qonnx --nearest-modes --data``)
exports those casts with their nearest expressible type instead and returns
:class:`NearestModes`: how much that changes the model's outputs on the data given (the
emulation with the original types against the one with the exported types). The QONNX model
then computes the second; the change is reported, never silent.

Tensors keep their names; ``graph.quantization_annotation`` keeps the ``qfx.*`` keys and gives every
annotated tensor (cast outputs and lossless intermediates) a ``finn_datatype`` that holds all its
values (:func:`finn_datatype`). Everything else stays standard ONNX.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qfx_onnx.atomic import write_atomic
from qfx_onnx.errors import ExportError
from qfx_onnx.fixed.reference import reference_cast
from qfx_onnx.fixed.types import FixedType, union_type
from qfx_onnx.importer.reader import read_model, weight_free
from qfx_onnx.quant.annotated import KEY_FINN, KEY_TYPE, LOSSLESS, KEY_ROLE, META_VERSION, CastCall, parse_types
from qfx_onnx.quant.onnx_cast import DOMAIN, channel_scales
from qfx_onnx.qonnx_modes import NEAREST, TO_QONNX, expressible_modes, quant_attributes, saturates

QONNX_DOMAIN = "qonnx.custom_op.general"
QONNX_OPSET = 1
META_QONNX = "qfx.qonnx_export"  # metadata: the format version of this export

ROUNDING_MODES = TO_QONNX  # ap_q_mode -> rounding_mode, from the one table (qfx_onnx.qonnx_modes)
REQUANTIZE = "qfx-onnx quantize ... --rounding AP_RND_CONV --overflow AP_SAT"

Types = FixedType | list[FixedType]


@dataclass(frozen=True)
class NearestModes:
    """What :func:`export_qonnx_nearest` changed: per re-rounded tensor ``(from, to)`` type
    texts, and on ``x`` (``samples`` inputs) how many of the ``values`` output values differ,
    in how many samples, and the largest difference in units of the output's LSB (the output
    cast's type; 0 when nothing differs)."""

    changed: dict[str, tuple[str, str]]
    samples: int
    values: int
    differing: int
    differing_samples: int
    max_lsb: float

    def describe(self) -> str:
        if not self.differing:
            return f"outputs unchanged on all {self.samples} samples (not a proof for other inputs)"
        return (f"{self.differing} of {self.values} output values differ, in {self.differing_samples} of "
                f"{self.samples} samples, by at most {self.max_lsb:g} LSB")


@dataclass(frozen=True)
class QuantSpec:
    """One Quant node: the exported type(s) (modes QONNX expresses) and the attributes they give."""

    tensor: str
    types: Types
    axis: int | None
    nearest_of: Types | None = None  # the original type(s) when re-rounded by nearest_modes

    @property
    def first(self) -> FixedType:
        return self.types[0] if isinstance(self.types, list) else self.types

    @property
    def attributes(self) -> dict[str, int | str]:
        return quant_attributes(self.first)


def export_qonnx(source: str | os.PathLike | onnx.ModelProto, path: str | os.PathLike | None = None) -> onnx.ModelProto:
    """The QONNX model of an annotated ONNX model (a path or a ModelProto), written to ``path``
    atomically when given, and returned.

    Raises OnnxModelError for a model that is not a valid annotated model (as
    :func:`~qfx_onnx.quant.annotated.read_annotated` does), ExportError naming every tensor whose
    cast QONNX cannot express (see the module docstring) or when ``path`` is the input file.
    :func:`export_qonnx_nearest` exports such casts with their nearest types instead, measured.
    """
    return _export(source, path, None)[0]


def export_qonnx_nearest(source: str | os.PathLike | onnx.ModelProto, x: np.ndarray,
                         path: str | os.PathLike | None = None) -> tuple[onnx.ModelProto, NearestModes]:
    """As :func:`export_qonnx`, but a cast QONNX cannot express is exported with its nearest
    expressible type (the one the refusal names), and the returned :class:`NearestModes` measures
    on ``x`` (float32 inputs, samples along axis 0) how far the exported model's outputs are from
    the annotated model's: the emulation with each set of types, which qonnx's executor equals by
    the mode table."""
    return _export(source, path, x)


def _export(source, path, nearest_x) -> tuple[onnx.ModelProto, NearestModes | None]:
    model, label = read_model(source)
    from qfx_onnx.quant.annotated_read import checked_casts  # imports torch: only when exporting

    casts, notes, types, axes = checked_casts(model, label)
    specs = _quant_specs(model, casts, notes, types, axes, label, nearest=nearest_x is not None)
    report = _measure_nearest(model, specs, nearest_x) if nearest_x is not None else None
    proto = build_qonnx(model, casts, notes, specs)
    if path is not None:
        if not isinstance(source, onnx.ModelProto) and _same_file(path, source):
            raise ExportError(f"{Path(path).name}: refusing to overwrite the model's own input file")
        write_atomic(path, proto.SerializeToString(), what="QONNX model", error=ExportError)
    return proto, report


def _measure_nearest(model: onnx.ModelProto, specs: list[QuantSpec], x: np.ndarray) -> NearestModes:
    """Both emulations on ``x``: the annotated types, and the exported ones."""
    from qfx_onnx.quant.annotated_read import read_annotated
    from qfx_onnx.quant.quantize import quantizer_for

    changed = {s.tensor: s for s in specs if s.nearest_of is not None}
    fixed = read_annotated(model)
    want = np.asarray(fixed.predict(x))
    if changed:
        gm = fixed.graph_module
        for node in gm.graph.nodes:
            spec = changed.get(node.meta.get("onnx_name")) if node.op == "call_module" else None
            if spec is not None:
                old = gm.get_submodule(node.target)
                setattr(gm, node.target, quantizer_for(spec.types, old.per_channel_axis).to(old.frac.dtype))
        got = np.asarray(fixed.predict(x))
    else:
        got = want
    out_types = [t for name, t in fixed.fixed_types().items() if name in {o.name for o in model.graph.output}]
    lsb = min((u.lsb for t in out_types for u in (t if isinstance(t, list) else [t])), default=1.0)
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    return NearestModes({k: (_text(s.nearest_of), _text(s.types)) for k, s in changed.items()}, len(x), int(diff.size),
                        int(np.count_nonzero(diff)), int(np.count_nonzero(diff.reshape(len(x), -1).any(axis=1))),
                        float(diff.max() / lsb) if diff.size else 0.0)


def finn_datatype(t: FixedType) -> str:
    """A QONNX DataType that holds every value of ``t`` (qonnx ``core/datatype.py``).

    Exact where QONNX has the type: ``INT<W>``/``UINT<W>`` for F = 0, ``FIXED<W,I>`` for signed
    F > 0. Otherwise the smallest that holds it: ``FIXED<W+1,I+1>`` for an ``ap_ufixed`` with F > 0
    (QONNX has no unsigned fixed type), ``INT<I>``/``UINT<I>`` for F < 0 (values are multiples of 2**-F).
    """
    if t.frac <= 0:
        return f"{'INT' if t.signed else 'UINT'}{t.integer}"
    if t.signed:
        return f"FIXED<{t.width},{t.integer}>"
    return f"FIXED<{t.width + 1},{t.integer + 1}>"


def hls4ml_layer_config(qonnx_model: onnx.ModelProto) -> dict[str, dict]:
    """The hls4ml per-layer config (``config['LayerName']`` entries) that makes hls4ml's QONNX front
    end reproduce the model bit for bit, to be merged into ``config_from_onnx_model(...,
    granularity='name')``.

    hls4ml infers every layer's precision from the Quant nodes (lossless accumulators included)
    but converts the float input to the model default (``fixed<16,6>``, truncating and wrapping)
    before the input's Quant; the entry sets that input layer (``global_in``, the name qonnx's
    ``cleanup_model`` gives the graph input) to the input cast's own type, so the conversion is the
    cast. Found and checked by ``benchmarks/bench_hls4ml.py`` and ``tests/test_qonnx_export.py``.
    Returns {} for a model with several inputs (qonnx names them differently).
    """
    graph = qonnx_model.graph
    if len(graph.input) != 1:
        return {}
    notes = {a.tensor_name: {kv.key: kv.value for kv in a.quant_parameter_tensor_names} for a in graph.quantization_annotation}
    for node in graph.node:
        if node.op_type == "Quant" and node.input[0] == graph.input[0].name and KEY_TYPE in notes.get(node.output[0], {}):
            t = FixedType.parse(notes[node.output[0]][KEY_TYPE])
            modes = f",{t.q.value[3:]},{t.o.value[3:]},{t.n}"
            text = f"{'fixed' if t.signed else 'ufixed'}<{t.width},{t.integer}{modes}>"
            return {"global_in": {"Precision": {"result": text}}}
    return {}


# ------------------------------------------------------------------------------------ modes


def _quant_specs(model: onnx.ModelProto, casts: list[CastCall], notes: dict[str, dict[str, str]],
                 types: dict[str, Types], axes: dict[str, int | None], label: str, nearest: bool = False) -> list[QuantSpec]:
    """One QuantSpec per cast, in node order; ExportError listing every cast QONNX cannot express
    (with ``nearest``: those get their nearest expressible type)."""
    initializers = {t.name: t for t in model.graph.initializer}
    specs, refused = [], []
    for cast in casts:
        t, axis = types[cast.tensor], axes[cast.tensor]
        if cast.raw in initializers:
            domain = numpy_helper.to_array(initializers[cast.raw]).astype(np.float64)
        elif cast.raw in notes and notes[cast.raw].get(KEY_ROLE) == LOSSLESS:
            domain, _ = parse_types(notes[cast.raw], cast.raw, label)
        else:
            domain = None  # a graph input: any float32
        exported = _expressible(t, axis, domain)
        if isinstance(exported, str) and nearest:
            specs.append(QuantSpec(cast.tensor, _nearest(t), axis, nearest_of=t))
        elif isinstance(exported, str):
            refused.append(f"tensor {cast.tensor!r} {_text(t)}: {exported}")
        else:
            specs.append(QuantSpec(cast.tensor, exported, axis))
    if refused:
        more = f" (and {len(refused) - 8} more)" if len(refused) > 8 else ""
        raise ExportError(f"{label}: QONNX Quant cannot express {len(refused)} cast(s): " + "; ".join(refused[:8]) + more
                          + f"; to export to QONNX, quantize with modes QONNX has: {REQUANTIZE} "
                          "(or export-qonnx --nearest-modes --data FILE: the nearest types, their change measured on the data)")
    return specs


def _expressible(t: Types, axis: int | None, domain) -> Types | str:
    """``t`` with modes QONNX expresses that give the same values on ``domain`` (constant values,
    the lossless input type, or None for any float), or the reason it cannot, naming the nearest
    expressible type."""
    channels = t if isinstance(t, list) else [t]
    first = channels[0]
    if first.signed and first.width == 1:
        return (f"qonnx reads a signed 1-bit Quant as bipolar +-1; nearest expressible: "
                f"{first.with_width(2, first.integer + 1)} (the same LSB, one more bit)")
    q, o, rounding_changed = expressible_modes(first)
    candidate = [c.with_modes(q=q, o=o, n=0) for c in channels]
    if _same_values(channels, candidate, axis, domain, rounding_changed, not saturates(first)):
        return candidate if isinstance(t, list) else candidate[0]
    why = []
    if rounding_changed:
        why.append(f"no rounding_mode rounds like {first.q.value} (QONNX has {', '.join(TO_QONNX.values())})")
    if not saturates(first):
        why.append(f"a Quant saturates, {first.o.value}{f' with N={first.n}' if first.n else ''} does not")
    nearest = _nearest(first)
    where = "any float input" if domain is None else "its values" if isinstance(domain, np.ndarray) else "its input type"
    return f"{' and '.join(why)}, which matters on {where}; nearest expressible: {nearest}"


def _nearest(t: Types) -> Types:
    """The nearest expressible type(s) a refusal names (signed 1 bit: 2 bits, the same LSB)."""
    if isinstance(t, list):
        return [_nearest(u) for u in t]
    if t.signed and t.width == 1:
        return t.with_width(2, t.integer + 1)
    _, o, _ = expressible_modes(t)
    return t.with_modes(q=NEAREST.get(t.q, t.q), o=o, n=0)


def _same_values(types: list[FixedType], candidate: list[FixedType], axis: int | None, domain,
                 rounding_changed: bool, overflow_changed: bool) -> bool:
    """Whether the casts to ``candidate`` equal those to ``types`` on every value of ``domain``."""
    if isinstance(domain, np.ndarray):  # a constant: compare every value (also for free changes)
        if axis is None:
            return np.array_equal(reference_cast(domain, types[0]), reference_cast(domain, candidate[0]))
        return all(np.array_equal(reference_cast(v, t), reference_cast(v, c))
                   for v, t, c in zip(np.moveaxis(domain, axis, 0), types, candidate))
    if not rounding_changed and not overflow_changed:
        return True
    if domain is None:
        return False
    raw = union_type(*domain) if isinstance(domain, list) else domain
    if rounding_changed and any(raw.frac > t.frac for t in types):
        return False  # bits below the LSB: the tie rule matters
    if overflow_changed and any(raw.min_value < t.min_value or raw.max_value > t.max_value for t in types):
        return False
    return True


def _text(t: Types) -> str:
    return ";".join(map(str, t)) if isinstance(t, list) else str(t)


# ------------------------------------------------------------------------------------ graph


def build_qonnx(model: onnx.ModelProto, casts: list[CastCall], notes: dict[str, dict[str, str]],
                specs: list[QuantSpec]) -> onnx.ModelProto:
    """A copy of ``model`` with each cast call replaced by its Quant node (same position, input
    and output), no local cast functions, value_info for every tensor, and the annotations of the
    module docstring. ``model`` is not modified."""
    shapes = _value_info(model)
    dims = {name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            for name, v in shapes.items()}
    dims.update({t.name: list(t.dims) for t in model.graph.initializer})
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    by_node = {id(c.node): (c, s) for c, s in zip(casts, specs)}
    nodes, dropped_inputs = [], set()
    for node in model.graph.node:
        if id(node) not in by_node:
            nodes.append(_with_kernel_shape(node, dims))
            continue
        cast, spec = by_node[id(node)]
        dropped_inputs.update(node.input[1:])
        quant, params = _quant_node(cast, spec, _rank(shapes, cast.raw, model))
        nodes.append(quant)
        graph.initializer.extend(params)
    del graph.node[:]
    graph.node.extend(nodes)
    still_read = {name for n in graph.node for name in n.input}
    kept = [t for t in graph.initializer if t.name not in dropped_inputs or t.name in still_read]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del out.functions[:]
    opsets = [o for o in out.opset_import if o.domain != DOMAIN]
    del out.opset_import[:]
    out.opset_import.extend([*opsets, helper.make_opsetid(QONNX_DOMAIN, QONNX_OPSET)])
    io = {v.name for v in [*graph.input, *graph.output]}
    del graph.value_info[:]
    graph.value_info.extend(v for name, v in shapes.items() if name not in io)
    _annotate(graph, notes)
    meta = {p.key: p.value for p in out.metadata_props if p.key != META_VERSION}
    meta[META_QONNX] = "1"
    del out.metadata_props[:]
    helper.set_model_props(out, meta)
    return out


def _quant_node(cast: CastCall, spec: QuantSpec, rank: int) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """The Quant node of one cast and its per-node initializers (hls4ml folds each into its node)."""
    t = spec.first
    if spec.axis is None:
        scale = np.array(np.ldexp(1.0, -t.frac), dtype=np.float32)
    else:
        scale = channel_scales(spec.types, spec.axis, rank)[1]
    stem = cast.out
    params = [numpy_helper.from_array(scale, f"{stem}::quant_scale"),
              numpy_helper.from_array(np.array(0.0, dtype=np.float32), f"{stem}::quant_zero_point"),
              numpy_helper.from_array(np.array(float(t.width), dtype=np.float32), f"{stem}::quant_bitwidth")]
    node = helper.make_node("Quant", [cast.raw, *(p.name for p in params)], [cast.out],
                            name=cast.node.name or f"{stem}::Quant", domain=QONNX_DOMAIN, **spec.attributes)
    return node, params


def _with_kernel_shape(node: onnx.NodeProto, shapes: dict[str, list[int | None]]) -> onnx.NodeProto:
    """A Conv with ``kernel_shape`` written out: ONNX infers it from the weight when absent, but
    qonnx's channels-last transformation (the front end hls4ml uses) requires the attribute."""
    if node.op_type != "Conv" or any(a.name == "kernel_shape" for a in node.attribute):
        return node
    kernel = shapes.get(node.input[1], [None])[2:]
    if not kernel or None in kernel:
        return node
    out = onnx.NodeProto()
    out.CopyFrom(node)
    out.attribute.append(helper.make_attribute("kernel_shape", kernel))
    return out


def _value_info(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """Every tensor's type and shape from ONNX shape inference through the local cast functions
    (qonnx's executor needs all of them; dynamic dims stay symbolic)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(weight_free(model), strict_mode=True, data_prop=True)
    except Exception as exc:
        raise ExportError(f"{model.graph.name}: shape inference failed ({' '.join(str(exc).split())[:200]})") from None
    return {v.name: v for v in [*inferred.graph.value_info, *inferred.graph.output]}


def _rank(shapes: dict[str, onnx.ValueInfoProto], name: str, model: onnx.ModelProto) -> int:
    if name in shapes:
        return len(shapes[name].type.tensor_type.shape.dim)
    for t in model.graph.initializer:
        if t.name == name:
            return len(t.dims)
    for v in model.graph.input:
        if v.name == name:
            return len(v.type.tensor_type.shape.dim)
    raise ExportError(f"{model.graph.name}: no shape for tensor {name!r}")


def _annotate(graph: onnx.GraphProto, notes: dict[str, dict[str, str]]) -> None:
    """Every annotated tensor gets the ``finn_datatype`` holding its (union of channel) type(s)."""
    del graph.quantization_annotation[:]
    for tensor, entries in notes.items():
        entries = dict(entries)
        types = [FixedType.parse(p) for p in entries[KEY_TYPE].split(";")]
        entries[KEY_FINN] = finn_datatype(union_type(*types) if len(types) > 1 else types[0])
        annotation = onnx.TensorAnnotation(tensor_name=tensor)
        for key, value in entries.items():
            annotation.quant_parameter_tensor_names.add(key=key, value=value)
        graph.quantization_annotation.append(annotation)


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    a, b = Path(a), Path(b)
    return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))


__all__ = ["QONNX_DOMAIN", "REQUANTIZE", "ROUNDING_MODES", "NearestModes", "QuantSpec", "build_qonnx", "export_qonnx",
           "export_qonnx_nearest", "finn_datatype",
           "hls4ml_layer_config"]
