"""Nonlinear IR ops: functions float64 cannot evaluate as hardware does. They give no fixed type
(their float result is only meaningful after the cast that follows).

After quantization the ops with an exact fixed-point definition carry the keyword ``fixed`` (a
spec string, :mod:`qfx_onnx.nonlinear.wiring`): the function then evaluates that definition
(tables on the input's codes, explicit intermediate types), the annotated ONNX writes it as
Gathers on the tables (:func:`~qfx_onnx.nonlinear.onnx_wiring.emit_exact`), and in HLS an op of
one input followed by one cast reads the spec's own compact table (:func:`spec_table`: index cast,
clamp and shift or log2 index, ``qfx_nl::table_lookup``) or, where that is no smaller, a table over
every code of its input type filled by the emulation itself (``HlsForm.table_of``); softmax is a
layer (:mod:`qfx_onnx.hls.nonlinear_kinds`).
Without ``fixed`` (float graphs, ``[nonlinear] exact = false``) they evaluate in float.
Ops without an exact definition are refused by the HLS exporter with the reason given here."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qfx_onnx.ir.opdef import HlsForm, NoHls, ir_op
from qfx_onnx.nonlinear.onnx_wiring import emit_exact
from qfx_onnx.nonlinear.wiring import build, evaluate


def spec_table(node):
    """The LookupTable of a one-input op's ``fixed`` spec (None without one): the compact table
    its HLS form reads (``HlsForm.table_of(compact=spec_table)``)."""
    spec = node.kwargs.get("fixed")
    if not spec:
        return None
    return build(node.target.ir_op.name, spec, node.kwargs.get("approximate", "none"))


def emit_nonlinear(fallback=None):
    """The ``emit`` of an op with an exact form: :func:`emit_exact` when the node has a ``fixed``
    spec, else ``fallback`` (None: the op's ``onnx_op`` with its attributes)."""
    def emit(w, node, out, name):
        if node.kwargs.get("fixed"):
            return emit_exact(w, node, out, name)
        if fallback is not None:
            return fallback(w, node, out, name)
        from qfx_onnx.quant.annotated_write import _emit_default  # the writer imports the ops
        return _emit_default(w, node, out, name)
    return emit


@ir_op("nonlinear", "Sigmoid", emit=emit_nonlinear(), hls=HlsForm.table_of(compact=spec_table))
def sigmoid(x, *, fixed=None):
    """Logistic sigmoid; with ``fixed``, its table."""
    return evaluate("sigmoid", fixed, x) if fixed else torch.sigmoid(x)


@ir_op("nonlinear", "Tanh", emit=emit_nonlinear(), hls=HlsForm.table_of(compact=spec_table))
def tanh(x, *, fixed=None):
    """Hyperbolic tangent; with ``fixed``, its table."""
    return evaluate("tanh", fixed, x) if fixed else torch.tanh(x)


@ir_op("nonlinear", "Softmax", emit=emit_nonlinear(), hls=HlsForm.head("softmax"))
def softmax(x, *, axis=-1, fixed=None):
    """Softmax along one axis (opset-13 semantics; the importer rewrites older coerced-2-D forms);
    with ``fixed``, the max-subtracted table softmax (:func:`~qfx_onnx.nonlinear.kernels.softmax_exact`)."""
    if fixed:
        return evaluate("softmax", fixed, x, axis=axis)
    return torch.softmax(x, dim=axis)


@ir_op("nonlinear", "LogSoftmax", hls=NoHls("no fixed-point log-softmax yet"))
def log_softmax(x, *, axis=-1):
    """Log of softmax along one axis (opset-13 semantics)."""
    return torch.log_softmax(x, dim=axis)


@ir_op("nonlinear", "Div", emit=emit_nonlinear(), hls=HlsForm.head("div"))
def div(a, b, *, fixed=None):
    """Division by a runtime tensor (division by a constant is imported as mul by its reciprocal);
    with ``fixed``, ``out(a * reciprocal_table(b))`` (a positive divisor)."""
    return evaluate("div", fixed, a, b) if fixed else a / b


@ir_op("nonlinear", "LRN", hls=NoHls("LRN's power of a window sum has no fixed-point form yet"))
def lrn(x, *, size, alpha=1e-4, beta=0.75, bias=1.0):
    """ONNX LRN across channels: ``x / (bias + alpha / size * window_sum(x^2)) ** beta``."""
    square = x * x
    front, back = (size - 1) // 2, size - 1 - (size - 1) // 2
    padded = F.pad(square, [0, 0] * (x.dim() - 2) + [front, back])
    channels = x.shape[1]
    window = sum(padded[:, k:k + channels] for k in range(size))
    return x / (bias + alpha / size * window) ** beta
