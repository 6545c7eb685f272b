"""Unlabelled data (an .npz with only ``x``) and regression targets, through the real CLI.

An autoencoder's data has no labels: inspect, quantize and export-hls work without them and say
there is no accuracy; finetune trains on the input itself only when asked (``--target input``).
Outputs that are not class scores are measured by their MSE against real-valued targets, never by
the argmax accuracy of a classifier.
"""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
import torch
from onnx import helper
from typer.testing import CliRunner

import qfx_onnx
from onnx_builders import make_model, run_ort, value_info
from qfx_onnx.data import load_arrays, score
from qfx_onnx.errors import DataError
from qfx_onnx.quant.annotated import read_annotated
from qfx_onnx_cli.main import app

pytestmark = pytest.mark.usefixtures("one_thread")


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def ok(result):
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    return result.output


def failed(result, *needles):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "error:" in result.output
    for needle in needles:
        assert needle in result.output
    return result.output


@pytest.fixture(scope="module")
def ae(tmp_path_factory):
    """A conv autoencoder on (N, 8, 6, 6) and 64 unlabelled samples, like shared/cases/img8.npz."""
    rng = np.random.default_rng(8)
    folder = tmp_path_factory.mktemp("ae")
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="enc", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["hr"], name="relu"),
             helper.make_node("Conv", ["hr", "w2", "b2"], ["recon"], name="dec", pads=[1, 1, 1, 1])]
    inits = {"w1": (0.2 * rng.standard_normal((4, 8, 3, 3))).astype(np.float32), "b1": np.zeros(4, np.float32),
             "w2": (0.2 * rng.standard_normal((8, 4, 3, 3))).astype(np.float32), "b2": np.full(8, 0.1, np.float32)}
    model = make_model(nodes, [value_info("x", ["N", 8, 6, 6])], ["recon"], initializers=inits)
    onnx.save(model, folder / "ae.onnx")
    x = rng.standard_normal((64, 8, 6, 6)).astype(np.float32)
    np.savez(folder / "img8.npz", x=x)
    np.save(folder / "img8.npy", x)
    target = (0.5 * x).astype(np.float32)
    np.savez(folder / "targets.npz", x=x, y=target)
    np.savez(folder / "split.npz", x=x, train_idx=np.arange(48), test_idx=np.arange(48, 64))
    np.savez(folder / "int_labels.npz", x=x, y=rng.integers(0, 8, 64))
    mse = float(np.mean((run_ort(model, {"x": x})[0].astype(np.float64) - target) ** 2))
    return folder, x, mse


@pytest.fixture(scope="module")
def ae_fixed(ae, tmp_path_factory):
    folder, _, _ = ae
    out = tmp_path_factory.mktemp("q") / "ae.qfx.onnx"
    ok(invoke("quantize", folder / "ae.onnx", "--data", folder / "img8.npz", "-o", out, "--no-verify"))
    return out


def number_after(label: str, text: str) -> float:
    match = re.search(re.escape(label) + r"\s*([-\d.e+]+)", text)
    assert match, f"no {label!r} in {text}"
    return float(match.group(1))


# --- inspect --------------------------------------------------------------------------------------


def test_inspect_unlabelled_shows_the_table_and_says_no_accuracy(ae):
    folder, _, _ = ae
    out = ok(invoke("inspect", folder / "ae.onnx", "--data", folder / "img8.npz"))
    for text in ("enc", "relu", "dec", "(?, 8, 6, 6)", "converted"):
        assert text in out
    assert "float accuracy: none, img8.npz has no labels (y)" in out
    assert "%" not in out


def test_inspect_unlabelled_still_checks_the_input_shape(ae, tmp_path):
    folder, x, _ = ae
    np.savez(tmp_path / "wrong.npz", x=x[:, :, :4, :4])
    failed(invoke("inspect", folder / "ae.onnx", "--data", tmp_path / "wrong.npz"), "wrong.npz", "(axis 2: 4 != 6)")


def test_inspect_real_targets_report_mse_not_accuracy(ae):
    folder, _, mse = ae
    out = ok(invoke("inspect", folder / "ae.onnx", "--data", folder / "targets.npz"))
    assert "accuracy" not in out
    assert number_after("float MSE:", out) == pytest.approx(mse, rel=1e-3)


def test_inspect_integer_labels_do_not_score_a_reconstruction(ae):
    folder, _, _ = ae
    failed(invoke("inspect", folder / "ae.onnx", "--data", folder / "int_labels.npz"),
           "int_labels.npz", "(64,)", "(64, 8, 6, 6)")


@pytest.mark.parametrize("labels", ["float", "int"])
def test_one_output_regressor_is_scored_by_mse(tmp_path, labels):
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["value"], name="fc", transB=1)]
    model = make_model(nodes, [value_info("x", ["N", 5])], ["value"],
                       initializers={"w": rng.standard_normal((1, 5)).astype(np.float32), "b": np.zeros(1, np.float32)})
    onnx.save(model, tmp_path / "reg.onnx")
    x = rng.standard_normal((40, 5)).astype(np.float32)
    y = rng.integers(0, 3, 40) if labels == "int" else rng.standard_normal(40).astype(np.float32)
    np.savez(tmp_path / "reg.npz", x=x, y=y)
    mse = float(np.mean((run_ort(model, {"x": x})[0][:, 0].astype(np.float64) - y) ** 2))
    out = ok(invoke("inspect", tmp_path / "reg.onnx", "--data", tmp_path / "reg.npz"))
    assert "accuracy" not in out
    assert number_after("float MSE:", out) == pytest.approx(mse, rel=1e-3)


# --- quantize -------------------------------------------------------------------------------------


def test_quantize_unlabelled_calibrates_verifies_and_reports(ae, tmp_path):
    folder, _, _ = ae
    out = tmp_path / "ae.qfx.onnx"
    text = ok(invoke("quantize", folder / "ae.onnx", "--data", folder / "img8.npz", "-o", out, "--report", tmp_path / "r.json"))
    assert "accuracy: none, " in text and "img8.npz has no labels (y)" in text
    assert "bit for bit" in text and "recon" in text
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["float_accuracy"] is None and report["fixed_accuracy"] is None and report["verify"]["ok"]
    assert {t["tensor"] for t in report["tensors"]} >= {"x", "h", "hr", "recon", "w1", "w2"}
    assert set(read_annotated(out).fixed_types()) >= {"x", "recon"}


def test_quantize_npy_inputs(ae, tmp_path):
    folder, _, _ = ae
    text = ok(invoke("quantize", folder / "ae.onnx", "--data", folder / "img8.npy", "-o", tmp_path / "a.qfx.onnx"))
    assert "has no labels (y)" in text and "bit for bit" in text


def test_quantize_real_targets_report_float_and_fixed_mse(ae, tmp_path):
    folder, _, mse = ae
    text = ok(invoke("quantize", folder / "ae.onnx", "--data", folder / "img8.npz", "--eval-data", folder / "targets.npz",
                     "-o", tmp_path / "a.qfx.onnx", "--no-verify"))
    assert "accuracy" not in text
    line = next(line for line in text.splitlines() if line.startswith("MSE on "))
    assert "targets.npz" in line
    assert number_after("float", line) == pytest.approx(mse, rel=1e-3)
    fixed = number_after("fixed point", line)
    assert fixed > 0 and fixed == pytest.approx(mse, rel=0.2)


def test_python_api_quantizes_with_unlabelled_data(ae):
    folder, x, mse = ae
    model = qfx_onnx.quantize(folder / "ae.onnx", folder / "img8.npz", weight_bits=6)
    with torch.no_grad():
        out = model(torch.from_numpy(x))
    assert out.shape == (64, 8, 6, 6)
    assert score(out, torch.from_numpy(0.5 * x)).metric == "mse"


# --- export-hls -----------------------------------------------------------------------------------


def test_export_hls_takes_test_vectors_from_unlabelled_data(ae, ae_fixed, tmp_path):
    folder, x, _ = ae
    ok(invoke("export-hls", ae_fixed, "-o", tmp_path / "prj", "--data", folder / "img8.npz", "--test-vectors", 3))
    rows = (tmp_path / "prj" / "tb" / "tb_data" / "input_codes.dat").read_text().splitlines()
    assert len(rows) == 3
    lsb = read_annotated(ae_fixed).fixed_types()["x"].lsb
    for row, sample in zip(rows, x):
        codes = np.array(row.split(), dtype=np.float64)
        np.testing.assert_allclose(codes * lsb, sample.ravel(), atol=lsb / 2)  # the data's rows, not random codes


# --- finetune -------------------------------------------------------------------------------------


@pytest.mark.parametrize("task, needles", [
    ("regression", ("img8.npz: no targets (y)", "--target input")),
    ("classification", ("img8.npz: no labels (y)", "--task regression --target input")),
])
def test_finetune_without_y_names_it_and_the_way_out(ae, ae_fixed, tmp_path, task, needles):
    folder, _, _ = ae
    out = tmp_path / "ft.qfx.onnx"
    failed(invoke("finetune", ae_fixed, "--data", folder / "img8.npz", "-o", out, "--task", task, "--epochs", 1), *needles)
    assert not out.exists()


def test_finetune_target_input_needs_regression(ae, ae_fixed, tmp_path):
    folder, _, _ = ae
    failed(invoke("finetune", ae_fixed, "--data", folder / "img8.npz", "-o", tmp_path / "ft.qfx.onnx", "--target", "input"),
           "--task regression")


def test_finetune_autoencoder_on_its_input(ae, ae_fixed, tmp_path):
    folder, _, _ = ae
    out = tmp_path / "ft.qfx.onnx"
    text = ok(invoke("finetune", ae_fixed, "--data", folder / "split.npz", "-o", out, "--task", "regression",
                     "--target", "input", "--epochs", 2, "--batch-size", 16, "--no-verify"))
    before, after = (float(v) for v in re.findall(r"(?:before|after) loss ([-\d.e+]+)", text))
    assert after < before  # trained towards reconstructing the 16 held-out inputs
    assert set(read_annotated(out).fixed_types()) >= {"x", "recon"}


def test_finetune_autoencoder_without_an_evaluation_split(ae, ae_fixed, tmp_path):
    folder, _, _ = ae
    text = ok(invoke("finetune", ae_fixed, "--data", folder / "img8.npy", "-o", tmp_path / "ft.qfx.onnx",
                     "--task", "regression", "--target", "input", "--epochs", 1, "--no-verify"))
    assert "no test data" in text and "validation: before loss" in text and "test loss" not in text


# --- the data layer -------------------------------------------------------------------------------


def test_real_targets_are_opt_in(ae):
    folder, x, _ = ae
    with pytest.raises(DataError, match="expected integer class labels"):
        load_arrays(folder / "targets.npz")
    _, y = load_arrays(folder / "targets.npz", real_targets=True)
    assert y.dtype == torch.float32 and torch.equal(y, torch.from_numpy(0.5 * x))
    _, labels = load_arrays(folder / "int_labels.npz", real_targets=True)
    assert labels.dtype == torch.int64 and labels.shape == (64,)


def test_score_picks_accuracy_only_for_class_scores():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    assert score(logits, torch.tensor([0, 1, 1])).metric == "accuracy"
    assert score(logits, torch.tensor([0, 1, 1])).value == pytest.approx(2 / 3)
    assert score(logits, torch.zeros(3, 2)).value == pytest.approx((4 + 1 + 9 + 1) / 6)
    assert score(logits[:, :1], torch.tensor([2, 0, 1])).metric == "mse"
    with pytest.raises(DataError, match=r"label 5 is out of range"):
        score(logits, torch.tensor([0, 5, 1]))
    with pytest.raises(DataError, match=r"targets y of shape \(3, 3\) do not fit outputs of shape \(3, 2\)"):
        score(logits, torch.zeros(3, 3))


def test_hook_items_with_real_targets(tmp_path, monkeypatch):
    import sys
    import uuid

    name = f"qfx_reg_hook_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        "import torch\n"
        "from torch.utils.data import Dataset\n"
        "class Items(Dataset):\n"
        "    def __init__(self, kind):\n"
        "        self.kind = kind\n"
        "    def __len__(self):\n"
        "        return 3\n"
        "    def __getitem__(self, i):\n"
        "        x = torch.full((2,), float(i))\n"
        "        return x, (0.5 * x if self.kind == 'vector' else float(i) / 4)\n"
        "def vector():\n"
        "    return Items('vector')\n"
        "def scalar():\n"
        "    return Items('scalar')\n")
    monkeypatch.chdir(tmp_path)
    try:
        _, y = load_arrays(f"{name}:vector", real_targets=True)
        assert y.dtype == torch.float32 and y.tolist() == [[0, 0], [0.5, 0.5], [1, 1]]
        _, y = load_arrays(f"{name}:scalar", real_targets=True)
        assert y.dtype == torch.float32 and y.tolist() == [0, 0.25, 0.5]
        with pytest.raises(DataError, match="label is float"):
            load_arrays(f"{name}:scalar")
    finally:
        sys.modules.pop(name, None)
