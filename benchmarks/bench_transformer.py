"""Accuracy of the fixed-point transformer (models/transformer.onnx) against float, as a function of
the softmax and LayerNorm table sizes and of the data widths; PTQ rows and QAT rows.

    python benchmarks/bench_transformer.py [--qat-epochs 2] [--no-qat]

Splits: the digits .npz's ``train_idx`` rows, of which the last 10% are **validation**, and its
``test_idx`` rows (**test**). PTQ calibrates on the first 512 training rows; QAT finetunes on the
training rows and selects its epoch on the validation rows (``finetune``'s ``val``); test accuracy
is only reported, never used to choose anything. Each row: weight/activation bits, table bits
(one-input tables, softmax exp and reciprocal, LayerNorm rsqrt all set to ``bits``), validation
and test accuracy of the fixed-point model, and the float model's (the same model with its casts
off: float ops). Every nonlinear op is exact (verify: bit-exact in onnxruntime); nothing is timed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from qfx_onnx.data import load_arrays
from qfx_onnx.quant.api import quantize
from qfx_onnx.quant.policy import load_policy
from qfx_onnx.train.finetune import FinetuneConfig, finetune

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "transformer.onnx"
DATA = ROOT / "models" / "digits.npz"
WIDTHS = (8, 6)
TABLE_BITS = (6, 8, 10)  # 5 bits and fewer cannot index LayerNorm's variance octaves (an error)


def _accuracy(model, x: torch.Tensor, y: torch.Tensor) -> float:
    out = model.predict(x)
    out = out[0] if isinstance(out, tuple) else out
    return float((out.argmax(1) == y).double().mean())


def _policy(bits: int, table_bits: int):
    policy = load_policy(None, weight_bits=bits, act_bits=bits, elementwise_bits=bits)
    policy.nonlinear = {"table_bits": table_bits, "exp_bits": table_bits, "reciprocal_bits": table_bits,
                        "rsqrt_bits": table_bits}
    return policy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--qat-epochs", type=int, default=2)
    parser.add_argument("--no-qat", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    x_all, y_all = load_arrays(DATA, "train")
    n_val = len(x_all) // 10
    x_tr, y_tr, x_val, y_val = x_all[:-n_val], y_all[:-n_val], x_all[-n_val:], y_all[-n_val:]
    x_te, y_te = load_arrays(DATA, "test")
    table = Table(title="transformer: fixed point vs float (accuracy)")
    for col in ("mode", "W bits", "table bits", "val", "test", "float val", "float test"):
        table.add_column(col)
    for bits in WIDTHS:
        for tb in TABLE_BITS:
            fm = quantize(MODEL, x_tr[:512], policy=_policy(bits, tb))
            fm.set_casts_enabled(False)
            float_val, float_te = _accuracy(fm, x_val, y_val), _accuracy(fm, x_te, y_te)
            fm.set_casts_enabled(True)
            table.add_row("PTQ", str(bits), str(tb), f"{_accuracy(fm, x_val, y_val):.4f}", f"{_accuracy(fm, x_te, y_te):.4f}",
                          f"{float_val:.4f}", f"{float_te:.4f}")
            if args.no_qat or tb not in (6, 10):
                continue
            cfg = FinetuneConfig(epochs=args.qat_epochs, batch_size=64, lr=1e-3, seed=0)
            train = torch.utils.data.TensorDataset(x_tr, y_tr)
            val = torch.utils.data.TensorDataset(x_val, y_val)
            finetune(fm, train, config=cfg, val=val)
            table.add_row("QAT", str(bits), str(tb), f"{_accuracy(fm, x_val, y_val):.4f}", f"{_accuracy(fm, x_te, y_te):.4f}",
                          f"{float_val:.4f}", f"{float_te:.4f}")
    Console().print(table)


if __name__ == "__main__":
    main()
