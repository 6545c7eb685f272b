"""Finetuning checkpoints: everything needed to continue a run exactly, loadable with
``torch.load(weights_only=True)``.

A checkpoint is a dict of tensors and primitive containers only (no pickled classes), so the
restricted unpickler accepts it::

    {"format": "qfx-onnx-finetune", "version": 1,
     "fingerprint": {...},            # settings and model structure the run depends on
     "epoch": int, "step": int,       # epochs completed; steps done in the next epoch
     "global_step": int,
     "model": state_dict, "optimizer": state_dict, "scheduler": state_dict,
     "rng": {"torch": ByteTensor, "cuda": [ByteTensor...], "python": tuple, "numpy": {...}},
     "best": {"epoch": int, "metrics": {...}, "state": state_dict} | None,
     "history": [ {...}, ... ], "bad_epochs": int, "partial": {"loss_sum": float, "count": int}}

:func:`save` writes atomically (temp file beside the target, fsync, rename).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qfx_onnx.atomic import write_atomic
from qfx_onnx.errors import QfxError

FORMAT = "qfx-onnx-finetune"
VERSION = 1
FILE_NAME = "last.pt"


class CheckpointError(QfxError):
    """A checkpoint cannot be read, or does not belong to this run."""


def checkpoint_path(directory: str | os.PathLike) -> Path:
    return Path(directory) / FILE_NAME


def save(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` (tensors moved to the CPU) to ``path`` atomically; returns the path."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot write the checkpoint ({exc.strerror})") from None
    payload = to_cpu({"format": FORMAT, "version": VERSION, **state})
    return write_atomic(path, lambda handle: torch.save(payload, handle), what="checkpoint", error=CheckpointError)


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)``; CheckpointError when it is missing,
    unreadable or not a finetuning checkpoint of this version."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint to resume from")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # the restricted unpickler raises several types
        raise CheckpointError(f"{path}: not a readable checkpoint ({' '.join(str(exc).split())[:200]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a qfx-onnx finetuning checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {state.get('version')} is not supported (expected {VERSION})")
    return state


def check_fingerprint(state: dict[str, Any], fingerprint: dict[str, Any], path: str | os.PathLike) -> None:
    """CheckpointError naming every setting that differs between the checkpoint and this run."""
    saved = state.get("fingerprint", {})
    diffs = [k for k in sorted(set(saved) | set(fingerprint)) if saved.get(k) != fingerprint.get(k)]
    if diffs:
        shown = "; ".join(f"{k}: {_short(saved.get(k))} -> {_short(fingerprint.get(k))}" for k in diffs[:4])
        more = f" (and {len(diffs) - 4} more)" if len(diffs) > 4 else ""
        raise CheckpointError(f"{path}: the checkpoint was made with other settings or another model ({shown}{more}); "
                              "resume with the same options, or use another --checkpoint-dir")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def to_cpu(value: Any) -> Any:
    """``value`` with every tensor detached, cloned onto the CPU (containers rebuilt as dict/list/tuple)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [to_cpu(v) for v in value]
        return items if isinstance(value, list) else tuple(items)
    return value


def rng_state() -> dict[str, Any]:
    """The global RNG states (torch, CUDA, Python, NumPy) as tensors and primitives."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(_as_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))


def _as_tuples(value: Any) -> Any:
    # random.setstate wants the nested tuples back
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
