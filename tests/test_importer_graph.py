"""The shape of the imported graph: nodes, metadata, constants, outputs, converter resolution."""

import copy
import operator

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

from onnx_builders import assert_matches_ort, make_model, value_info
from qfx_onnx import load_onnx
from qfx_onnx.importer import registry
from qfx_onnx.importer.context import ROLES
from qfx_onnx.ir.ops import IR_OPS, op_of

RNG = np.random.default_rng(3)


def small_cnn():
    """Conv+BN+Relu+MaxPool+Flatten+Gemm with unnamed nodes and awkward tensor names."""
    c = 4
    inits = {
        "conv.weight": (RNG.standard_normal((c, 1, 3, 3)) / 3).astype(np.float32),
        "conv.bias": RNG.standard_normal(c).astype(np.float32),
        "bn.gamma": RNG.standard_normal(c).astype(np.float32),
        "bn.beta": RNG.standard_normal(c).astype(np.float32),
        "bn.mean": RNG.standard_normal(c).astype(np.float32),
        "bn.var": (np.abs(RNG.standard_normal(c)) + 0.5).astype(np.float32),
        "fc.weight": (RNG.standard_normal((3, c * 4 * 4)) / 8).astype(np.float32),
        "fc.bias": RNG.standard_normal(3).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["input.1", "conv.weight", "conv.bias"], ["7"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["7", "bn.gamma", "bn.beta", "bn.mean", "bn.var"], ["8"], name="bn1"),
        helper.make_node("Relu", ["8"], ["9"]),
        helper.make_node("MaxPool", ["9"], ["10"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["10"], ["11"]),
        helper.make_node("Gemm", ["11", "fc.weight", "fc.bias"], ["logits"], transB=1, alpha=0.5),
    ]
    return make_model(nodes, [value_info("input.1", ["batch", 1, 8, 8])], ["logits", "9"], initializers=inits, name="cnn")


@pytest.fixture(scope="module")
def cnn():
    return assert_matches_ort(small_cnn())


def test_every_node_carries_the_metadata(cnn):
    for node in cnn.graph.nodes:
        assert {"onnx_node", "onnx_op", "onnx_dtype", "role"} <= set(node.meta), node
        assert node.meta["role"] in ROLES


def test_node_kinds_and_targets(cnn):
    ops = {n.op for n in cnn.graph.nodes}
    assert ops == {"placeholder", "get_attr", "call_function", "output"}
    for node in cnn.graph.nodes:
        if node.op == "call_function":
            assert op_of(node.target) is not None or node.target is operator.getitem
            assert op_of(node.target) is None or IR_OPS[op_of(node.target).name].fn is node.target


def test_onnx_names_and_roles(cnn):
    by_name = {n.meta["onnx_name"]: n for n in cnn.graph.nodes if "onnx_name" in n.meta}
    assert by_name["input.1"].op == "placeholder" and by_name["input.1"].meta["role"] == "input"
    assert by_name["conv.weight"].meta["role"] == "weight" and by_name["conv.bias"].meta["role"] == "bias"
    assert by_name["7"].meta["onnx_node"] == "Conv_0" and by_name["7"].meta["onnx_op"] == "Conv"
    assert by_name["8"].meta["onnx_node"] == "bn1" and by_name["8"].meta["role"] == "activation"
    assert by_name["bn1::scale"].meta["role"] == "constant" and by_name["bn1::shift"].op == "get_attr"
    assert by_name["Gemm_5::B"].meta["role"] == "weight", "alpha folded into a synthesized B"
    assert "fc.weight" not in by_name, "a constant replaced by its folded form gets no get_attr"
    assert by_name["logits"].meta["onnx_dtype"] == "float32"
    assert by_name["input.1"].meta["onnx_node"] is None


def test_constants_are_parameters_with_identifier_names(cnn):
    params = dict(cnn.named_parameters())
    for node in cnn.graph.nodes:
        if node.op == "get_attr":
            assert node.target.isidentifier() and node.target in params
            assert isinstance(params[node.target], torch.nn.Parameter)


def test_several_outputs_are_a_tuple_and_onnx_info(cnn):
    info = cnn.onnx_info
    assert (info.graph_name, info.opset) == ("cnn", 13)
    assert info.input_names == ("input.1",) and info.output_names == ("logits", "9")
    assert info.input_shapes == ((None, 1, 8, 8),)
    out = cnn(torch.zeros(2, 1, 8, 8))
    assert isinstance(out, tuple) and [tuple(o.shape) for o in out] == [(2, 3), (2, 4, 8, 8)]
    assert copy.deepcopy(cnn).onnx_info == info


def test_single_output_is_not_a_tuple():
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    gm = load_onnx(make_model(nodes, [value_info("x", [2])], ["y"]))
    assert isinstance(gm(torch.ones(2)), torch.Tensor)


def test_one_get_attr_per_constant_and_integer_buffers():
    w = RNG.standard_normal(3).astype(np.float32)
    nodes = [
        helper.make_node("Mul", ["x", "w"], ["a"]),
        helper.make_node("Add", ["a", "w"], ["b"]),
        helper.make_node("Gather", ["b", "idx"], ["y"], axis=1),
    ]
    inits = {"w": w, "idx": np.array([2, 0], np.int64)}
    gm = assert_matches_ort(make_model(nodes, [value_info("x", [2, 3])], ["y"], initializers=inits))
    attrs = [n for n in gm.graph.nodes if n.op == "get_attr"]
    assert [n.meta["onnx_name"] for n in attrs] == ["w", "idx"]
    assert dict(gm.named_buffers()).keys() == {attrs[1].target}
    assert attrs[1].meta["role"] == "shape"


def test_awkward_constant_names_become_unique_identifiers():
    names = ["a.b", "a_b", "class", "forward", "0", "x y", "training"]
    inits = {n: np.full(2, k, np.float32) for k, n in enumerate(names)}
    nodes = [helper.make_node("Sum", ["x", *names], ["y"])]
    gm = assert_matches_ort(make_model(nodes, [value_info("x", [2])], ["y"], initializers=inits))
    targets = [n.target for n in gm.graph.nodes if n.op == "get_attr"]
    assert len(set(targets)) == len(names) and all(t.isidentifier() for t in targets)


@pytest.mark.parametrize("op,opset,expected", [
    ("Squeeze", 12, "convert_squeeze_1"),
    ("Squeeze", 13, "convert_squeeze_13"),
    ("Squeeze", 24, "convert_squeeze_13"),
    ("Split", 17, "convert_split_13"),
    ("Split", 18, "convert_split_18"),
    ("Clip", 10, "convert_clip_6"),
    ("Clip", 12, "convert_clip_11"),
    ("Upsample", 9, "convert_upsample_9"),
    ("Upsample", 10, None),  # deprecated from opset 10
    ("HardSwish", 13, None),  # not an op before opset 14
    ("NoSuchOp", 13, None),
])
def test_converter_resolution(op, opset, expected):
    found = registry.find_converter(op, opset)
    assert (found.__name__ if found else None) == expected


def test_weights_from_constant_nodes_and_folded_casts():
    w = (RNG.standard_normal((2, 1, 3, 3)) / 3).astype(np.float64)
    nodes = [
        helper.make_node("Constant", [], ["w64"], name="wconst", value=onnx.numpy_helper.from_array(w, "w")),
        helper.make_node("Cast", ["w64"], ["w"], name="wcast", to=onnx.TensorProto.FLOAT),
        helper.make_node("Conv", ["x", "w"], ["y"], name="conv"),
    ]
    gm = assert_matches_ort(make_model(nodes, [value_info("x", [1, 1, 5, 5])], ["y"]))
    (weight,) = [n for n in gm.graph.nodes if n.op == "get_attr"]
    assert weight.meta["onnx_name"] == "w" and weight.meta["role"] == "weight"
    assert (weight.meta["onnx_node"], weight.meta["onnx_op"], weight.meta["onnx_dtype"]) == ("wcast", "Cast", "float32")
