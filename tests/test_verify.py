"""verify_annotated: onnxruntime against the emulation, tensor by tensor, bit for bit, and the
float32 exactness prediction from type propagation."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
import torch

from qfx_onnx.errors import OnnxModelError
from qfx_onnx.fixed import FixedType, OverflowMode, QuantMode
from qfx_onnx.importer import load_onnx
from qfx_onnx.quant.annotated import verify_annotated, write_annotated
from qfx_onnx.quant.policy import Policy
from qfx_onnx.quant.quantize import quantize_graph

from test_annotated import MODELS, ROOT, data, fixed_model, rich_fixed, rich_model  # noqa: F401 - fixture

pytestmark = pytest.mark.usefixtures("one_thread")

WIDE = "wider than float32's 24 bits"


def check_consistent(result) -> None:
    """What every result must satisfy: predicted-exact tensors match, a raw value wider than 24
    bits is reported, and ``ok`` means no mismatch."""
    assert result.layers
    for layer in result.layers:
        if layer.predicted_exact:
            assert layer.matches, f"{layer.tensor}: {layer.mismatches} mismatches where float32 is exact"
        else:
            assert layer.reason and layer.tensor in result.not_guaranteed
        if layer.raw_type and FixedType.parse(layer.raw_type).width > 24:
            assert not layer.predicted_exact and WIDE in layer.reason
    assert result.unexpected == []
    assert result.ok == (result.mismatched == [])


@pytest.mark.parametrize("name", MODELS)
def test_shipped_models_match_bit_for_bit_at_8_bits(name, tmp_path):
    fixed = fixed_model(name)
    path = tmp_path / "m.onnx"
    write_annotated(fixed, path)
    result = verify_annotated(fixed, path, data("test")[:64])
    check_consistent(result)
    assert [layer.tensor for layer in result.layers] == list(fixed.fixed_types())
    # cnn and resnet have a conv accumulator wider than 24 bits, so float32 is not guaranteed exact
    # from there on; on these 64 test images their partial sums stay small and every tensor still
    # matches, which is what this (deterministic) check pins, flagged or not
    assert bool(result.not_guaranteed) == (name in ("cnn", "resnet"))
    assert result.ok and result.mismatched == [], result.mismatched
    assert result.summary() == (f"bit-exact: {len(result.layers)} tensors compared, {len(result.not_guaranteed)} "
                                "not guaranteed exact in float32, 0 unexpected mismatch(es)")


def test_16_bit_cnn_is_predicted_not_exact_in_float32(tmp_path):
    fixed = fixed_model("cnn", bits=16)
    proto = write_annotated(fixed, tmp_path / "cnn16.onnx")
    result = verify_annotated(fixed, proto, data("test")[:32])
    check_consistent(result)
    by_name = {layer.tensor: layer for layer in result.layers}
    conv = by_name["/0/Conv_output_0"]
    assert not conv.predicted_exact and FixedType.parse(conv.raw_type).width > 24
    assert re.search(r"/0/Conv_output_0::raw needs ap_fixed<\d+,\d+>, " + WIDE, conv.reason)
    assert "/0/Conv_output_0" in result.not_guaranteed and "logits" in result.not_guaranteed
    assert by_name["input"].predicted_exact and by_name["0.weight"].predicted_exact  # before any arithmetic


def _count_overflows(fixed, x) -> int:
    """How many values reaching a cast lie outside its type's range (so the overflow mode acts)."""
    count = 0

    def hook(module, inputs, _out):
        nonlocal count
        for t in module.frozen_types():
            count += int(((inputs[0] > t.max_value) | (inputs[0] < t.min_value)).sum())

    handles = [q.register_forward_hook(hook) for q in fixed.quantizers().values() if q.per_channel_axis is None]
    with torch.no_grad():
        fixed(x)
    for handle in handles:
        handle.remove()
    return count


@pytest.mark.parametrize("q, o, n", [
    (QuantMode.RND_CONV, OverflowMode.WRAP, 0),
    (QuantMode.TRN, OverflowMode.WRAP, 2),
    (QuantMode.RND, OverflowMode.SAT_SYM, 2),
    (QuantMode.RND_ZERO, OverflowMode.WRAP_SM, 1),
    (QuantMode.TRN_ZERO, OverflowMode.SAT_ZERO, 0),
], ids=lambda m: str(getattr(m, "value", m)))
def test_rounding_and_overflow_modes_match_bit_for_bit(q, o, n, tmp_path):
    # calibrated on 8 images, so the test images overflow some casts and the overflow mode matters
    fixed = quantize_graph(load_onnx(ROOT / "models" / "cnn.onnx"), [data("train")[:8]],
                           Policy(rounding=q, overflow=o, sat_bits=n, act_bits=6))
    x = data("test")[:48]
    assert _count_overflows(fixed, x) > 0
    assert all(t.q is q and t.o is o and t.n == n for t in fixed.fixed_types().values())
    result = verify_annotated(fixed, write_annotated(fixed, tmp_path / "m.onnx"), x)
    check_consistent(result)


def test_per_channel_weights_match(tmp_path):
    fixed = fixed_model("cnn", per_channel=True)
    result = verify_annotated(fixed, write_annotated(fixed, tmp_path / "pc.onnx"), data("test")[:48])
    check_consistent(result)
    weights = [layer for layer in result.layers if layer.role == "weight"]
    assert weights and all(";" in layer.ap_type and layer.matches for layer in weights)


def test_nonlinear_ops_and_uncast_outputs_are_reported(tmp_path):
    """Nonlinear ops evaluated in float (``[nonlinear] exact = false``) are not guaranteed exact."""
    calib = [torch.randn(64, 2, 8, 8, generator=torch.Generator().manual_seed(0))]
    fixed = quantize_graph(load_onnx(rich_model()), calib, Policy(nonlinear={"exact": False}))
    x = torch.randn(16, 2, 8, 8, generator=torch.Generator().manual_seed(2))
    result = verify_annotated(fixed, write_annotated(fixed, tmp_path / "rich.onnx"), x)
    check_consistent(result)
    by_name = {layer.tensor: layer for layer in result.layers}
    assert "sigmoid (sg::raw) is computed by onnxruntime in float32" in by_name["sg"].reason
    assert "softmax" in by_name["out"].reason
    assert by_name["rp"].role == "output"  # a graph output after a reshape, not a cast tensor
    assert by_name["h1"].predicted_exact and by_name["h1"].matches


def test_exact_nonlinear_ops_are_not_blamed(tmp_path):
    """By default sigmoid and softmax have their exact fixed-point definition: onnxruntime
    reproduces them bit for bit, and verify no longer names them as a reason."""
    fixed = rich_fixed()
    x = torch.randn(16, 2, 8, 8, generator=torch.Generator().manual_seed(2))
    result = verify_annotated(fixed, write_annotated(fixed, tmp_path / "rich.onnx"), x)
    check_consistent(result)
    by_name = {layer.tensor: layer for layer in result.layers}
    for tensor in ("sg", "out"):
        assert by_name[tensor].matches and "computed by onnxruntime" not in by_name[tensor].reason


def test_a_wrong_onnx_model_is_caught(tmp_path):
    fixed = fixed_model("mlp")
    proto = write_annotated(fixed, tmp_path / "m.onnx")
    weight = next(t for t in proto.graph.initializer if t.name == "3.weight::raw")
    values = onnx.numpy_helper.to_array(weight).copy()
    values[:4] += 0.5
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    result = verify_annotated(fixed, proto, data("test")[:32])
    assert not result.ok and "3.weight" in result.unexpected
    assert result.summary().startswith(f"{len(result.mismatched)} tensor(s) differ: ")
    layer = next(layer for layer in result.layers if layer.tensor == "3.weight")
    assert layer.mismatches > 0 and layer.max_abs_diff > 0.25
    assert result.layers[0].matches  # what comes before the edit still matches


def test_models_that_do_not_belong_together_are_refused(tmp_path):
    with pytest.raises(OnnxModelError, match="not an annotated qfx model"):
        verify_annotated(fixed_model("mlp"), ROOT / "models" / "mlp.onnx", data("test")[:4])
    other = write_annotated(fixed_model("cnn"), tmp_path / "cnn.onnx")
    with pytest.raises(OnnxModelError, match="quantize different tensors"):
        verify_annotated(fixed_model("mlp"), other, data("test")[:4])


def test_float_input_is_compared_as_float32(tmp_path):
    fixed = fixed_model("mlp")
    x64 = data("test")[:8].to(torch.float64) + 1e-12  # not a float32 value: both sides see float32(x)
    result = verify_annotated(fixed, write_annotated(fixed, tmp_path / "m.onnx"), x64)
    check_consistent(result)
    assert np.isfinite([layer.max_abs_diff for layer in result.layers]).all()
