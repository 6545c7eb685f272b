"""The shipped dataset and demo models: valid ONNX, dynamic batch, and the recorded accuracy."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
DIGITS = MODELS_DIR / "digits.npz"
SUMMARY = json.loads((MODELS_DIR / "accuracy.json").read_text())
NAMES = sorted(SUMMARY["models"])
BN_MODELS = {"cnn", "resnet", "dscnn"}


def session(name: str) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    path = MODELS_DIR / SUMMARY["models"][name]["file"]
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def digits() -> dict[str, np.ndarray]:
    with np.load(DIGITS, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def tracked_models() -> list[str] | None:
    """The ``models/*.onnx`` files git tracks, or None outside a git checkout.

    Never a directory listing: the README's main job writes ``models/cnn.qfx.onnx`` beside the
    shipped models, and a test must not depend on what a user's run left there.
    """
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--", "*.onnx"], cwd=MODELS_DIR, capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return sorted(Path(name).name for name in listed.stdout.decode().split("\0") if name)


def test_every_shipped_model_is_recorded() -> None:
    recorded = sorted(m["file"] for m in SUMMARY["models"].values())
    assert all((MODELS_DIR / name).is_file() for name in recorded)
    shipped = tracked_models()
    if shipped is not None:
        assert shipped == recorded
    assert set(NAMES) == {"mlp", "cnn", "resnet", "dscnn", "transformer"}


def test_dataset_layout(digits: dict[str, np.ndarray]) -> None:
    x, y, train, test = digits["x"], digits["y"], digits["train_idx"], digits["test_idx"]
    assert x.dtype == np.float32 and x.shape == (1797, 1, 8, 8)
    assert y.dtype == np.int64 and y.shape == (1797,) and set(np.unique(y)) == set(range(10))
    assert x.min() == 0.0 and x.max() == 1.0 and np.array_equal(x * 16, np.round(x * 16))
    assert train.dtype == np.int64 and test.dtype == np.int64
    assert (len(train), len(test)) == (SUMMARY["train_samples"], SUMMARY["test_samples"]) == (1437, 360)
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(1797))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(test) > 0)
    # stratified: each class holds its share of the test split to within one image
    assert np.all(np.abs(np.bincount(y[test], minlength=10) - 0.2 * np.bincount(y, minlength=10)) <= 1)
    text = str(digits["attribution"])
    for needle in ("UCI Machine Learning Repository", "CC BY 4.0", "Alpaydin", "Kaynak", "1998"):
        assert needle in text


@pytest.mark.parametrize("name", NAMES)
def test_model_is_valid_onnx_with_recorded_ops(name: str) -> None:
    info = SUMMARY["models"][name]
    model = onnx.load(MODELS_DIR / info["file"])
    onnx.checker.check_model(model, full_check=True)
    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    assert ops == info["ops"]
    assert "Identity" not in ops
    assert model.graph.node[-1].op_type != "Softmax"  # logits, not probabilities
    assert ("Softmax" in ops) == (name == "transformer")  # the attention weights
    assert ("BatchNormalization" in ops) == (name in BN_MODELS)
    assert sum(int(np.prod(t.dims)) for t in model.graph.initializer) == info["initializer_values"]
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits"]
    in_dims = model.graph.input[0].type.tensor_type.shape.dim
    assert in_dims[0].dim_param and [d.dim_value for d in in_dims[1:]] == [1, 8, 8]


@pytest.mark.parametrize("name", NAMES)
def test_model_runs_at_batch_1_and_7(name: str, digits: dict[str, np.ndarray]) -> None:
    sess = session(name)
    x = digits["x"][digits["test_idx"][:7]]
    batch7 = sess.run(["logits"], {"input": x})[0]
    assert batch7.shape == (7, 10) and batch7.dtype == np.float32
    for i in range(7):
        batch1 = sess.run(["logits"], {"input": x[i:i + 1]})[0]
        assert batch1.shape == (1, 10)
        np.testing.assert_allclose(batch1[0], batch7[i], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_model_reaches_recorded_accuracy(name: str, digits: dict[str, np.ndarray]) -> None:
    test = digits["test_idx"]
    logits = session(name).run(["logits"], {"input": digits["x"][test]})[0]
    accuracy = float((logits.argmax(1) == digits["y"][test]).mean())
    recorded = SUMMARY["models"][name]["test_accuracy"]
    assert abs(accuracy - recorded) <= 0.001, f"{name}: {accuracy:.4f} vs recorded {recorded:.4f}"
    assert recorded >= (0.93 if name == "mlp" else 0.95)


def test_readme_table_matches_accuracy_json() -> None:
    readme = (MODELS_DIR / "README.md").read_text()
    for name, info in SUMMARY["models"].items():
        row = re.search(rf"^\| {name} \| `{re.escape(info['file'])}` \| ([\d,]+) \| [\d,]+ \| [^|]+ \| ([\d.]+)% \|", readme, re.M)
        assert row, f"no README row for {name}"
        assert int(row.group(1).replace(",", "")) == info["parameters"]
        assert float(row.group(2)) == pytest.approx(100 * info["test_accuracy"], abs=0.005)
