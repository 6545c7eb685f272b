"""``verify_annotated``: run an annotated ONNX model in onnxruntime and compare every quantized
tensor with the torch emulation, bit for bit.

Values of types of at most 24 bits are exact float32 numbers, so the emulation's float64 values are
compared as float32 bit patterns with onnxruntime's. Type propagation predicts where float32 cannot
guarantee that: a lossless intermediate wider than float32's 24-bit significand (a wide
accumulator), a nonlinear op (sigmoid, softmax ...) without its exact fixed-point definition (no
``fixed`` spec, see :mod:`qfx_onnx.nonlinear.wiring`), which onnxruntime evaluates with its own
float32 approximation, and everything computed from such a value. An op with a spec is written as
its integer definition (tables gathered in float64) and is compared as exact.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper
from torch import fx

from qfx_onnx.batching import fixed_batch_of, split_chunks
from qfx_onnx.errors import OnnxModelError
from qfx_onnx.fixed.types import OverflowMode, QuantMode
from qfx_onnx.importer.reader import read_model
from qfx_onnx.ir.ops import op_of
from qfx_onnx.quant.annotated import NOT_ANNOTATED, find_casts
from qfx_onnx.quant.annotated_write import lossless_values
from qfx_onnx.quant.quantize import CAST_MODULE_PREFIX, FixedPointModel, output_nodes
from qfx_onnx.quant.report import samples_per_pass
from qfx_onnx.quant.typeprop import ValueInfo


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


CHUNK_BYTES = 256 * 2**20
"""About how many bytes of onnxruntime's outputs (float32) one run may hold: a verify on more
samples than that allows runs in chunks of samples."""


def verify_annotated(model: FixedPointModel, onnx_model: str | os.PathLike | onnx.ModelProto,
                     x: torch.Tensor | Sequence[torch.Tensor], *, values: dict[fx.Node, ValueInfo] | None = None) -> VerifyResult:
    """Compare every quantized tensor (and every graph output) of ``onnx_model`` run by
    onnxruntime on ``x`` (as float32) with the float64 emulation of ``model`` on the same float32
    values. Raises OnnxModelError when the ONNX model is not annotated or casts other tensors
    than ``model``.

    Every element of every tensor is compared, in bounded memory: onnxruntime and the emulation
    run on chunks of samples (at most :data:`CHUNK_BYTES` of onnxruntime's outputs, and what
    :func:`~qfx_onnx.quant.report.samples_per_pass` gives the emulation; a graph fixed to one
    batch in that batch), and each cast's emulated value is compared as the emulation produces
    it, then dropped with onnxruntime's. Counts add up over the chunks; casts of parameters are
    compared once.
    ``values`` may pass type propagation's result from an earlier call on one sample
    (:func:`~qfx_onnx.quant.annotated_write.lossless_values`).
    """
    proto, label = read_model(onnx_model)
    casts = find_casts(proto.graph, label)
    if not casts:
        raise OnnxModelError(f"{label}: {NOT_ANNOTATED}")
    onnx_names = {c.tensor: c.out for c in casts}
    del casts  # its NodeProtos would keep the whole model alive
    inputs = tuple(x) if isinstance(x, (tuple, list)) else (x,)
    inputs = tuple(t.detach().cpu().to(torch.float32) if t.is_floating_point() else t.detach().cpu() for t in inputs)
    gm = model.graph_module
    cast_nodes = {n.meta["onnx_name"]: n for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith(CAST_MODULE_PREFIX)}
    if set(onnx_names) != set(cast_nodes):
        diff = sorted(set(onnx_names) ^ set(cast_nodes))
        raise OnnxModelError(f"{label}: the ONNX model and the fixed-point model quantize different tensors ({', '.join(diff[:5])})")

    fixed = fixed_batch_of(gm)
    constant = {name for name, node in cast_nodes.items() if node.args[0].op == "get_attr"}  # same in every chunk
    # types do not depend on the data: one sample (one chunk of a fixed-batch graph) gives the shapes
    first = split_chunks(inputs, fixed)[0] if fixed else [t[:1] for t in inputs]
    values = lossless_values(gm, first, values)
    exact = _predict(gm, values)
    graph_outputs = [o.name for o in proto.graph.output]
    probe = _probe_bytes(proto, list(onnx_names.values()))
    del proto  # when read from a file, onnxruntime's copy is the only one left
    session = ort.InferenceSession(probe, providers=["CPUExecutionProvider"])
    del probe

    cast_outputs = set(onnx_names.values())
    uncast = [(k, node, name) for k, (node, name) in enumerate(zip(output_nodes(gm), graph_outputs)) if name not in cast_outputs]
    tallies = {name: _Tally() for name in [*cast_nodes, *(name for _, _, name in uncast)]}
    per_sample = 4 * sum(_numel(values[node]) for name, node in cast_nodes.items() if name not in constant)
    names = [o.name for o in session.get_outputs()]
    size = min(max(1, CHUNK_BYTES // max(per_sample, 1)), samples_per_pass(values))
    for index, (chunk, rows) in enumerate(_chunks(inputs, fixed, size)):
        ran = dict(zip(names, session.run(names, {i.name: t.numpy() for i, t in zip(session.get_inputs(), chunk)})))

        def compare(name: str, want: torch.Tensor, ran=ran, first=index == 0, rows=rows) -> None:
            got = ran.pop(onnx_names[name])  # dropped once compared
            if name not in constant:
                tallies[name].add(*_samples(want, got, rows))
            elif first:
                tallies[name].add(want, got)

        outputs = _emulate(model, cast_nodes, chunk, compare)
        for k, _, name in uncast:
            tallies[name].add(*_samples(outputs[k], ran.pop(name), rows))

    result = VerifyResult()
    quantizers = model.quantizers()
    for name, node in cast_nodes.items():
        types = quantizers[name].frozen_types()
        raw = node.args[0]
        result.layers.append(tallies[name].check(
            name, onnx_names[name], node.meta.get("role", ""), ";".join(str(t) for t in types) if len(types) > 1 else str(types[0]),
            "" if raw.op == "get_attr" else _type_text(values.get(raw)), *exact[node]))
    for _, node, name in uncast:  # an uncast graph output (after a reshape ...)
        result.layers.append(tallies[name].check(name, name, "output", _type_text(values.get(node)), _type_text(values.get(node)),
                                                 *exact[node]))
    return result


def _samples(want: torch.Tensor, got: np.ndarray, rows: int | None) -> tuple[torch.Tensor, np.ndarray]:
    return (want, got) if rows is None else (want[:rows], got[:rows])


def _chunks(inputs: tuple[torch.Tensor, ...], fixed_batch: int | None, size: int):
    """(chunk, rows): the inputs in chunks to run, and how many leading rows of each are samples
    (None: all of them; only the padded last chunk of a graph fixed to one batch has fewer).

    A graph fixed to one batch runs in chunks of that batch, the last one padded (see
    :mod:`qfx_onnx.batching`); any other in chunks of at most ``size`` samples."""
    n = int(inputs[0].shape[0])
    if fixed_batch and n != fixed_batch:
        for k, chunk in enumerate(split_chunks(list(inputs), fixed_batch)):
            rows = n - k * fixed_batch
            yield chunk, (rows if rows < fixed_batch else None)
        return
    if fixed_batch:
        size = n
    for start in range(0, max(n, 1), size):
        yield [t[start:start + size] for t in inputs], None


def _emulate(model: FixedPointModel, cast_nodes: dict[str, fx.Node], inputs, compare) -> list[torch.Tensor]:
    """Run the emulation on ``inputs`` calling ``compare(name, value)`` with every cast's value
    (float64) as it is computed (forward hooks); the outputs, float64."""
    handles = []
    for name, node in cast_nodes.items():
        module = model.graph_module.get_submodule(node.target)
        handles.append(module.register_forward_hook(lambda _m, _i, out, name=name: compare(name, out.detach().to(torch.float64))))
    try:
        with torch.no_grad():
            out = model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    outputs = list(out) if isinstance(out, (tuple, list)) else [out]
    return [o.detach().to(torch.float64) for o in outputs]


def _probe_bytes(proto: onnx.ModelProto, extra: list[str]) -> bytes:
    """``proto`` serialized with every tensor in ``extra`` as a graph output too. The outputs are
    added for the serialization only: ``proto`` is as it was on return."""
    outputs = proto.graph.output
    present, count = {o.name for o in outputs}, len(outputs)
    outputs.extend(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in extra if name not in present)
    try:
        return proto.SerializeToString()
    finally:
        del outputs[count:]


def _numel(value: ValueInfo) -> int:
    return math.prod(value.shape) if value.shape is not None else 0


def _predict(gm: fx.GraphModule, values: dict[fx.Node, ValueInfo]) -> dict[fx.Node, tuple[bool, str]]:
    """Per node: is float32 evaluation guaranteed exact up to here, and if not, why (the node's own
    reason first, else the first input's)."""
    exact: dict[fx.Node, tuple[bool, str]] = {}
    for node in gm.graph.nodes:
        op = op_of(node.target) if node.op == "call_function" else None
        where = node.meta.get("onnx_name") or node.name
        if op is not None and op.kind == "nonlinear" and not node.kwargs.get("fixed"):
            exact[node] = (False, f"{op.name} ({where}) is computed by onnxruntime in float32")
        elif op is not None and not values[node].exact_float32:
            exact[node] = (False, f"{where} needs {_type_text(values[node])}, wider than float32's 24 bits")
        else:
            upstream = [exact[a] for a in node.all_input_nodes if a in exact]
            exact[node] = next(((False, reason) for ok, reason in upstream if not ok), (True, ""))
    return exact


class _Tally:
    """One tensor's comparison, added up over chunks of samples."""

    def __init__(self) -> None:
        self.elements = 0
        self.mismatches = 0
        self.max_diff = -math.inf  # over the non-NaN differences
        self.shape_error = ""

    def add(self, want: torch.Tensor, got: np.ndarray) -> None:
        """Compare the emulated ``want`` (float64) with onnxruntime's ``got`` as float32 bits."""
        want32 = want.to(torch.float32).numpy()
        self.elements += int(want32.size)
        if want32.shape != got.shape:
            self.mismatches += int(want32.size)
            self.shape_error = self.shape_error or f"shape {got.shape} from onnxruntime, {want32.shape} emulated"
            return
        got32 = got.astype(np.float32, copy=False)
        self.mismatches += int(np.count_nonzero(want32.view(np.uint32) != got32.view(np.uint32)))
        if got.size:
            diff = np.abs(np.subtract(got, want.numpy(), dtype=np.float64))
            largest = float(np.fmax.reduce(diff, axis=None))  # NaN only when every difference is NaN
            if not math.isnan(largest):
                self.max_diff = max(self.max_diff, largest)

    def check(self, tensor: str, onnx_tensor: str, role: str, ap_type: str, raw_type: str, predicted: bool, reason: str) -> LayerCheck:
        if self.shape_error:
            return LayerCheck(tensor, onnx_tensor, role, ap_type, raw_type, self.elements, self.mismatches, float("inf"), predicted,
                              reason or self.shape_error)
        max_diff = self.max_diff if self.max_diff != -math.inf else (0.0 if not self.mismatches else float("nan"))
        return LayerCheck(tensor, onnx_tensor, role, ap_type, raw_type, self.elements, self.mismatches, max_diff, predicted, reason)


def _type_text(value: ValueInfo | None) -> str:
    """A lossless value's type, without modes (nothing rounds there)."""
    if value is None or value.type is None:
        return ""
    return str(value.type.with_modes(QuantMode.TRN, OverflowMode.WRAP, 0))


__all__ = ["LayerCheck", "VerifyResult", "verify_annotated"]
