"""Data-movement and shape ops, constants and folding, and a dynamic batch, against onnxruntime."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnx_builders import assert_matches_ort, call_targets, make_model, node_model, random_feeds, value_info

I64 = np.int64


@pytest.mark.parametrize("axis,opset", [(0, 9), (2, 9), (1, 13), (4, 13), (-1, 13), (-4, 11)])
def test_flatten(axis, opset):
    assert_matches_ort(node_model("Flatten", [("x", (2, 3, 4, 5))], opset=opset, axis=axis))


@pytest.mark.parametrize("shape,attrs", [
    ([6, -1], {}), ([0, 4, -1], {}), ([-1], {}), ([2, 3, 4, 5, 1], {"allowzero": 1}),
])
def test_reshape_constant_shape(shape, attrs):
    model = node_model("Reshape", [("x", (2, 3, 4, 5)), ("shape", np.array(shape, I64))], opset=14, **attrs)
    gm = assert_matches_ort(model)
    assert call_targets(gm) == ["reshape"]
    assert not [n for n in gm.graph.nodes if n.op == "get_attr"], "a constant shape is a keyword, not a tensor"


@pytest.mark.parametrize("perm", [None, [0, 2, 1, 3], [3, 1, 0, 2]])
def test_transpose(perm):
    attrs = {} if perm is None else {"perm": perm}
    assert_matches_ort(node_model("Transpose", [("x", (2, 3, 4, 5))], **attrs))


@pytest.mark.parametrize("axes", [None, [1], [-1, 1]])
@pytest.mark.parametrize("opset", [11, 13])
def test_squeeze(axes, opset):
    if axes is None:
        model = node_model("Squeeze", [("x", (2, 1, 3, 1))], opset=opset)
    elif opset < 13:
        model = node_model("Squeeze", [("x", (2, 1, 3, 1))], opset=opset, axes=axes)
    else:
        model = node_model("Squeeze", [("x", (2, 1, 3, 1)), ("axes", np.array(axes, I64))], opset=opset)
    gm = assert_matches_ort(model)
    assert call_targets(gm) == ["squeeze"]
    expected = None if axes is None else [a % 4 for a in axes]
    assert next(n for n in gm.graph.nodes if n.op == "call_function").kwargs["axes"] == expected


@pytest.mark.parametrize("axes", [[0], [1, -1], [-1, 0]])
@pytest.mark.parametrize("opset", [11, 13])
def test_unsqueeze(axes, opset):
    if opset < 13:
        model = node_model("Unsqueeze", [("x", (2, 3))], opset=opset, axes=axes)
    else:
        model = node_model("Unsqueeze", [("x", (2, 3)), ("axes", np.array(axes, I64))], opset=opset)
    assert_matches_ort(model)


@pytest.mark.parametrize("axis", [1, -1])
def test_concat_with_constant(axis):
    extra = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
    model = node_model("Concat", [("a", (2, 3, 4)), ("b", extra), ("c", (2, 3, 1))], axis=axis + 1 if axis == 1 else axis)
    assert_matches_ort(model)


@pytest.mark.parametrize("opset,split,outputs", [
    (11, None, 3), (11, [1, 2, 3], 3), (13, None, 2), (13, [4, 2], 2), (18, "num_outputs", 3), (18, [5, 1], 2),
])
def test_split(opset, split, outputs):
    names = [f"y{k}" for k in range(outputs)]
    inputs = [("x", (2, 6, 3))]
    attrs = {"axis": 1}
    if split == "num_outputs":
        attrs["num_outputs"] = outputs
    elif split is not None and opset < 13:
        attrs["split"] = split
    elif split is not None:
        inputs.append(("split", np.array(split, I64)))
    gm = assert_matches_ort(node_model("Split", inputs, outputs=names, opset=opset, **attrs))
    tuple_node = next(n for n in gm.graph.nodes if n.op == "call_function")
    assert tuple_node.target.__name__ == "split" and "onnx_name" not in tuple_node.meta
    getitems = [n for n in gm.graph.nodes if n.op == "call_function"][1:]
    assert [n.target.__name__ for n in getitems] == ["getitem"] * outputs
    assert [n.meta["onnx_name"] for n in getitems] == names


def test_split_18_uneven():
    model = node_model("Split", [("x", (2, 7))], outputs=["a", "b", "c"], opset=18, axis=1, num_outputs=3)
    assert_matches_ort(model)


SLICES = [
    ([1], [3], [1], None),
    ([0, 1], [-1, 100], [0, 2], None),
    ([-1], [-100], [1], [-1]),
    ([4], [0], [2], [-2]),
    ([0, 1], [5, 4], [2, 1], [2, 3]),
    ([-100], [100], [-1], None),
]


@pytest.mark.parametrize("starts,ends,axes,steps,opset", [
    case + (opset,) for case in SLICES for opset in ([9, 13] if case[3] is None else [13])
])
def test_slice(starts, ends, axes, steps, opset):
    if opset < 10:  # starts, ends and axes are attributes; there are no steps
        model = node_model("Slice", [("x", (3, 5, 6))], opset=opset, starts=starts, ends=ends, axes=axes)
    else:
        values = [starts, ends, axes, steps]
        inputs = [("x", (3, 5, 6))] + [
            (name, None if v is None else np.array(v, I64)) for name, v in zip(["starts", "ends", "axes", "steps"], values)
        ]
        model = node_model("Slice", inputs, opset=opset)
    assert call_targets(assert_matches_ort(model)) == ["slice_axes"]


@pytest.mark.parametrize("indices,axis", [(np.array(1, I64), 0), (np.array([2, 0, -1], I64), 1), (np.array([[0, 1], [1, 0]], I64), 2)])
def test_gather_constant_indices(indices, axis):
    gm = assert_matches_ort(node_model("Gather", [("x", (3, 4, 2)), ("i", indices)], axis=axis))
    index = next(n for n in gm.graph.nodes if n.op == "get_attr")
    assert index.meta["role"] == "shape" and index.meta["onnx_dtype"] == "int64"


def test_gather_of_a_constant_table_with_runtime_indices():
    table = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "idx"], ["y"], axis=0)]
    model = make_model(nodes, [value_info("idx", [4], TensorProto.INT64)], ["y"], initializers={"table": table})
    gm = assert_matches_ort(model, {"idx": np.array([4, 0, -2, 1], I64)})
    assert next(n for n in gm.graph.nodes if n.op == "get_attr").meta["role"] == "weight"


@pytest.mark.parametrize("to", [TensorProto.FLOAT, TensorProto.INT64])
def test_cast(to):
    model = node_model("Cast", [("x", (2, 3))], to=to)
    assert_matches_ort(model, {"x": np.array([[-2.7, -0.5, 0.0], [0.4, 1.5, 3.9]], np.float32)})


def const_node(output: str, **value):
    return helper.make_node("Constant", [], [output], **value)


@pytest.mark.parametrize("value", [
    {"value": helper.make_tensor("v", TensorProto.FLOAT, [3], [1.0, -2.0, 0.5])},
    {"value_float": 0.25},
    {"value_floats": [1.0, 2.0, 3.0]},
])
def test_constant_forms_feed_an_add(value):
    nodes = [const_node("c", **value), helper.make_node("Add", ["x", "c"], ["y"])]
    gm = assert_matches_ort(make_model(nodes, [value_info("x", [2, 3])], ["y"]))
    constant = next(n for n in gm.graph.nodes if n.op == "get_attr")
    assert constant.meta["onnx_name"] == "c" and constant.meta["onnx_op"] == "Constant"
    assert constant.meta["role"] == "constant"


@pytest.mark.parametrize("value,out_shape", [({"value_ints": [6, -1]}, [6, 4]), ({"value_int": -1}, [24])])
def test_integer_constant_forms_feed_a_reshape(value, out_shape):
    nodes = [const_node("shape", **value), helper.make_node("Reshape", ["x", "shape"], ["y"])]
    if "value_int" in value:  # a scalar: make it a 1-D shape
        nodes = [const_node("zero", value_ints=[0]), const_node("s", **value), helper.make_node("Unsqueeze", ["s", "zero"], ["shape"]), nodes[1]]
    gm = assert_matches_ort(make_model(nodes, [value_info("x", [2, 3, 4])], [value_info("y", out_shape)]))
    assert call_targets(gm) == ["reshape"]


def test_constant_of_shape_is_folded():
    nodes = [
        helper.make_node("ConstantOfShape", ["shape"], ["c"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.5])),
        helper.make_node("Mul", ["x", "c"], ["y"]),
    ]
    model = make_model(nodes, [value_info("x", [2, 3])], ["y"], initializers={"shape": np.array([2, 3], I64)})
    gm = assert_matches_ort(model)
    assert call_targets(gm) == ["mul"]


def flatten_chain(batch_dim: str | int) -> onnx.ModelProto:
    """x.view(x.size(0), -1) as PyTorch exports it."""
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Shape", ["r"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "axes0"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus_one"], ["shape"], axis=0),
        helper.make_node("Reshape", ["r", "shape"], ["y"]),
    ]
    inits = {"zero": np.array(0, I64), "axes0": np.array([0], I64), "minus_one": np.array([-1], I64)}
    return make_model(nodes, [value_info("x", [batch_dim, 2, 3, 3])], [value_info("y", [batch_dim, 18])], initializers=inits)


@pytest.mark.parametrize("batch", [1, 5])
def test_dynamic_batch_flatten_chain_folds_to_a_copy_of_the_batch_dim(batch):
    model = flatten_chain("N")
    gm = assert_matches_ort(model, random_feeds(model, batch=batch))
    assert call_targets(gm) == ["relu", "reshape"]
    reshape = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target.__name__ == "reshape")
    assert reshape.args[1] == (0, -1)  # x.view(x.size(0), -1): copy dim 0, infer the rest
    assert gm.onnx_info.input_shapes == ((None, 2, 3, 3),)


@pytest.mark.parametrize("batch", [1, 4])
def test_shape_arithmetic_on_the_dynamic_batch_stays_at_runtime(batch):
    """x.view(x.size(0) * 3, -1): the batch entry is computed, so two entries are unknown."""
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Shape", ["r"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Mul", ["n", "three"], ["n3"]),
        helper.make_node("Unsqueeze", ["n3", "axes0"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus_one"], ["shape"], axis=0),
        helper.make_node("Reshape", ["r", "shape"], ["y"]),
    ]
    inits = {"zero": np.array(0, I64), "three": np.array(3, I64), "axes0": np.array([0], I64), "minus_one": np.array([-1], I64)}
    model = make_model(nodes, [value_info("x", ["N", 3, 2, 2])], [value_info("y", [None, 4])], initializers=inits)
    gm = assert_matches_ort(model, random_feeds(model, batch=batch))
    assert call_targets(gm) == ["relu", "shape_of", "shape_gather", "shape_mul", "shape_unsqueeze", "shape_concat", "reshape"]
    kinds = {n.target.__name__: n.meta["role"] for n in gm.graph.nodes if n.op == "call_function"}
    assert kinds["shape_concat"] == "shape" and kinds["reshape"] == "activation"


def test_static_batch_flatten_chain_is_folded():
    gm = assert_matches_ort(flatten_chain(4))
    assert call_targets(gm) == ["relu", "reshape"]


def test_old_style_initializers_listed_as_inputs_are_constants():
    w = np.random.default_rng(0).standard_normal(3).astype(np.float32)
    nodes = [helper.make_node("Mul", ["x", "w"], ["y"])]
    model = make_model(nodes, [value_info("x", [2, 3]), value_info("w", [3])], ["y"], initializers={"w": w})
    gm = assert_matches_ort(model)
    assert gm.onnx_info.input_names == ("x",)
    assert [n.meta["onnx_name"] for n in gm.graph.nodes if n.op == "placeholder"] == ["x"]
