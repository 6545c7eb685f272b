"""PTQ: cast placement, calibration, policy and config overrides, BN folding, lossless types."""

import json

import numpy as np
import pytest
import torch

from qfx_onnx.data import load_arrays
from qfx_onnx.errors import ConfigError
from qfx_onnx.fixed import FixedType, cast
from qfx_onnx.importer import load_onnx
from qfx_onnx.quant.api import quantize
from qfx_onnx.quant.fold_bn import fold_batchnorm
from qfx_onnx.quant.policy import Policy, load_policy
from qfx_onnx.quant.quantize import CAST_MODULE_PREFIX, FixedPointModel, find_cast_sites, quantize_graph
from qfx_onnx.quant.report import layer_exactness, measure_tensors
from qfx_onnx.quant.typeprop import propagate

DATA = "models/digits.npz"


@pytest.fixture(scope="module")
def digits():
    x, _ = load_arrays(DATA, "train")
    xt, yt = load_arrays(DATA, "test")
    return x[:256], xt, yt


def acc(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).double().mean().item()


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet", "dscnn"])
def test_every_tensor_is_fixed_point_and_accuracy_holds(name, digits):
    x, xt, yt = digits
    gm = load_onnx(f"models/{name}.onnx")
    float_acc = acc(gm, xt, yt)
    model = quantize_graph(gm, [x])
    types = model.fixed_types()
    roles = {s.role for s in model.sites}
    assert {"input", "weight", "act"} <= roles
    if name != "mlp":
        assert {"constant", "elementwise"} <= roles  # BatchNorm scale/shift and its affine output
    # every float value that reaches a computing op comes from a cast or a lossless op on casts
    info = propagate(model.graph_module, (xt[:1].double(),))
    for node, vi in info.items():
        if node.op == "call_function" and node.meta.get("onnx_op") not in ("Shape",):
            assert vi.type is not None, f"{node.name} has no fixed-point type"
    # every cast output is exactly representable in its type
    hooks_ok = []

    def check(module, inputs, output):
        t = module.frozen_types()[0]
        if module.per_channel_axis is None:
            hooks_ok.append(torch.equal(output, cast(output, t)))

    for q in model.quantizers().values():
        q.register_forward_hook(check)
    fixed_acc = acc(model, xt, yt)
    assert all(hooks_ok) and hooks_ok
    assert fixed_acc >= float_acc - 0.02, (float_acc, fixed_acc)
    assert len(types) == len(model.sites)


def test_relu_outputs_become_unsigned(digits):
    x, _, _ = digits
    model = quantize_graph(load_onnx("models/cnn.onnx"), [x])
    relu = [t for name, t in model.fixed_types().items() if "Relu" in name]
    assert relu and all(not t.signed for t in relu)


def test_policy_widths_and_modes_apply(digits):
    x, _, _ = digits
    policy = Policy(weight_bits=4, act_bits=6, elementwise_bits=7, rounding="AP_RND_CONV", overflow="AP_SAT_SYM")
    model = quantize_graph(load_onnx("models/cnn.onnx"), [x], policy)
    by_role = {}
    for site in model.sites:
        by_role.setdefault(site.role, []).append(model.fixed_types()[site.tensor])
    assert {t.width for t in by_role["weight"]} == {4}
    assert {t.width for t in by_role["act"]} == {6}
    assert {t.width for t in by_role["elementwise"]} == {7}
    assert all(t.q.value == "AP_RND_CONV" and t.o.value == "AP_SAT_SYM" for ts in by_role.values() for t in ts)


def test_config_overrides_by_node_op_tensor_and_fixed_type(tmp_path, digits):
    x, _, _ = digits
    cfg = tmp_path / "p.toml"
    cfg.write_text(
        '[defaults]\nweight_bits = 6\n\n'
        '[[override]]\nop = "Gemm"\nrole = "weight"\nbits = 3\n\n'
        '[[override]]\ntensor = "logits"\ntype = "ap_fixed<16,6,AP_RND,AP_SAT>"\n'
    )
    model = quantize("models/cnn.onnx", x, config=cfg)
    types = model.fixed_types()
    assert str(types["logits"]) == "ap_fixed<16,6,AP_RND,AP_SAT>"
    gemm_w = [s for s in model.sites if s.role == "weight" and s.op == "Gemm"]
    conv_w = [s for s in model.sites if s.role == "weight" and s.op == "Conv"]
    assert gemm_w and all(types[s.tensor].width == 3 for s in gemm_w)
    assert conv_w and all(types[s.tensor].width == 6 for s in conv_w)
    as_json = tmp_path / "p.json"
    as_json.write_text(json.dumps({"override": [{"node": "no_such_node*", "bits": 4}]}))
    with pytest.raises(ConfigError, match="matches no tensor"):
        quantize("models/cnn.onnx", x, config=as_json)


@pytest.mark.parametrize("text, message", [
    ("[defaults]\nweight_bit = 4\n", "unknown key"),
    ("[[override]]\nbits = 4\n", "at least one of"),
    ("[[override]]\nop = 'Conv'\nrounding = 'AP_FOO'\n", "AP_FOO"),
    ("[[override]]\nop = 'Conv'\ntype = 'ap_fixed<8>'\n", "template arguments"),
    ("[[override]]\nop = 'Conv'\nrole = 'weights'\n", "role"),
    ("not toml at all [", "invalid TOML"),
    # every value is checked against the schema, naming the key, the value and what is allowed
    ("[defaults]\nweight_bits = 'eight'\n", r"weight_bits = 'eight': expected an integer from 1 to 24"),
    ("[defaults]\nact_bits = true\n", r"act_bits = True: expected an integer"),
    ("[defaults]\nsat_bits = -1\n", r"sat_bits = -1: expected an integer from 0 to 24"),
    ("[defaults]\nrounding = 'nearest'\n", r"rounding = 'nearest': expected one of AP_TRN"),
    ("[[override]]\ntensor = 'y'\ntype = 'ap_fixed<65,20,AP_RND,AP_SAT>'\n", r"type = 'ap_fixed<65,20,AP_RND,AP_SAT>'.*W=65"),
    ("[[override]]\ntensor = 'y'\ntype = 'ap_fixed<25,20,AP_RND,AP_SAT>'\n", r"W=25 is wider than float32"),
    ("[[override]]\ntensor = 'y'\ntype = 8\n", r"type = 8: expected an HLS type string"),
    ("[[override]]\nnode = 'x'\nbits = 0\n", r"override #1: bits = 0"),
    ("[[override]]\nnode = 'x'\nunsigned = 'yes'\n", r"unsigned = 'yes': expected true or false"),
    ("[[override]]\nnode = 3\n", r"node = 3: expected a non-empty string"),
    ("[extra]\nx = 1\n", r"unknown section\(s\) 'extra'"),
    ("override = 3\n", r"must be a list of tables"),
    ("[defaults.weight_bits]\nx = 1\n", r"weight_bits = \{'x': 1\}: expected an integer"),
])
def test_bad_configs_are_one_line_errors(tmp_path, text, message):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_policy(cfg)
    assert "\n" not in str(info.value)


def test_fold_bn_removes_the_affine_and_keeps_accuracy(digits):
    x, xt, yt = digits
    gm = load_onnx("models/cnn.onnx")
    ref = gm(xt)
    assert fold_batchnorm(gm) == 2
    torch.testing.assert_close(gm(xt), ref, rtol=1e-4, atol=1e-4)
    model = quantize_graph(gm, [x])
    assert not any("BatchNormalization::scale" in s.tensor for s in model.sites)
    assert acc(model, xt, yt) > 0.95


def test_calibration_methods_and_per_channel(digits):
    x, xt, yt = digits
    for method in ("max", "percentile", "mse"):
        model = quantize_graph(load_onnx("models/mlp.onnx"), [x], Policy(weight_bits=6), method=method)
        assert acc(model, xt, yt) > 0.85
    model = quantize_graph(load_onnx("models/cnn.onnx"), [x], per_channel_weights=True)
    per_channel = [t for t in model.fixed_types().values() if isinstance(t, list)]
    # every weight is per channel, and channels really get their own binary points somewhere
    weights = [s for s in model.sites if s.role == "weight"]
    assert len(per_channel) == len(weights)
    assert any(len({u.frac for u in types}) > 1 for types in per_channel)
    assert acc(model, xt, yt) > 0.95


def test_lossless_accumulators_and_exactness_report(digits):
    x, xt, _ = digits
    model = quantize_graph(load_onnx("models/resnet.onnx"), [x], Policy(weight_bits=8, act_bits=8))
    layers = layer_exactness(model, xt[:1])
    convs = [layer for layer in layers if layer.op == "Conv"]
    assert convs and all(layer.exact_float64 for layer in layers)
    # a 3x3 conv over 32 channels sums 288 products of 8x8-bit values: 16 + 9 bits > 24
    assert any(not layer.exact_float32 and layer.terms == 288 for layer in convs)
    wide = quantize_graph(load_onnx("models/cnn.onnx"), [x], Policy(weight_bits=24, act_bits=24, elementwise_bits=24))
    assert any(not layer.exact_float64 for layer in layer_exactness(wide, xt[:1]))


def test_emulation_is_order_independent_float64(digits):
    """Lossless accumulators: float64 sums of products are exact, so batch order cannot matter."""
    x, xt, _ = digits
    model = quantize_graph(load_onnx("models/resnet.onnx"), [x])
    with torch.no_grad():
        full = model(xt[:40])
        parts = torch.cat([model(xt[:40][i:i + 7]) for i in range(0, 40, 7)])
        flipped = model(xt[:40].flip(0)).flip(0)
    assert torch.equal(full, parts) and torch.equal(full, flipped)


def test_report_measures_clipping_and_sqnr(digits):
    x, xt, _ = digits
    model = quantize_graph(load_onnx("models/cnn.onnx"), [x[:8]], Policy(act_bits=4), method="percentile")
    stats = measure_tensors(model, [xt])
    assert all(s.count > 0 for s in stats)
    assert any(s.clipped_fraction > 0 for s in stats)  # calibrated on 8 samples, evaluated on 360
    assert all(s.sqnr_db > 0 for s in stats if s.role == "weight")


def test_cast_modules_carry_names(digits):
    x, _, _ = digits
    model = quantize_graph(load_onnx("models/dscnn.onnx"), [x])
    casts = [n for n in model.graph_module.graph.nodes if n.op == "call_module" and n.target.startswith(CAST_MODULE_PREFIX)]
    assert len(casts) == len(model.sites) == len(find_cast_sites(load_onnx("models/dscnn.onnx")))
    for n in casts:
        assert n.args[0].meta["onnx_name"] == n.meta["onnx_name"] + FixedPointModel.RAW_SUFFIX
    assert isinstance(FixedType.parse(str(model.fixed_types()["logits"])), FixedType)
    assert np.isfinite(model(x[:2]).detach().numpy()).all()
