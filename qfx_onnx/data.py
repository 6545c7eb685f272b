"""Calibration and evaluation data: ``.npz`` / ``.npy`` files or a ``module:function`` hook.

A dataset spec is one of

* ``path/to/data.npz`` with key ``x`` (inputs, batch first) and optionally ``y`` (integer class
  labels, or with ``real_targets=True`` real-valued targets) and ``train_idx`` / ``test_idx`` (row
  indices selecting a split). Other keys are ignored.
* ``path/to/inputs.npy``: inputs only, no labels, no splits.
* ``package.module:function``: a function returning a map-style ``torch.utils.data.Dataset`` whose
  items are ``(x, y)`` or ``x``. It is called as ``function()``, or ``function(split=...)`` when a
  split is asked for. The current directory is importable while the module loads.

Data without ``y`` is unlabelled: it calibrates, verifies and feeds test vectors, but measures no
accuracy. :func:`score` decides how outputs are measured against ``y``: accuracy for class labels
against class scores, mean squared error otherwise.

Files are always read with ``allow_pickle=False``. Every problem is reported as a
:class:`~qfx_onnx.errors.DataError` whose one-line message names the file (or hook) and the problem.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset

from qfx_onnx.errors import DataError

SPLITS = ("train", "test")
_HOOK_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")


class ArrayDataset(Dataset):
    """Inputs (and labels) held as tensors; items are ``(x[i], y[i])``, or ``x[i]`` without labels.

    ``x`` is float32 with at least one dimension (the batch); ``y`` is int64 of shape ``(len(x),)``
    (class labels), float32 of shape ``(len(x), ...)`` (real targets) or None. ``source`` names
    where the data came from, for messages.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor | None, source: str) -> None:
        self.x = x
        self.y = y
        self.source = source

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> Any:
        return self.x[i] if self.y is None else (self.x[i], self.y[i])


def load_dataset(spec: str | os.PathLike, split: str | None = None, *, real_targets: bool = False) -> Dataset:
    """Open the dataset named by ``spec`` (see module docstring), restricted to ``split``.

    ``split`` is ``"train"``, ``"test"`` or None (every row). For files the result is an
    :class:`ArrayDataset` whose inputs are finite float32 and whose labels, if any, are
    non-negative int64 of matching length; with ``real_targets`` a ``y`` that is not such a label
    vector is accepted as finite float32 targets of ``len(x)`` rows instead (see :func:`score`).
    For a hook it is the hook's own map-style dataset,
    checked only for having a length; its items are validated by :func:`load_arrays`.
    Raises DataError for a bad spec, split, file, key, dtype or shape, and for a failing hook.
    """
    if split is not None and split not in SPLITS:
        raise DataError(f"{spec}: unknown split {split!r}; expected one of {', '.join(SPLITS)} or none")
    text = os.fspath(spec)
    suffix = Path(text).suffix.lower()
    if suffix == ".npz":
        return _load_npz(Path(text), split, real_targets)
    if suffix == ".npy":
        if split is not None:
            raise DataError(f"{text}: a .npy file holds inputs only and has no {split!r} split; use an .npz with {split}_idx")
        x = _as_inputs(_read_npy(Path(text)), text)
        return ArrayDataset(x, None, text)
    if _HOOK_RE.match(text):
        return _load_hook(text, split)
    raise DataError(f"{text}: not a dataset spec; expected a .npz or .npy file, or module:function")


def load_arrays(spec: str | os.PathLike, split: str | None = None, *,
                real_targets: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """All rows of ``load_dataset(spec, split, real_targets=...)`` as tensors ``(x, y)``.

    ``x`` is float32 of shape ``(N, *sample_shape)`` with N >= 1 and finite values; ``y`` is
    int64 of shape ``(N,)`` with non-negative values, or None when the data has no labels. With
    ``real_targets``, a ``y`` that is not such a label vector (floats, negative or multi-column
    integers) is float32 of shape ``(N, ...)`` instead. Hook items must all be ``(x, y)`` or all
    ``x``, with one sample shape (and one target shape); they are read into memory.
    """
    dataset = load_dataset(spec, split, real_targets=real_targets)
    if isinstance(dataset, ArrayDataset):
        return dataset.x, dataset.y
    return _stack_items(dataset, os.fspath(spec), real_targets)


def check_matches_model(x: torch.Tensor | np.ndarray, input_shape: Sequence[int | str | None], source: str = "data") -> None:
    """Raise DataError unless samples ``x`` (batch first) fit a model input of ``input_shape``.

    ``input_shape`` includes the batch dimension, which is not compared (callers may feed a
    fixed-batch model in chunks). Dimensions that are None or a string (ONNX ``dim_param``) are
    dynamic and match any size; every other dimension must equal the sample's, and the ranks
    must agree. ``source`` names the data in the message.
    """
    data_shape = tuple(x.shape)
    model_shape = tuple(input_shape)
    shown = "(" + ", ".join("?" if _is_dynamic(d) else str(d) for d in model_shape) + ")"
    if len(data_shape) != len(model_shape):
        raise DataError(f"{source}: samples of shape {data_shape} have rank {len(data_shape)}, but the model input {shown} has rank {len(model_shape)}")
    for axis, (have, want) in enumerate(zip(data_shape, model_shape)):
        if axis > 0 and not _is_dynamic(want) and have != int(want):
            raise DataError(f"{source}: samples of shape {data_shape} do not fit the model input {shown} (axis {axis}: {have} != {want})")


@dataclass(frozen=True)
class Score:
    """Outputs measured against targets: ``metric`` is ``"accuracy"`` or ``"mse"``, over ``count`` samples."""

    metric: str
    value: float
    count: int

    @property
    def name(self) -> str:
        return "accuracy" if self.metric == "accuracy" else "MSE"

    def value_text(self) -> str:
        return f"{self.value:.2%}" if self.metric == "accuracy" else f"{self.value:.4g}"


def score(out: torch.Tensor, y: torch.Tensor, source: str = "data") -> Score:
    """Measure model outputs ``out`` (batch first) against targets ``y`` of the same samples.

    Integer class labels of shape ``(N,)`` against class scores ``(N, C)`` with C >= 2 give the
    accuracy of the argmax. Anything else with one target value per output value (real-valued
    targets, an autoencoder's inputs, a 1-output regressor's integer targets) gives the mean
    squared error, so a regression output is never scored as a classification. Raises DataError
    naming ``source`` and both shapes when ``y`` fits neither, or when a label has no class output.
    """
    if (y.dim() == 1 and out.dim() == 2 and out.shape[1] >= 2 and len(y) == len(out)
            and (not y.dtype.is_floating_point or bool((y == y.round()).all()))):  # one whole number per sample: labels
        y = y.to(torch.int64)
        if len(y) and int(y.min()) < 0:
            raise DataError(f"{source}: label {int(y.min())} is negative; class labels are indices 0..{out.shape[1] - 1}")
        if len(y) and int(y.max()) >= out.shape[1]:
            raise DataError(f"{source}: label {int(y.max())} is out of range for a model with {out.shape[1]} class outputs")
        correct = int((out.argmax(dim=1) == y).sum())
        return Score("accuracy", correct / len(y), len(y))
    if out.dim() == 0 or y.shape[:1] != out.shape[:1] or y.numel() != out.numel():
        raise DataError(f"{source}: targets y of shape {tuple(y.shape)} do not fit outputs of shape {tuple(out.shape)}; "
                        "expected integer class labels (N,) for (N, classes) outputs, or one real target per output value")
    err = out.detach().to(torch.float64) - y.to(torch.float64).reshape(out.shape)
    return Score("mse", float((err * err).mean()), len(out))


def _is_dynamic(dim: int | str | None) -> bool:
    return dim is None or isinstance(dim, str)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")


def _read_npy(path: Path) -> np.ndarray:
    _check_file(path)
    with open(path, "rb") as f:
        # np.load falls back to unpickling for unknown content; refuse anything without the header.
        if f.read(6) != b"\x93NUMPY":
            raise DataError(f"{path}: not a .npy file (no NumPy header)")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise DataError(f"{path}: holds pickled objects, which are never loaded") from None
        raise DataError(f"{path}: not a readable .npy file ({_one_line(exc)})") from None
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read ({_one_line(exc)})") from None


def _load_npz(path: Path, split: str | None, real_targets: bool) -> ArrayDataset:
    _check_file(path)
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path}: not a .npz file (not a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = set(archive.files)
            if "x" not in keys:
                raise DataError(f"{path}: missing key 'x' (found: {', '.join(sorted(keys)) or 'none'})")
            wanted = ["x"] + [k for k in ("y", f"{split}_idx") if k in keys]
            arrays = {key: archive[key] for key in wanted}
    except DataError:
        raise
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise DataError(f"{path}: holds pickled objects, which are never loaded") from None
        raise DataError(f"{path}: not a readable .npz file ({_one_line(exc)})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a readable .npz file ({_one_line(exc)})") from None
    x = _as_inputs(arrays["x"], f"{path}: key 'x'")
    y = _as_targets(arrays["y"], len(x), f"{path}: key 'y'", real_targets) if "y" in arrays else None
    if split is not None:
        key = f"{split}_idx"
        if key not in arrays:
            raise DataError(f"{path}: split {split!r} asked for, but key {key!r} is missing")
        idx = _as_indices(arrays[key], len(x), f"{path}: key {key!r}")
        x = x[idx]
        y = None if y is None else y[idx]
    return ArrayDataset(x, y, str(path))


def _as_inputs(array: np.ndarray, where: str) -> torch.Tensor:
    if array.dtype.kind not in "biuf":
        raise DataError(f"{where} has dtype {array.dtype}; expected a numeric (float or integer) array")
    if array.ndim < 1 or array.shape[0] == 0:
        raise DataError(f"{where} has shape {array.shape}; expected at least one sample along axis 0")
    with np.errstate(over="ignore"):  # overflow becomes inf, reported just below
        x = np.ascontiguousarray(array, dtype=np.float32)
    _check_finite(x, where)
    return torch.from_numpy(x)


def _check_finite(x: np.ndarray, where: str) -> None:
    """Raise DataError naming the first sample (row) holding NaN or an infinity."""
    bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1) if x.ndim else ~np.isfinite(x)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise DataError(f"{where} holds NaN or infinite values in {len(rows)} sample(s), the first at index {int(rows[0])} "
                        "(after conversion to float32)")


def as_inputs(x: torch.Tensor | np.ndarray, source: str = "data") -> torch.Tensor:
    """``x`` (samples along axis 0) as a float32 CPU tensor, checked: numeric, at least one
    sample, every value finite. Raises DataError naming ``source`` and the first bad sample."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return _as_inputs(np.asarray(x), source)


def _as_labels(array: np.ndarray, n: int, where: str) -> torch.Tensor:
    if array.dtype.kind not in "iu":
        raise DataError(f"{where} has dtype {array.dtype}; expected integer class labels")
    if array.shape != (n,):
        raise DataError(f"{where} has shape {array.shape}; expected ({n},), one label per input")
    if n and array.min() < 0:
        raise DataError(f"{where} holds negative labels; expected class indices >= 0")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64))


def _as_targets(array: np.ndarray, n: int, where: str, real_targets: bool) -> torch.Tensor:
    """Class labels (int64, ``(n,)``) when ``array`` is one; else, with ``real_targets``, float32 targets."""
    is_labels = array.dtype.kind in "iu" and array.shape == (n,) and not (n and array.min() < 0)
    if not real_targets or is_labels:
        return _as_labels(array, n, where)
    if array.dtype.kind not in "biuf":
        raise DataError(f"{where} has dtype {array.dtype}; expected class labels or real-valued targets")
    if array.ndim < 1 or array.shape[0] != n:
        raise DataError(f"{where} has shape {array.shape}; expected {n} rows, one target per input")
    with np.errstate(over="ignore"):
        y = np.ascontiguousarray(array, dtype=np.float32)
    _check_finite(y, where)
    return torch.from_numpy(y)


def _as_indices(array: np.ndarray, n: int, where: str) -> torch.Tensor:
    if array.dtype.kind not in "iu":
        raise DataError(f"{where} has dtype {array.dtype}; expected integer row indices")
    if array.ndim != 1 or array.shape[0] == 0:
        raise DataError(f"{where} has shape {array.shape}; expected a non-empty 1-D index array")
    if array.min() < 0 or array.max() >= n:
        raise DataError(f"{where} holds indices outside 0..{n - 1}")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64))


def _load_hook(spec: str, split: str | None) -> Dataset:
    module_name, func_name = spec.split(":")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise DataError(f"{spec}: cannot import module {module_name!r} ({_one_line(exc)})") from None
    finally:
        if added:
            sys.path.remove(cwd)
    func = getattr(module, func_name, None)
    if not callable(func):
        raise DataError(f"{spec}: module {module_name!r} has no function {func_name!r}")
    try:
        dataset = func() if split is None else func(split=split)
    except Exception as exc:
        raise DataError(f"{spec}: the hook raised {_one_line(exc)}") from None
    if isinstance(dataset, IterableDataset) or not isinstance(dataset, Dataset) or not hasattr(dataset, "__len__"):
        raise DataError(f"{spec}: the hook returned {type(dataset).__name__}; expected a map-style torch.utils.data.Dataset with a length")
    return dataset


def _stack_items(dataset: Dataset, spec: str, real_targets: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    try:
        n = len(dataset)
    except Exception as exc:
        raise DataError(f"{spec}: len(dataset) raised {_one_line(exc)}") from None
    if n == 0:
        raise DataError(f"{spec}: the dataset is empty")
    xs: list[np.ndarray] = []
    ys: list[Any] = []
    labelled: bool | None = None
    for i in range(n):
        try:
            item = dataset[i]
        except Exception as exc:
            raise DataError(f"{spec}: dataset[{i}] raised {_one_line(exc)}") from None
        has_label = isinstance(item, tuple)
        if has_label and len(item) != 2:
            raise DataError(f"{spec}: dataset[{i}] is a tuple of {len(item)}; expected (x, y) or x")
        if labelled is None:
            labelled = has_label
        elif has_label != labelled:
            raise DataError(f"{spec}: dataset[{i}] {'has' if has_label else 'lacks'} a label, unlike dataset[0]")
        x_item = item[0] if has_label else item
        xs.append(_item_input(x_item, f"{spec}: dataset[{i}]", xs[0].shape if xs else None))
        if has_label:
            where = f"{spec}: dataset[{i}]"
            ys.append(_item_target(item[1], where, ys[0].shape if ys else None) if real_targets else _item_label(item[1], where))
    x = _as_inputs(np.stack(xs), f"{spec}: inputs")
    if not labelled:
        return x, None
    if real_targets:
        return x, _as_targets(np.stack(ys), n, f"{spec}: targets", real_targets=True)
    return x, torch.tensor(ys, dtype=torch.int64)


def _item_input(value: Any, where: str, shape: tuple[int, ...] | None) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "biuf":
        kind = f"array of {value.dtype}" if isinstance(value, np.ndarray) else type(value).__name__
        raise DataError(f"{where}: input is {kind}; expected a numeric tensor or array")
    if shape is not None and value.shape != shape:
        raise DataError(f"{where}: input has shape {value.shape}, unlike dataset[0] with {shape}")
    return value


def _item_target(value: Any, where: str, shape: tuple[int, ...] | None) -> np.ndarray:
    """A hook item's target as an array: a class index or a real-valued scalar/array."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, (bool, int, float, np.number)):
        value = np.asarray(value)
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "biuf":
        kind = f"array of {value.dtype}" if isinstance(value, np.ndarray) else type(value).__name__
        raise DataError(f"{where}: target is {kind}; expected a class index or a numeric tensor or array")
    if shape is not None and value.shape != shape:
        raise DataError(f"{where}: target has shape {value.shape}, unlike dataset[0] with {shape}")
    return value


def _item_label(value: Any, where: str) -> int:
    if isinstance(value, torch.Tensor) and value.ndim == 0 and not (value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool):
        value = int(value.item())
    elif isinstance(value, (np.ndarray, np.integer)) and value.ndim == 0 and value.dtype.kind in "iu":
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"{where}: label is {type(value).__name__}; expected an integer class index")
    if value < 0:
        raise DataError(f"{where}: label {value} is negative; expected a class index >= 0")
    return value
