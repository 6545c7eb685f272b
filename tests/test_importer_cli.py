"""``qfx-onnx inspect`` through the real typer app."""

import numpy as np
import onnx
import pytest
from onnx import helper
from typer.testing import CliRunner

from onnx_builders import make_model, run_ort, value_info
from qfx_onnx_cli.main import app

runner = CliRunner()


@pytest.fixture
def classifier(tmp_path):
    """Flatten + Gemm on (N, 1, 8, 8) digits-shaped input, saved with a labelled .npz."""
    rng = np.random.default_rng(4)
    nodes = [
        helper.make_node("Flatten", ["x"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "w", "b"], ["logits"], name="fc", transB=1),
    ]
    inits = {"w": rng.standard_normal((10, 64)).astype(np.float32), "b": rng.standard_normal(10).astype(np.float32)}
    model = make_model(nodes, [value_info("x", ["N", 1, 8, 8])], ["logits"], initializers=inits)
    path = tmp_path / "clf.onnx"
    onnx.save(model, str(path))
    x = rng.random((50, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, 50).astype(np.int64)
    y[:20] = run_ort(model, {"x": x[:20]})[0].argmax(axis=1)  # some right, most wrong
    np.savez(tmp_path / "data.npz", x=x, y=y)
    expected = float(np.mean(run_ort(model, {"x": x})[0].argmax(axis=1) == y))
    return path, tmp_path / "data.npz", expected


def test_inspect_lists_nodes(classifier):
    path, _, _ = classifier
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    for text in ("flatten", "Flatten", "fc", "Gemm", "(?, 64)", "(?, 10)", "converted"):
        assert text in result.output


def test_inspect_reports_float_accuracy(classifier):
    path, data, expected = classifier
    result = runner.invoke(app, ["inspect", str(path), "--data", str(data), "--batch-size", "16"])
    assert result.exit_code == 0, result.output
    assert f"float accuracy: {100 * expected:.2f}%" in result.output


def test_inspect_unsupported_ops_exit_2(tmp_path):
    nodes = [helper.make_node("Sin", ["x"], ["a"], name="e1"), helper.make_node("Floor", ["a"], ["y"], name="f1")]
    path = tmp_path / "u.onnx"
    onnx.save(make_model(nodes, [value_info("x", [2])], ["y"]), str(path))
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 2
    assert "unsupported" in result.output and "Sin (node e1)" in result.output and "Floor (node f1)" in result.output
    assert "Traceback" not in result.output


def test_inspect_garbage_file(tmp_path):
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"not a model at all")
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 1
    assert "junk.onnx" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("command", ["inspect", "quantize"])
def test_nan_weight_is_one_line_and_writes_nothing(classifier, command):
    path, data, _ = classifier
    model = onnx.load(str(path))
    w = onnx.numpy_helper.to_array(model.graph.initializer[0]).copy()
    w[3, 5] = np.nan
    model.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w, model.graph.initializer[0].name))
    bad = path.parent / "nan.onnx"
    onnx.save(model, str(bad))
    result = runner.invoke(app, [command, str(bad), "--data", str(data)])
    assert result.exit_code != 0
    assert "Traceback" not in result.output and "non-finite" in result.output and "'w'" in result.output
    assert not (path.parent / "nan.qfx.onnx").exists()


@pytest.mark.parametrize("command", ["inspect", "quantize"])
def test_labels_outside_the_model_outputs_are_refused(classifier, command, tmp_path):
    path, data, _ = classifier
    with np.load(data) as z:
        x, y = z["x"], z["y"].copy()
    y[7] = 10  # the model has 10 class outputs: 0..9
    bad = tmp_path / "bad_labels.npz"
    np.savez(bad, x=x, y=y)
    result = runner.invoke(app, [command, str(path), "--data", str(bad), "-o", str(tmp_path / "o.qfx.onnx")]
                           if command == "quantize" else [command, str(path), "--data", str(bad)])
    assert result.exit_code == 1, result.output
    assert "label 10 is out of range for a model with 10 class outputs" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "o.qfx.onnx").exists()
