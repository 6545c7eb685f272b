"""The annotated-ONNX format: a fixed-point model as an ONNX file that onnxruntime runs bit-exactly.

This module holds what the writer (:mod:`qfx_onnx.quant.annotated_write`), the reader
(:mod:`qfx_onnx.quant.annotated_read`) and the checker (:mod:`qfx_onnx.quant.verify`) share: the
annotation keys, the tensor-naming rules and :func:`find_casts`. The public functions
``write_annotated``, ``read_annotated`` and ``verify_annotated`` are importable from here too.

Layout of an annotated model (format version 1)
    * Main-domain opset 18, domain :data:`~qfx_onnx.quant.onnx_cast.DOMAIN` version 1, IR version 10.
    * Every quantized tensor ``T`` is the output of one call to a local cast function. Its input is
      the raw (lossless) tensor ``T::raw``; for a graph input ``T`` the call reads ``T`` itself and
      writes ``T::quant``. Per-channel casts take ``T::scale`` and ``T::inv_scale`` as well.
    * ``graph.quantization_annotation`` holds, per cast output, :data:`KEY_TYPE` (the HLS spelling,
      per-channel types joined by ``;``), :data:`KEY_AXIS` (per-channel only), :data:`KEY_ROLE` and,
      where QONNX has one, :data:`KEY_FINN`; lossless intermediates carry :data:`KEY_TYPE` and the
      role :data:`LOSSLESS`. A cast whose type an imported quantizer (QONNX ``Quant``, a QDQ pair)
      fixed, kept exactly as given, carries :data:`KEY_IMPORTED` ``= "1"``: finetune keeps its
      binary point unless asked to recalibrate imported types.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import onnx

from qfx_onnx.errors import OnnxModelError
from qfx_onnx.fixed.types import FixedType
from qfx_onnx.quant.onnx_cast import DOMAIN

FORMAT_VERSION = "1"
META_VERSION = "qfx.format_version"
META_SOURCE = "qfx.source"

KEY_TYPE = "qfx.ap_type"
KEY_AXIS = "qfx.axis"
KEY_ROLE = "qfx.role"
KEY_FINN = "finn_datatype"
KEY_KHOT = "qfx.khot"  # K-hot weights: at most K ones (or signed digits with KEY_CSD = "1") per code
KEY_CSD = "qfx.csd"
KEY_IMPORTED = "qfx.imported"  # "1": the type is an imported quantizer's, kept as given
LOSSLESS = "lossless"
CAST_ROLES = ("input", "weight", "bias", "constant", "act", "elementwise")

NODE_IR_OP = "qfx.ir_op"  # node metadata: the IR op an emission that is not one-to-one stands for

RAW_SUFFIX = "::raw"  # FixedPointModel.RAW_SUFFIX
QUANT_SUFFIX = "::quant"  # the cast output of a graph input (which keeps its own name)
SCALE_SUFFIX = "::scale"
INV_SCALE_SUFFIX = "::inv_scale"

NOT_ANNOTATED = "not an annotated qfx model (run qfx-onnx quantize first)"


@dataclass(frozen=True)
class CastCall:
    """One cast function call: ``tensor`` is the quantized tensor's name in the FixedPointModel,
    ``raw`` the call's input and ``out`` its output in the ONNX graph (``tensor`` itself unless
    the tensor is a graph input)."""

    node: onnx.NodeProto
    tensor: str
    raw: str
    out: str


def find_casts(graph: onnx.GraphProto, label: str) -> list[CastCall]:
    """Every cast call of ``graph`` in node order; raises OnnxModelError for a call that does not
    follow the naming rules (see the module docstring)."""
    inputs = {i.name for i in graph.input}
    casts = []
    for node in graph.node:
        if node.domain != DOMAIN:
            continue
        if len(node.output) != 1 or len(node.input) not in (1, 3):
            raise OnnxModelError(f"{label}: cast node {node.name!r} must have 1 or 3 inputs and one output")
        raw, out = node.input[0], node.output[0]
        if raw == out + RAW_SUFFIX:
            casts.append(CastCall(node, out, raw, out))
        elif raw in inputs and out == raw + QUANT_SUFFIX:
            casts.append(CastCall(node, raw, raw, out))
        else:
            raise OnnxModelError(f"{label}: cast node {node.name!r} reads {raw!r} and writes {out!r}; "
                                 f"expected <name>{RAW_SUFFIX} -> <name> (or a graph input <name> -> <name>{QUANT_SUFFIX})")
    return casts


def annotations(graph: onnx.GraphProto, label: str) -> dict[str, dict[str, str]]:
    """``graph.quantization_annotation`` as ``{tensor: {key: value}}``; a tensor annotated twice is an error."""
    out: dict[str, dict[str, str]] = {}
    for entry in graph.quantization_annotation:
        if entry.tensor_name in out:
            raise OnnxModelError(f"{label}: tensor {entry.tensor_name!r} is annotated twice")
        out[entry.tensor_name] = {kv.key: kv.value for kv in entry.quant_parameter_tensor_names}
    return out


def type_entries(types: FixedType | list[FixedType], role: str, axis: int | None = None) -> dict[str, str]:
    """The annotation of one tensor, keys in schema order."""
    entries = {KEY_TYPE: ";".join(str(t) for t in types) if isinstance(types, list) else str(types)}
    if isinstance(types, list):
        entries[KEY_AXIS] = str(axis)
    entries[KEY_ROLE] = role
    finn = {t.finn_datatype for t in types} if isinstance(types, list) else {types.finn_datatype}
    if len(finn) == 1 and None not in finn:
        entries[KEY_FINN] = finn.pop()
    return entries


def imported_entries(site) -> dict[str, str]:
    """The :data:`KEY_IMPORTED` key of a cast whose CastSite is marked imported (none otherwise)."""
    return {KEY_IMPORTED: "1"} if getattr(site, "imported", False) else {}


def parse_imported(entries: dict[str, str], tensor: str, label: str) -> bool:
    """Whether an annotation marks the tensor's type as imported."""
    value = entries.get(KEY_IMPORTED, "0")
    if value not in ("0", "1"):
        raise OnnxModelError(f"{label}: tensor {tensor!r}: {KEY_IMPORTED}={value!r} is not 0 or 1")
    return value == "1"


def khot_entries(quantizer) -> dict[str, str]:
    """The K-hot keys of a KHotQuantizer's annotation (none for other quantizers)."""
    k = getattr(quantizer, "k", None)
    if k is None or not hasattr(quantizer, "signed_digits"):
        return {}
    return {KEY_KHOT: str(int(k)), KEY_CSD: "1" if quantizer.signed_digits else "0"}


def parse_khot(entries: dict[str, str], tensor: str, label: str) -> tuple[int, bool] | None:
    """(K, signed digits) of a K-hot annotation, or None."""
    if KEY_KHOT not in entries:
        return None
    try:
        k = int(entries[KEY_KHOT])
    except ValueError:
        k = -1
    if k < 0 or entries.get(KEY_CSD, "0") not in ("0", "1"):
        raise OnnxModelError(f"{label}: tensor {tensor!r}: bad K-hot annotation {entries.get(KEY_KHOT)!r}/{entries.get(KEY_CSD)!r}")
    return k, entries.get(KEY_CSD, "0") == "1"


def parse_types(entries: dict[str, str], tensor: str, label: str) -> tuple[FixedType | list[FixedType], int | None]:
    """The type (or per-channel types and their axis) an annotation gives ``tensor``."""
    text = entries.get(KEY_TYPE)
    if text is None:
        raise OnnxModelError(f"{label}: tensor {tensor!r} has no {KEY_TYPE} annotation")
    try:
        parts = [FixedType.parse(p) for p in text.split(";")]
    except ValueError as exc:
        raise OnnxModelError(f"{label}: tensor {tensor!r}: {exc}") from None
    if KEY_AXIS not in entries:
        if len(parts) != 1:
            raise OnnxModelError(f"{label}: tensor {tensor!r} has {len(parts)} types but no {KEY_AXIS}")
        return parts[0], None
    try:
        axis = int(entries[KEY_AXIS])
    except ValueError:
        raise OnnxModelError(f"{label}: tensor {tensor!r}: {KEY_AXIS}={entries[KEY_AXIS]!r} is not an integer") from None
    return parts, axis


_PUBLIC = {"write_annotated": "annotated_write", "read_annotated": "annotated_read",
           "verify_annotated": "verify", "VerifyResult": "verify", "LayerCheck": "verify"}


def __getattr__(name: str):
    """The public functions of the sibling modules, imported on first use (they import this one)."""
    if name in _PUBLIC:
        return getattr(importlib.import_module(f"qfx_onnx.quant.{_PUBLIC[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
