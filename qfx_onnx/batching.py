"""Running a graph fixed to one batch on any number of samples.

A fixed-batch export that :mod:`qfx_onnx.importer.batch` could not generalise keeps its declared
batch ``B`` (``gm.onnx_info.fixed_batch``). Every stage that pushes data through it (calibration,
evaluation, verify, training, test vectors) calls :func:`run_in_chunks`: the samples are cut into
chunks of ``B`` (the last one padded by repeating its final sample), each chunk runs on its own,
and the outputs are joined along the batch and trimmed back. Autograd flows through the join, so
a training step on a chunked model computes the same loss and gradients as a batched one would.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch


def fixed_batch_of(module) -> int | None:
    """The declared batch a model must be run in chunks of (None when any batch works).

    Accepts an imported GraphModule, a FixedPointModel or anything carrying ``onnx_info`` or a
    ``graph_module`` that does."""
    info = getattr(module, "onnx_info", None)
    if info is None and hasattr(module, "graph_module"):
        info = getattr(module.graph_module, "onnx_info", None)
    return getattr(info, "fixed_batch", None)


def run_in_chunks(fn: Callable, inputs: Sequence, batch: int | None):
    """``fn(*inputs)`` for inputs of any batch, calling ``fn`` on chunks of exactly ``batch``
    samples when ``batch`` is set and differs from the inputs' batch.

    ``inputs`` are torch tensors or numpy arrays sharing their first dim. The result has the
    structure of ``fn``'s (a tensor/array, or a tuple/list/dict of them), joined along dim 0.
    """
    n = int(inputs[0].shape[0]) if inputs else 0
    if batch is None or n == batch:
        return fn(*inputs)
    return join_chunks([fn(*chunk) for chunk in split_chunks(inputs, batch)], n)


def split_chunks(inputs: Sequence, batch: int) -> list[list]:
    """``inputs`` (sharing their first dim, ``n`` > 0 samples) cut into chunks of exactly
    ``batch`` samples, the last one padded by repeating its final sample."""
    n = int(inputs[0].shape[0])
    if n == 0:
        raise ValueError("no samples to run")
    return [[_take(x, start, batch, n) for x in inputs] for start in range(0, n, batch)]


def join_chunks(outputs: list, n: int):
    """The per-chunk ``outputs`` of :func:`split_chunks` joined along dim 0 and trimmed to ``n``."""
    return _join(outputs, n)


def _take(x, start: int, batch: int, n: int):
    stop = min(start + batch, n)
    part = x[start:stop]
    if stop - start == batch:
        return part
    pad = batch - (stop - start)
    last = x[stop - 1:stop]
    if isinstance(x, torch.Tensor):
        return torch.cat([part, last.expand(pad, *last.shape[1:])], dim=0)
    return np.concatenate([part, np.repeat(last, pad, axis=0)], axis=0)


def _join(outputs: list, n: int):
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outputs, dim=0)[:n]
    if isinstance(first, np.ndarray):
        return np.concatenate(outputs, axis=0)[:n]
    if isinstance(first, dict):
        return {key: _join([o[key] for o in outputs], n) for key in first}
    if isinstance(first, (tuple, list)):
        return type(first)(_join([o[k] for o in outputs], n) for k in range(len(first)))
    raise TypeError(f"cannot join chunk outputs of type {type(first).__name__}")
