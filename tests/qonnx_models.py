"""QONNX and QDQ models built with onnx.helper for the import tests (no download).

``tfc`` is shaped like the QONNX model zoo's TFC (FINN's fully connected MNIST net: MatMul, a
BatchNorm-like affine Mul/Add, BipolarQuant or Quant activations) and ``cnv`` like its CNV (3x3
convs, max pools, a dense head), both small, with 1-2-bit weights.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

QONNX = "qonnx.custom_op.general"


def _init(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


class Builder:
    """Nodes, initializers and unique names for a small QONNX graph."""

    def __init__(self, seed: int = 0) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.rng = np.random.default_rng(seed)
        self.count = 0

    def fresh(self, base: str) -> str:
        self.count += 1
        return f"{base}_{self.count}"

    def const(self, base: str, value) -> str:
        name = self.fresh(base)
        self.inits.append(_init(name, value))
        return name

    def node(self, op: str, inputs: list[str], domain: str = "", base: str | None = None, **attrs) -> str:
        out = self.fresh(base or op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out + "_n", domain=domain, **attrs))
        return out

    def quant(self, x: str, scale, bits: int, signed: int = 1, narrow: int = 0, mode: str = "ROUND", zero_point=0.0,
              op: str = "Quant") -> str:
        s = self.const("scale", scale)
        z = self.const("zeropt", zero_point)
        b = self.const("bitwidth", float(bits))
        return self.node(op, [x, s, z, b], QONNX, base="quant", signed=signed, narrow=narrow, rounding_mode=mode)

    def bipolar(self, x: str, scale=1.0) -> str:
        return self.node("BipolarQuant", [x, self.const("scale", scale)], QONNX, base="bipolar")

    def trunc(self, x: str, scale, out_scale, in_bits: int, out_bits: int, mode: str = "FLOOR", signed: int = 1,
              narrow: int = 0) -> str:
        inputs = [x, self.const("scale", scale), self.const("zeropt", 0.0), self.const("in_bits", float(in_bits)),
                  self.const("out_scale", out_scale), self.const("out_bits", float(out_bits))]
        return self.node("Trunc", inputs, QONNX, base="trunc", rounding_mode=mode, signed=signed, narrow=narrow)

    def model(self, inputs, outputs, opset: int = 13, qonnx_opset: int = 1) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "qonnx_test", inputs, outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(QONNX, qonnx_opset)])
        model.ir_version = 8
        return model


def single_quant_model(shape, scale, bits: int, signed: int, narrow: int, mode: str, zero_point=0.0,
                       op: str = "Quant") -> onnx.ModelProto:
    """x -> Quant -> y, for value-by-value checks against the executor."""
    b = Builder()
    y = b.quant("x", scale, bits, signed, narrow, mode, zero_point, op=op)
    out = helper.make_tensor_value_info(y, TensorProto.FLOAT, shape)
    return b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)], [out])


def tfc(hidden: int = 16, weight_bits: int = 1, act: str = "bipolar", seed: int = 0) -> onnx.ModelProto:
    """TFC shape: (N, 64) -> [MatMul(Quant w) -> Mul/Add (BN) -> act] x3 -> MatMul -> (N, 10)."""
    b = Builder(seed)
    x = b.quant("x", 2.0**-4, 8, signed=0, narrow=0)
    width = 64
    for layer in range(3):
        w = b.const("w", b.rng.standard_normal((width, hidden)) * 0.5)
        wq = _weight_quant(b, w, weight_bits, per_channel_shape=(1, hidden) if layer == 1 else None)
        h = b.node("MatMul", [x, wq])
        h = b.node("Mul", [h, b.const("bn_a", b.rng.integers(3, 13, hidden) / 64)])  # dyadic: exact in ap_fixed
        h = b.node("Add", [h, b.const("bn_b", b.rng.integers(-32, 33, hidden) / 64)])
        x = b.bipolar(h) if act == "bipolar" else b.quant(h, 2.0**-2, 2, signed=1, narrow=1)
        width = hidden
    w = b.const("w", b.rng.standard_normal((width, 10)) * 0.5)
    y = b.node("MatMul", [x, _weight_quant(b, w, weight_bits)])
    return b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                   [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["N", 10])])


def _weight_quant(b: Builder, w: str, bits: int, per_channel_shape=None) -> str:
    if bits == 1:
        return b.bipolar(w, 0.5)
    scale = 2.0 ** -b.rng.integers(0, 3, per_channel_shape) if per_channel_shape else 0.5
    return b.quant(w, scale, bits, signed=1, narrow=1)


def cnv(channels: int = 8, weight_bits: int = 2, seed: int = 1) -> onnx.ModelProto:
    """CNV shape on (N, 1, 8, 8): [Conv 3x3 (Quant w) -> Mul/Add -> act] x2 -> MaxPool -> ... -> dense."""
    b = Builder(seed)
    x = b.quant("x", 2.0**-4, 8, signed=0, narrow=0)
    cin = 1
    for layer in range(3):
        w = b.const("w", b.rng.standard_normal((channels, cin, 3, 3)) * 0.5)
        scale = 2.0 ** -b.rng.integers(0, 3, (channels, 1, 1, 1))
        wq = b.bipolar(w, 0.5) if weight_bits == 1 else b.quant(w, scale, weight_bits, signed=1, narrow=1)
        h = b.node("Conv", [x, wq], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
        h = b.node("Mul", [h, b.const("bn_a", b.rng.integers(3, 13, (1, channels, 1, 1)) / 64)])
        h = b.node("Add", [h, b.const("bn_b", b.rng.integers(-32, 33, (1, channels, 1, 1)) / 64)])
        x = b.bipolar(h) if layer != 1 else b.quant(h, 2.0**-1, 2, signed=1, narrow=1)
        if layer < 2:
            x = b.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
        cin = channels
    flat = b.node("Flatten", [x], axis=1)
    w = b.const("w", b.rng.standard_normal((channels * 2 * 2, 10)) * 0.5)
    y = b.node("MatMul", [flat, b.quant(w, 0.25, weight_bits, signed=1, narrow=1)])
    return b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
                   [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["N", 10])])


def qonnx_execute(model: onnx.ModelProto, x: np.ndarray, outputs: list[str] | None = None,
                  cleanup: bool = False) -> dict[str, np.ndarray]:
    """QONNX's own executor (``qonnx.core.onnx_exec.execute_onnx``) on ``x``, the batch fixed to
    ``len(x)`` (the executor needs static shapes); every tensor named in ``outputs`` (default: the
    graph outputs). ``cleanup``: first ``qonnx.util.cleanup.cleanup_model``, as QONNX's tools do
    with an exporter's output (a Brevitas export needs it; the batch stays the exported one)."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.transformation.infer_shapes import InferShapes

    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    del fixed.graph.value_info[:]  # shapes at the exported batch; the executor infers its own
    for value in [*fixed.graph.input, *fixed.graph.output]:
        if not value.type.tensor_type.shape.dim:
            continue
        dim = value.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_value = len(x)
    if cleanup:
        from qonnx.util.cleanup import cleanup_model

        wrapper = cleanup_model(ModelWrapper(model))
        names = outputs or [o.name for o in wrapper.graph.output]
        result = execute_onnx(wrapper, {wrapper.graph.input[0].name: x}, return_full_exec_context=bool(outputs))
        return {n: np.asarray(result[n]) for n in names}
    wrapper = ModelWrapper(fixed).transform(InferShapes())
    names = outputs or [o.name for o in model.graph.output]
    result = execute_onnx(wrapper, {model.graph.input[0].name: x}, return_full_exec_context=bool(outputs))
    return {n: np.asarray(result[n]) for n in names}


def khot_finetuned_mlp(models_dir, train: np.ndarray):
    """The shipped MLP quantized with a QONNX-expressible rounding, per-channel 2-hot weights,
    finetuned one epoch on 256 training samples: the K-hot model both QONNX test files check."""
    import qfx_onnx
    from qfx_onnx.data import ArrayDataset, load_arrays
    from qfx_onnx.train import FinetuneConfig, finetune
    from qfx_onnx.train.prepare import to_khot, to_per_channel

    x, y = load_arrays(models_dir / "digits.npz", "train")
    model = qfx_onnx.quantize(models_dir / "mlp.onnx", train, calib_samples=128, rounding="AP_RND_CONV")
    to_per_channel(model)
    to_khot(model, 2)
    result = finetune(model, ArrayDataset(x[:256], y[:256], "train[:256]"), None,
                      FinetuneConfig(epochs=1, batch_size=32, val_fraction=0))
    return result.model
