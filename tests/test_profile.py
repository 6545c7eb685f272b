"""``qfx-onnx profile`` and the numerical profile behind it."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import qfx_onnx
from qfx_onnx.profile import profile_model
from qfx_onnx_cli.main import app

MODELS = Path(__file__).resolve().parents[1] / "models"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def annotated(tmp_path_factory):
    folder = tmp_path_factory.mktemp("profile")
    with np.load(MODELS / "digits.npz") as z:
        x = torch.from_numpy(z["x"][:128])
    model = qfx_onnx.quantize(MODELS / "mlp.onnx", x, act_bits=6)
    path = folder / "mlp.qfx.onnx"
    qfx_onnx.write_annotated(model, path)
    return model, path, x


def test_profile_has_every_cast_in_graph_order_with_its_type_range(annotated):
    model, _, x = annotated
    profiles = profile_model(model, [x[:64], x[64:]])
    assert [p.tensor for p in profiles] == list(model.fixed_types())
    for p in profiles:
        t = model.fixed_types()[p.tensor]
        t = t[0] if isinstance(t, list) else t
        assert p.lsb_log2 == -t.frac and math.isclose(p.max_log2, math.log2(max(abs(t.min_value), t.max_value)))
        assert 0 < p.count and p.log2_abs.size <= 4096
    weight = next(p for p in profiles if p.role == "weight")
    # a weight's profile is the weight itself (entering its cast)
    gm = model.graph_module
    cast = next(n for n in gm.graph.nodes if n.op == "call_module" and n.meta.get("onnx_name") == weight.tensor)
    raw = gm.get_parameter(cast.args[0].target)
    assert weight.count == raw.numel()
    nonzero = raw.detach().double().flatten()
    assert np.allclose(np.sort(weight.log2_abs), np.sort(np.log2(np.abs(nonzero[nonzero != 0].numpy()))))
    again = profile_model(model, [x[:64], x[64:]])
    assert all(np.array_equal(a.log2_abs, b.log2_abs) for a, b in zip(profiles, again))  # seeded


def test_cli_writes_a_png_comparing_two_models(annotated, tmp_path):
    _, path, _ = annotated
    out = tmp_path / "p.png"
    result = CliRunner().invoke(app, ["profile", str(path), str(path), "--data", str(MODELS / "digits.npz"), "-o", str(out),
                                      "--samples", "64"])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 10_000
    assert "2 model(s)" in result.output
    again = CliRunner().invoke(app, ["profile", str(path), "--data", str(MODELS / "digits.npz"), "-o", str(out)])
    assert again.exit_code == 1 and "--force" in again.output
    bad = CliRunner().invoke(app, ["profile", str(path), "--data", str(MODELS / "digits.npz"), "-o", str(path), "--force"])
    assert bad.exit_code == 1 and "refusing to overwrite an input model" in bad.output
