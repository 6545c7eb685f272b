"""Elementwise ops, activations, BatchNormalization, Identity, Dropout against onnxruntime."""

import numpy as np
import pytest
from onnx import helper

from onnx_builders import assert_matches_ort, call_targets, make_model, node_model, value_info

RNG = np.random.default_rng(1)


def const(*shape: int, positive: bool = False) -> np.ndarray:
    values = RNG.standard_normal(shape).astype(np.float32)
    return np.abs(values) + 0.5 if positive else values


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul"])
@pytest.mark.parametrize("opset", [7, 13])
@pytest.mark.parametrize("b", [(2, 3, 4), (4,), (3, 1), "const"])
def test_binary_broadcast(op, opset, b):
    b_spec = const(3, 1) if b == "const" else b
    assert_matches_ort(node_model(op, [("a", (2, 3, 4)), ("b", b_spec)], opset=opset))


@pytest.mark.parametrize("opset", [7, 14])
def test_div_by_constant_is_mul_by_reciprocal(opset):
    model = node_model("Div", [("a", (2, 3)), ("b", const(3, positive=True))], opset=opset)
    gm = assert_matches_ort(model)
    assert call_targets(gm) == ["mul"]
    recip = next(n for n in gm.graph.nodes if n.meta.get("onnx_name") == "div_node::recip")
    assert recip.op == "get_attr" and recip.meta["role"] == "constant"


def test_div_by_tensor_is_nonlinear():
    model = node_model("Div", [("a", (2, 3)), ("b", (2, 3))])
    feeds = {"a": const(2, 3), "b": const(2, 3, positive=True)}
    assert call_targets(assert_matches_ort(model, feeds)) == ["div"]


@pytest.mark.parametrize("opset", [8, 13])
def test_sum_nary(opset):
    assert_matches_ort(node_model("Sum", [("a", (2, 3)), ("b", (3,)), ("c", const(2, 1))], opset=opset))


@pytest.mark.parametrize("op", ["Neg", "Relu", "Sigmoid", "Tanh", "Identity"])
def test_unary(op):
    assert_matches_ort(node_model(op, [("x", (2, 3, 4))]))


@pytest.mark.parametrize("attrs", [{}, {"alpha": 0.3}])
def test_leaky_relu(attrs):
    gm = assert_matches_ort(node_model("LeakyRelu", [("x", (2, 8))], **attrs))
    alpha = next(n for n in gm.graph.nodes if n.op == "get_attr")
    assert alpha.meta["onnx_name"] == "leakyrelu_node::alpha"
    assert getattr(gm, alpha.target).item() == pytest.approx(attrs.get("alpha", 0.01))


@pytest.mark.parametrize("slope_shape", [(3, 1, 1), (1,)])
def test_prelu_slope_is_a_weight(slope_shape):
    gm = assert_matches_ort(node_model("PRelu", [("x", (2, 3, 4, 4)), ("slope", const(*slope_shape))], opset=9))
    slope = next(n for n in gm.graph.nodes if n.op == "get_attr")
    assert slope.meta["role"] == "weight"


@pytest.mark.parametrize("attrs", [{}, {"min": -0.5}, {"max": 0.25}, {"min": -0.5, "max": 0.25}])
def test_clip_6_attributes(attrs):
    gm = assert_matches_ort(node_model("Clip", [("x", (4, 5))], opset=10, **attrs))
    bounds = {n.meta["onnx_name"] for n in gm.graph.nodes if n.op == "get_attr"}
    assert bounds == {f"clip_node::{k}" for k in attrs}


@pytest.mark.parametrize("opset", [11, 13])
@pytest.mark.parametrize("bounds", [("lo", "hi"), ("lo", None), (None, "hi"), (None, None)])
def test_clip_inputs(opset, bounds):
    values = {"lo": np.array(-0.5, np.float32), "hi": np.array(0.3, np.float32)}
    inputs = [("x", (4, 5))] + [(b or "", values[b] if b else None) for b in bounds]
    assert_matches_ort(node_model("Clip", inputs, opset=opset))


@pytest.mark.parametrize("attrs", [{}, {"alpha": 0.5, "beta": 0.25}])
def test_hard_sigmoid(attrs):
    model = node_model("HardSigmoid", [("x", (3, 10))], **attrs)
    assert_matches_ort(model, {"x": np.linspace(-5, 5, 30, dtype=np.float32).reshape(3, 10)})


def test_hard_swish_constants():
    model = node_model("HardSwish", [("x", (3, 10))], opset=14)
    gm = assert_matches_ort(model, {"x": np.linspace(-5, 5, 30, dtype=np.float32).reshape(3, 10)})
    names = sorted(n.meta["onnx_name"] for n in gm.graph.nodes if n.op == "get_attr")
    assert names == ["hardswish_node::alpha", "hardswish_node::beta"]


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("opset,axis", [(11, None), (11, 1), (11, -1), (11, 0), (13, None), (13, 1), (13, -2)])
def test_softmax_axes(op, opset, axis):
    attrs = {} if axis is None else {"axis": axis}
    assert_matches_ort(node_model(op, [("x", (2, 3, 4))], opset=opset, **attrs))


def bn_params(channels: int) -> list[tuple[str, np.ndarray]]:
    return [
        ("gamma", const(channels)),
        ("beta", const(channels)),
        ("mean", const(channels)),
        ("var", const(channels, positive=True)),
    ]


@pytest.mark.parametrize("opset", [7, 9, 15])
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (2, 3), (2, 3, 6)])
def test_batch_norm_is_scale_and_shift(opset, shape):
    model = node_model("BatchNormalization", [("x", shape)] + bn_params(3), opset=opset, epsilon=1e-3)
    gm = assert_matches_ort(model)
    mul, add = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert (mul.target.__name__, add.target.__name__) == ("mul", "add")
    assert "onnx_name" not in mul.meta and mul.meta["role"] == "internal"
    assert add.meta["onnx_name"] == "y" and add.meta["role"] == "activation"
    scale = getattr(gm, mul.args[1].target)
    assert mul.args[1].meta["onnx_name"] == "batchnormalization_node::scale"
    assert tuple(scale.shape) == (3,) + (1,) * (len(shape) - 2)


@pytest.mark.parametrize("opset", [7, 10, 13])
def test_dropout_is_identity(opset):
    gm = assert_matches_ort(node_model("Dropout", [("x", (2, 5))], opset=opset))
    assert call_targets(gm) == ["identity"]


def test_dropout_12_ratio_input():
    model = node_model("Dropout", [("x", (2, 5)), ("ratio", np.array(0.3, np.float32))], opset=12)
    assert_matches_ort(model)


def test_chain_of_ops_keeps_float64():
    nodes = [
        helper.make_node("Mul", ["x", "w"], ["m"]),
        helper.make_node("Relu", ["m"], ["r"]),
        helper.make_node("Add", ["r", "x"], ["y"]),
    ]
    model = make_model(nodes, [value_info("x", [2, 3])], ["y"], initializers={"w": const(3)})
    assert call_targets(assert_matches_ort(model)) == ["mul", "relu", "add"]
