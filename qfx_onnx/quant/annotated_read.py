"""``read_annotated``: an annotated ONNX model back to a FixedPointModel.

The steps: find the cast calls, take each tensor's type from its annotation (checked against the
function the call names, the function's body and, per channel, its scale inputs), strip the casts
(``T::raw`` becomes ``T`` again) and the local functions, import the float graph with
:func:`~qfx_onnx.importer.load_onnx`, restore the IR ops whose emission was not one-to-one, and
insert casts of exactly the annotated types with :func:`~qfx_onnx.quant.quantize.quantize_with_types`.
"""

from __future__ import annotations

import operator
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
import torch
from torch import fx

from qfx_onnx.errors import ExportError, OnnxModelError
from qfx_onnx.fixed.types import FixedType
from qfx_onnx.importer import load_onnx
from qfx_onnx.importer.reader import read_model
from qfx_onnx.ir.ops import IR_OPS
from qfx_onnx.nonlinear.onnx_wiring import collapse_exact, restore_types
from qfx_onnx.quant.annotated import (
    CAST_ROLES, KEY_ROLE, KEY_TYPE, LOSSLESS, META_SOURCE, NODE_IR_OP, NOT_ANNOTATED, CastCall, annotations, find_casts,
    parse_imported, parse_khot, parse_types,
)
from qfx_onnx.quant.annotated_write import READ_FROM
from qfx_onnx.quant.onnx_cast import DOMAIN, cast_function, cast_function_per_channel, channel_scales, check_channel_types
from qfx_onnx.quant.quantize import FixedPointModel, quantize_with_types

Types = dict[str, FixedType | list[FixedType]]


def read_annotated(source: str | os.PathLike | onnx.ModelProto) -> FixedPointModel:
    """The FixedPointModel an annotated ONNX model describes.

    Its ``fixed_types()`` are exactly the annotated types and its emulation computes what the
    model computes in onnxruntime. Raises OnnxModelError for a float model without casts ("not an
    annotated qfx model"), a cast without annotation, or an annotation that disagrees with the
    cast function, its body or its per-channel scales.
    """
    model, label = read_model(source)
    casts = find_casts(model.graph, label)
    if not casts:
        raise OnnxModelError(f"{label}: {NOT_ANNOTATED}")
    notes = annotations(model.graph, label)
    types, axes, roles = _cast_types(model, casts, notes, label)
    collapsed, typed = collapse_exact(model)
    float_model = strip_casts(collapsed, casts)
    restore_types(float_model, typed, {c.raw: c.tensor for c in casts})
    gm = load_onnx(float_model)  # restores the tagged IR ops (restore_qfx_marks)
    try:
        fixed = quantize_with_types(gm, types)
    except ValueError as exc:  # a per-channel type on a tensor without a channel axis
        raise OnnxModelError(f"{label}: {exc}") from None
    _restore_roles(fixed, roles, axes, label)
    outs = {c.tensor: c.out for c in casts}
    for site in fixed.sites:
        site.imported = parse_imported(notes[outs[site.tensor]], site.tensor, label)
    _restore_khot(fixed, {c.tensor: notes[c.out] for c in casts}, label)
    meta = {p.key: p.value for p in model.metadata_props}
    path = None if isinstance(source, onnx.ModelProto) else str(Path(source).resolve())
    READ_FROM[fixed] = (path, meta.get(META_SOURCE))
    return fixed


def checked_casts(model: onnx.ModelProto, label: str) -> tuple[list[CastCall], dict[str, dict[str, str]], Types,
                                                                dict[str, int | None]]:
    """The cast calls of an annotated model, its annotations and, per cast tensor, its type(s) and
    channel axis, checked as :func:`read_annotated` checks them (for exporters that rewrite the
    ONNX graph without rebuilding the emulation). Raises OnnxModelError as read_annotated does."""
    casts = find_casts(model.graph, label)
    if not casts:
        raise OnnxModelError(f"{label}: {NOT_ANNOTATED}")
    notes = annotations(model.graph, label)
    types, axes, _ = _cast_types(model, casts, notes, label)
    return casts, notes, types, axes


def _cast_types(model: onnx.ModelProto, casts: list[CastCall], notes: dict[str, dict[str, str]],
                label: str) -> tuple[Types, dict[str, int | None], dict[str, str]]:
    """Per cast tensor: the annotated type(s), the channel axis and the role, all checked."""
    functions = {(f.domain, f.name): f for f in model.functions}
    initializers = {t.name: t for t in model.graph.initializer}
    types: Types = {}
    axes: dict[str, int | None] = {}
    roles: dict[str, str] = {}
    for cast in casts:
        entries = notes.get(cast.out)
        if entries is None:
            raise OnnxModelError(f"{label}: the cast of tensor {cast.tensor!r} has no annotation")
        t, axis = parse_types(entries, cast.out, label)
        _check_function(cast, t, entries[KEY_TYPE], functions, label)
        if axis is not None:
            _check_scales(cast, t, axis, initializers, label)
        role = entries.get(KEY_ROLE, "act")
        if role not in CAST_ROLES:
            raise OnnxModelError(f"{label}: tensor {cast.tensor!r} has role {role!r}; "
                                 f"a cast tensor's role is one of {', '.join(CAST_ROLES)}")
        types[cast.tensor], axes[cast.tensor], roles[cast.tensor] = t, axis, role
    cast_outputs = {c.out for c in casts}
    for tensor, entries in notes.items():
        if tensor not in cast_outputs and entries.get(KEY_ROLE) != LOSSLESS:
            raise OnnxModelError(f"{label}: tensor {tensor!r} is annotated as {entries.get(KEY_ROLE)!r} but no cast produces it")
    return types, axes, roles


def _check_function(cast: CastCall, t: FixedType | list[FixedType], text: str, functions: dict, label: str) -> None:
    """The call must name the cast function of the annotated type, and that function must be
    exactly the one this version writes for it (the body is what onnxruntime runs)."""
    per_channel = isinstance(t, list)
    try:
        if per_channel:
            check_channel_types(t, f"tensor {cast.tensor!r}")
        want = cast_function_per_channel(t[0]) if per_channel else cast_function(t)
    except ExportError as exc:
        raise OnnxModelError(f"{label}: {exc}") from None
    if cast.node.op_type != want.name:
        raise OnnxModelError(f"{label}: tensor {cast.tensor!r} is annotated {text} but its cast calls "
                             f"{cast.node.op_type} (expected {want.name})")
    if per_channel != (len(cast.node.input) == 3):
        raise OnnxModelError(f"{label}: tensor {cast.tensor!r}: per-channel types need the 3-input cast, a single type the 1-input one")
    function = functions.get((DOMAIN, want.name))
    if function is None or function.SerializeToString() != want.SerializeToString():
        raise OnnxModelError(f"{label}: local function {want.name} is missing or not the cast it names")


def _check_scales(cast: CastCall, types: list[FixedType], axis: int, initializers: dict, label: str) -> None:
    """The per-channel scale inputs must be the initializers ``2**F_c`` and ``2**-F_c`` of the annotation."""
    got = []
    for name in cast.node.input[1:]:
        if name not in initializers:
            raise OnnxModelError(f"{label}: per-channel scale {name!r} of tensor {cast.tensor!r} is not an initializer")
        got.append(numpy_helper.to_array(initializers[name]))
    rank = got[0].ndim
    if not 0 <= axis < rank:
        raise OnnxModelError(f"{label}: tensor {cast.tensor!r}: axis {axis} is out of range for its scales")
    for have, want in zip(got, channel_scales(types, axis, rank)):
        if have.shape != want.shape or have.dtype != want.dtype or not np.array_equal(have, want):
            raise OnnxModelError(f"{label}: the per-channel scales of tensor {cast.tensor!r} disagree with its annotation")


def strip_casts(model: onnx.ModelProto, casts: list[CastCall]) -> onnx.ModelProto:
    """A copy of ``model`` without casts, cast functions, annotations or the cast domain: the float
    graph, with every ``T::raw`` named ``T`` again (and a graph input's ``T::quant`` read as ``T``)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    rename = {}
    for cast in casts:
        if cast.raw == cast.tensor:  # a graph input: readers of T::quant read T
            rename[cast.out] = cast.tensor
        else:
            rename[cast.raw] = cast.tensor
    kept = [n for n in graph.node if n.domain != DOMAIN]  # find_casts checked that these are all casts
    scale_inputs = {name for c in casts for name in c.node.input[1:]}
    del graph.node[:]
    graph.node.extend(kept)
    for node in graph.node:
        node.input[:] = [rename.get(n, n) for n in node.input]
        node.output[:] = [rename.get(n, n) for n in node.output]
    used = {n for node in graph.node for n in node.input}
    initializers = [t for t in graph.initializer if not (t.name in scale_inputs and t.name not in used)]
    for tensor in initializers:
        tensor.name = rename.get(tensor.name, tensor.name)
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    for value in graph.output:
        value.name = rename.get(value.name, value.name)
    del graph.value_info[:]  # may type both T::raw and T; the importer infers shapes anyway
    del graph.quantization_annotation[:]
    del out.functions[:]
    kept_opsets = [o for o in out.opset_import if o.domain != DOMAIN]
    del out.opset_import[:]
    out.opset_import.extend(kept_opsets)
    return out


def restore_qfx_marks(gm: fx.GraphModule, model: onnx.ModelProto, label: str) -> None:
    """What a qfx-onnx writer marked in ``model`` (annotated, or QONNX from export-qonnx), on the
    graph ``gm`` imported from it: IR ops emitted as several nodes (tagged ``qfx.ir_op``) are
    restored, and tensors annotated ``qfx.role = lossless`` get ``meta["lossless"]``, so that
    quantize leaves them lossless (no cast) as the writer's model did. A QONNX model qfx-onnx
    exported thus quantizes back to the model it came from."""
    tags = {n.name: {p.key: p.value for p in n.metadata_props} for n in model.graph.node}
    if any(NODE_IR_OP in t for t in tags.values()):
        restore_ir_ops(gm, tags, label)
    lossless = {a.tensor_name for a in model.graph.quantization_annotation
                if any(kv.key == KEY_ROLE and kv.value == LOSSLESS for kv in a.quant_parameter_tensor_names)}
    for node in gm.graph.nodes:
        if lossless and node.op == "call_function" and node.meta.get("onnx_name") in lossless:
            node.meta["lossless"] = True


def restore_ir_ops(gm: fx.GraphModule, node_meta: dict[str, dict[str, str]], label: str) -> None:
    """Turn emissions tagged ``qfx.ir_op`` back into the IR op they stand for (the tagged op's
    ``restore``), so that a model read back has the graph (and the lossless types) of the model written."""
    changed = False
    for node in list(gm.graph.nodes):
        tag = node_meta.get(node.meta.get("onnx_node"), {}).get(NODE_IR_OP) if node.op == "call_function" else None
        if tag is None:
            continue
        op = IR_OPS.get(tag)
        restore = op.restore if op is not None else None
        if restore is None:
            raise OnnxModelError(f"{label}: node {node.meta['onnx_node']!r} is tagged {NODE_IR_OP}={tag!r}, which this version cannot restore")
        if not restore(gm, node):
            raise OnnxModelError(f"{label}: node {node.meta['onnx_node']!r} is tagged {NODE_IR_OP}={tag!r} but is not its emission")
        changed = True
    if changed:
        _erase_unused(gm)
        gm.graph.lint()
        gm.recompile()


def _erase_unused(gm: fx.GraphModule) -> None:
    """Drop the nodes a restore left without users (the expansion's steps and constants)."""
    for node in reversed(list(gm.graph.nodes)):
        if node.op in ("call_function", "get_attr") and not node.users:
            gm.graph.erase_node(node)
            if node.op == "get_attr":
                delattr(gm, node.target)


def _restore_roles(fixed: FixedPointModel, roles: dict[str, str], axes: dict[str, int | None], label: str) -> None:
    """Give each cast the annotated role (the float graph alone may tell a different one) and
    check that per-channel casts run along the annotated axis."""
    for site in fixed.sites:
        site.role = roles[site.tensor]
    quantizers = fixed.quantizers()
    for node in fixed.graph_module.graph.nodes:
        name = node.meta.get("onnx_name")
        if node.op == "call_module" and name in roles:
            node.meta["role"] = roles[name]
            quant, axis = quantizers[name], axes[name]
            if axis is None:
                continue
            producer = node.args[0]
            rank = operator.attrgetter(producer.target)(fixed.graph_module).dim() if producer.op == "get_attr" else None
            have = None if quant.per_channel_axis is None or rank is None else quant.per_channel_axis % rank
            if have != axis:
                raise OnnxModelError(f"{label}: tensor {name!r} is annotated per channel along axis {axis}, "
                                     f"but the graph makes {have} its channel axis")


def _restore_khot(fixed: FixedPointModel, entries: dict[str, dict[str, str]], label: str) -> None:
    """Casts annotated K-hot become KHotQuantizers of the same (per-channel) types."""
    from qfx_onnx.fixed.khot import KHotQuantizer

    for node in fixed.graph_module.graph.nodes:
        name = node.meta.get("onnx_name")
        khot = parse_khot(entries.get(name, {}), name, label) if node.op == "call_module" else None
        if khot is None:
            continue
        old = fixed.graph_module.get_submodule(node.target)
        fracs = torch.tensor([float(t.frac) for t in old.frozen_types()], dtype=torch.float64)
        try:
            new = KHotQuantizer(old.width, old.signed, khot[0], signed_digits=khot[1],
                                frac=fracs if old.per_channel_axis is not None else fracs[0],
                                per_channel_axis=old.per_channel_axis,
                                num_channels=old.num_channels if old.per_channel_axis is not None else None)
        except ValueError as exc:
            raise OnnxModelError(f"{label}: tensor {name!r}: {exc}") from None
        if new.frozen_types() != old.frozen_types():
            raise OnnxModelError(f"{label}: tensor {name!r} is annotated K-hot but its type is not "
                                 f"{new.frozen_types()[0]} (K-hot types round to nearest and saturate)")
        setattr(fixed.graph_module, node.target, new.to(old.frac.dtype))


__all__ = ["read_annotated", "restore_ir_ops", "restore_qfx_marks", "strip_casts"]
