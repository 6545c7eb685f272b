"""Batches for finetuning: a seeded global-batch order, sharded across ranks, resumable mid-epoch.

For a map-style dataset of ``n`` samples, epoch ``e`` uses the permutation drawn from a generator
seeded with ``(seed, e)`` alone, cut into global batches of ``batch_size`` (the last may be
shorter). Rank ``r`` of ``world`` takes the ``r``-th of the ``world`` contiguous near-equal parts
of every global batch (``torch.tensor_split``), so one process with batch B and N processes with
batch B see the same samples in every step. The order is a pure function of (seed, epoch), which
makes resuming at any step exact.

A rank whose part of a short last batch is empty gets one placeholder sample with weight 0 (it
must still run the forward and backward pass that DDP synchronises on).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset, default_collate

from qfx_onnx.data import ArrayDataset
from qfx_onnx.errors import DataError


@dataclass
class Batch:
    """One step's local inputs and targets; ``size`` real samples here, ``global_size`` in all
    ranks together (0 real samples marks a placeholder)."""

    x: torch.Tensor
    y: torch.Tensor | None
    size: int
    global_size: int


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of ``epoch``: a permutation of ``range(n)`` fixed by ``(seed, epoch)``."""
    gen = torch.Generator()
    gen.manual_seed((int(seed) * 1_000_003 + int(epoch)) % (2**63))
    return torch.randperm(n, generator=gen)


def shard(indices: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous part of one global batch."""
    return torch.tensor_split(indices, world)[rank]


class ShardedBatches:
    """Iterates one epoch of local batches of a map-style dataset (see the module docstring)."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 shuffle: bool = True, num_workers: int = 0) -> None:
        try:
            self.n = len(dataset)  # type: ignore[arg-type]
        except TypeError:
            raise DataError("training data must be a map-style Dataset with a length, or a DataLoader") from None
        if self.n == 0:
            raise DataError("the training set is empty")
        self.dataset, self.batch_size, self.seed = dataset, int(batch_size), int(seed)
        self.rank, self.world, self.shuffle, self.num_workers = rank, world, shuffle, num_workers
        self.tensors = _tensors_of(dataset)
        if self.tensors is not None:  # checked once; other datasets batch by batch as they are read
            for t in self.tensors:
                check_finite_rows(t, torch.arange(len(t)), "training data")

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """The local batches of ``epoch`` from step ``start`` on."""
        order = epoch_order(self.n, self.seed, epoch) if self.shuffle else torch.arange(self.n)
        plan = []
        for step in range(start, len(self)):
            glob = order[step * self.batch_size:(step + 1) * self.batch_size]
            local = shard(glob, self.rank, self.world)
            plan.append((local if len(local) else glob[:1], len(local), len(glob)))
        if self.tensors is not None:
            for idx, size, global_size in plan:
                x, y = (t[idx] for t in self.tensors) if self.tensors[1] is not None else (self.tensors[0][idx], None)
                yield Batch(x, y, size, global_size)
            return
        loader = DataLoader(self.dataset, batch_sampler=[p[0].tolist() for p in plan],
                            num_workers=self.num_workers, collate_fn=default_collate)
        for (idx, size, global_size), item in zip(plan, loader):
            x, y = split_item(item)
            check_finite_rows(x, idx, "training data")
            if y is not None:
                check_finite_rows(y, idx, "training targets")
            yield Batch(x, y, size, global_size)


def check_finite_rows(t: torch.Tensor, rows: torch.Tensor, what: str) -> None:
    """Raise DataError naming the dataset row of the first sample of ``t`` (rows ``rows``) that
    holds NaN or an infinity; integer tensors always pass."""
    if not t.is_floating_point() or t.numel() == 0:
        return
    bad = ~torch.isfinite(t.reshape(len(t), -1)).all(dim=1)
    if bool(bad.any()):
        first = int(rows[int(bad.nonzero()[0])])
        raise DataError(f"{what}: sample {first} holds NaN or infinite values")


def _tensors_of(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(x, y) tensors when the dataset is a plain pair of tensors: indexed without collating."""
    if isinstance(dataset, ArrayDataset):
        return dataset.x, dataset.y
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) in (1, 2):
        t = dataset.tensors
        return t[0], (t[1] if len(t) == 2 else None)
    return None


def split_item(item) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A collated batch as (x, y): ``(x, y)``/``[x, y]`` pairs or a bare ``x``."""
    if isinstance(item, (tuple, list)):
        if len(item) == 2:
            return item[0], item[1]
        if len(item) == 1:
            return item[0], None
        raise DataError(f"a batch has {len(item)} parts; expected (x, y) or x")
    if isinstance(item, torch.Tensor):
        return item, None
    raise DataError(f"a batch is a {type(item).__name__}; expected tensors (x, y) or x")


def eval_batches(data: Dataset | DataLoader, batch_size: int, rank: int = 0, world: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """The evaluation set in order: a Dataset is split into ``world`` contiguous parts (this
    rank's part, in batches); a DataLoader is used whole on every rank."""
    if isinstance(data, DataLoader):
        for item in data:
            yield split_item(item)
        return
    n = len(data)  # type: ignore[arg-type]
    indices = shard(torch.arange(n), rank, world)
    tensors = _tensors_of(data)
    for start in range(0, len(indices), batch_size):
        idx = indices[start:start + batch_size]
        if tensors is not None:
            x, y = tensors[0][idx], (tensors[1][idx] if tensors[1] is not None else None)
        else:
            x, y = split_item(default_collate([data[i] for i in idx.tolist()]))
        check_finite_rows(x, idx, "evaluation data")
        yield x, y


# ------------------------------------------------------------------------------ validation
@dataclass
class ValidationSplit:
    """Training data with a validation part carved out of it (see :func:`carve_validation`).

    ``train`` and ``val`` are the two parts; ``train_idx`` and ``val_idx`` are their row numbers
    in the dataset they were carved from (disjoint, together every row, each sorted);
    ``stratified`` tells whether each class kept its share."""

    train: Dataset
    val: Dataset
    train_idx: torch.Tensor
    val_idx: torch.Tensor
    stratified: bool


def class_labels(dataset: Dataset) -> torch.Tensor | None:
    """The integer class label of every row of ``dataset``, or None when it has none (no ``y``,
    real-valued or multi-dimensional targets, a DataLoader). Tensor-backed datasets answer from
    their tensors, a dataset with an integer ``targets`` attribute (torchvision) from that; any
    other map-style dataset is read item by item once."""
    if isinstance(dataset, DataLoader):
        return None
    tensors = _tensors_of(dataset)
    if tensors is not None:
        y = tensors[1]
    elif isinstance(getattr(dataset, "targets", None), (torch.Tensor, np.ndarray, list)):
        y = torch.as_tensor(np.asarray(dataset.targets))  # type: ignore[attr-defined]
    else:
        labels = []
        for i in range(len(dataset)):  # type: ignore[arg-type]
            item = dataset[i]
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                return None
            target = torch.as_tensor(item[1])
            if target.dim() != 0 or target.dtype.is_floating_point or target.dtype == torch.bool:
                return None
            labels.append(int(target))
        y = torch.tensor(labels, dtype=torch.int64)
    if y is None or y.dim() != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
        return None
    return y.to(torch.int64)


def validation_indices(n: int, fraction: float, seed: int, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Sorted row numbers of a validation part of ``round(fraction * n)`` rows (at least one),
    drawn with a generator seeded by ``seed`` alone: the same ``(n, fraction, seed, labels)``
    give the same rows. With ``labels`` the draw is stratified: each class gives its share
    (largest remainders, ties to the larger class, then the smaller label), drawn at random
    within the class. Raises DataError when no row would be left for training."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"validation fraction {fraction}: must be between 0 and 1 (0: no validation)")
    count = max(1, round(fraction * n))
    if count >= n:
        raise DataError(f"the training data has {n} sample(s): too few to set {count} aside for validation "
                        "(give validation data, or a validation fraction of 0)")
    gen = torch.Generator()
    gen.manual_seed((int(seed) * 1_000_003 + 999_983) % (2**63))  # a stream of its own, not an epoch's
    if labels is None:
        return torch.sort(torch.randperm(n, generator=gen)[:count]).values
    classes, sizes = torch.unique(labels, return_counts=True)
    quota = sizes.double() * count / n
    take = quota.floor().long()
    order = sorted(range(len(classes)), key=lambda c: (-(quota[c] - take[c]).item(), -int(sizes[c]), int(classes[c])))
    for c in order[:count - int(take.sum())]:
        take[c] += 1
    chosen = []
    for c, k in zip(classes.tolist(), take.tolist()):
        members = torch.nonzero(labels == c).flatten()
        chosen.append(members[torch.randperm(len(members), generator=gen)[:k]])
    return torch.sort(torch.cat(chosen)).values


def carve_validation(dataset: Dataset, fraction: float, seed: int, stratify: bool = True) -> ValidationSplit:
    """Split a map-style ``dataset`` into training and validation parts (:func:`validation_indices`),
    stratified by class when ``stratify`` and the rows have integer class labels. Tensor-backed
    datasets give tensor-backed parts (fast batching); others give ``Subset``s."""
    try:
        n = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        raise DataError("training data must be a map-style Dataset with a length, or a DataLoader") from None
    labels = class_labels(dataset) if stratify else None
    val_idx = validation_indices(n, fraction, seed, labels)
    keep = torch.ones(n, dtype=torch.bool)
    keep[val_idx] = False
    train_idx = torch.nonzero(keep).flatten()
    return ValidationSplit(subset_rows(dataset, train_idx), subset_rows(dataset, val_idx), train_idx, val_idx,
                           stratified=labels is not None)


def subset_rows(dataset: Dataset, idx: torch.Tensor) -> Dataset:
    """The rows ``idx`` of ``dataset``, tensor-backed when the dataset is."""
    if isinstance(dataset, ArrayDataset):
        return ArrayDataset(dataset.x[idx], None if dataset.y is None else dataset.y[idx], dataset.source)
    if isinstance(dataset, TensorDataset):
        return TensorDataset(*(t[idx] for t in dataset.tensors))
    return Subset(dataset, idx.tolist())


# --------------------------------------------------------------------------------- loading
HELD_OUT = ("val", "test")  # .npz splits that training never sees


def load_task_dataset(spec: str | None, split: str | None, task: str, missing_ok: bool = False, *,
                      target_input: bool = False) -> Dataset | None:
    """The dataset named by ``spec`` for ``task``.

    ``split`` ("train"/"val"/"test") selects an .npz split by its ``{split}_idx`` key. Without
    ``train_idx``, "train" means every row outside ``val_idx`` and ``test_idx``; without
    ``val_idx``/``test_idx`` the held-out split is None when ``missing_ok``, else DataError. A
    ``val_idx`` must not share a row with ``train_idx`` or ``test_idx``. Classification uses
    :func:`qfx_onnx.data.load_dataset` (integer labels); regression reads an .npz whose ``y`` may
    be real-valued, of shape (N, ...). A ``module:function`` hook is called with ``split=`` for
    "train"/"test" (it has no "val": None); for the default "test" evaluation set a hook that
    fails returns None when ``missing_ok``. With ``target_input`` each sample is paired with
    itself as the target (an autoencoder; any ``y`` is ignored), with the same splits.
    """
    from pathlib import Path

    from qfx_onnx.data import load_arrays, load_dataset

    if spec is None:
        return None
    text = os.fspath(spec)
    is_npz = Path(text).suffix.lower() == ".npz"
    rows = None
    keys = npz_keys(text) if is_npz else set()
    if is_npz and split is not None and "x" in keys:  # else the loader below says what is wrong
        if f"{split}_idx" not in keys:
            if split in HELD_OUT:
                if missing_ok:
                    return None
                raise DataError(f"{text}: no {split}_idx split" + ("; pass --eval-data" if split == "test" else ""))
            held = [k for k in (f"{h}_idx" for h in HELD_OUT) if k in keys]
            rows = _rows_outside(Path(text), held) if held else None
            split = None
        elif split == "val":
            rows = _val_rows(Path(text), keys)
            split = None
    elif split == "val":
        return None
    elif split is not None and Path(text).suffix.lower() == ".npy":  # inputs only, no splits
        if split in HELD_OUT:
            if missing_ok:
                return None
            raise DataError(f"{text}: a .npy file has no {split} split" + ("; pass --eval-data" if split == "test" else ""))
        split = None
    if target_input:
        try:
            x, _ = load_arrays(text, split, real_targets=True)
        except DataError:
            if missing_ok and not is_npz:
                return None
            raise
        x = x[rows] if rows is not None else x
        return TensorDataset(x, x)
    if task == "regression" and is_npz:
        dataset: Dataset = _regression_npz(Path(text), split)
    else:
        try:
            dataset = load_dataset(text, split)
        except DataError:
            if missing_ok and not is_npz:
                return None
            raise
    return subset_rows(dataset, rows) if rows is not None else dataset


def npz_keys(spec: str | os.PathLike) -> set[str]:
    """The keys of a readable .npz file; empty for anything else (the loaders report why)."""
    from pathlib import Path

    if Path(spec).suffix.lower() != ".npz" or not Path(spec).is_file():
        return set()
    try:
        with np.load(spec, allow_pickle=False) as archive:
            return set(archive.files)
    except Exception:  # not a readable .npz (a bad zip, a truncated file): the loaders report why
        return set()


def _npz_index(path, key: str) -> np.ndarray:
    """The row indices under ``key``, checked: integer, 1-D, non-empty, inside ``x``'s rows."""
    with np.load(path, allow_pickle=False) as z:
        n = len(z["x"]) if "x" in z.files else 0
        idx = z[key]
    if idx.dtype.kind not in "iu" or idx.ndim != 1 or len(idx) == 0 or idx.min() < 0 or idx.max() >= n:
        raise DataError(f"{path}: key '{key}' must be a non-empty list of row indices inside 0..{n - 1}")
    return idx.astype(np.int64)


def _val_rows(path, keys: set[str]) -> torch.Tensor:
    """``val_idx``, checked to share no row with ``train_idx`` or ``test_idx``."""
    val = _npz_index(path, "val_idx")
    for other in ("train_idx", "test_idx"):
        if other in keys:
            shared = np.intersect1d(val, _npz_index(path, other))
            if len(shared):
                raise DataError(f"{path}: val_idx and {other} share {len(shared)} row(s), the first {int(shared[0])}; "
                                "validation rows must be held out")
    return torch.from_numpy(val)


def _rows_outside(path, keys: list[str]) -> torch.Tensor:
    """Every row of the file's ``x`` that none of ``keys`` lists."""
    with np.load(path, allow_pickle=False) as z:
        n = len(z["x"]) if "x" in z.files else 0
    keep = np.ones(n, dtype=bool)
    for key in keys:
        keep[_npz_index(path, key)] = False
    if not keep.any():
        raise DataError(f"{path}: every row is in {' or '.join(keys)}; no row is left for training")
    return torch.from_numpy(np.flatnonzero(keep))


def _regression_npz(path, split: str | None) -> TensorDataset:
    """x (float32) and real-valued y (float32) of an .npz, restricted to ``split``."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z.files or "y" not in z.files:
                raise DataError(f"{path}: regression needs keys 'x' and 'y'")
            xa, ya = z["x"], z["y"]
            idx = z[f"{split}_idx"] if split is not None else None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({' '.join(str(exc).split())[:200]})") from None
    if xa.dtype.kind not in "biuf" or ya.dtype.kind not in "biuf":
        raise DataError(f"{path}: x and y must be numeric arrays")
    if xa.ndim < 1 or len(xa) == 0 or len(ya) != len(xa):
        raise DataError(f"{path}: x has {len(xa)} rows and y {len(ya)}; expected the same number, at least one")
    x = torch.from_numpy(np.ascontiguousarray(xa, dtype=np.float32))
    y = torch.from_numpy(np.ascontiguousarray(ya, dtype=np.float32))
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise DataError(f"{path}: x or y holds NaN or infinite values")
    if idx is not None:
        if idx.dtype.kind not in "iu" or idx.ndim != 1 or len(idx) == 0 or idx.min() < 0 or idx.max() >= len(x):
            raise DataError(f"{path}: key '{split}_idx' must be a non-empty list of row indices")
        t = torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64))
        x, y = x[t], y[t]
    return TensorDataset(x, y)
