"""C simulation of generated HLS projects: every output bit of every test vector must equal the
PyTorch emulation. g++ compiles each project once against the real ap_fixed.h (hls4ml's copy).
Never skipped: without g++ or the headers these tests fail with the message that says what to install.

Covered: the four shipped models after default PTQ (8 bits, AP_RND, AP_SAT); the CNN with AP_WRAP
at small widths (values really wrap), AP_RND_CONV + AP_SAT_SYM, AP_TRN + AP_SAT_ZERO, AP_WRAP
with N = 2 saturation bits, per-channel weights, 2-hot weights (shift-adds), --io stream; and two
synthetic models that use every other layer kind (tests/test_hls_models.py).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from qfx_onnx.data import load_arrays
from qfx_onnx.fixed.types import OverflowMode, QuantMode
from qfx_onnx.hls.export import record_values
from qfx_onnx.hls.project import ExportResult, export_hls
from qfx_onnx.importer import load_onnx
from qfx_onnx.quant.policy import Policy
from qfx_onnx.quant.quantize import quantize_graph

import test_hls_models as zoo

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits.npz"
VECTORS = 20
CALIB = 256


@functools.lru_cache(maxsize=2)
def digits(split: str) -> torch.Tensor:
    return load_arrays(DIGITS, split)[0]


def ptq(model: str, policy: Policy | None = None, **kw):
    return quantize_graph(load_onnx(ROOT / "models" / f"{model}.onnx"), [digits("train")[:CALIB]], policy, **kw)


def simulate(fpm, folder: Path, top: str, x: torch.Tensor | None = None, **kw) -> ExportResult:
    """Export, compile, run; assert every bit of every vector matched."""
    x = digits("test") if x is None else x
    result = export_hls(fpm, folder, top=top, data=(x,), n_vectors=VECTORS, csim=True, **kw)
    sim = result.csim
    assert sim.passed, sim.output[-3000:]
    assert (sim.vectors, sim.mismatches) == (VECTORS, 0)
    assert sim.values == VECTORS * sum(b.size for b in result.model.outputs)
    return result


def cast_nodes(fpm, roles=("act", "elementwise")):
    gm = fpm.graph_module
    return [n for n in gm.graph.nodes if n.op == "call_module" and n.meta.get("role") in roles]


def narrow(fpm, bits: int = 1) -> None:
    """Give every activation cast ``bits`` fewer integer bits than calibration chose, so that
    values overflow and the overflow mode decides them."""
    for node in cast_nodes(fpm):
        q = fpm.graph_module.get_submodule(node.target)
        q.set_frac(q.frac.detach() + bits)


def overflow_events(fpm, x: torch.Tensor) -> tuple[int, int]:
    """(values beyond their cast type's range, of those the ones not saturated: wrapped or zeroed)."""
    values = record_values(fpm.graph_module, (x.to(torch.float64),))
    beyond = changed = 0
    for node in cast_nodes(fpm):
        t = fpm.graph_module.get_submodule(node.target).frozen_types()[0]
        raw, out = values[node.all_input_nodes[0]], values[node]
        outside = (raw > t.max_value + t.lsb) | (raw < t.min_value - t.lsb)
        beyond += int(outside.sum())
        saturated = out.clamp(t.min_value, t.max_value) == raw.clamp(t.min_value, t.max_value)
        changed += int((outside & ~saturated & ((out - raw.clamp(t.min_value, t.max_value)).abs() > t.lsb)).sum())
    return beyond, changed


@pytest.mark.parametrize("model", ["mlp", "cnn", "resnet", "dscnn"])
def test_shipped_model_after_ptq_is_bit_exact(model, tmp_path):
    fpm = ptq(model)
    result = simulate(fpm, tmp_path / model, model)
    tensors = [t.type for t in result.model.ctypes if t.role == "tensor"]
    assert tensors and all(t.width == 8 and t.q is QuantMode.RND and t.o is OverflowMode.SAT for t in tensors)
    assert (tmp_path / model / "report.json").is_file()


CNN_MODES = {
    "wrap": dict(policy=Policy(weight_bits=6, act_bits=5, elementwise_bits=5, overflow="AP_WRAP")),
    "rnd_conv_sat_sym": dict(policy=Policy(rounding="AP_RND_CONV", overflow="AP_SAT_SYM")),
    "trn_sat_zero": dict(policy=Policy(act_bits=6, rounding="AP_TRN", overflow="AP_SAT_ZERO")),
    "wrap_sat_bits": dict(policy=Policy(act_bits=6, elementwise_bits=6, rounding="AP_RND_INF",
                                        overflow="AP_WRAP", sat_bits=2)),
}


@pytest.mark.parametrize("mode", sorted(CNN_MODES))
def test_cnn_overflow_and_rounding_modes_are_bit_exact(mode, tmp_path):
    fpm = ptq("cnn", CNN_MODES[mode]["policy"])
    narrow(fpm)
    beyond, not_saturated = overflow_events(fpm, digits("test")[:VECTORS])
    assert beyond > 0, "the test must make values overflow"
    if mode == "wrap":
        assert not_saturated > 0, "with AP_WRAP some values must really wrap"
    result = simulate(fpm, tmp_path / mode, "cnn")
    modes = {(t.type.q, t.type.o, t.type.n) for t in result.model.ctypes if t.role == "tensor"}
    policy = CNN_MODES[mode]["policy"]
    assert (policy.rounding, policy.overflow, policy.sat_bits) in modes


def test_cnn_per_channel_weights_are_bit_exact(tmp_path):
    fpm = ptq("cnn", per_channel_weights=True)
    per_channel = [q for q in fpm.quantizers().values() if q.per_channel_axis is not None]
    assert per_channel and any(len(set(q.frozen_types())) > 1 for q in per_channel)
    simulate(fpm, tmp_path / "pc", "cnn")


def make_khot(fpm, k: int = 2) -> None:
    """Project every weight to its nearest k-hot code and mark the quantizer ``khot = k``."""
    from qfx_onnx.fixed.khot import khot_project

    gm = fpm.graph_module
    for node in cast_nodes(fpm, ("weight",)):
        q = gm.get_submodule(node.target)
        param = gm.get_parameter(node.all_input_nodes[0].target)
        with torch.no_grad():
            param.copy_(khot_project(param.to(torch.float64), q.frozen_types()[0], k).to(param.dtype))
        q.khot = k


def test_cnn_khot_weights_become_shift_adds_and_stay_bit_exact(tmp_path):
    fpm = ptq("cnn")
    make_khot(fpm)
    result = simulate(fpm, tmp_path / "khot", "cnn")
    linear = [layer for layer in result.model.layers if layer.kind in ("conv", "dense")]
    assert linear and all(layer.weight.khot == 2 for layer in linear)
    params = (tmp_path / "khot" / "firmware" / "parameters.h").read_text()
    macs = re.findall(r"static void mac\(.*?\n  \}", params, re.S)
    assert len(macs) == len(linear)
    assert all("*" not in body.split("\n", 1)[1] for body in macs), "no multiply in a K-hot product"
    assert ("qfx::shl<" in params or "qfx::shr<" in params) and "qfx::khot_" in params
    top = (tmp_path / "khot" / "firmware" / "cnn.cpp").read_text()
    assert top.count("_khot<") == len(linear)
    report = {e["layer"]: e for e in result.report["layers"]}
    dense = [layer for layer in linear if layer.kind == "dense"][0]
    assert report[dense.ident]["dsp"] == 0 and report[dense.ident]["shift_add_terms"] > 0
    for layer in linear:  # the weight products: shift-adds, no DSP (conv layers keep BatchNorm's multiplies)
        khot = [m for key, m in report[layer.ident]["multiplies"].items() if "K-hot" in key]
        assert len(khot) == 1 and khot[0]["dsp"] == 0 and khot[0]["multipliers"] == 0 and khot[0]["lut"] > 0


def test_cnn_stream_io_is_bit_exact(tmp_path):
    fpm = ptq("cnn")
    result = simulate(fpm, tmp_path / "stream", "cnn", io="stream", reuse_factor=4)
    top = (tmp_path / "stream" / "firmware" / "cnn.cpp").read_text()
    assert "hls::stream<" in top and "#pragma HLS DATAFLOW" in top
    assert "II = CONFIG_T::reuse_factor" in (tmp_path / "stream" / "firmware" / "layers.h").read_text()
    assert "reuse_factor = 4" in (tmp_path / "stream" / "firmware" / "parameters.h").read_text()
    assert result.report["totals"]["interval_cycles"] < result.report["totals"]["latency_cycles"]


@pytest.mark.parametrize("build, io", [(zoo.zoo2d, "stream"), (zoo.zoo1d, "parallel")], ids=["zoo2d", "zoo1d"])
def test_every_layer_kind_is_bit_exact(build, io, tmp_path):
    model = build()
    x = torch.from_numpy(zoo.inputs_for(model, 64))
    fpm = quantize_graph(load_onnx(model), [x])
    result = simulate(fpm, tmp_path / build.__name__, build.__name__, x=x, reuse_factor=2, io=io)
    kinds = {layer.kind for layer in result.model.layers}
    if build is zoo.zoo2d:
        # stream io: arrays read by several layers get fanout copies (one reader each under DATAFLOW)
        assert kinds == {"conv", "map", "remap", "concat", "pool", "reduce", "dense", "fanout"}
        readers = [x.ident for layer in result.model.layers for x in layer.inputs]
        assert len(readers) == len(set(readers))
        steps = {s.kind for layer in result.model.layers for s in layer.steps}
        assert "lut" in steps
        assert len(result.model.outputs) == 2
    else:
        assert {"conv", "pool", "remap", "map", "dense"} <= kinds
