"""The checker and shape inference see a weight-free copy: same verdicts, same shapes, no weights."""

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from onnx_builders import value_info
from qfx_onnx import load_onnx
from qfx_onnx.errors import OnnxModelError
from qfx_onnx.importer.loader import prepare
from qfx_onnx.importer.reader import weight_free


def _matmul_reshape_model(weight: onnx.TensorProto) -> onnx.ModelProto:
    """x (N, 64) @ w (64, 64), reshaped by a small int64 initializer that data propagation reads."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Reshape", ["h", "shape"], ["y"], name="rs"),
    ]
    shape = numpy_helper.from_array(np.array([-1, 8, 8], np.int64), "shape")
    graph = helper.make_graph(nodes, "g", [value_info("x", ["N", 64])], [value_info("y", ["N", 8, 8])], [weight, shape])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _weight() -> tuple[np.ndarray, onnx.TensorProto]:
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    return w, numpy_helper.from_array(w, "w")


def test_weight_free_copy_drops_only_large_float_data():
    _, tensor = _weight()
    model = _matmul_reshape_model(tensor)
    before = model.SerializeToString()
    stripped = weight_free(model)
    assert model.SerializeToString() == before  # the source is untouched
    assert [t.name for t in stripped.graph.initializer] == ["shape"]
    (w_input,) = [i for i in stripped.graph.input if i.name == "w"]
    assert [d.dim_value for d in w_input.type.tensor_type.shape.dim] == [64, 64]
    assert stripped.ByteSize() < 1000 < model.ByteSize() // 10
    onnx.checker.check_model(stripped, full_check=True)


def test_prepared_model_is_weight_free_and_keeps_shapes():
    w, tensor = _weight()
    model = _matmul_reshape_model(tensor)
    prepared = prepare(model)
    assert prepared.model.ByteSize() < 1000
    assert prepared.infos["h"].shape == (None, 64)
    assert prepared.constants["w"].flags.writeable
    gm = load_onnx(model)
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    out = gm(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(out, (x @ w).reshape(3, 8, 8), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("broken", ["short_raw_data", "two_value_fields", "wrong_float_count"])
def test_broken_large_weight_is_still_refused_by_the_checker(broken):
    w, tensor = _weight()
    if broken == "short_raw_data":
        tensor.raw_data = tensor.raw_data[:-4]
    elif broken == "two_value_fields":
        tensor.float_data.extend([1.0] * w.size)
    else:
        tensor = onnx.TensorProto(name="w", data_type=onnx.TensorProto.FLOAT, dims=[64, 64], float_data=[1.0] * (w.size - 1))
    with pytest.raises(OnnxModelError, match="invalid ONNX model"):
        load_onnx(_matmul_reshape_model(tensor))
