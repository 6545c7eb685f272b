"""The library entry point for post-training quantization: :func:`quantize`.

>>> import qfx_onnx
>>> model = qfx_onnx.quantize("models/cnn.onnx", "models/digits.npz", weight_bits=6)
>>> qfx_onnx.write_annotated(model, "cnn.qfx.onnx")
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import fx

from qfx_onnx.data import as_inputs, check_matches_model, load_arrays
from qfx_onnx.errors import DataError
from qfx_onnx.importer import load_onnx
from qfx_onnx.quant.fold_bn import fold_batchnorm
from qfx_onnx.quant.policy import Policy, load_policy
from qfx_onnx.quant.quantize import FixedPointModel, quantize_graph


def calibration_split(spec: str | os.PathLike) -> str | None:
    """The split to calibrate on: "train" when the .npz carries split indices, else everything."""
    return "train" if _has_splits(spec) else None


def evaluation_split(spec: str | os.PathLike) -> str | None:
    return "test" if _has_splits(spec) else None


def _has_splits(spec: str | os.PathLike) -> bool:
    path = Path(spec)
    if path.suffix != ".npz" or not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as z:
            return "train_idx" in z.files and "test_idx" in z.files
    except Exception:  # not a readable .npz: the loader reports why, in one line
        return False


def quantize(model: str | os.PathLike | onnx.ModelProto | fx.GraphModule,
             data: str | os.PathLike | torch.Tensor | np.ndarray, *, policy: Policy | None = None, config: str | os.PathLike | None = None,
             method: str = "max", calib_samples: int = 512, fold_bn: bool = False, per_channel: bool = False,
             recalibrate_imported: bool = False, approximate_scales: int | None = None,
             **policy_flags) -> FixedPointModel:
    """Post-training quantization of a float ONNX model: every tensor becomes an ``ap_fixed``.

    ``data`` is a dataset spec (``.npz``/``.npy``/``module:function``; the train split when the
    .npz has one) or a tensor or numpy array of inputs (samples along axis 0); the first
    ``calib_samples`` samples calibrate the binary points with ``method`` (``max``,
    ``percentile`` or ``mse``). The policy comes from ``policy``, or from ``config`` (TOML/JSON)
    and keyword flags such as ``weight_bits=6``. A QONNX or QDQ model's own quantizers fix the
    types of their tensors (see :mod:`qfx_onnx.importer.quant_ops`); they are kept as given unless
    ``recalibrate_imported``, which calibrates their binary points; a quantizer scale that is not
    a power of two is an error unless ``approximate_scales`` (bits of the fixed-point multipliers
    approximating it; the largest relative error is logged as a warning). Raises DataError for data holding NaN or
    infinities (naming the first bad sample) or not fitting the model's input.
    """
    gm = model if isinstance(model, fx.GraphModule) else load_onnx(model, approximate_scales=approximate_scales)
    if isinstance(data, (torch.Tensor, np.ndarray)):
        x = as_inputs(data, "calibration data")
    else:
        x, _ = load_arrays(data, calibration_split(data), real_targets=True)  # only x calibrates; any y may be real-valued
    if calib_samples < 1:
        raise DataError(f"--calib-samples must be at least 1, got {calib_samples}")
    info = getattr(gm, "onnx_info", None)
    if info is not None and info.input_shapes:
        check_matches_model(x, info.input_shapes[0], str(data) if not isinstance(data, torch.Tensor) else "data")
    if fold_bn:
        fold_batchnorm(gm)
    policy = policy or load_policy(config, **policy_flags)
    batches = torch.split(x[:calib_samples], 256)
    return quantize_graph(gm, batches, policy, method, per_channel_weights=per_channel,
                          recalibrate_imported=recalibrate_imported)

