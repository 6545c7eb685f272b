"""``qfx-onnx inspect`` on annotated models (quantize's and finetune's output), through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import qfx_onnx
from qfx_onnx.data import load_arrays
from qfx_onnx.quant.annotated import read_annotated, verify_annotated, write_annotated
from qfx_onnx.train.prepare import to_khot
from qfx_onnx_cli.main import app

MODELS = Path(__file__).resolve().parents[1] / "models"
DATA = MODELS / "digits.npz"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """An 8-bit MLP with 2-hot weights (float32-exact), a 12-bit one (wide accumulators) and the
    data beside them, as a user would have them."""
    folder = tmp_path_factory.mktemp("inspect")
    x, _ = load_arrays(DATA, "train")
    khot = qfx_onnx.quantize(MODELS / "mlp.onnx", x[:256])
    to_khot(khot, 2, signed_digits=True)
    write_annotated(khot, folder / "khot.qfx.onnx", source="mlp.onnx")
    wide = qfx_onnx.quantize(MODELS / "mlp.onnx", x[:256], weight_bits=12, act_bits=12)
    write_annotated(wide, folder / "wide.qfx.onnx", source="mlp.onnx")
    return folder


def inspect_json(*args) -> dict:
    result = CliRunner().invoke(app, ["inspect", *map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_every_quantized_tensor_in_graph_order_with_khot_and_lossless_types(files):
    path = files / "khot.qfx.onnx"
    report = inspect_json(path)
    model = read_annotated(path)
    tensors = report["tensors"]
    assert report["annotated"] and report["source"] == "mlp.onnx" and report["format_version"] == "1"
    assert [t["tensor"] for t in tensors] == list(model.fixed_types())
    assert [t["type"] for t in tensors] == [str(t) for t in model.fixed_types().values()]
    weights = [t for t in tensors if t["role"] == "weight"]
    assert weights and all(t["khot"] == {"k": 2, "csd": True} for t in weights)
    assert all(t["khot"] is None for t in tensors if t["role"] != "weight")
    # no data: the range is the type's own
    assert all(t["range"] == "type" and t["clipped_fraction"] is None for t in tensors)
    first = model.fixed_types()[tensors[0]["tensor"]]
    assert (tensors[0]["min"], tensors[0]["max"]) == (first.min_value, first.max_value)
    # the lossless type of the value reaching each cast is the one verify compares against
    x, _ = load_arrays(DATA, "test")
    raw_types = {layer.tensor: layer.raw_type for layer in verify_annotated(model, path, x[:4]).layers}
    assert [t["lossless"] for t in tensors] == [raw_types[t["tensor"]] for t in tensors]
    layers = {layer["tensor"]: layer for layer in report["layers"]}
    assert sorted(t["terms"] for t in tensors if t["tensor"] in layers) == sorted(layer["terms"] for layer in layers.values())
    assert any(t["terms"] == 64 and t["lossless"] for t in tensors)  # the first Gemm sums 8x8 inputs
    assert report["not_exact_float32"] == [] and report["score"] is None


def test_float32_exactness_is_verify_s_prediction(files):
    path = files / "wide.qfx.onnx"
    report = inspect_json(path)
    model = read_annotated(path)
    x, _ = load_arrays(DATA, "test")
    check = verify_annotated(model, path, x[:8])
    expected = [layer.tensor for layer in check.layers if not layer.predicted_exact and layer.role != "output"]
    assert expected, "the 12-bit model should have accumulators wider than float32's 24 bits"
    assert report["not_exact_float32"] == expected
    reasons = {t["tensor"]: t["reason"] for t in report["tensors"] if not t["exact_float32"]}
    assert all("24 bits" in reason for reason in reasons.values())
    text = CliRunner().invoke(app, ["inspect", str(path)])
    assert text.exit_code == 0, text.output
    assert f"{len(expected)} not guaranteed exact in float32 onnxruntime" in text.output
    assert all(f"not guaranteed exact in float32 onnxruntime: {name}" in text.output for name in expected)


def test_ranges_and_fixed_point_accuracy_on_labelled_data(files):
    path = files / "khot.qfx.onnx"
    report = inspect_json(path, "--data", DATA)
    model = read_annotated(path)
    x, y = load_arrays(DATA, "test")
    logits = model.predict(x)
    assert report["score"]["metric"] == "accuracy" and report["score"]["samples"] == len(x)
    assert report["score"]["value"] == pytest.approx((logits.argmax(1) == y).double().mean().item(), abs=0)
    first = report["tensors"][0]  # the input: observed on the data
    assert first["range"] == "observed" and (first["min"], first["max"]) == (float(x.min()), float(x.max()))
    assert all(t["range"] == "observed" for t in report["tensors"])
    text = CliRunner().invoke(app, ["inspect", str(path), "--data", str(DATA)])
    assert text.exit_code == 0, text.output
    assert f"fixed-point accuracy: {report['score']['value']:.2%} ({len(x)} samples of digits.npz)" in text.output
    assert "K=2 CSD" in text.output and "resource estimate" in text.output


def test_unlabelled_data_gives_ranges_and_no_score(files, tmp_path):
    x, _ = load_arrays(DATA, "test")
    npy = tmp_path / "x.npy"
    np.save(npy, x.numpy())
    result = CliRunner().invoke(app, ["inspect", str(files / "khot.qfx.onnx"), "--data", str(npy)])
    assert result.exit_code == 0, result.output
    assert "fixed-point accuracy: none, x.npy has no labels (y)" in result.output


def test_estimate_is_export_hls_s(files, tmp_path):
    path = files / "khot.qfx.onnx"
    report = inspect_json(path, "--reuse-factor", "2")
    exported = CliRunner().invoke(app, ["export-hls", str(path), "-o", str(tmp_path / "prj"), "--reuse-factor", "2",
                                        "--json", "--data", str(DATA)])
    assert exported.exit_code == 0, exported.output
    assert report["estimate"] == json.loads(exported.stdout)["estimate"]
    assert report["estimate"]["totals"]["shift_add_terms"] > 0  # the K-hot weights are shift-adds
    assert not any(p.name == "prj" for p in files.iterdir())  # inspect writes nothing


def test_float_models_are_inspected_as_before(files):
    result = CliRunner().invoke(app, ["inspect", str(MODELS / "mlp.onnx"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["supported"] and "annotated" not in report and report["nodes"]


def test_quiet_prints_the_final_line_only(files):
    result = CliRunner().invoke(app, ["inspect", str(files / "khot.qfx.onnx"), "-q"])
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines() == [result.output.strip()]
    assert "quantized tensors, 0 not guaranteed exact" in result.output

