"""Pooling, reductions and LRN against onnxruntime; averages are exact sums times reciprocals."""

import numpy as np
import pytest

from onnx_builders import assert_matches_ort, call_targets, node_model

MAX_POOL = [
    {"kernel_shape": [2, 2]},
    {"kernel_shape": [3, 3], "strides": [2, 2]},
    {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
    {"kernel_shape": [3, 2], "pads": [0, 1, 2, 0]},
    {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1},
    {"kernel_shape": [2, 2], "strides": [3, 3], "pads": [1, 1, 1, 1], "ceil_mode": 1},
    {"kernel_shape": [2, 2], "dilations": [2, 2]},
    {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"},
    {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_LOWER"},
    {"kernel_shape": [2, 2], "storage_order": 0},
]


@pytest.mark.parametrize("attrs", MAX_POOL)
def test_max_pool_2d(attrs):
    gm = assert_matches_ort(node_model("MaxPool", [("x", (2, 3, 9, 8))], **attrs))
    assert call_targets(gm) == ["max_pool"]


@pytest.mark.parametrize("opset", [8, 12])
def test_max_pool_1d_and_older_opset(opset):
    assert_matches_ort(node_model("MaxPool", [("x", (2, 3, 11))], opset=opset, kernel_shape=[3], strides=[2]))


AVERAGE_POOL = [
    {"kernel_shape": [2, 2], "strides": [2, 2]},
    {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]},
    {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1},
    {"kernel_shape": [3, 2], "pads": [0, 1, 2, 0], "strides": [2, 1]},
    {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1},
    {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1, "pads": [1, 1, 1, 1], "count_include_pad": 1},
    {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"},
    {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER", "count_include_pad": 1},
]


@pytest.mark.parametrize("attrs", AVERAGE_POOL)
def test_average_pool_2d(attrs):
    gm = assert_matches_ort(node_model("AveragePool", [("x", (2, 3, 9, 8))], opset=11, **attrs))
    summed, scaled = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert summed.target.__name__ == "sum_pool" and "onnx_name" not in summed.meta
    assert scaled.target.__name__ == "mul" and scaled.meta["onnx_name"] == "y"
    assert scaled.args[1].meta["onnx_name"] == "averagepool_node::recip"


def test_average_pool_uniform_windows_use_a_scalar_reciprocal():
    gm = assert_matches_ort(node_model("AveragePool", [("x", ("batch", 3, 8, 8))], kernel_shape=[2, 2], strides=[2, 2]))
    recip = next(n for n in gm.graph.nodes if n.op == "get_attr")
    assert getattr(gm, recip.target).numel() == 1


def test_average_pool_partial_windows_use_a_map():
    model = node_model("AveragePool", [("x", (1, 2, 5, 5))], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    gm = assert_matches_ort(model)
    recip = getattr(gm, next(n for n in gm.graph.nodes if n.op == "get_attr").target).detach().numpy()
    assert recip.shape == (1, 1, 5, 5)
    assert recip[0, 0, 0, 0] == np.float32(1 / 4) and recip[0, 0, 2, 2] == np.float32(1 / 9)


@pytest.mark.parametrize("opset", [7, 19])
def test_average_pool_1d_and_dilations(opset):
    attrs = {"kernel_shape": [3], "strides": [2], "pads": [1, 1]}
    if opset >= 19:
        attrs["dilations"] = [2]
    assert_matches_ort(node_model("AveragePool", [("x", (2, 3, 12))], opset=opset, **attrs))


@pytest.mark.parametrize("shape", [("batch", 3, 5, 4), (2, 3, 7)])
def test_global_pools(shape):
    gm = assert_matches_ort(node_model("GlobalAveragePool", [("x", shape)]))
    assert call_targets(gm) == ["reduce_sum", "mul"]
    assert call_targets(assert_matches_ort(node_model("GlobalMaxPool", [("x", shape)]))) == ["global_max_pool"]


REDUCE_CASES = [
    ({"axes": [1]}, {}),
    ({"axes": [-1, 1]}, {"keepdims": 0}),
    ({"axes": None}, {}),
    ({"axes": None}, {"keepdims": 0}),
]


def reduce_model(op: str, opset: int, axes, attrs, axes_as_input: bool):
    if axes_as_input:
        inputs = [("x", (2, 3, 4)), ("axes", None if axes is None else np.array(axes, np.int64))]
        return node_model(op, inputs, opset=opset, **attrs)
    extra = {} if axes is None else {"axes": axes}
    return node_model(op, [("x", (2, 3, 4))], opset=opset, **attrs, **extra)


@pytest.mark.parametrize("case", REDUCE_CASES)
@pytest.mark.parametrize("op,opset,axes_as_input", [
    ("ReduceSum", 11, False), ("ReduceSum", 13, True), ("ReduceMean", 13, False), ("ReduceMean", 18, True),
])
def test_reduce(case, op, opset, axes_as_input):
    axes, attrs = case[0]["axes"], case[1]
    gm = assert_matches_ort(reduce_model(op, opset, axes, attrs, axes_as_input))
    assert call_targets(gm) == (["reduce_sum"] if op == "ReduceSum" else ["reduce_sum", "mul"])


@pytest.mark.parametrize("op,opset", [("ReduceSum", 13), ("ReduceMean", 18)])
def test_reduce_noop_with_empty_axes(op, opset):
    gm = assert_matches_ort(node_model(op, [("x", (2, 3))], opset=opset, noop_with_empty_axes=1))
    assert call_targets(gm) == ["identity"]


@pytest.mark.parametrize("attrs", [{"size": 3}, {"size": 5, "alpha": 0.01, "beta": 0.5, "bias": 2.0}])
def test_lrn(attrs):
    assert_matches_ort(node_model("LRN", [("x", (2, 6, 3, 3))], **attrs))
