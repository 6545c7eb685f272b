"""The quantization report: per-tensor type, observed range, clipped/wrapped fraction and SQNR.

Measured on evaluation data with forward hooks on the cast modules, so every number describes one
cast in the fixed-point model as it runs: ``raw`` is what reaches the cast (already computed from
quantized inputs), ``out`` what leaves it. SQNR is ``10*log10(sum(raw^2) / sum((raw-out)^2))``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from rich.table import Table
from torch import fx

from qfx_onnx.fixed.types import FixedType
from qfx_onnx.quant.quantize import CAST_MODULE_PREFIX, FixedPointModel
from qfx_onnx.quant.typeprop import ValueInfo


@dataclass
class TensorStats:
    tensor: str
    role: str
    type: str
    min: float = math.inf
    max: float = -math.inf
    count: int = 0
    out_of_range: int = 0
    signal: float = 0.0
    noise: float = 0.0

    @property
    def clipped_fraction(self) -> float:
        return self.out_of_range / self.count if self.count else 0.0

    @property
    def sqnr_db(self) -> float:
        if self.noise == 0.0:
            return math.inf
        return 10 * math.log10(self.signal / self.noise) if self.signal > 0 else -math.inf


@dataclass
class LayerExactness:
    tensor: str
    op: str
    type: str
    terms: int
    exact_float64: bool
    exact_float32: bool


@dataclass
class QuantReport:
    float_accuracy: float | None = None
    fixed_accuracy: float | None = None
    tensors: list[TensorStats] = field(default_factory=list)
    layers: list[LayerExactness] = field(default_factory=list)
    verify: dict | None = None

    def to_json(self) -> str:
        """The report as JSON. A non-finite number is the string the table prints, ``"inf"``,
        ``"-inf"`` or ``"nan"`` (JSON has no such numbers): SQNR ``"inf"`` is a lossless cast."""
        def clean(v):
            return str(v) if isinstance(v, float) and not math.isfinite(v) else v

        tensors = [{**{k: clean(v) for k, v in asdict(t).items() if k not in ("signal", "noise")},
                    "clipped_fraction": t.clipped_fraction, "sqnr_db": clean(t.sqnr_db)} for t in self.tensors]
        return json.dumps({
            "float_accuracy": self.float_accuracy, "fixed_accuracy": self.fixed_accuracy,
            "tensors": tensors, "layers": [asdict(layer) for layer in self.layers], "verify": self.verify,
        }, indent=2)


def _bounds(quant, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Range limits widened by half an LSB: beyond them a value is clipped or wrapped, not rounded."""
    types: list[FixedType] = quant.frozen_types()
    lo = torch.tensor([t.min_value - t.lsb / 2 for t in types], dtype=raw.dtype)
    hi = torch.tensor([t.max_value + t.lsb / 2 for t in types], dtype=raw.dtype)
    if len(types) == 1:
        return lo[0], hi[0]
    shape = [1] * raw.dim()
    shape[quant.per_channel_axis % raw.dim()] = len(types)
    return lo.reshape(shape), hi.reshape(shape)


class _Meter:
    """Forward hook of one cast: accumulates its TensorStats.

    Types are frozen while measuring, so the range limits are computed on the first call only. A
    per-tensor cast whose observed minimum and maximum lie within them clipped nothing, which spares
    the element-wise comparison; NaN fails that test and is counted as before (never out of range).
    Sums of squares are dot products: one pass each, summed in another order than ``sum`` would.
    A cast of a parameter (``once``) is measured on the first pass only: every pass casts the
    same values.
    """

    def __init__(self, entry: TensorStats, once: bool) -> None:
        self.entry = entry
        self.once = once
        self.limits: tuple[torch.Tensor, torch.Tensor, float, float] | None = None

    def __call__(self, module, inputs, output) -> None:
        if self.once and self.entry.count:
            return
        raw = inputs[0].detach().to(torch.float64).reshape(-1)
        if raw.numel() == 0:
            return
        out = output.detach().to(torch.float64).reshape(-1)
        if self.limits is None:
            lo, hi = _bounds(module, inputs[0].detach().to(torch.float64))
            scalar = lo.dim() == 0
            self.limits = (lo, hi, lo.item() if scalar else math.nan, hi.item() if scalar else math.nan)
        lo, hi, lo_value, hi_value = self.limits
        low, high = (v.item() for v in torch.aminmax(raw))
        entry = self.entry
        entry.min = min(entry.min, low)
        entry.max = max(entry.max, high)
        entry.count += raw.numel()
        if not (lo_value <= low and high <= hi_value):  # per channel, or perhaps clipped
            full = inputs[0].detach().to(torch.float64)
            entry.out_of_range += int(((full < lo) | (full > hi)).sum())
        entry.signal += float(torch.dot(raw, raw))
        noise = raw - out
        entry.noise += float(torch.dot(noise, noise))


def measure_tensors(model: FixedPointModel, batches, on_output: Callable[[Any], None] | None = None) -> list[TensorStats]:
    """Run ``batches`` through the fixed-point model and collect TensorStats for every cast (those
    of parameters once, whatever the number of batches).

    ``on_output``, when given, receives the model's output for each batch, so that a caller can
    score the same forward passes instead of running the model again.
    """
    gm = model.graph_module
    stats: dict[str, TensorStats] = {}
    handles = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not node.target.startswith(CAST_MODULE_PREFIX):
            continue
        quant = gm.get_submodule(node.target)
        types = quant.frozen_types()
        entry = TensorStats(node.meta["onnx_name"], node.meta.get("role", ""),
                            str(types[0]) if len(types) == 1 else f"{types[0]} ... ({len(types)} channels)")
        stats[entry.tensor] = entry
        handles.append(quant.register_forward_hook(_Meter(entry, once=node.args[0].op == "get_attr")))
    try:
        with torch.no_grad():
            for x in batches:
                out = model(x)
                if on_output is not None:
                    on_output(out)
    finally:
        for h in handles:
            h.remove()
    return list(stats.values())


def layer_exactness(model: FixedPointModel, example: torch.Tensor,
                    values: dict[fx.Node, ValueInfo] | None = None) -> list[LayerExactness]:
    """Lossless width of every linear/arithmetic result and whether float64/float32 hold it exactly.

    ``values`` may pass type propagation's result from an earlier call
    (:func:`~qfx_onnx.quant.annotated_write.lossless_values`), used when it was computed on inputs
    shaped like ``example``.
    """
    from qfx_onnx.quant.annotated_write import lossless_values  # onnx-heavy, only needed here

    gm = model.graph_module
    info = lossless_values(gm, [example], values)
    layers = []
    for node, vi in info.items():
        if node.op != "call_function" or vi.type is None:
            continue
        if not any(u.op == "call_module" and u.target.startswith(CAST_MODULE_PREFIX) for u in node.users):
            continue  # only results that reach a cast: the raw value of a layer
        layers.append(LayerExactness(node.meta.get("onnx_name", node.name).removesuffix(FixedPointModel.RAW_SUFFIX),
                                     node.meta.get("onnx_op", ""), str(vi.type), vi.terms,
                                     vi.exact_float64, vi.exact_float32))
    return layers


PASS_BYTES = 1 << 20
"""The size, in float64, that the largest tensor of one forward pass of the emulation aims at."""


def samples_per_pass(values: dict[fx.Node, ValueInfo]) -> int:
    """How many samples to run through the emulation at once, from type propagation's shapes for
    one sample (:func:`~qfx_onnx.quant.typeprop.propagate`): enough that the largest tensor that
    depends on the input holds about :data:`PASS_BYTES` in float64, at least 1 and at most 256.

    Results do not depend on it wherever the emulation is exact (lossless accumulators within
    float64's 53 bits, so no summation order matters). Speed and memory do: on ResNet-20 a
    fixed-point pass over 256 samples takes 2.3 s in batches of 8 against 8.6 s in one batch,
    whose 33 MB tensors glibc maps and unmaps on every allocation (2.4M page faults), and the
    process peaks at 0.3 GB instead of 3.4 GB.
    """
    depends: set[fx.Node] = set()
    largest = 1
    for node, value in values.items():
        if node.op == "placeholder" or any(a in depends for a in node.all_input_nodes):
            depends.add(node)
            if value.shape is not None:
                largest = max(largest, math.prod(value.shape))
    return max(1, min(256, PASS_BYTES // (8 * largest)))


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(dim=1) == labels).double().mean().item()


def tensor_table(report: QuantReport, limit: int | None = None) -> Table:
    table = Table(title="fixed-point tensors", show_lines=False)
    for col in ("tensor", "role", "type", "observed range", "clipped", "SQNR dB"):
        table.add_column(col, overflow="fold")
    rows = report.tensors if limit is None else report.tensors[:limit]
    for t in rows:
        sqnr = f"{t.sqnr_db:.1f}"  # "inf", "-inf" as in the JSON
        table.add_row(t.tensor, t.role, t.type, f"[{t.min:.4g}, {t.max:.4g}]", f"{t.clipped_fraction:.2%}", sqnr)
    return table
