"""What an annotated qfx model holds, tensor by tensor: the view ``qfx-onnx inspect`` prints.

:func:`describe_model` reads nothing from disk and writes nothing: it takes a FixedPointModel (as
:func:`~qfx_onnx.quant.annotated_read.read_annotated` returns it) and, optionally, samples, and
gathers in graph order for every quantized tensor its role, type, range (observed on the samples,
else the type's own), K-hot constraint, the lossless type of the value that reaches its cast
(accumulator or other intermediate, from :func:`~qfx_onnx.quant.typeprop.propagate`) and whether
float32 onnxruntime is guaranteed to compute it exactly (the prediction
:func:`~qfx_onnx.quant.annotated.verify_annotated` makes). It adds the lossless layers
(:func:`~qfx_onnx.quant.report.layer_exactness`), the HLS resource estimate of the project
``export-hls`` would write (:func:`~qfx_onnx.hls.export.build_hls_model` and
:func:`~qfx_onnx.hls.estimate.estimate`, nothing written) and, with targets, the fixed-point
score of the samples.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import onnx
import torch

from qfx_onnx.data import Score, score
from qfx_onnx.errors import ExportError
from qfx_onnx.fixed.khot import KHotQuantizer
from qfx_onnx.fixed.types import FixedType
from qfx_onnx.quant.annotated import FORMAT_VERSION, META_SOURCE, META_VERSION
from qfx_onnx.quant.annotated_write import lossless_values
from qfx_onnx.quant.onnx_cast import DOMAIN
from qfx_onnx.quant.quantize import CAST_MODULE_PREFIX, FixedPointModel
from qfx_onnx.quant.report import LayerExactness, layer_exactness, measure_tensors
from qfx_onnx.quant.verify import _predict, _type_text  # verify's own prediction, not a copy of it


@dataclass
class TensorDescription:
    """One quantized tensor. ``range`` is ``"observed"`` (``min``/``max`` over the samples, with
    the share of values beyond the type in ``clipped_fraction``) or ``"type"`` (the type's own
    limits, no samples given). ``lossless`` is the exact type of the value entering the cast
    (empty for parameters and graph inputs, which are cast as they are) and ``terms`` the
    products or elements it sums. ``exact_float32`` is False when float32 onnxruntime cannot
    guarantee this tensor bit for bit; ``reason`` says why."""

    index: int
    tensor: str
    role: str
    type: str
    channels: int | None
    range: str
    min: float
    max: float
    clipped_fraction: float | None
    khot: dict | None
    lossless: str
    terms: int
    exact_float32: bool
    reason: str


@dataclass
class ModelDescription:
    """An annotated model as :func:`describe_model` sees it; :meth:`to_dict` is the JSON form."""

    tensors: list[TensorDescription] = field(default_factory=list)
    layers: list[LayerExactness] = field(default_factory=list)
    estimate: dict | None = None  # export-hls's report.json, or None with estimate_error saying why
    estimate_error: str = ""
    score: Score | None = None
    samples: int = 0

    @property
    def not_exact_float32(self) -> list[str]:
        """The tensors float32 onnxruntime cannot guarantee exact, in graph order."""
        return [t.tensor for t in self.tensors if not t.exact_float32]

    def to_dict(self) -> dict:
        """Plain data (non-finite floats stay floats: the CLI's JSON writer spells them)."""
        return {"tensors": [asdict(t) for t in self.tensors], "layers": [asdict(layer) for layer in self.layers],
                "not_exact_float32": self.not_exact_float32, "estimate": self.estimate,
                "estimate_error": self.estimate_error or None, "samples": self.samples,
                "score": None if self.score is None else {"metric": self.score.metric, "value": self.score.value,
                                                          "samples": self.score.count}}


def is_annotated(path: str | os.PathLike) -> bool:
    """Whether the ONNX file at ``path`` calls qfx cast functions (an annotated model); False for
    a float model and for anything unreadable (the float importer then says what is wrong)."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # protobuf raises several unrelated types for a corrupt file
        return False
    return any(node.domain == DOMAIN for node in model.graph.node)


def metadata(path: str | os.PathLike) -> dict[str, str]:
    """The annotated file's format version and source model name (empty strings when absent)."""
    model = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    return {"format_version": meta.get(META_VERSION, ""), "source": meta.get(META_SOURCE, ""),
            "supported_format": FORMAT_VERSION}


def describe_model(model: FixedPointModel, x: torch.Tensor | None = None, y: torch.Tensor | None = None, *,
                   source: str = "data", batch_size: int = 256, top: str = "myproject", io: str = "parallel",
                   reuse_factor: int = 1, part: str | None = None, clock_ns: float = 5.0,
                   progress=None) -> ModelDescription:
    """Describe every quantized tensor of ``model`` (see the module docstring).

    ``x``: samples of the model's single input (batch first), or None: ranges are then the
    types' own and the example for types and the estimate is one random input code per graph
    input. ``y``: targets of ``x`` for the fixed-point score (:func:`qfx_onnx.data.score`;
    ``source`` names the data in its errors), run in batches of ``batch_size``. ``top``, ``io``,
    ``reuse_factor``, ``part`` and ``clock_ns`` are export-hls's options for the estimate; a model without an HLS form gets
    ``estimate=None`` and the reason in ``estimate_error``. ``progress(done, total)``, when
    given, is called after each batch of ``x``. The model is not changed.
    """
    from qfx_onnx.hls.project import DEFAULT_PART, test_inputs

    inputs = test_inputs(model, None if x is None else (x,), 1)
    example = tuple(t[:1] for t in inputs)
    values = lossless_values(model.graph_module, example)
    exact = _predict(model.graph_module, values)
    out = ModelDescription(layers=layer_exactness(model, example[0], values=values))

    measured, outputs = {}, []
    if x is not None:
        batches = torch.split(x, batch_size)
        done = [0]

        def seen(o) -> None:
            outputs.append(o[0] if isinstance(o, (tuple, list)) else o)
            done[0] += 1
            if progress is not None:
                progress(done[0], len(batches))

        measured = {s.tensor: s for s in measure_tensors(model, batches, on_output=seen)}
        out.samples = len(x)
        if y is not None:
            out.score = score(torch.cat(outputs), y, source)

    gm = model.graph_module
    casts = [n for n in gm.graph.nodes if n.op == "call_module" and str(n.target).startswith(CAST_MODULE_PREFIX)]
    for index, node in enumerate(casts):
        out.tensors.append(_tensor(index, node, gm.get_submodule(node.target), values, exact[node],
                                   measured.get(node.meta["onnx_name"])))
    try:
        out.estimate = _estimate(model, inputs, top=top, io=io, reuse_factor=reuse_factor, part=part or DEFAULT_PART,
                                 clock_ns=clock_ns)
    except ExportError as exc:
        out.estimate_error = str(exc)
    return out


def _tensor(index: int, node, quant, values, exact: tuple[bool, str], stats) -> TensorDescription:
    types: list[FixedType] = quant.frozen_types()
    per_channel = quant.per_channel_axis is not None
    text = str(types[0]) if not per_channel else f"{types[0]} ... ({len(types)} channels)"
    if stats is not None and stats.count:
        kind, lo, hi, clipped = "observed", stats.min, stats.max, stats.clipped_fraction
    else:
        kind, lo, hi, clipped = "type", min(t.min_value for t in types), max(t.max_value for t in types), None
    raw = node.args[0]
    vi = values.get(raw) if raw.op == "call_function" else None
    khot = {"k": quant.k, "csd": quant.signed_digits} if isinstance(quant, KHotQuantizer) else None
    return TensorDescription(index, node.meta["onnx_name"], node.meta.get("role", ""), text,
                             len(types) if per_channel else None, kind, float(lo), float(hi), clipped, khot,
                             _type_text(vi), vi.terms if vi is not None and vi.type is not None else 0, *exact)


def _estimate(model: FixedPointModel, inputs, *, top: str, io: str, reuse_factor: int, part: str, clock_ns: float) -> dict:
    """export-hls's resource estimate (its report.json) without writing a project."""
    from qfx_onnx.hls.estimate import estimate
    from qfx_onnx.hls.export import ExportOptions, build_hls_model
    from qfx_onnx.hls.names import top_name

    hls = build_hls_model(model, inputs, ExportOptions(top=top_name(top), io=io, reuse_factor=reuse_factor))
    return estimate(hls, reuse_factor=reuse_factor, io=io, part=part, clock_ns=clock_ns)


def range_text(t: TensorDescription) -> str:
    """``[min, max]`` as the tables print it; a type's own range is marked ``(type)``."""
    text = f"[{t.min:.4g}, {t.max:.4g}]"
    return text if t.range == "observed" else f"{text} (type)"


def khot_text(t: TensorDescription) -> str:
    """``K=2`` or ``K=2 CSD``; ``-`` when the tensor is not K-hot."""
    if t.khot is None:
        return "-"
    return f"K={t.khot['k']}" + (" CSD" if t.khot["csd"] else "")


__all__ = ["ModelDescription", "TensorDescription", "describe_model", "is_annotated", "khot_text", "metadata",
           "range_text"]
