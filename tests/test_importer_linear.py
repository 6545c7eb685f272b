"""Conv, ConvTranspose, Gemm and MatMul against onnxruntime."""

import numpy as np
import pytest

from onnx_builders import assert_matches_ort, call_targets, node_model

RNG = np.random.default_rng(2)


def weight(*shape: int) -> np.ndarray:
    """Normal values scaled by 1/sqrt(fan-in), like trained layers, so that outputs stay O(1)."""
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    return (RNG.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)


CONV_2D = [
    {},
    {"strides": [2, 2]},
    {"pads": [1, 1, 1, 1]},
    {"pads": [0, 1, 2, 1], "strides": [2, 1]},
    {"dilations": [2, 2], "pads": [2, 2, 2, 2]},
    {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
    {"auto_pad": "SAME_LOWER", "strides": [2, 2]},
    {"auto_pad": "SAME_UPPER"},
    {"auto_pad": "VALID", "strides": [2, 2]},
    {"auto_pad": "NOTSET", "kernel_shape": [3, 3]},
]


@pytest.mark.parametrize("attrs", CONV_2D)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("opset", [7, 13])
def test_conv_2d(attrs, bias, opset):
    inputs = [("x", (2, 4, 9, 8)), ("w", weight(6, 4, 3, 3)), ("b", weight(6) if bias else None)]
    gm = assert_matches_ort(node_model("Conv", inputs, opset=opset, **attrs))
    conv = next(n for n in gm.graph.nodes if n.op == "call_function")
    assert conv.target.__name__ == "conv" and len(conv.kwargs["pads"]) == 4
    roles = {n.meta["onnx_name"]: n.meta["role"] for n in gm.graph.nodes if n.op == "get_attr"}
    assert roles == ({"w": "weight", "b": "bias"} if bias else {"w": "weight"})


@pytest.mark.parametrize("attrs", [{}, {"strides": [2]}, {"pads": [2, 1]}, {"dilations": [3]}, {"auto_pad": "SAME_LOWER"}])
def test_conv_1d(attrs):
    inputs = [("x", (2, 3, 17)), ("w", weight(5, 3, 4)), ("b", weight(5))]
    assert_matches_ort(node_model("Conv", inputs, **attrs))


@pytest.mark.parametrize("group,w_shape", [(2, (6, 2, 3, 3)), (4, (4, 1, 3, 3)), (4, (8, 1, 3, 3))])
def test_conv_groups_and_depthwise(group, w_shape):
    inputs = [("x", (1, 4, 7, 7)), ("w", weight(*w_shape)), ("b", weight(w_shape[0]))]
    assert_matches_ort(node_model("Conv", inputs, group=group, pads=[1, 1, 1, 1]))


def test_conv_with_dynamic_batch():
    model = node_model("Conv", [("x", ("batch", 2, 5, 5)), ("w", weight(3, 2, 3, 3))], auto_pad="SAME_UPPER")
    assert_matches_ort(model)


CONV_T = [
    {},
    {"strides": [2, 2]},
    {"strides": [2, 2], "output_padding": [1, 1]},
    {"strides": [2, 3], "pads": [1, 0, 2, 1]},
    {"strides": [2, 2], "pads": [0, 0, 1, 1], "output_padding": [1, 1]},
    {"dilations": [2, 1], "pads": [1, 1, 1, 1]},
    {"strides": [2, 2], "output_shape": [10, 9]},
    {"strides": [2, 2], "output_shape": [11, 8]},
    {"strides": [2, 2], "auto_pad": "SAME_UPPER"},
    {"strides": [2, 2], "auto_pad": "SAME_LOWER"},
    {"strides": [3, 3], "auto_pad": "SAME_UPPER"},
    {"strides": [2, 2], "auto_pad": "VALID"},
]


@pytest.mark.parametrize("attrs", CONV_T)
@pytest.mark.parametrize("opset", [9, 13])
def test_conv_transpose_2d(attrs, opset):
    inputs = [("x", (2, 4, 5, 4)), ("w", weight(4, 3, 3, 3)), ("b", weight(3))]
    gm = assert_matches_ort(node_model("ConvTranspose", inputs, opset=opset, **attrs))
    assert call_targets(gm) == ["conv_transpose"]


@pytest.mark.parametrize("attrs", [{"group": 2}, {"group": 2, "strides": [2, 2], "output_padding": [1, 0]}])
def test_conv_transpose_groups(attrs):
    inputs = [("x", (1, 4, 4, 4)), ("w", weight(4, 2, 2, 3)), ("b", weight(4))]
    assert_matches_ort(node_model("ConvTranspose", inputs, **attrs))


@pytest.mark.parametrize("attrs", [{}, {"strides": [2], "pads": [1, 0]}, {"strides": [3], "output_padding": [2]}])
def test_conv_transpose_1d(attrs):
    inputs = [("x", (2, 3, 6)), ("w", weight(3, 2, 4)), ("b", None)]
    assert_matches_ort(node_model("ConvTranspose", inputs, **attrs))


GEMM = [
    {},
    {"transB": 1},
    {"transA": 1},
    {"transA": 1, "transB": 1},
    {"alpha": 0.5},
    {"beta": 2.0},
    {"alpha": 0.25, "beta": 0.5, "transB": 1},
]


@pytest.mark.parametrize("attrs", GEMM)
@pytest.mark.parametrize("c_shape", [(5,), (3, 5), (1, 1), None])
@pytest.mark.parametrize("opset", [9, 13])
def test_gemm_constant_b(attrs, c_shape, opset):
    a = (4, 3) if attrs.get("transA") else (3, 4)
    b = weight(5, 4) if attrs.get("transB") else weight(4, 5)
    if c_shape is None and opset < 11:
        c_shape = (5,)
    c = None if c_shape is None else weight(*c_shape)
    gm = assert_matches_ort(node_model("Gemm", [("a", a), ("b", b), ("c", c)], opset=opset, **attrs))
    assert call_targets(gm) == ["gemm"]  # alpha and beta are folded into the constants
    names = {n.meta["onnx_name"]: n.meta["role"] for n in gm.graph.nodes if n.op == "get_attr"}
    assert names.get("gemm_node::B" if attrs.get("alpha", 1.0) != 1.0 else "b") == "weight"
    if c is not None:
        assert names.get("gemm_node::C" if attrs.get("beta", 1.0) != 1.0 else "c") == "bias"


@pytest.mark.parametrize("attrs", [{}, {"alpha": 0.5, "beta": 3.0, "transB": 1}])
def test_gemm_dynamic_operands(attrs):
    b = (5, 4) if attrs.get("transB") else (4, 5)
    gm = assert_matches_ort(node_model("Gemm", [("a", (3, 4)), ("b", b), ("c", (3, 5))], **attrs))
    multipliers = sorted(n.meta["onnx_name"] for n in gm.graph.nodes if n.op == "get_attr")
    assert multipliers == (["gemm_node::alpha", "gemm_node::beta"] if attrs else [])


@pytest.mark.parametrize("a,b", [((3, 4), "w"), ((2, 3, 4), "w"), ((2, 3, 4), (2, 4, 5)), ((4,), "w"), ((2, 3, 4), (4,))])
def test_matmul(a, b):
    b_spec = weight(4, 5) if b == "w" else b
    gm = assert_matches_ort(node_model("MatMul", [("a", a), ("b", b_spec)]))
    assert call_targets(gm) == ["matmul"]
