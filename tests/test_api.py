"""The Python API accepts numpy where users have numpy, and inference carries no autograd."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import qfx_onnx
from qfx_onnx.fixed import FixedType, cast, cast_codes

MODELS = Path(__file__).resolve().parents[1] / "models"


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16])
def test_cast_of_numpy_gives_numpy_equal_to_the_tensor_cast(dtype):
    t = FixedType.parse("ap_fixed<6,2,AP_RND_CONV,AP_WRAP>")
    x = (np.random.default_rng(0).standard_normal(100) * 3).astype(dtype)
    got = cast(x, t)
    assert isinstance(got, np.ndarray) and got.dtype == (np.dtype(dtype) if np.dtype(dtype).kind == "f" else np.float64)
    want = cast(torch.from_numpy(x.astype(got.dtype)), t).numpy()
    np.testing.assert_array_equal(got, want)
    codes = cast_codes(x, t)
    assert isinstance(codes, np.ndarray) and codes.dtype == np.int64
    np.testing.assert_array_equal(codes * 2.0 ** -t.frac, want.astype(np.float64))
    assert cast(0.3, t) == cast(np.array(0.3), t)


def test_cast_of_text_is_a_type_error():
    with pytest.raises(TypeError, match="expects numbers"):
        cast(np.array(["a"]), "ap_fixed<8,3>")


@pytest.fixture(scope="module")
def model():
    with np.load(MODELS / "digits.npz") as z:
        return qfx_onnx.quantize(MODELS / "mlp.onnx", z["x"][:128]), z["x"][:40]


def test_model_takes_numpy_and_predict_has_no_autograd(model):
    fixed, x = model
    out = fixed(x)  # numpy into the nn.Module: converted, differentiable
    assert isinstance(out, torch.Tensor) and out.requires_grad
    pred = fixed.predict(x, batch_size=16)
    assert isinstance(pred, np.ndarray) and pred.shape == (40, 10)
    np.testing.assert_array_equal(pred, out.detach().numpy())
    tensor_pred = fixed.predict(torch.from_numpy(x))
    assert isinstance(tensor_pred, torch.Tensor) and not tensor_pred.requires_grad
    fixed.train()
    fixed.predict(x[:2])
    assert fixed.training  # restored
