"""Nonlinear IR ops as exact fixed-point ops in all three executions (issue 11, step 2).

Each op quantized gets a ``fixed`` spec (qfx_onnx.nonlinear.wiring): the emulation evaluates its
tables and kernels on integer codes, the annotated ONNX reproduces it in onnxruntime (verify
reports every tensor predicted exact with zero mismatches), the model read back has the same
specs, and the HLS project C-simulates bit-exact (one-input ops as tables over every input code
when the input is narrow, else as the spec's own compact table read by qfx_nl::table_lookup;
softmax as a layer on qfx_nl::softmax_stable). The shipped cnn with a Softmax head goes through
the CLI (quantize, finetune, export-hls --csim).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto as TP
from onnx import helper
from typer.testing import CliRunner

from qfx_onnx.errors import ConfigError
from qfx_onnx.hls.project import export_hls
from qfx_onnx.ir.ops import op_of
from qfx_onnx.nonlinear import wiring
from qfx_onnx.quant.annotated_read import read_annotated
from qfx_onnx.quant.annotated_write import build_annotated
from qfx_onnx.quant.api import quantize
from qfx_onnx.quant.policy import load_policy
from qfx_onnx.quant.verify import verify_annotated
from qfx_onnx_cli.main import app

MODELS = Path(__file__).resolve().parent.parent / "models"
N = 6
ONE_INPUT = [("Sigmoid", {}), ("Tanh", {}), ("Exp", {}), ("Erf", {}), ("Gelu", {}), ("Gelu", {"approximate": "tanh"}),
             ("Softmax", {"axis": -1})]
POSITIVE = ["Sqrt", "Reciprocal"]  # on h*h + 1

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(div: bool = True, layer_norm: bool = True) -> onnx.ModelProto:
    """x -> MatMul -> h; every op of ONE_INPUT on h, Sqrt and Reciprocal on h*h + 1, and (optionally)
    h / (h*h + 1) and LayerNormalization(h): one output each."""
    rng = np.random.default_rng(0)
    w = helper.make_tensor("W", TP.FLOAT, [N, N], (rng.standard_normal((N, N)) * 0.7).astype(np.float32).ravel())
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
             helper.make_node("Mul", ["h", "h"], ["sq"], name="sq"), helper.make_node("Add", ["sq", "one"], ["p"], name="p")]
    outs = []
    for i, (op, attrs) in enumerate(ONE_INPUT):
        nodes.append(helper.make_node(op, ["h"], [f"y{i}"], name=f"{op.lower()}{i}", **attrs))
    for i, op in enumerate(POSITIVE):
        nodes.append(helper.make_node(op, ["p"], [f"z{i}"], name=op.lower()))
    inits = [w, helper.make_tensor("one", TP.FLOAT, [], [1.0])]
    names = [f"y{i}" for i in range(len(ONE_INPUT))] + [f"z{i}" for i in range(len(POSITIVE))]
    if div:
        nodes.append(helper.make_node("Div", ["h", "p"], ["d"], name="div"))
        names.append("d")
    if layer_norm:
        nodes.append(helper.make_node("LayerNormalization", ["h", "g", "b"], ["ln"], name="ln", axis=-1, epsilon=1e-5))
        inits += [helper.make_tensor("g", TP.FLOAT, [N], np.linspace(0.5, 1.5, N)),
                  helper.make_tensor("b", TP.FLOAT, [N], np.linspace(-0.2, 0.2, N))]
        names.append("ln")
    outs = [helper.make_tensor_value_info(n, TP.FLOAT, ["N", N]) for n in names]
    graph = helper.make_graph(nodes, "nl", [helper.make_tensor_value_info("x", TP.FLOAT, ["N", N])], outs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def _inputs(n: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((n, N)).astype(np.float32))


def _specs(fm) -> dict[str, str]:
    return {n.meta.get("onnx_node"): n.kwargs["fixed"] for n in fm.graph_module.graph.nodes
            if n.op == "call_function" and n.kwargs.get("fixed")}


@pytest.mark.parametrize("bits", [10, 6])
def test_every_op_is_exact_in_onnxruntime_and_reads_back(bits):
    x = _inputs()
    fm = quantize(_model(), x, act_bits=bits, elementwise_bits=bits)
    specs = _specs(fm)
    assert set(specs) == {"sigmoid0", "tanh1", "exp2", "erf3", "gelu4", "gelu5", "softmax6", "sqrt", "reciprocal",
                          "div", "ln"}
    proto = build_annotated(fm)
    result = verify_annotated(fm, proto, x)
    checks = {c.tensor: c for c in result.layers}
    for tensor in ["y0", "y1", "y2", "y3", "y4", "y5", "y6", "z0", "z1", "d", "ln"]:
        c = checks[tensor]
        assert c.predicted_exact and c.mismatches == 0 and c.elements == 64 * N, c
    back = read_annotated(proto)
    assert _specs(back) == specs
    for a, b in zip(fm.predict(x), back.predict(x)):
        assert torch.equal(a, b)


def test_the_emulation_is_the_table_not_the_float_function():
    """With 4 index bits the sigmoid of a 10-bit input takes at most 16 values (the entries), and
    those are the integer definition's (LookupTable.lookup_codes on the input codes)."""
    x = _inputs(256)
    policy = load_policy(None, act_bits=10)
    policy.nonlinear = {"table_bits": 4}
    fm = quantize(_model(div=False, layer_norm=False), x, policy=policy)
    node = next(n for n in fm.graph_module.graph.nodes if n.op == "call_function" and op_of(n.target).name == "sigmoid")
    table = wiring.build("sigmoid", node.kwargs["fixed"])
    assert table.size == 16
    h = next(n for n in fm.graph_module.graph.nodes if n.meta.get("onnx_name") == "h" and n.op == "call_module")
    values = {}

    def grab(module, inputs, output):
        values["h"] = output.detach()
    handle = fm.graph_module.get_submodule(h.target).register_forward_hook(grab)
    fm.predict(x)
    handle.remove()
    with torch.no_grad():
        raw = node.target(values["h"], **node.kwargs)
    codes = np.ldexp(values["h"].numpy(), table.in_type.frac).astype(np.int64)
    want = np.ldexp(table.lookup_codes(codes).astype(np.float64), -table.out_type.frac)
    np.testing.assert_array_equal(raw.numpy(), want)
    assert len(np.unique(raw.numpy())) <= 16


def test_exact_false_keeps_float_evaluation_and_verify_says_so():
    x = _inputs()
    policy = load_policy(None, act_bits=10)
    policy.nonlinear = {"exact": False}
    fm = quantize(_model(div=False, layer_norm=False), x, policy=policy)
    assert not _specs(fm)
    checks = {c.tensor: c for c in verify_annotated(fm, build_annotated(fm), x).layers}
    assert not checks["y6"].predicted_exact and "float32" in checks["y6"].reason


def test_policy_nonlinear_section(tmp_path):
    good = tmp_path / "p.toml"
    good.write_text("[nonlinear]\ntable_bits = 6\nexp_bits = 8\n")
    policy = load_policy(good)
    fm = quantize(_model(div=False, layer_norm=False), _inputs(), policy=policy)
    specs = _specs(fm)
    assert "bits=6" in specs["sigmoid0"] and "exp_bits=8" in specs["softmax6"]
    bad = tmp_path / "bad.toml"
    bad.write_text("[nonlinear]\ntable_bits = 40\n")
    with pytest.raises(ConfigError, match="table_bits"):
        load_policy(bad)


# the ONNX node, the IR op, its output tensor and its keywords, for each one-input op of _model
TABLE_NODES = [("sigmoid0", "sigmoid", "y0", {}), ("tanh1", "tanh", "y1", {}), ("exp2", "exp", "y2", {}),
               ("erf3", "erf", "y3", {}), ("gelu4", "gelu", "y4", {}), ("gelu5", "gelu", "y5", {"approximate": "tanh"}),
               ("sqrt", "sqrt", "z0", {}), ("reciprocal", "reciprocal", "z1", {})]


def test_hls_csim_bit_exact_for_every_table_op_softmax_and_layer_norm(tmp_path):
    """One C-simulation: sigmoid, tanh, exp, erf, both GELUs, softmax, sqrt, reciprocal, division
    by an activation and LayerNormalization."""
    from qfx_onnx.hls.estimate import bram18

    x = _inputs()
    fm = quantize(_model(), x, act_bits=8)
    result = export_hls(fm, tmp_path / "prj", data=(x,), n_vectors=64, csim=True)
    assert result.csim.passed and result.csim.mismatches == 0
    softmax = next(e for e in result.report["layers"] if e["kind"] == "softmax")
    # its exp and reciprocal tables are counted, and its e*r products
    cfg = wiring.build("softmax", _specs(fm)["softmax6"])
    assert softmax["weight_bits"] == cfg.exp.bits + cfg.reciprocal.bits
    assert sum(m["count"] for m in softmax["multiplies"].values()) == N
    assert {"softmax", "layer_norm", "div"} <= {e["kind"] for e in result.report["layers"]}
    ln = next(e for e in result.report["layers"] if e["kind"] == "layer_norm")
    assert ln["weight_bits"] >= wiring.build("layer_norm", _specs(fm)["ln"]).rsqrt.bits
    # 8-bit inputs: the all-codes table (256 entries of the cast) where it is no bigger than the
    # spec's own (sigmoid, tanh, exp), else the compact one (erf and gelu clamp or pass through
    # beyond +-4, sqrt and reciprocal read a log2 index)
    weights = tmp_path / "prj" / "firmware" / "weights"
    q = fm.quantizers()
    for node, op, out, kwargs in TABLE_NODES:
        table = wiring.build(op, _specs(fm)[node], kwargs.get("approximate", "none"))
        all_codes = (1 << table.in_type.width) * q[out].frozen_types()[0].width
        assert (weights / f"w_{out}_lut.h").exists() == (table.bits >= all_codes), node
        if table.bits >= all_codes:  # a data-indexed table is one ROM: 2048 bits, one BRAM18K
            e = next(e for e in result.report["layers"] if e["onnx_node"] == node)
            assert e["weight_bits"] == all_codes and e["bram18"] == bram18(256, all_codes // 256) == 1
    assert {"w_y0_lut.h", "w_y1_lut.h", "w_y2_lut.h"} == {p.name for p in weights.glob("*_lut.h")}


def test_wide_inputs_read_the_compact_tables_in_csim(tmp_path):
    """16-bit activations into every one-input op: the C++ reads the spec's own table of at most
    2**table_bits entries (the index cast, then clamp and shift, or the log2 index of sqrt and
    reciprocal) instead of 2**16 entries, bit-exact in C-simulation; the estimate counts each
    table as one ROM of LookupTable.bits."""
    from qfx_onnx.hls.estimate import BRAM_BITS_THRESHOLD, bram18

    x = _inputs(256)
    fm = quantize(_model(div=False, layer_norm=False), x, act_bits=16, elementwise_bits=16)
    specs = _specs(fm)
    prj = tmp_path / "prj"
    result = export_hls(fm, prj, data=(x,), n_vectors=256, csim=True)
    assert result.csim.passed and result.csim.mismatches == 0
    assert not list((prj / "firmware" / "weights").glob("*_lut.h"))  # no all-codes table left
    params = (prj / "firmware" / "parameters.h").read_text()
    layers = {e["onnx_node"]: e for e in result.report["layers"]}
    for node, op, out, kwargs in TABLE_NODES:
        spec = wiring.parse_spec(specs[node])
        assert spec["in"].startswith("ap_fixed<16,") or spec["in"].startswith("ap_ufixed<16,"), spec
        table = wiring.build(op, specs[node], kwargs.get("approximate", "none"))
        assert table.size <= (1 << int(spec["bits"])), (node, table.size)
        assert f"struct t_{out}_table {{  // {table.name}: {table.size} entries" in params
        assert f"qfx_nl::table_lookup<t_{out}_table>" in params
        e = layers[node]
        assert e["weight_bits"] == table.bits == table.size * table.out_type.width
        assert table.bits > BRAM_BITS_THRESHOLD and e["bram18"] == bram18(table.size, table.out_type.width)


# ------------------------------------------------------------------------------------ the shipped cnn + Softmax
@pytest.fixture(scope="module")
def cnn_softmax(tmp_path_factory):
    """models/cnn.onnx with a Softmax appended to its logits, and a small .npz like the shipped one."""
    folder = tmp_path_factory.mktemp("cnn_softmax")
    model = onnx.load(MODELS / "cnn.onnx")
    out = model.graph.output[0]
    model.graph.node.append(helper.make_node("Softmax", [out.name], ["probs"], name="softmax", axis=-1))
    probs = onnx.ValueInfoProto()
    probs.CopyFrom(out)
    probs.name = "probs"
    del model.graph.output[:]
    model.graph.output.append(probs)
    path = folder / "cnn_softmax.onnx"
    onnx.save(model, path)
    with np.load(MODELS / "digits.npz", allow_pickle=False) as z:
        np.savez(folder / "small.npz", x=z["x"], y=z["y"], train_idx=z["train_idx"][:200], test_idx=z["test_idx"][:64])
    return path, folder / "small.npz"


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_cnn_with_softmax_head_quantize_finetune_export_csim(cnn_softmax, tmp_path):
    model, data = cnn_softmax
    q = tmp_path / "cnn.qfx.onnx"
    r = _cli("quantize", model, "--data", data, "-o", q, "--weight-bits", "6", "--act-bits", "6", "--force")
    assert r.exit_code == 0, r.output
    ft = tmp_path / "cnn.ft.qfx.onnx"
    r = _cli("finetune", q, "--data", data, "-o", ft, "--epochs", "1", "--batch-size", "100", "--seed", "1")
    assert r.exit_code == 0, r.output
    fm = read_annotated(ft)
    assert "softmax" in _specs(fm)
    x = torch.from_numpy(np.load(data)["x"][:32].astype(np.float32))
    probs = next(c for c in verify_annotated(fm, ft, x).layers if c.tensor == "probs")
    assert probs.predicted_exact and probs.mismatches == 0
    prj = tmp_path / "prj"
    r = _cli("export-hls", ft, "-o", prj, "--csim", "--data", data, "--test-vectors", "32", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["csim"]["passed"] and report["csim"]["mismatches"] == 0
    assert any(layer["kind"] == "softmax" for layer in report["estimate"]["layers"])


def test_specs_follow_learned_types_and_casts_off_is_float():
    """A learned binary point of an op's input: the op still reads its table through its own
    index cast (exact in onnxruntime), and refresh_nonlinear (finetune runs it) rebuilds the spec for
    the new type. With the casts off the ops evaluate in float."""
    from qfx_onnx.quant.nonlinear_specs import refresh_nonlinear

    x = _inputs()
    fm = quantize(_model(div=False, layer_norm=False), x, act_bits=8)
    before = _specs(fm)
    h = fm.quantizers()["h"]
    with torch.no_grad():
        h.frac += 1.0  # one more fractional bit on h
    stale = {c.tensor: c for c in verify_annotated(fm, build_annotated(fm), x).layers}
    assert all(stale[t].mismatches == 0 and stale[t].predicted_exact for t in ("y0", "y6"))
    assert refresh_nonlinear(fm) == len(before)
    after = _specs(fm)
    want = f"in={wiring.index_type(h.frozen_types()[0])}"
    assert want not in before["sigmoid0"] and want in after["sigmoid0"] and want in after["softmax6"]
    assert all(c.mismatches == 0 for c in verify_annotated(fm, build_annotated(fm), x).layers)

    fm.set_casts_enabled(False)
    assert not _specs(fm)
    y = fm.predict(x)[6]
    fm.set_casts_enabled(True)
    assert _specs(fm) == after
    h_float = x.to(torch.float64) @ torch.from_numpy(onnx.numpy_helper.to_array(_model().graph.initializer[0])).to(torch.float64)
    torch.testing.assert_close(y, torch.softmax(h_float, -1), rtol=0, atol=1e-6)


def test_too_small_tables_are_an_error_naming_the_node():
    policy = load_policy(None, act_bits=8)
    policy.nonlinear = {"rsqrt_bits": 2}
    with pytest.raises(ConfigError, match=r"'ln' \(layer_norm\).*table bits"):
        quantize(_model(), _inputs(), policy=policy)


def test_transformer_at_6_bits_is_bit_exact_in_onnxruntime_and_csim(tmp_path):
    """models/transformer.onnx (LayerNorm, softmax attention, exact GELU, MatMul of activations):
    every nonlinear op exact, onnxruntime and the C-simulation bit-exact with the emulation."""
    from qfx_onnx.data import load_arrays
    from qfx_onnx.quant.annotated_write import write_annotated

    x, _ = load_arrays(MODELS / "digits.npz", "train")
    xt, _ = load_arrays(MODELS / "digits.npz", "test")
    fm = quantize(MODELS / "transformer.onnx", x[:256], weight_bits=6, act_bits=6, elementwise_bits=6)
    kinds = sorted(op_of(n.target).name for n in fm.graph_module.graph.nodes if n.op == "call_function" and n.kwargs.get("fixed"))
    assert kinds == ["gelu"] * 2 + ["layer_norm"] * 5 + ["softmax"] * 2
    path = tmp_path / "tfm.qfx.onnx"
    write_annotated(fm, path)
    checks = verify_annotated(fm, path, xt[:32]).layers
    assert all(c.mismatches == 0 for c in checks)
    assert all(c.predicted_exact for c in checks if "Softmax" in c.tensor or "LayerNorm" in c.tensor)
    result = export_hls(read_annotated(path), tmp_path / "prj", data=(xt[:16],), n_vectors=16, csim=True)
    assert result.csim.passed and result.csim.mismatches == 0
    kinds = {e["kind"] for e in result.report["layers"]}
    assert {"softmax", "layer_norm", "matmul_act"} <= kinds


def test_narrow_inputs_keep_the_all_codes_tables():
    """An input of at most table_bits bits: one entry per code holding the following cast's value of
    f(x), so sigmoid/tanh (and every one-input op) equal float64 f then the cast, as before."""
    x = _inputs()
    fm = quantize(_model(div=False, layer_norm=False), x, act_bits=8)
    q = fm.quantizers()
    values = {}
    handle = q["h"].register_forward_hook(lambda m, i, o: values.setdefault("h", o.detach()))
    outs = fm.predict(x)
    handle.remove()
    h = values["h"]
    for k, fn in ((0, torch.sigmoid), (1, torch.tanh), (2, torch.exp)):
        want = q[f"y{k}"].quantize_frozen(fn(h))
        assert torch.equal(outs[k], want), k
