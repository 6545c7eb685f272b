"""Progress on the long stages, through the real CLI, and what finetune says about the model it trains.

A terminal is simulated with ``TTY_COMPATIBLE=1`` (rich reads it each time it asks whether it
writes to a terminal) and the consoles marked interactive (rich decides that once, when the console
is made at import), so the live displays render into CliRunner's output; they must not appear in a
log, with ``--quiet`` or with ``--json``.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import qfx_onnx
from qfx_onnx.data import load_arrays
from qfx_onnx.hls import csim
from qfx_onnx.hls.csim import CsimResult
from qfx_onnx_cli import output
from qfx_onnx_cli.main import app

MODELS = Path(__file__).resolve().parents[1] / "models"
DATA = MODELS / "digits.npz"
ELAPSED = re.compile(r"\d:\d\d:\d\d")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def terminal(monkeypatch):
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("TERM", "xterm-256color")
    for console in (output.console, output.err_console):
        monkeypatch.setattr(console, "is_interactive", True)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """300 training and 100 test digits, and an 8-bit MLP that truncates and wraps, beside them."""
    folder = tmp_path_factory.mktemp("progress")
    with np.load(DATA, allow_pickle=False) as z:
        np.savez(folder / "small.npz", x=z["x"], y=z["y"], train_idx=z["train_idx"][:300], test_idx=z["test_idx"][:100])
    x, _ = load_arrays(DATA, "train")
    model = qfx_onnx.quantize(MODELS / "mlp.onnx", x[:256], rounding="AP_TRN", overflow="AP_WRAP")
    qfx_onnx.write_annotated(model, folder / "mlp.qfx.onnx", source="mlp.onnx")
    return folder


def quantize(tmp_path, *extra):
    return CliRunner().invoke(app, ["quantize", str(MODELS / "mlp.onnx"), "--data", str(DATA), "-o",
                                    str(tmp_path / "q.qfx.onnx"), "--calib-samples", "128", "--verify-samples", "8",
                                    *extra])


def test_quantize_shows_calibration_and_verify_with_elapsed_time_on_a_terminal(terminal, tmp_path):
    result = quantize(tmp_path)
    assert result.exit_code == 0, result.output
    assert "importing and calibrating" in result.output and "verifying in onnxruntime" in result.output
    assert ELAPSED.search(result.output)


@pytest.mark.parametrize("flag", ["--quiet", "--json", None])
def test_no_progress_with_quiet_json_or_off_a_terminal(flag, monkeypatch, request, tmp_path):
    if flag is None:
        monkeypatch.setenv("TTY_COMPATIBLE", "0")  # a log: no terminal
    else:
        request.getfixturevalue("terminal")
    result = quantize(tmp_path, *([flag] if flag else []))
    assert result.exit_code == 0, result.output
    assert "calibrating" not in result.output and "verifying in onnxruntime" not in result.output
    assert not ELAPSED.search(result.output) and "\x1b[?25l" not in result.output  # no live display, no hidden cursor


def test_finetune_counts_the_batches_of_each_epoch(terminal, small, tmp_path):
    result = CliRunner().invoke(app, ["finetune", str(small / "mlp.qfx.onnx"), "--data", str(small / "small.npz"),
                                      "-o", str(tmp_path / "ft.qfx.onnx"), "--epochs", "2", "--batch-size", "50",
                                      "--act-bits", "6"])
    assert result.exit_code == 0, result.output
    steps = 270 // 50 + 1  # 300 training rows less the 10% validation, in batches of 50
    assert "calibrating binary points" in result.output  # --act-bits recalibrates the activations
    for epoch in (1, 2):
        assert re.search(rf"epoch {epoch}/2 .*{steps}/{steps}.* batches", result.output), result.output[-2000:]
    assert "verifying in onnxruntime" in result.output
    assert f"epoch 2/2: train loss" not in result.output  # the per-epoch log lines are for logs only


def test_inspect_counts_the_batches_it_measures(terminal, small):
    result = CliRunner().invoke(app, ["inspect", str(small / "mlp.qfx.onnx"), "--data", str(DATA), "--batch-size", "100"])
    assert result.exit_code == 0, result.output
    assert re.search(r"measuring every tensor on the data.*4/4", result.output)  # 360 test samples


def test_csim_compile_shows_its_elapsed_time(terminal, small, tmp_path, monkeypatch):
    """The compile is faked (g++ takes minutes): it lasts a little over a second, the display shows
    the seconds passing and the summary reports the time the compile took."""

    def slow_compile(project, top, **kwargs):
        time.sleep(1.3)
        return Path("csim_binary")

    def run(project, top, *, binary=None, **kwargs):
        assert binary == Path("csim_binary")
        return CsimResult(20, 200, 0, 0, "QFX-CSIM vectors=20 values=200 mismatches=0", 0.0, 0.1)

    monkeypatch.setattr(csim, "compile_csim", slow_compile)
    monkeypatch.setattr(csim, "run_csim", run)
    result = CliRunner().invoke(app, ["export-hls", str(small / "mlp.qfx.onnx"), "-o", str(tmp_path / "prj"), "--csim",
                                      "--data", str(small / "small.npz")])
    assert result.exit_code == 0, result.output
    assert re.search(r"C simulation: compiling with g\+\+.*0:00:01", result.output)
    assert re.search(r"compile 1\.\d s, run 0\.10 s", result.output)


# --- what finetune says about the model it trains ------------------------------------------------


def finetune(small, tmp_path, *extra):
    return CliRunner().invoke(app, ["finetune", str(small / "mlp.qfx.onnx"), "--data", str(small / "small.npz"),
                                    "-o", str(tmp_path / "ft.qfx.onnx"), "--epochs", "1", "--batch-size", "100", *extra])


def test_khot_says_the_before_score_is_of_the_projected_model_and_that_modes_change(small, tmp_path):
    result = finetune(small, tmp_path, "--khot", "2")
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if "--khot" in line]
    assert notes == ["note: --khot: 3 tensor(s) now round to the nearest K-hot code and saturate (AP_RND, AP_SAT) "
                     "instead of AP_TRN, AP_WRAP"]
    assert "validation: before (after K-hot projection of the weights) " in result.output
    quiet = finetune(small, tmp_path, "--khot", "2", "--force", "--json", "-q")
    assert quiet.exit_code == 0, quiet.output
    assert json.loads(quiet.stdout)["prepared"] == ["K-hot projection of the weights"]
    assert "instead of AP_TRN, AP_WRAP" in quiet.stderr  # a warning survives --quiet


def test_without_changes_before_is_plain_and_nothing_is_said_about_modes(small, tmp_path):
    result = finetune(small, tmp_path)
    assert result.exit_code == 0, result.output
    assert re.search(r"validation: before \d", result.output) and "AP_SAT" not in result.output


def test_khot_help_states_the_mode():
    result = CliRunner().invoke(app, ["finetune", "--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0
    assert "round to the nearest K-hot code and saturate (AP_RND, AP_SAT)" in " ".join(result.output.split())
