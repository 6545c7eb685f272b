"""``qfx-onnx profile`` and the numerical profile behind it."""

from __future__ import annotations

import json
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


def test_cli_shared_options_json_quiet_force_and_data_forms(annotated, tmp_path):
    """--data is a string (an .npy here), --force replaces the plot, --json is one object on
    stdout, --quiet keeps the final line only: as in every other command."""
    model, path, x = annotated
    npy = tmp_path / "x.npy"
    np.save(npy, x.numpy())
    out = tmp_path / "p.png"
    out.write_bytes(b"old")
    result = CliRunner().invoke(app, ["profile", str(path), "--data", str(npy), "-o", str(out), "--samples", "32",
                                      "--force", "--json"])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == PNG_MAGIC
    report = json.loads(result.stdout)
    assert report["output"] == str(out) and report["samples"] == 32 and report["data"] == str(npy)
    [entry] = report["models"]
    assert entry["name"] == path.name and [t["tensor"] for t in entry["tensors"]] == list(model.fixed_types())
    assert all(t["max_log2"] is not None and t["count"] > 0 for t in entry["tensors"])
    quiet = CliRunner().invoke(app, ["profile", str(path), "--data", str(npy), "-o", str(out), "--samples", "32",
                                     "--force", "-q"])
    assert quiet.exit_code == 0, quiet.output
    lines = [line for line in quiet.output.splitlines() if not line.startswith("note:")]
    assert lines == [f"wrote {out} ({len(entry['tensors'])} tensors, 1 model(s), 32 samples)"]
    folder = CliRunner().invoke(app, ["profile", str(path), "--data", str(npy), "-o", str(tmp_path)])
    assert folder.exit_code == 1 and "is a folder" in folder.output


def test_profile_help_shows_the_shared_options():
    result = CliRunner().invoke(app, ["profile", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for flag in ("--data", "--force", "--json", "--quiet", "--samples", "--output"):
        assert flag in result.output
    assert "Usage: root profile [OPTIONS] MODEL..." in result.output or "profile [OPTIONS] MODEL..." in result.output


def test_quantize_plot_writes_the_profile_of_the_quantized_model(tmp_path):
    out, plot = tmp_path / "mlp.qfx.onnx", tmp_path / "mlp.png"
    args = ["quantize", str(MODELS / "mlp.onnx"), "--data", str(MODELS / "digits.npz"), "-o", str(out),
            "--calib-samples", "128", "--no-verify", "--plot", str(plot), "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert plot.read_bytes()[:8] == PNG_MAGIC and plot.stat().st_size > 10_000
    assert json.loads(result.stdout)["plot"] == str(plot)
    args[args.index(str(out))] = str(tmp_path / "other.qfx.onnx")  # a new output, the same plot: --force is needed
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 1 and f"{plot} already exists: pass --force" in again.output
    onto_input = CliRunner().invoke(app, ["quantize", str(MODELS / "mlp.onnx"), "-o", str(tmp_path / "b.qfx.onnx"),
                                          "--plot", str(MODELS / "mlp.onnx")])
    assert onto_input.exit_code == 1 and "would overwrite the input model" in onto_input.output
