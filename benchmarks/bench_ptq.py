"""PTQ accuracy of the shipped models: every tensor fixed point, against float accuracy.

    python benchmarks/bench_ptq.py [--method max|percentile|mse] [--markdown]

Weights/activations at 8, 6 and 4 bits; element-wise layers (BatchNorm, residual adds, pooling
and their constants) at 8 and 6 bits; biases at 16 bits; AP_RND / AP_SAT; calibration on 512
training images; accuracy on the 360-image test split, all evaluated with the exact float64
emulation.
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

from qfx_onnx.data import load_arrays
from qfx_onnx.importer import load_onnx
from qfx_onnx.quant.api import quantize
from qfx_onnx.quant.policy import Policy

MODELS = ["mlp", "cnn", "resnet", "dscnn"]
WIDTHS = [8, 6, 4]
ELEMENTWISE = [8, 6]


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).double().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="max", choices=["max", "percentile", "mse"])
    parser.add_argument("--markdown", action="store_true", help="print a markdown table too")
    args = parser.parse_args()
    x, _ = load_arrays("models/digits.npz", "train")
    xt, yt = load_arrays("models/digits.npz", "test")
    table = Table(title=f"PTQ test accuracy (%), calibration: {args.method}")
    table.add_column("model")
    table.add_column("float")
    columns = [(w, e) for w in WIDTHS for e in ELEMENTWISE]
    for w, e in columns:
        table.add_column(f"W/A {w}/{w}\nelem {e}")
    rows = []
    start = time.perf_counter()
    for name in MODELS:
        row = [name, f"{100 * accuracy(load_onnx(f'models/{name}.onnx'), xt, yt):.2f}"]
        for w, e in columns:
            policy = Policy(weight_bits=w, act_bits=w, elementwise_bits=e)
            model = quantize(f"models/{name}.onnx", x, policy=policy, method=args.method)
            row.append(f"{100 * accuracy(model, xt, yt):.2f}")
        table.add_row(*row)
        rows.append(row)
    console = Console()
    console.print(table)
    console.print(f"{len(MODELS) * len(columns)} quantizations in {time.perf_counter() - start:.0f} s")
    if args.markdown:
        header = ["model", "float"] + [f"{w}/{w}, elem {e}" for w, e in columns]
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for row in rows:
            print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
