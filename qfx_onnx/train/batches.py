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
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset, default_collate

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
        for (_, size, global_size), item in zip(plan, loader):
            x, y = split_item(item)
            yield Batch(x, y, size, global_size)


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
            yield tensors[0][idx], (tensors[1][idx] if tensors[1] is not None else None)
        else:
            yield split_item(default_collate([data[i] for i in idx.tolist()]))


# --------------------------------------------------------------------------------- loading
def load_task_dataset(spec: str | None, split: str | None, task: str, missing_ok: bool = False) -> Dataset | None:
    """The dataset named by ``spec`` for ``task``.

    ``split`` ("train"/"test") selects an .npz split when the file has split indices; without
    them "train" means every row and "test" means none (None when ``missing_ok``, else
    DataError). Classification uses :func:`qfx_onnx.data.load_dataset` (integer labels);
    regression reads an .npz whose ``y`` may be real-valued, of shape (N, ...). A
    ``module:function`` hook is called with ``split=`` (for the default "test" evaluation set a
    hook that fails returns None when ``missing_ok``).
    """
    import os
    from pathlib import Path

    from qfx_onnx.data import load_dataset

    if spec is None:
        return None
    text = os.fspath(spec)
    is_npz = Path(text).suffix.lower() == ".npz"
    if is_npz and split is not None and Path(text).is_file():
        with np.load(text, allow_pickle=False) as z:
            if f"{split}_idx" not in z.files:
                if split == "test":
                    if missing_ok:
                        return None
                    raise DataError(f"{text}: no test_idx split to evaluate on; pass --eval-data")
                split = None
    if task == "regression" and is_npz:
        return _regression_npz(Path(text), split)
    try:
        return load_dataset(text, split)
    except DataError:
        if missing_ok and not is_npz:
            return None
        raise


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
