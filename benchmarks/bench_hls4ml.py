"""How far hls4ml agrees with qfx-onnx on the QONNX models ``export-qonnx`` writes.

    python benchmarks/bench_hls4ml.py [--models mlp cnn-fold cnn-fold-pc dscnn-fold resnet-fold cnn]

For each model: PTQ with ``AP_RND_CONV``/``AP_SAT`` (hls4ml's Quant front end reads only the
rounding modes ROUND and FLOOR), :func:`qfx_onnx.qonnx_export.export_qonnx`, then hls4ml's
documented QONNX flow (qonnx ``cleanup_model``, ``ConvertToChannelsLastAndClean``,
``GemmToMatMul``, ``cleanup_model``), ``convert_from_onnx_model`` (Vitis backend, io_parallel),
``compile`` (g++) and ``predict`` on the 360 test images, under two precision configs:

* ``default``: ``granularity='model'``, ``fixed<16,6>`` for everything the Quant nodes do not set
  (accumulators, biases' layers' results, ...): what a user gets without a per-layer config;
* ``auto``: ``granularity='name'``: every layer ``auto``, so hls4ml infers each precision from
  the Quant nodes (weights, biases, activations) and derives accumulators itself;
* ``auto+input``: ``auto`` plus :func:`qfx_onnx.qonnx_export.hls4ml_layer_config` (what
  ``export-qonnx --hls4ml-config`` writes): the input layer gets the input cast's type.

Each is run on the digits test images (multiples of 1/16) and on 2,000 random float32 inputs in
[-0.2, 2.2) with all 24 significand bits.

The table shows the fraction of output values equal to the qfx-onnx emulation, the largest
difference in output LSBs, compile time, and, where they differ, the layers whose precision under
``default`` is narrower than under ``auto`` (the reason), or the error that stopped hls4ml.
Nothing is asserted; ``tests/test_qonnx_export.py`` asserts the exact case.
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

import qfx_onnx
from qfx_onnx.qonnx_export import export_qonnx, hls4ml_layer_config

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "models" / "digits.npz"
VARIANTS = {  # name: (shipped model, quantize flags)
    "mlp": ("mlp", {}),
    "cnn-fold": ("cnn", {"fold_bn": True}),
    "cnn-fold-pc": ("cnn", {"fold_bn": True, "per_channel": True}),
    "dscnn-fold": ("dscnn", {"fold_bn": True}),
    "resnet-fold": ("resnet", {"fold_bn": True}),
    "cnn": ("cnn", {}),  # BatchNorm kept as a fixed-point Mul/Add
}
CONFIGS = {"default": "model", "auto": "name", "auto+input": "name"}
# what stops hls4ml 1.3 on a model, found by reading its traceback (the first match explains it)
KNOWN_LIMITS = {
    "ReduceSum": "global average pool is ReduceSum times a quantized 1/N in qfx-onnx (exact); hls4ml's ONNX "
                 "front end has no ReduceSum",
    "Unsqueeze": "BatchNorm kept as a fixed-point Mul/Add on [C,1,1] constants: qonnx's channels-last inserts "
                 "Unsqueeze, which hls4ml's ONNX front end lacks (quantize --fold-bn avoids it)",
    "IndexError": "per-channel power-of-two weight scales: hls4ml's Quant-on-constant path leaves a layer "
                  "without input and infer_precision fails",
}


def hls4ml_model(qonnx_proto, config_name: str, folder: Path):
    import hls4ml
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.channels_last import ConvertToChannelsLastAndClean
    from qonnx.transformation.gemm_to_matmul import GemmToMatMul
    from qonnx.util.cleanup import cleanup_model

    wrapper = cleanup_model(ModelWrapper(qonnx_proto))
    wrapper = cleanup_model(wrapper.transform(ConvertToChannelsLastAndClean()).transform(GemmToMatMul()))
    config = hls4ml.utils.config.config_from_onnx_model(wrapper, granularity=CONFIGS[config_name], backend="Vitis",
                                                        default_precision="fixed<16,6>")
    if config_name == "auto+input":
        for name, entry in hls4ml_layer_config(qonnx_proto).items():
            config["LayerName"][name]["Precision"].update(entry["Precision"])
    model = hls4ml.converters.convert_from_onnx_model(wrapper, output_dir=str(folder), io_type="io_parallel",
                                                      backend="Vitis", hls_config=config)
    return model, len(wrapper.graph.input[0].type.tensor_type.shape.dim)


def precisions(model) -> dict[tuple[str, str], str]:
    return {(layer.name, kind): str(t.precision) for layer in model.get_layers() for kind, t in layer.types.items()}


def _width(text: str) -> tuple[int, int]:
    m = re.match(r"u?fixed<(\d+),(-?\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def narrower(default: dict, auto: dict) -> str:
    """Layers whose precision under ``default`` has fewer fraction or integer bits than under ``auto``."""
    found = []
    for key, text in default.items():
        if key in auto and text != auto[key]:
            (w, i), (aw, ai) = _width(text), _width(auto[key])
            if w - i < aw - ai or i < ai:
                found.append(f"{key[0]}.{key[1]} {text.split(',TRN')[0]}> < {auto[key].split(',TRN')[0]}>")
    return "; ".join(found[:3]) + (f" (+{len(found) - 3})" if len(found) > 3 else "")


def run_variant(name: str, folder: Path, inputs: dict[str, np.ndarray]) -> list[dict]:
    base, flags = VARIANTS[name]
    fixed = qfx_onnx.quantize(ROOT / "models" / f"{base}.onnx", DATA, calib_samples=256, rounding="AP_RND_CONV", **flags)
    annotated = folder / f"{name}.qfx.onnx"
    qfx_onnx.write_annotated(fixed, annotated)
    wants = {k: fixed.predict(x) for k, x in inputs.items()}
    lsb = fixed.fixed_types()["logits"].lsb  # every shipped model's output is named logits
    proto = export_qonnx(annotated)
    rows, layers = [], {}
    for config in CONFIGS:
        row = {"model": name, "config": config}
        try:
            model, rank = hls4ml_model(proto, config, folder / f"{name}-{config}")
            started = time.perf_counter()
            model.compile()
            row["compile"] = time.perf_counter() - started
            for key, x in inputs.items():
                xin = np.ascontiguousarray(x.transpose(0, 2, 3, 1) if x.ndim == 4 and rank == 4 else x)
                got = np.asarray(model.predict(xin)).reshape(wants[key].shape)
                row[key] = (float((got == wants[key]).mean()), float(np.abs(got - wants[key]).max() / lsb))
            layers[config] = precisions(model)
        except Exception as exc:  # hls4ml's own limits are what this benchmark reports
            text = f"{type(exc).__name__}: {' '.join(str(exc).split())[:90]}"
            row["error"] = next((f"{why} ({text})" for key, why in KNOWN_LIMITS.items() if key in text), text)
        rows.append(row)
    if "default" in layers and "auto" in layers and rows[0].get("digits", (1.0,))[0] < 1.0:
        rows[0]["reason"] = narrower(layers["default"], layers["auto"])
    if rows[1].get("random", (1.0,))[0] < 1.0:
        rows[1]["reason"] = f"input layer global_in {layers['auto'][('global_in', 'result_t')]}: the float input is " \
                            "truncated before the input Quant"
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    from importlib.metadata import version

    d = np.load(DATA)
    inputs = {"digits": d["x"][d["test_idx"]].astype(np.float32),
              "random": np.random.default_rng(0).uniform(-0.2, 2.2, size=(2000, 1, 8, 8)).astype(np.float32)}
    console = Console(width=200)
    table = Table(title=f"hls4ml {version('hls4ml')} (qonnx {version('qonnx')}) on export-qonnx output: "
                        "outputs equal to the qfx-onnx emulation, max |difference| in output LSBs")
    for col in ("model", "config", "digits: equal", "LSB", "random floats: equal", "LSB", "compile s",
                "why not equal / error"):
        table.add_column(col, justify="left" if col in ("model", "config", "why not equal / error") else "right")
    with tempfile.TemporaryDirectory(prefix="bench_hls4ml_") as tmp:
        for name in args.models:
            for row in run_variant(name, Path(tmp), inputs):
                ok = "error" not in row
                cells = [f"{row[k][0]:.4f}\t{row[k][1]:g}" if ok else "-\t-" for k in inputs]
                table.add_row(row["model"], row["config"], *"\t".join(cells).split("\t"),
                              f"{row['compile']:.0f}" if ok else "-", row.get("error") or row.get("reason", ""))
            console.print(f"done: {name}")
    console.print(table)


if __name__ == "__main__":
    main()
