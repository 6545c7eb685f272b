"""Numerical profiling: every quantized tensor's values against its ``ap_fixed`` type.

The view hls4ml's numerical profiling made familiar: for each tensor, in graph order, the
distribution of ``log2 |x|`` of the values that reach its cast (weights: the parameter itself;
activations: over the data given), drawn against the type's representable magnitudes, from its
LSB ``2**-F`` up to its largest value. Values right of the type's range saturate or wrap; values
left of its LSB round to zero or to one LSB.

:func:`profile_model` measures (no plotting library needed); :func:`plot_profiles` draws one or
more measured models side by side (e.g. before and after finetune) with matplotlib, which is an
optional extra: ``pip install "qfx-onnx[plot]"``.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from qfx_onnx.atomic import write_atomic
from qfx_onnx.errors import QfxError
from qfx_onnx.quant.quantize import CAST_MODULE_PREFIX, FixedPointModel

MAX_SAMPLES = 4096  # per tensor: enough for quartiles and whiskers, small enough for deep graphs


@dataclass
class TensorProfile:
    """One quantized tensor: ``log2_abs`` holds log2 |x| of (a sample of at most ``MAX_SAMPLES``)
    non-zero values before the cast; ``zeros`` the fraction of exact zeros; ``lsb_log2`` and
    ``max_log2`` are log2 of the type's LSB and of its largest magnitude (over channels for
    per-channel types: smallest LSB, largest magnitude)."""

    tensor: str
    role: str
    type_text: str
    lsb_log2: float
    max_log2: float
    log2_abs: np.ndarray
    zeros: float
    count: int


def profile_model(model: FixedPointModel, batches: Iterable[torch.Tensor], *, seed: int = 0) -> list[TensorProfile]:
    """Run ``batches`` through ``model`` and profile every cast, in graph order.

    The values are those entering each cast (the exact float64 emulation). Sampling is seeded,
    so the same model and data give the same profile.
    """
    gm = model.graph_module
    gen = torch.Generator().manual_seed(seed)
    seen: dict[str, list[torch.Tensor]] = {}
    order: list[tuple[str, str, object]] = []
    handles = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not node.target.startswith(CAST_MODULE_PREFIX):
            continue
        quant = gm.get_submodule(node.target)
        name = node.meta["onnx_name"]
        order.append((name, node.meta.get("role", ""), quant))
        seen[name] = []
        constant = node.args[0].op == "get_attr"  # a parameter: the same values on every batch

        def hook(_module, inputs, _output, name=name, constant=constant):
            if constant and seen[name]:
                return
            values = inputs[0].detach().to(torch.float64).flatten()
            if values.numel() > MAX_SAMPLES:
                values = values[torch.randint(values.numel(), (MAX_SAMPLES,), generator=gen)]
            seen[name].append(values)

        handles.append(quant.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
    finally:
        for handle in handles:
            handle.remove()
    profiles = []
    for name, role, quant in order:
        values = torch.cat(seen[name]) if seen[name] else torch.zeros(0, dtype=torch.float64)
        if values.numel() > MAX_SAMPLES:
            values = values[torch.randperm(values.numel(), generator=gen)[:MAX_SAMPLES]]
        array = values.numpy()
        nonzero = array[array != 0]
        types = quant.frozen_types()
        type_text = str(types[0]) if len(types) == 1 else f"{types[0]} ... ({len(types)} channels)"
        profiles.append(TensorProfile(
            tensor=name, role=role, type_text=type_text,
            lsb_log2=float(min(-t.frac for t in types)),
            max_log2=float(max(math.log2(max(abs(t.min_value), abs(t.max_value))) for t in types)),
            log2_abs=np.log2(np.abs(nonzero)), zeros=float((array == 0).mean()) if array.size else 0.0,
            count=int(array.size)))
    return profiles


def plot_profiles(models: Sequence[tuple[str, list[TensorProfile]]], path: str | os.PathLike, *,
                  title: str = "qfx-onnx numerical profile") -> Path:
    """Draw the profiles of one or more models (``(label, profiles)`` pairs, tensors matched by
    name, in the first model's order) to a PNG (or any format matplotlib knows by the suffix)
    at ``path``, written atomically. Raises QfxError when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        raise QfxError('the profile plot needs matplotlib: pip install "qfx-onnx[plot]"') from None
    names = [p.tensor for p in models[0][1]]
    rows = len(names)
    height = max(3.0, 0.28 * rows + 1.5)
    fig, ax = plt.subplots(figsize=(13, height))
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    band = 0.8 / len(models)
    for k, (label, profiles) in enumerate(models):
        by_name = {p.tensor: p for p in profiles}
        offset = -0.4 + band * (k + 0.5)
        positions, data, ranges = [], [], []
        for row, name in enumerate(names):
            p = by_name.get(name)
            if p is None:
                continue
            y = rows - 1 - row + offset
            ranges.append((y, p))
            if p.log2_abs.size:
                positions.append(y)
                data.append(p.log2_abs)
        color = colors[k % len(colors)]
        for y, p in ranges:  # the type's representable magnitudes, LSB to max
            ax.plot([p.lsb_log2, p.max_log2], [y, y], color=color, alpha=0.25, linewidth=max(2.0, 14 * band), solid_capstyle="butt")
        if data:
            ax.boxplot(data, positions=positions, orientation="horizontal", widths=band * 0.7, showfliers=True,
                       flierprops={"markersize": 2, "alpha": 0.4, "markeredgecolor": color},
                       boxprops={"color": color}, whiskerprops={"color": color}, capprops={"color": color},
                       medianprops={"color": "black"}, manage_ticks=False)
        ax.plot([], [], color=color, linewidth=6, alpha=0.35, label=f"{label}: type range (LSB to max)")
        ax.plot([], [], color=color, linewidth=1, label=f"{label}: log2|x| (box: quartiles)")
    ax.set_yticks(range(rows))
    ax.set_yticklabels([f"{name} [{models[0][1][i].role}]" for i, name in enumerate(names)][::-1], fontsize=7)
    ax.set_xlabel("log2 |value|")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    fig.tight_layout()
    buffer = io.BytesIO()
    suffix = Path(path).suffix.lstrip(".").lower() or "png"
    try:
        fig.savefig(buffer, format=suffix, dpi=110)
    except ValueError as exc:
        raise QfxError(f"{path}: cannot write a plot in this format ({exc})") from None
    finally:
        plt.close(fig)
    return write_atomic(path, buffer.getvalue(), what="profile plot")
