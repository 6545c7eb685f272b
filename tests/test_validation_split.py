"""Model selection on validation data, never on test data: the split, the selection, the one
test evaluation, ``val_fraction=0``, an .npz ``val_idx`` split, checkpoints and the CLI labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset
from typer.testing import CliRunner

from qfx_onnx.data import ArrayDataset, load_arrays
from qfx_onnx.errors import DataError, QfxError
from qfx_onnx.importer import load_onnx
from qfx_onnx.quant.annotated import read_annotated, write_annotated
from qfx_onnx.quant.quantize import quantize_graph
from qfx_onnx.train import FinetuneConfig, evaluate, finetune
from qfx_onnx.train import checkpoint as ckpt
from qfx_onnx.train.batches import carve_validation, class_labels, load_task_dataset, validation_indices
from qfx_onnx.train.prepare import set_widths
from qfx_onnx_cli.main import app

MODELS = Path(__file__).resolve().parent.parent / "models"
DATA = MODELS / "digits.npz"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    x, y = load_arrays(DATA, "train")
    xt, yt = load_arrays(DATA, "test")
    return ArrayDataset(x, y, "train"), ArrayDataset(xt, yt, "test")


@pytest.fixture(scope="module")
def mlp_file(tmp_path_factory, digits):
    path = tmp_path_factory.mktemp("models") / "mlp.qfx.onnx"
    write_annotated(quantize_graph(load_onnx(MODELS / "mlp.onnx"), [digits[0].x[:512]]), path, source="mlp.onnx")
    return path


def four_bit(path, train: ArrayDataset):
    model = read_annotated(path)
    set_widths(model, {"weight": 4, "act": 4, "input": 4}, [train.x[:512]], method="mse")
    return model


def head(ds: ArrayDataset, n: int, labels: torch.Tensor | None = None) -> ArrayDataset:
    return ArrayDataset(ds.x[:n], ds.y[:n] if labels is None else labels, f"{ds.source}[:{n}]")


class Counting(Dataset):
    """A dataset that counts how many of its items were read (no tensor fast path)."""

    def __init__(self, ds: ArrayDataset) -> None:
        self.ds, self.reads = ds, 0

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i):
        self.reads += 1
        return self.ds[i]


# ------------------------------------------------------------------------------------- the split
def test_split_is_disjoint_complete_seeded_and_stratified(digits):
    train = digits[0]
    a, b, c = (carve_validation(train, 0.1, seed) for seed in (3, 3, 4))
    n = len(train)
    assert a.stratified and len(a.val_idx) == round(0.1 * n) and len(a.train) + len(a.val) == n
    assert not set(a.train_idx.tolist()) & set(a.val_idx.tolist())
    assert sorted(a.train_idx.tolist() + a.val_idx.tolist()) == list(range(n))
    assert torch.equal(a.val_idx, b.val_idx) and not torch.equal(a.val_idx, c.val_idx)
    assert torch.equal(a.val.x, train.x[a.val_idx]) and torch.equal(a.train.y, train.y[a.train_idx])
    # each class keeps its share: within one sample of fraction * class size
    for cls in range(10):
        size = int((train.y == cls).sum())
        assert abs(int((a.val.y == cls).sum()) - 0.1 * size) < 1, cls


def test_stratification_holds_on_skewed_labels():
    labels = torch.tensor([0] * 90 + [1] * 10)
    for seed in range(5):
        idx = validation_indices(100, 0.2, seed, labels)
        assert int((labels[idx] == 0).sum()) == 18 and int((labels[idx] == 1).sum()) == 2
    plain = [validation_indices(100, 0.2, s) for s in range(20)]
    assert any(int((labels[i] == 1).sum()) != 2 for i in plain)  # unstratified draws do stray


def test_labels_only_for_class_targets():
    x = torch.randn(20, 3)
    assert class_labels(TensorDataset(x, torch.randn(20, 2))) is None          # regression
    assert class_labels(TensorDataset(x, x)) is None                            # --target input
    assert class_labels(TensorDataset(x)) is None                               # unlabelled
    hook = [(x[i], i % 4) for i in range(20)]                                    # a hook's plain list
    assert torch.equal(class_labels(hook), torch.arange(20) % 4)
    split = carve_validation(TensorDataset(x, torch.randn(20, 2)), 0.25, 0)
    assert not split.stratified and len(split.val) == 5 and isinstance(split.val, TensorDataset)


def test_too_small_to_split_is_an_error():
    with pytest.raises(DataError, match="too few"):
        validation_indices(1, 0.1, 0)


# ----------------------------------------------------------------------------- the selection
def test_the_test_data_is_read_once_after_selection(mlp_file, digits):
    train, test = head(digits[0], 256), Counting(head(digits[1], 90))
    result = finetune(read_annotated(mlp_file), train, test, FinetuneConfig(epochs=3, batch_size=32))
    assert test.reads == len(test)  # one pass: the final evaluation, nothing per epoch
    assert result.final == evaluate(result.model, head(digits[1], 90))
    assert result.split["kind"] == "carved" and result.split["val_samples"] == 26 and result.split["train_samples"] == 230
    assert all("val_loss" in r for r in result.history) and not any(k.startswith("eval_") for r in result.history for k in r)
    assert result.validation == {k[4:]: v for k, v in result.history[result.best_epoch].items() if k.startswith("val_")} | {"count": 26}


def test_selection_follows_validation_when_test_disagrees(mlp_file, digits):
    """Validation V has the real labels; T holds the same images with every label shifted, so the
    epoch that scores best on T is another one. The run given V to validate on and T to test must
    keep V's epoch, and report T's score of that epoch."""
    train = head(digits[0], 256)
    v = head(digits[1], 120)
    t = head(digits[1], 120, labels=(digits[1].y[:120] + 1) % 10)
    config = FinetuneConfig(epochs=4, batch_size=32, lr=3e-3)
    on_v = finetune(four_bit(mlp_file, train), train, None, config, val=v)
    on_t = finetune(four_bit(mlp_file, train), train, None, config, val=t)
    assert on_v.best_epoch != on_t.best_epoch  # the two sets disagree (else this test shows nothing)

    run = finetune(four_bit(mlp_file, train), train, t, config, val=v)
    assert run.best_epoch == on_v.best_epoch
    for key, value in on_v.model.state_dict().items():
        assert torch.equal(run.model.state_dict()[key], value), key
    assert run.final == evaluate(on_v.model, t) and run.validation == on_v.validation


def test_patience_stops_on_validation(mlp_file, digits):
    train = head(digits[0], 256)
    v = head(digits[1], 120)
    t = head(digits[1], 120, labels=(digits[1].y[:120] + 1) % 10)
    result = finetune(four_bit(mlp_file, train), train, t, FinetuneConfig(epochs=8, batch_size=32, lr=3e-3, patience=1), val=v)
    accs = [r["val_accuracy"] for r in result.history]
    # stopped at the first epoch that did not beat the best validation epoch so far
    first_worse = next(e for e in range(1, len(accs)) if accs[e] <= max(accs[:e]))
    assert result.stopped_early and result.epochs_run == first_worse


def test_val_fraction_zero_keeps_the_last_epoch(mlp_file, digits):
    train, test = head(digits[0], 256), Counting(head(digits[1], 60))
    result = finetune(read_annotated(mlp_file), train, test, FinetuneConfig(epochs=2, batch_size=32, val_fraction=0))
    assert result.best_epoch == result.epochs_run == 2 and result.validation is None and result.initial is None
    assert result.split == {"kind": "none", "val_samples": 0, "stratified": False, "val_fraction": 0, "train_samples": 256}
    assert not any(k.startswith("val_") for r in result.history for k in r)
    assert test.reads == len(test)
    with pytest.raises(QfxError, match="--patience"):
        finetune(read_annotated(mlp_file), train, None, FinetuneConfig(epochs=1, val_fraction=0, patience=2))
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(QfxError, match="--val-fraction"):
            finetune(read_annotated(mlp_file), train, None, FinetuneConfig(val_fraction=bad))


def test_a_dataloader_needs_explicit_validation(mlp_file, digits):
    train = head(digits[0], 128)
    loader = DataLoader(train, batch_size=32)
    with pytest.raises(QfxError, match="DataLoader cannot be split"):
        finetune(read_annotated(mlp_file), loader, None, FinetuneConfig(epochs=1))
    result = finetune(read_annotated(mlp_file), loader, None, FinetuneConfig(epochs=1), val=head(digits[1], 40))
    assert result.split["kind"] == "given" and result.validation["count"] == 40


def test_regression_splits_without_stratifying(mlp_file, digits):
    onehot = lambda ds: TensorDataset(ds.x, torch.nn.functional.one_hot(ds.y, 10).float() * 4)
    result = finetune(read_annotated(mlp_file), onehot(head(digits[0], 200)), onehot(head(digits[1], 40)),
                      FinetuneConfig(epochs=1, task="regression"))
    assert result.split["kind"] == "carved" and not result.split["stratified"] and result.split["val_samples"] == 20
    assert "val_loss" in result.history[-1] and "val_accuracy" not in result.history[-1]
    assert result.final["count"] == 40


def test_the_split_is_part_of_the_checkpoint_fingerprint(mlp_file, digits, tmp_path):
    train = head(digits[0], 128)
    finetune(read_annotated(mlp_file), train, None, FinetuneConfig(epochs=1, checkpoint_dir=str(tmp_path)))
    saved = ckpt.load(ckpt.checkpoint_path(tmp_path))
    assert saved["fingerprint"]["split"].startswith("carved:0.1:115+13:")
    with pytest.raises(ckpt.CheckpointError, match="other settings"):
        finetune(read_annotated(mlp_file), train, None,
                 FinetuneConfig(epochs=1, val_fraction=0.2, checkpoint_dir=str(tmp_path), resume=True))


# ------------------------------------------------------------------------------ npz val_idx
@pytest.fixture(scope="module")
def npz_files(tmp_path_factory):
    with np.load(DATA, allow_pickle=False) as z:
        x, y, tr, te = z["x"], z["y"], z["train_idx"], z["test_idx"]
    folder = tmp_path_factory.mktemp("data")
    np.savez(folder / "val.npz", x=x, y=y, train_idx=tr[:300], val_idx=tr[300:360], test_idx=te[:100])
    np.savez(folder / "overlap.npz", x=x, y=y, train_idx=tr[:300], val_idx=tr[290:360], test_idx=te[:100])
    np.savez(folder / "no_train.npz", x=x[:50], y=y[:50], val_idx=np.arange(10), test_idx=np.arange(40, 50))
    np.savez(folder / "small.npz", x=x, y=y, train_idx=tr[:300], test_idx=te[:100])
    return folder


def test_npz_val_idx_is_the_validation_split(npz_files):
    path = npz_files / "val.npz"
    val = load_task_dataset(str(path), "val", "classification")
    with np.load(DATA) as z:
        rows = z["train_idx"][300:360]
        np.testing.assert_array_equal(val.y.numpy(), z["y"][rows])
    assert len(load_task_dataset(str(path), "train", "classification")) == 300
    assert load_task_dataset(str(npz_files / "small.npz"), "val", "classification", missing_ok=True) is None
    with pytest.raises(DataError, match="val_idx and train_idx share 10 row"):
        load_task_dataset(str(npz_files / "overlap.npz"), "val", "classification")
    # without train_idx, training is every row that is neither validation nor test
    train = load_task_dataset(str(npz_files / "no_train.npz"), "train", "classification")
    assert len(train) == 30
    ae = load_task_dataset(str(npz_files / "no_train.npz"), "val", "regression", target_input=True)
    assert isinstance(ae, TensorDataset) and len(ae) == 10 and torch.equal(ae.tensors[0], ae.tensors[1])


# ------------------------------------------------------------------------------------- the CLI
def invoke(*args) -> str:
    result = CliRunner().invoke(app, ["finetune", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.output


def test_cli_labels_the_one_test_evaluation(mlp_file, npz_files, tmp_path):
    common = ("--epochs", 2, "--batch-size", 50, "--no-verify")
    text = invoke(mlp_file, "--data", npz_files / "small.npz", "-o", tmp_path / "a.onnx", *common)
    assert "selected on validation (30 samples carved from the training data, stratified by class)" in text
    assert "test accuracy (evaluated once, after selection on validation): " in text and "on 100 samples" in text
    assert "epoch 1/2: train loss" in text and " val " in text

    text = invoke(mlp_file, "--data", npz_files / "val.npz", "-o", tmp_path / "b.onnx", *common)
    assert "(60 samples of the data's val_idx split)" in text
    assert "test accuracy (evaluated once, after selection on validation)" in text

    text = invoke(mlp_file, "--data", npz_files / "small.npz", "-o", tmp_path / "c.onnx", "--val-fraction", 0, *common)
    assert "--val-fraction 0" in text and "last epoch 2 kept (no validation data, no selection)" in text
    assert "test accuracy (evaluated once, last epoch, no selection)" in text and "validation:" not in text

    result = CliRunner().invoke(app, ["finetune", str(mlp_file), "--data", str(npz_files / "val.npz"), "-o",
                                      str(tmp_path / "d.onnx"), "--val-fraction", "0.2"])
    assert result.exit_code == 1 and "has a val_idx split" in result.output


@pytest.mark.parametrize("wrapped", [False, True])
def test_non_finite_training_samples_are_refused_naming_the_row(wrapped):
    """NaN inside a Dataset given to the finetune API: refused before it is trained on, naming the
    row, for tensor-backed datasets (checked once) and any other map-style dataset (per batch)."""
    import numpy as np
    from torch.utils.data import Dataset, TensorDataset

    import qfx_onnx
    from qfx_onnx.errors import DataError
    from qfx_onnx.train import FinetuneConfig, finetune

    with np.load(Path(__file__).resolve().parents[1] / "models" / "digits.npz") as z:
        x, y = torch.from_numpy(z["x"][:60]), torch.from_numpy(z["y"][:60])
    model = qfx_onnx.quantize(Path(__file__).resolve().parents[1] / "models" / "mlp.onnx", x)
    bad = x.clone()
    bad[37, 0, 3, 3] = float("nan")
    tensors = TensorDataset(bad, y)
    data = tensors
    if wrapped:
        class Plain(Dataset):
            def __len__(self):
                return len(tensors)

            def __getitem__(self, i):
                return tensors[i]
        data = Plain()
    with pytest.raises(DataError, match="training data: sample 37 holds NaN or infinite values"):
        finetune(model, data, config=FinetuneConfig(epochs=1, val_fraction=0, batch_size=16))
