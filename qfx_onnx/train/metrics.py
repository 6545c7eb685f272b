"""Evaluation of (fixed-point) models and the losses finetuning minimises.

Losses are sums over samples (cross-entropy for classification; for regression the MSE averaged
over each sample's outputs), so that a caller can normalise by the global batch under DDP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from qfx_onnx.errors import QfxError
from qfx_onnx.train import distributed as dist_util
from qfx_onnx.train.batches import eval_batches


def evaluate(model: nn.Module, data: Dataset | DataLoader, task: str = "classification", *,
             batch_size: int = 512, device: torch.device | str | None = None,
             ctx: dist_util.DistContext | None = None) -> dict[str, float]:
    """Mean loss (cross-entropy or MSE) and, for classification, accuracy of ``model`` on ``data``.

    Runs in the model's own dtype (a FixedPointModel in float64 is the exact fixed-point forward
    pass), without gradients. Under DDP each rank evaluates its part of a Dataset and the sums
    are combined, so every rank returns the same numbers.
    """
    ctx = ctx or dist_util.DistContext()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, correct, count = 0.0, 0.0, 0.0
    with torch.no_grad():
        for x, y in eval_batches(data, batch_size, ctx.rank, ctx.world):
            if y is None:
                raise QfxError("evaluation data has no targets (y)")
            out = model(x.to(device))
            y = y.to(device)
            total += float(loss_sum(out, y, task))
            if task == "classification":
                correct += float((out.argmax(dim=-1) == y).sum())
            count += len(x)
    model.train(was_training)
    if not isinstance(data, DataLoader):
        total, correct, count = dist_util.all_sum(ctx, [total, correct, count])
    if count == 0:
        raise QfxError("the evaluation set is empty")
    metrics = {"loss": total / count, "count": int(count)}
    if task == "classification":
        metrics["accuracy"] = correct / count
    return metrics


def loss_sum(out: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    """Sum over the samples of the per-sample loss (MSE: mean over a sample's outputs)."""
    if task == "classification":
        if out.dim() != 2:
            raise QfxError(f"classification needs (batch, classes) logits, the model gives shape {tuple(out.shape)}")
        if y.dtype.is_floating_point or y.dim() != 1:
            raise QfxError("classification needs integer class labels of shape (batch,); use --task regression for real targets")
        if len(y) and int(y.max()) >= out.shape[1]:
            raise QfxError(f"label {int(y.max())} is out of range for a model with {out.shape[1]} outputs")
        return F.cross_entropy(out, y, reduction="sum")
    target = y.to(out.dtype)
    if target.numel() != out.numel():
        raise QfxError(f"regression targets of shape {tuple(y.shape)} do not match outputs of shape {tuple(out.shape)}")
    per_sample = max(out[0].numel(), 1) if len(out) else 1
    return F.mse_loss(out, target.reshape(out.shape), reduction="sum") / per_sample


def better(a: dict[str, float], b: dict[str, float] | None, task: str) -> bool:
    """Whether metrics ``a`` beat ``b`` (accuracy first, then loss; regression: loss)."""
    if b is None:
        return True
    if task == "classification" and a["accuracy"] != b["accuracy"]:
        return a["accuracy"] > b["accuracy"]
    return a["loss"] < b["loss"]
