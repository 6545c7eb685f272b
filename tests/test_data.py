"""qfx_onnx.data: every input form, split handling, and every bad input raising a one-line DataError."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from qfx_onnx.data import ArrayDataset, check_matches_model, load_arrays, load_dataset
from qfx_onnx.errors import DataError, QfxError

X = np.arange(5 * 1 * 2 * 2, dtype=np.float32).reshape(5, 1, 2, 2) / 8
Y = np.array([3, 1, 4, 1, 5], dtype=np.int64)


def npz(tmp_path: Path, name: str = "d.npz", **arrays: np.ndarray) -> Path:
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def raises(match: str, spec, split=None) -> str:
    """Assert load_arrays(spec, split) raises a one-line DataError matching ``match``."""
    with pytest.raises(DataError, match=match) as info:
        load_arrays(spec, split)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- .npz and .npy ------------------------------------------------------------------------------


def test_npz_with_labels_and_splits(tmp_path: Path) -> None:
    path = npz(tmp_path, x=X, y=Y, train_idx=np.array([0, 2, 4]), test_idx=np.array([1, 3]), note=np.array("extra keys are ignored"))
    x, y = load_arrays(path)
    assert x.dtype == torch.float32 and x.shape == (5, 1, 2, 2) and torch.equal(x, torch.from_numpy(X))
    assert y.dtype == torch.int64 and y.tolist() == Y.tolist()
    x, y = load_arrays(str(path), "train")
    assert torch.equal(x, torch.from_numpy(X[[0, 2, 4]])) and y.tolist() == [3, 4, 5]
    x, y = load_arrays(path, "test")
    assert torch.equal(x, torch.from_numpy(X[[1, 3]])) and y.tolist() == [1, 1]
    dataset = load_dataset(path, "test")
    assert isinstance(dataset, ArrayDataset) and len(dataset) == 2
    item_x, item_y = dataset[1]
    assert torch.equal(item_x, torch.from_numpy(X[3])) and int(item_y) == 1


def test_npz_without_labels_and_integer_inputs(tmp_path: Path) -> None:
    pixels = np.arange(12, dtype=np.uint8).reshape(3, 4)
    x, y = load_arrays(npz(tmp_path, x=pixels))
    assert y is None and x.dtype == torch.float32 and x.tolist() == pixels.astype(np.float32).tolist()
    dataset = load_dataset(npz(tmp_path, "u.npz", x=pixels))
    assert isinstance(dataset[0], torch.Tensor) and dataset[0].shape == (4,)


def test_npy_inputs_only(tmp_path: Path) -> None:
    path = tmp_path / "inputs.npy"
    np.save(path, X.astype(np.float64))
    x, y = load_arrays(path)
    assert y is None and x.dtype == torch.float32 and torch.equal(x, torch.from_numpy(X))
    raises(r"inputs\.npy: a \.npy file holds inputs only and has no 'train' split", path, "train")


def test_shipped_digits_load() -> None:
    digits = Path(__file__).resolve().parents[1] / "models" / "digits.npz"
    x, y = load_arrays(digits, "test")
    assert x.shape == (360, 1, 8, 8) and y.shape == (360,)
    check_matches_model(x, ["batch", 1, 8, 8])


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"y": Y}, r"d\.npz: missing key 'x' \(found: y\)"),
        ({"x": np.array(["a", "b"])}, r"d\.npz: key 'x' has dtype <U1; expected a numeric"),
        ({"x": X.astype(np.complex64)}, r"key 'x' has dtype complex64"),
        ({"x": np.float32(1.0)}, r"key 'x' has shape \(\); expected at least one sample"),
        ({"x": np.zeros((0, 4), np.float32)}, r"key 'x' has shape \(0, 4\)"),
        ({"x": np.array([[1.0, np.nan]])}, r"key 'x' holds NaN or infinite values"),
        ({"x": np.array([[1e300]])}, r"key 'x' holds NaN or infinite values"),
        ({"x": X, "y": Y.astype(np.float32)}, r"key 'y' has dtype float32; expected integer class labels"),
        ({"x": X, "y": Y[:4]}, r"key 'y' has shape \(4,\); expected \(5,\)"),
        ({"x": X, "y": -Y}, r"key 'y' holds negative labels"),
        ({"x": np.array([object(), 1], dtype=object)}, r"d\.npz: holds pickled objects"),
    ],
)
def test_npz_errors(tmp_path: Path, arrays: dict, match: str) -> None:
    raises(match, npz(tmp_path, **arrays))


@pytest.mark.parametrize(
    ("idx", "match"),
    [
        (np.array([0, 5]), r"key 'train_idx' holds indices outside 0\.\.4"),
        (np.array([-1]), r"key 'train_idx' holds indices outside"),
        (np.array([0.0, 1.0]), r"key 'train_idx' has dtype float64; expected integer row indices"),
        (np.array([[0, 1]]), r"key 'train_idx' has shape \(1, 2\)"),
        (np.array([], dtype=np.int64), r"key 'train_idx' has shape \(0,\)"),
    ],
)
def test_split_index_errors(tmp_path: Path, idx: np.ndarray, match: str) -> None:
    path = npz(tmp_path, x=X, y=Y, train_idx=idx)
    raises(match, path, "train")
    load_arrays(path)  # without a split the index array is not read


def test_split_errors(tmp_path: Path) -> None:
    path = npz(tmp_path, x=X, y=Y, train_idx=np.array([0, 1]))
    raises(r"d\.npz: split 'test' asked for, but key 'test_idx' is missing", path, "test")
    raises(r"d\.npz: unknown split 'valid'", path, "valid")


def test_file_errors(tmp_path: Path) -> None:
    raises(r"nothere\.npz: no such file", tmp_path / "nothere.npz")
    raises(r"nothere\.npy: no such file", tmp_path / "nothere.npy")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    raises(r"junk\.npz: not a \.npz file \(not a zip archive\)", tmp_path / "junk.npz")
    (tmp_path / "junk.npy").write_bytes(b"\x93NUMPY garbage")
    raises(r"junk\.npy: not a readable \.npy file", tmp_path / "junk.npy")
    (tmp_path / "pickle.npy").write_bytes(pickle.dumps({"x": [1, 2]}))
    raises(r"pickle\.npy: not a \.npy file \(no NumPy header\)", tmp_path / "pickle.npy")
    (tmp_path / "pickle.npz").write_bytes(pickle.dumps({"x": [1, 2]}))
    raises(r"pickle\.npz: not a \.npz file", tmp_path / "pickle.npz")
    (tmp_path / "folder.npz").mkdir()
    raises(r"folder\.npz: not a regular file", tmp_path / "folder.npz")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    raises(r"objects\.npy: holds pickled objects", tmp_path / "objects.npy")
    (tmp_path / "data.csv").write_text("1,2\n")
    raises(r"data\.csv: not a dataset spec", tmp_path / "data.csv")
    raises(r"not a spec: not a dataset spec", "not a spec")


def test_data_error_is_a_qfx_error() -> None:
    assert issubclass(DataError, QfxError)


# --- module:function hooks ---------------------------------------------------------------------


@pytest.fixture
def hook_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Write a module into a fresh working directory; return a function making it from source."""
    monkeypatch.chdir(tmp_path)
    names: list[str] = []

    def make(source: str) -> str:
        name = f"qfx_test_hook_{uuid.uuid4().hex}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        names.append(name)
        return name

    yield make
    for name in names:
        sys.modules.pop(name, None)


HOOKS = """
    import torch
    from torch.utils.data import Dataset, IterableDataset

    class Pairs(Dataset):
        def __init__(self, n, labelled=True, shape=(1, 2, 2)):
            self.n, self.labelled, self.shape = n, labelled, shape
        def __len__(self):
            return self.n
        def __getitem__(self, i):
            x = torch.full(self.shape, float(i))
            return (x, i % 3) if self.labelled else x

    class Mixed(Pairs):
        def __getitem__(self, i):
            x = torch.zeros(2)
            return (x, 0) if i == 0 else x

    class Ragged(Pairs):
        def __getitem__(self, i):
            return torch.zeros(2 + i)

    class FloatLabel(Pairs):
        def __getitem__(self, i):
            return torch.zeros(2), 0.5

    class Broken(Pairs):
        def __getitem__(self, i):
            raise KeyError(i)

    class Stream(IterableDataset):
        def __iter__(self):
            yield torch.zeros(2)

    def labelled():
        return Pairs(4)

    def unlabelled():
        return Pairs(3, labelled=False)

    def by_split(split=None):
        return Pairs({"train": 6, "test": 2, None: 8}[split])

    def numpy_items():
        import numpy as np
        class NumpyItems(Pairs):
            def __getitem__(self, i):
                return np.full((3,), i, dtype=np.int16), np.int64(i)
        return NumpyItems(2)

    def failing():
        raise RuntimeError("database\\nunreachable")

    def not_a_dataset():
        return [1, 2, 3]

    def stream():
        return Stream()

    def empty():
        return Pairs(0)

    def mixed():
        return Mixed(2)

    def ragged():
        return Ragged(2)

    def float_label():
        return FloatLabel(2)

    def broken():
        return Broken(2)

    VALUE = 3
"""


def test_hook_forms(hook_module) -> None:
    mod = hook_module(HOOKS)
    x, y = load_arrays(f"{mod}:labelled")
    assert x.shape == (4, 1, 2, 2) and x.dtype == torch.float32 and y.tolist() == [0, 1, 2, 0]
    assert x[:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0, 3.0]
    x, y = load_arrays(f"{mod}:unlabelled")
    assert x.shape == (3, 1, 2, 2) and y is None
    assert len(load_arrays(f"{mod}:by_split", "train")[0]) == 6
    assert len(load_arrays(f"{mod}:by_split", "test")[0]) == 2
    assert len(load_arrays(f"{mod}:by_split")[0]) == 8
    x, y = load_arrays(f"{mod}:numpy_items")
    assert x.dtype == torch.float32 and x.tolist() == [[0, 0, 0], [1, 1, 1]] and y.tolist() == [0, 1]
    assert len(load_dataset(f"{mod}:labelled")) == 4


@pytest.mark.parametrize(
    ("func", "split", "match"),
    [
        ("failing", None, r":failing: the hook raised RuntimeError: database unreachable$"),
        ("labelled", "train", r":labelled: the hook raised TypeError: .*split"),
        ("missing", None, r"has no function 'missing'"),
        ("VALUE", None, r"has no function 'VALUE'"),
        ("not_a_dataset", None, r"the hook returned list; expected a map-style torch\.utils\.data\.Dataset"),
        ("stream", None, r"the hook returned Stream; expected a map-style"),
        ("empty", None, r":empty: the dataset is empty"),
        ("mixed", None, r"dataset\[1\] lacks a label, unlike dataset\[0\]"),
        ("ragged", None, r"dataset\[1\]: input has shape \(3,\), unlike dataset\[0\] with \(2,\)"),
        ("float_label", None, r"dataset\[0\]: label is float; expected an integer class index"),
        ("broken", None, r"dataset\[0\] raised KeyError: 0"),
    ],
)
def test_hook_errors(hook_module, func: str, split: str | None, match: str) -> None:
    raises(match, f"{hook_module(HOOKS)}:{func}", split)


def test_hook_module_errors(hook_module) -> None:
    raises(r"no_such_module_qfx:f: cannot import module 'no_such_module_qfx' \(ModuleNotFoundError", "no_such_module_qfx:f")
    bad = hook_module("raise ValueError('import-time failure')\n")
    raises(rf"{bad}:f: cannot import module '{bad}' \(ValueError: import-time failure\)", f"{bad}:f")
    raises(r"mod:f:g: not a dataset spec", "mod:f:g")
    raises(r"mod:f\(\): not a dataset spec", "mod:f()")


def test_runtime_does_not_import_sklearn() -> None:
    code = "import sys, qfx_onnx.data; sys.exit('sklearn' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# --- check_matches_model ------------------------------------------------------------------------


def test_check_matches_model() -> None:
    x = torch.zeros(7, 1, 8, 8)
    check_matches_model(x, [None, 1, 8, 8])
    check_matches_model(x, ["batch", 1, 8, 8])
    check_matches_model(x, [1, 1, None, "w"])  # a fixed batch is fed in chunks: not compared
    check_matches_model(np.zeros((2, 3)), [None, 3])
    with pytest.raises(DataError, match=r"^digits\.npz: samples of shape \(7, 1, 8, 8\) do not fit the model input \(\?, 1, 28, 28\) \(axis 2: 8 != 28\)$"):
        check_matches_model(x, ["batch", 1, 28, 28], source="digits.npz")
    with pytest.raises(DataError, match=r"^data: samples of shape \(7, 1, 8, 8\) have rank 4, but the model input \(\?, 64\) has rank 2$"):
        check_matches_model(x, [None, 64])
    with pytest.raises(DataError, match=r"axis 1: 1 != 3"):
        check_matches_model(x, [None, 3, 8, 8])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("kind", ["tensor", "numpy"])
def test_non_finite_inputs_given_to_the_api_name_the_sample(bad, kind):
    import qfx_onnx

    x = np.random.default_rng(0).random((20, 1, 8, 8)).astype(np.float32)
    x[13, 0, 2, 5] = bad
    data = torch.from_numpy(x) if kind == "tensor" else x
    with pytest.raises(DataError, match=r"calibration data holds NaN or infinite values in 1 sample\(s\), the first at index 13"):
        qfx_onnx.quantize(Path(__file__).resolve().parents[1] / "models" / "mlp.onnx", data)


def test_non_finite_inputs_from_a_hook_name_the_sample(tmp_path, monkeypatch):
    (tmp_path / "nanhook.py").write_text(
        "import torch\n"
        "from torch.utils.data import TensorDataset\n"
        "def make():\n"
        "    x = torch.zeros(6, 3)\n"
        "    x[4, 1] = float('nan')\n"
        "    return TensorDataset(x, torch.zeros(6, dtype=torch.long))\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"nanhook:make: inputs holds NaN or infinite values in 1 sample\(s\), the first at index 4"):
        load_arrays("nanhook:make")
