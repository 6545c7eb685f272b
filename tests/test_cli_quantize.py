"""``qfx-onnx quantize`` end to end through the real CLI: outputs, report, errors."""

import json
import shutil
from pathlib import Path

import onnx
import pytest
from typer.testing import CliRunner

from qfx_onnx.quant.annotated import read_annotated
from qfx_onnx_cli.main import app

runner = CliRunner()
MODELS = Path(__file__).resolve().parent.parent / "models"


@pytest.fixture()
def workdir(tmp_path):
    for name in ("mlp.onnx", "cnn.onnx", "digits.npz"):
        shutil.copy(MODELS / name, tmp_path / name)
    return tmp_path


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_main_job_defaults_find_the_data_and_verify(workdir):
    result = invoke("quantize", workdir / "cnn.onnx", "--report", workdir / "r.json")
    assert result.exit_code == 0, result.output
    out = workdir / "cnn.qfx.onnx"
    onnx.checker.check_model(onnx.load(out), full_check=True)
    assert "bit for bit" in result.output and "fixed point" in result.output
    report = json.loads((workdir / "r.json").read_text())
    assert report["verify"]["ok"] and report["fixed_accuracy"] > 0.95
    roles = {t["role"] for t in report["tensors"]}
    assert {"input", "weight", "bias", "constant", "act", "elementwise"} <= roles
    assert all(0.0 <= t["clipped_fraction"] <= 1.0 for t in report["tensors"])
    types = read_annotated(out).fixed_types()
    assert len(types) == len(report["tensors"])


def test_flags_reach_the_written_types(workdir):
    out = workdir / "m.qfx.onnx"
    result = invoke("quantize", workdir / "mlp.onnx", "--data", workdir / "digits.npz", "-o", out,
                    "--weight-bits", 5, "--act-bits", 7, "--rounding", "AP_RND_CONV", "--overflow", "AP_WRAP",
                    "--method", "mse", "--calib-samples", 128, "--per-channel")
    assert result.exit_code == 0, result.output
    model = read_annotated(out)
    for site in model.sites:
        t = model.fixed_types()[site.tensor]
        first = t[0] if isinstance(t, list) else t
        assert first.q.value == "AP_RND_CONV" and first.o.value == "AP_WRAP"
        if site.role == "weight":
            assert isinstance(t, list) and first.width == 5
        if site.role == "act":
            assert first.width == 7


def test_fold_bn_and_config(workdir):
    cfg = workdir / "p.toml"
    cfg.write_text('[[override]]\nop = "Gemm"\nrole = "weight"\nbits = 4\n')
    result = invoke("quantize", workdir / "cnn.onnx", "--fold-bn", "--config", cfg, "-o", workdir / "f.qfx.onnx", "--no-verify")
    assert result.exit_code == 0, result.output
    types = read_annotated(workdir / "f.qfx.onnx").fixed_types()
    assert not any("BatchNormalization::scale" in name for name in types)


@pytest.mark.parametrize("args, message", [
    (["quantize", "{w}/missing.onnx"], "no such file"),
    (["quantize", "{w}/digits.npz", "--data", "{w}/digits.npz"], "digits.npz"),
    (["quantize", "{w}/mlp.onnx", "-o", "{w}/mlp.onnx"], "refusing to overwrite"),
    (["quantize", "{w}/mlp.onnx", "--method", "median"], "median"),
    (["quantize", "{w}/mlp.onnx", "--rounding", "AP_NEAREST"], "AP_NEAREST"),
    (["quantize", "{w}/mlp.onnx", "--weight-bits", "40"], "--weight-bits 40"),
    (["quantize", "{w}/mlp.onnx", "--data", "{w}/nothing.npz"], "nothing.npz"),
    (["quantize", "{w}/mlp.onnx", "--config", "{w}/p.toml"], "matches no tensor"),
])
def test_bad_input_is_one_line_error_and_no_output(workdir, args, message):
    (workdir / "p.toml").write_text('[[override]]\nnode = "nope*"\nbits = 4\n')
    before = sorted(p.name for p in workdir.iterdir())
    result = invoke(*[a.format(w=workdir) for a in args])
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output
    assert len([line for line in result.output.strip().splitlines() if line.startswith("error")]) == 1
    assert sorted(p.name for p in workdir.iterdir()) == before  # nothing half-written


def test_no_data_anywhere_is_an_error(tmp_path):
    shutil.copy(MODELS / "mlp.onnx", tmp_path / "mlp.onnx")
    result = invoke("quantize", tmp_path / "mlp.onnx")
    assert result.exit_code != 0 and "--data" in result.output


def test_verify_checks_the_bytes_this_run_writes_not_the_file_at_the_path(workdir, monkeypatch):
    """Two runs with the same -o (a sweep with a typo): each verifies its own model in memory,
    before writing, so another run's file at -o is never read or blamed."""
    import onnx as onnx_module

    import qfx_onnx.quant.verify as verify_module

    out = workdir / "m.qfx.onnx"
    assert invoke("quantize", workdir / "cnn.onnx", "--data", workdir / "digits.npz", "-o", out).exit_code == 0
    other_run = out.read_bytes()  # what "the other run" left at -o: a different model
    real = verify_module.verify_annotated
    seen = []

    def only_protos(model, onnx_model, x, **kwargs):
        seen.append(type(onnx_model))
        assert isinstance(onnx_model, onnx_module.ModelProto), "verify must check the bytes about to be written"
        assert out.read_bytes() == other_run  # nothing written yet
        return real(model, onnx_model, x, **kwargs)

    monkeypatch.setattr(verify_module, "verify_annotated", only_protos)
    result = invoke("quantize", workdir / "mlp.onnx", "--data", workdir / "digits.npz", "-o", out, "--force")
    assert result.exit_code == 0, result.output
    assert seen == [onnx_module.ModelProto]
    assert out.read_bytes() != other_run and read_annotated(out).fixed_types()
