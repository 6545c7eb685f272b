"""``verify_annotated``: run an annotated ONNX model in onnxruntime and compare every quantized
tensor with the torch emulation, bit for bit.

Values of types of at most 24 bits are exact float32 numbers, so the emulation's float64 values are
compared as float32 bit patterns with onnxruntime's. Type propagation predicts where float32 cannot
guarantee that: a lossless intermediate wider than float32's 24-bit significand (a wide
accumulator), a nonlinear op (sigmoid, softmax ...) that onnxruntime evaluates with its own float32
approximation, and everything computed from such a value.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper
from torch import fx

from qfx_onnx.batching import fixed_batch_of, join_chunks, split_chunks
from qfx_onnx.errors import OnnxModelError
from qfx_onnx.fixed.types import OverflowMode, QuantMode
from qfx_onnx.importer.reader import read_model
from qfx_onnx.ir.ops import op_of
from qfx_onnx.quant.annotated import NOT_ANNOTATED, find_casts
from qfx_onnx.quant.quantize import CAST_MODULE_PREFIX, FixedPointModel, output_nodes
from qfx_onnx.quant.typeprop import ValueInfo, propagate


@dataclass(frozen=True)
class LayerCheck:
    """One compared tensor: ``tensor`` (the model's name; ``onnx_tensor`` in the ONNX graph), how
    many of its ``elements`` differ in their float32 bits, the largest absolute difference, and
    whether float32 evaluation is predicted exact (``reason`` says why not)."""

    tensor: str
    onnx_tensor: str
    role: str
    ap_type: str
    raw_type: str
    elements: int
    mismatches: int
    max_abs_diff: float
    predicted_exact: bool
    reason: str = ""

    @property
    def matches(self) -> bool:
        return self.mismatches == 0


@dataclass
class VerifyResult:
    """Per-layer comparison of onnxruntime (float32) with the emulation, in graph order."""

    layers: list[LayerCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every compared tensor matches bit for bit."""
        return all(layer.matches for layer in self.layers)

    @property
    def mismatched(self) -> list[str]:
        return [layer.tensor for layer in self.layers if not layer.matches]

    @property
    def not_guaranteed(self) -> list[str]:
        """The tensors float32 evaluation cannot guarantee to be exact."""
        return [layer.tensor for layer in self.layers if not layer.predicted_exact]

    @property
    def unexpected(self) -> list[str]:
        """Mismatches where exactness was predicted: a bug somewhere, never rounding."""
        return [layer.tensor for layer in self.layers if layer.predicted_exact and not layer.matches]

    def summary(self) -> str:
        """One line: the verdict and the counts."""
        verdict = "bit-exact" if self.ok else f"{len(self.mismatched)} tensor(s) differ"
        return (f"{verdict}: {len(self.layers)} tensors compared, {len(self.not_guaranteed)} not guaranteed exact "
                f"in float32, {len(self.unexpected)} unexpected mismatch(es)")


def verify_annotated(model: FixedPointModel, onnx_model: str | os.PathLike | onnx.ModelProto,
                     x: torch.Tensor | Sequence[torch.Tensor]) -> VerifyResult:
    """Compare every quantized tensor (and every graph output) of ``onnx_model`` run by
    onnxruntime on ``x`` (as float32) with the float64 emulation of ``model`` on the same float32
    values. Raises OnnxModelError when the ONNX model is not annotated or casts other tensors
    than ``model``.
    """
    proto, label = read_model(onnx_model)
    casts = find_casts(proto.graph, label)
    if not casts:
        raise OnnxModelError(f"{label}: {NOT_ANNOTATED}")
    inputs = tuple(x) if isinstance(x, (tuple, list)) else (x,)
    inputs = tuple(t.detach().cpu().to(torch.float32) if t.is_floating_point() else t.detach().cpu() for t in inputs)
    gm = model.graph_module
    cast_nodes = {n.meta["onnx_name"]: n for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith(CAST_MODULE_PREFIX)}
    onnx_names = {c.tensor: c.out for c in casts}
    if set(onnx_names) != set(cast_nodes):
        diff = sorted(set(onnx_names) ^ set(cast_nodes))
        raise OnnxModelError(f"{label}: the ONNX model and the fixed-point model quantize different tensors ({', '.join(diff[:5])})")

    fixed = fixed_batch_of(gm)
    constant = {name for name, node in cast_nodes.items() if node.args[0].op == "get_attr"}  # same in every chunk
    emulated, outputs = _emulate(model, cast_nodes, inputs, constant)
    extra = [name for name in onnx_names.values()]
    ran = _run_onnxruntime(proto, extra, inputs, fixed, {onnx_names[name] for name in constant})
    dtype = next((p.dtype for p in gm.parameters()), torch.float64)
    # types do not depend on the data: one sample (one chunk of a fixed-batch graph) gives the shapes
    first = split_chunks(inputs, fixed)[0] if fixed else [t[:1] for t in inputs]
    values = propagate(gm, tuple(t.to(dtype) if t.is_floating_point() else t for t in first))
    exact = _predict(gm, values)

    result = VerifyResult()
    quantizers = model.quantizers()
    for name, node in cast_nodes.items():
        types = quantizers[name].frozen_types()
        raw = node.args[0]
        result.layers.append(_compare(
            name, onnx_names[name], node.meta.get("role", ""), ";".join(str(t) for t in types) if len(types) > 1 else str(types[0]),
            "" if raw.op == "get_attr" else _type_text(values.get(raw)), emulated[name], ran[onnx_names[name]], *exact[node]))
    cast_outputs = set(onnx_names.values())
    for node, value, out in zip(output_nodes(gm), outputs, proto.graph.output):
        if out.name not in cast_outputs:  # an uncast graph output (after a reshape ...)
            result.layers.append(_compare(out.name, out.name, "output", _type_text(values.get(node)), _type_text(values.get(node)),
                                          value, ran[out.name], *exact[node]))
    return result


def _emulate(model: FixedPointModel, cast_nodes: dict[str, fx.Node], inputs,
             constant: set[str]) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """The emulation's value of every cast tensor (forward hooks) and its outputs, float64.

    A graph fixed to one batch runs in chunks (one hook call per chunk): batched values are
    joined, and those in ``constant`` (casts of parameters) taken from the first chunk."""
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, node in cast_nodes.items():
        module = model.graph_module.get_submodule(node.target)
        handles.append(module.register_forward_hook(lambda _m, _i, out, name=name: seen.setdefault(name, []).append(out.detach().to(torch.float64))))
    try:
        with torch.no_grad():
            out = model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    n = int(inputs[0].shape[0])
    joined = {name: parts[0] if len(parts) == 1 or name in constant else join_chunks(parts, n) for name, parts in seen.items()}
    outputs = list(out) if isinstance(out, (tuple, list)) else [out]
    return joined, [o.detach().to(torch.float64) for o in outputs]


def _run_onnxruntime(proto: onnx.ModelProto, extra: list[str], inputs, fixed_batch: int | None = None,
                     constant: set[str] = frozenset()) -> dict[str, np.ndarray]:
    """Every graph output and every tensor in ``extra``, from onnxruntime runs on a copy: one run,
    or one per chunk of ``fixed_batch`` samples (``constant`` tensors then from the first)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    present = {o.name for o in probe.graph.output}
    for name in extra:
        if name not in present:
            probe.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    arrays = [t.numpy() for t in inputs]
    n = int(arrays[0].shape[0])
    chunks = split_chunks(arrays, fixed_batch) if fixed_batch and n != fixed_batch else [arrays]
    runs = [dict(zip(names, session.run(names, {i.name: a for i, a in zip(session.get_inputs(), chunk)}))) for chunk in chunks]
    if len(runs) == 1:
        return runs[0]
    return {name: runs[0][name] if name in constant else join_chunks([r[name] for r in runs], n) for name in names}


def _predict(gm: fx.GraphModule, values: dict[fx.Node, ValueInfo]) -> dict[fx.Node, tuple[bool, str]]:
    """Per node: is float32 evaluation guaranteed exact up to here, and if not, why (the node's own
    reason first, else the first input's)."""
    exact: dict[fx.Node, tuple[bool, str]] = {}
    for node in gm.graph.nodes:
        op = op_of(node.target) if node.op == "call_function" else None
        where = node.meta.get("onnx_name") or node.name
        if op is not None and op.kind == "nonlinear":
            exact[node] = (False, f"{op.name} ({where}) is computed by onnxruntime in float32")
        elif op is not None and not values[node].exact_float32:
            exact[node] = (False, f"{where} needs {_type_text(values[node])}, wider than float32's 24 bits")
        else:
            upstream = [exact[a] for a in node.all_input_nodes if a in exact]
            exact[node] = next(((False, reason) for ok, reason in upstream if not ok), (True, ""))
    return exact


def _compare(tensor: str, onnx_tensor: str, role: str, ap_type: str, raw_type: str, want: torch.Tensor,
             got: np.ndarray, predicted: bool, reason: str) -> LayerCheck:
    want32 = want.to(torch.float32).numpy()
    if want32.shape != got.shape:
        return LayerCheck(tensor, onnx_tensor, role, ap_type, raw_type, int(want32.size), int(want32.size), float("inf"), predicted,
                          reason or f"shape {got.shape} from onnxruntime, {want32.shape} emulated")
    mismatches = int(np.count_nonzero(want32.view(np.uint32) != got.astype(np.float32).view(np.uint32)))
    diff = np.abs(got.astype(np.float64) - want.numpy())
    max_diff = float(np.nanmax(diff)) if diff.size and not np.all(np.isnan(diff)) else (0.0 if not mismatches else float("nan"))
    return LayerCheck(tensor, onnx_tensor, role, ap_type, raw_type, int(want32.size), mismatches, max_diff, predicted, reason)


def _type_text(value: ValueInfo | None) -> str:
    """A lossless value's type, without modes (nothing rounds there)."""
    if value is None or value.type is None:
        return ""
    return str(value.type.with_modes(QuantMode.TRN, OverflowMode.WRAP, 0))


__all__ = ["LayerCheck", "VerifyResult", "verify_annotated"]
