"""Nonlinear IR ops: functions float64 cannot evaluate as hardware does. They give no fixed type
(their float result is only meaningful after the cast that follows), and in HLS an op of one
input followed by one cast is a lookup table over every code of its input type, filled by the
emulation itself (``HlsForm.table_of``). Ops without an exact fixed-point definition yet are
refused by the HLS exporter with the reason given here."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qfx_onnx.ir.opdef import HlsForm, NoHls, ir_op


@ir_op("nonlinear", "Sigmoid", hls=HlsForm.table_of())
def sigmoid(x):
    """Logistic sigmoid."""
    return torch.sigmoid(x)


@ir_op("nonlinear", "Tanh", hls=HlsForm.table_of())
def tanh(x):
    """Hyperbolic tangent."""
    return torch.tanh(x)


@ir_op("nonlinear", "Softmax", hls=NoHls("no fixed-point softmax yet (it needs a max, an exponent table and a reciprocal)"))
def softmax(x, *, axis=-1):
    """Softmax along one axis (opset-13 semantics; the importer rewrites older coerced-2-D forms)."""
    return torch.softmax(x, dim=axis)


@ir_op("nonlinear", "LogSoftmax", hls=NoHls("no fixed-point log-softmax yet"))
def log_softmax(x, *, axis=-1):
    """Log of softmax along one axis (opset-13 semantics)."""
    return torch.log_softmax(x, dim=axis)


@ir_op("nonlinear", "Div", hls=NoHls("no fixed-point division by an activation yet (it needs a reciprocal table)"))
def div(a, b):
    """Division by a runtime tensor (division by a constant is imported as mul by its reciprocal)."""
    return a / b


@ir_op("nonlinear", "LRN", hls=NoHls("LRN's power of a window sum has no fixed-point form yet"))
def lrn(x, *, size, alpha=1e-4, beta=0.75, bias=1.0):
    """ONNX LRN across channels: ``x / (bias + alpha / size * window_sum(x^2)) ** beta``."""
    square = x * x
    front, back = (size - 1) // 2, size - 1 - (size - 1) // 2
    padded = F.pad(square, [0, 0] * (x.dim() - 2) + [front, back])
    channels = x.shape[1]
    window = sum(padded[:, k:k + channels] for k in range(size))
    return x / (bias + alpha / size * window) ** beta
