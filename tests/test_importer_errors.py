"""Import errors: one message for every unsupported op, attributes named, unsafe files refused."""

import os

import numpy as np
import onnx
import pytest
from onnx import helper

from onnx_builders import make_model, node_model, value_info
from qfx_onnx import load_onnx
from qfx_onnx.errors import OnnxModelError, UnsupportedAttributeError, UnsupportedOpError
from qfx_onnx.importer import registry
from qfx_onnx.importer.context import GraphBuilder, NodeContext


def test_all_unsupported_ops_in_one_message():
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="ok"),
        helper.make_node("Sin", ["a"], ["b"], name="sin1"),
        helper.make_node("Floor", ["b"], ["c"], name="floor1"),
        helper.make_node("Sin", ["c"], ["d"], name="sin2"),
        helper.make_node("MaxPool", ["d"], ["e"], name="bad_attr", kernel_shape=[1], storage_order=1),
        helper.make_node("Custom", ["e"], ["y"], name="mine", domain="com.example"),
    ]
    graph = helper.make_graph(nodes, "g", [value_info("x", [1, 2, 3])], [value_info("y", [1, 2, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.example", 1)])
    with pytest.raises(UnsupportedOpError) as err:
        load_onnx(model)
    message = str(err.value)
    assert "\n" not in message and "opset 13" in message
    for part in ("Sin (nodes sin1, sin2)", "Floor (node floor1)", "com.example:Custom (node mine)"):
        assert part in message
    assert "Relu" not in message and "MaxPool" not in message
    assert err.value.exit_code == 2


def test_deprecated_op_version_is_unsupported():
    node = helper.make_node("Upsample", ["x", "scales"], ["y"], name="up")
    (found,) = registry.find_unsupported([("up", node)], 10)
    assert (found.op_type, found.nodes) == ("Upsample", ("up",))
    assert registry.find_unsupported([("up", node)], 9) == []


def test_opset_out_of_range():
    model = node_model("Relu", [("x", (2,))], opset=6)
    with pytest.raises(UnsupportedOpError, match="opset 6"):
        load_onnx(model)


@pytest.mark.parametrize("op,inputs,attrs,needle", [
    ("MaxPool", [("x", (1, 1, 4, 4))], {"kernel_shape": [2, 2], "storage_order": 1}, "storage_order"),
    ("Resize", [("x", (1, 1, 2, 2)), ("roi", None), ("scales", np.array([1, 1, 2, 2], np.float32))], {"mode": "linear"}, "mode"),
    ("Pad", [("x", (1, 4)), ("pads", np.array([0, 1, 0, 1], np.int64)), ("v", np.array(1.0, np.float32))], {}, "constant_value"),
    ("Dropout", [("x", (2, 3))], {}, "mask"),
])
def test_unsupported_values_name_node_and_attribute(op, inputs, attrs, needle):
    outputs = ("y", "mask") if op == "Dropout" else ("y",)
    model = node_model(op, inputs, outputs=outputs, **attrs)
    with pytest.raises(UnsupportedAttributeError) as err:
        load_onnx(model)
    assert f"{op.lower()}_node" in str(err.value) and needle in str(err.value) and op in str(err.value)


def test_an_attribute_no_converter_read_is_an_error():
    node = helper.make_node("Relu", ["x"], ["y"], name="r1", surprise=3)
    ctx = NodeContext(GraphBuilder({}, {}, {}), node, "r1", 13)
    with pytest.raises(UnsupportedAttributeError, match="r1.*Relu.*'surprise'"):
        ctx.check_done()


@pytest.mark.parametrize("op,allowed", [("Reshape", True), ("Squeeze", False)])
def test_a_runtime_value_where_a_constant_is_needed(op, allowed):
    inputs = [value_info("x", [2, 1]), value_info("second", [1], onnx.TensorProto.INT64)]
    model = make_model([helper.make_node(op, ["x", "second"], ["y"])], inputs, [value_info("y", [2])])
    if allowed:  # a runtime target shape is fine for Reshape ...
        assert load_onnx(model).onnx_info.input_names == ("x", "second")
    else:  # ... but Squeeze axes must be known at import
        with pytest.raises(UnsupportedAttributeError, match="axes.*must be a constant"):
            load_onnx(model)


def save_with_external_weight(folder, location="w.bin"):
    w = np.arange(64, dtype=np.float32)
    model = make_model([helper.make_node("Add", ["x", "w"], ["y"])], [value_info("x", [64])], ["y"], initializers={"w": w})
    onnx.save(model, str(folder / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True, location="w.bin", size_threshold=0)
    if location != "w.bin":
        model = onnx.load(str(folder / "m.onnx"), load_external_data=False)
        for entry in model.graph.initializer[0].external_data:
            if entry.key == "location":
                entry.value = location
        onnx.save(model, str(folder / "m.onnx"))
    return folder / "m.onnx", w


def test_external_data_inside_the_folder_loads(tmp_path):
    path, w = save_with_external_weight(tmp_path)
    gm = load_onnx(path)
    assert np.array_equal(dict(gm.named_parameters())["w"].detach().numpy(), w)


@pytest.mark.parametrize("location", ["../w.bin", "/etc/passwd", "sub/../../w.bin", "link.bin"])
def test_external_data_escaping_the_folder_is_refused(tmp_path, location):
    inner = tmp_path / "model"
    inner.mkdir()
    path, _ = save_with_external_weight(inner, location)
    (tmp_path / "w.bin").write_bytes((inner / "w.bin").read_bytes())
    os.symlink(tmp_path / "w.bin", inner / "link.bin")
    with pytest.raises(OnnxModelError) as err:
        load_onnx(path)
    assert "m.onnx" in str(err.value) and "'w'" in str(err.value) and "refused" in str(err.value)


def test_model_proto_with_external_data_is_refused(tmp_path):
    path, _ = save_with_external_weight(tmp_path)
    with pytest.raises(OnnxModelError, match="external data"):
        load_onnx(onnx.load(str(path), load_external_data=False))


@pytest.mark.parametrize("content", [b"", b"garbage\x00\xff" * 10, b"\x08\x07"])
def test_garbage_file_is_a_one_line_error(tmp_path, content):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(OnnxModelError) as err:
        load_onnx(path)
    assert str(err.value).startswith("bad.onnx: ") and "\n" not in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(OnnxModelError, match="nothere.onnx: no such file"):
        load_onnx(tmp_path / "nothere.onnx")


def gemm_with_weight(weight: np.ndarray, constant_node: bool = False) -> onnx.ModelProto:
    """x (N, 4) @ W: W an initializer, or the output of a Constant node."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    inits = {"w": weight}
    if constant_node:
        nodes.insert(0, helper.make_node("Constant", [], ["w"], name="w_const", value=onnx.numpy_helper.from_array(weight)))
        inits = {}
    graph = helper.make_graph(nodes, "g", [value_info("x", ["N", weight.shape[0]])], [value_info("y", ["N", weight.shape[1]])],
                              [onnx.numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("constant_node", [False, True])
@pytest.mark.parametrize("bad, words", [(np.nan, "non-finite"), (np.inf, "non-finite"), (-np.inf, "non-finite")])
def test_non_finite_weights_are_refused_naming_the_tensor(bad, words, constant_node):
    w = np.ones((4, 3), np.float32)
    w[2, 1] = bad
    with pytest.raises(OnnxModelError) as err:
        load_onnx(gemm_with_weight(w, constant_node))
    message = str(err.value)
    assert "'w'" in message and words in message and "(2, 1)" in message and "\n" not in message
    assert ("w_const" in message) == constant_node


def test_an_empty_weight_is_refused_naming_the_tensor():
    with pytest.raises(OnnxModelError, match=r"constant 'w' is empty \(shape \(0, 64\)\)"):
        load_onnx(gemm_with_weight(np.zeros((0, 64), np.float32)))


def test_a_division_by_a_zero_constant_is_refused_naming_the_node():
    nodes = [helper.make_node("Div", ["x", "d"], ["y"], name="div0")]
    model = make_model(nodes, [value_info("x", ["N", 2])], ["y"], initializers={"d": np.array([1.0, 0.0], np.float32)})
    with pytest.raises(OnnxModelError, match=r"div0::recip.*non-finite"):
        load_onnx(model)
