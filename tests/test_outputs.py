"""Outputs: atomic, umask-following, and one-line errors for folders that cannot be written."""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

import qfx_onnx
from qfx_onnx.atomic import write_atomic
from qfx_onnx.errors import ExportError, OutputError
from qfx_onnx.train.checkpoint import CheckpointError
from qfx_onnx.hls.project import write_project
from qfx_onnx.train import checkpoint

MODELS = Path(__file__).resolve().parents[1] / "models"


@pytest.fixture
def umask_027():
    before = os.umask(0o027)
    yield
    os.umask(before)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_files_follow_the_umask(tmp_path, umask_027):
    assert mode(write_atomic(tmp_path / "a.txt", "text")) == 0o640
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_annotated_onnx_checkpoint_and_hls_project_follow_the_umask(tmp_path, umask_027):
    with np.load(MODELS / "digits.npz") as z:
        x = torch.from_numpy(z["x"][:32])
    model = qfx_onnx.quantize(MODELS / "mlp.onnx", x)
    qfx_onnx.write_annotated(model, tmp_path / "m.qfx.onnx")
    assert mode(tmp_path / "m.qfx.onnx") == 0o640
    checkpoint.save({"step": 1}, tmp_path / "ckpt" / "state.pt")
    assert mode(tmp_path / "ckpt" / "state.pt") == 0o640
    out = write_project({"a/b.txt": "x"}, tmp_path / "prj", force=False)
    assert mode(out) == 0o750 and mode(out / "a" / "b.txt") == 0o640


def test_a_missing_folder_is_one_line_naming_it(tmp_path):
    with pytest.raises(OutputError, match=r"the folder .*missing does not exist") as err:
        write_atomic(tmp_path / "missing" / "r.json", "{}", what="report")
    assert "\n" not in str(err.value)


def test_a_file_where_a_folder_should_be(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(OutputError, match="does not exist"):
        write_atomic(tmp_path / "f" / "r.json", "{}")


def test_unwritable_folders_are_one_line_errors_and_leave_nothing(tmp_path, monkeypatch):
    """Permission errors (simulated: the tests may run as root, whom a read-only folder does not stop)."""
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    with pytest.raises(OutputError, match=r"r.json: cannot write the report \(Permission denied\)"):
        write_atomic(tmp_path / "r.json", "{}", what="report")
    with pytest.raises(CheckpointError, match="Permission denied"):
        checkpoint.save({"step": 1}, tmp_path / "c" / "state.pt")
    with pytest.raises(ExportError, match=r"cannot write the HLS project \(Permission denied\)"):
        write_project({"a.txt": "x"}, tmp_path / "prj", force=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_a_failed_write_removes_its_temp_file(tmp_path):
    def boom(handle):
        handle.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutputError, match="No space left"):
        write_atomic(tmp_path / "x.bin", boom)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ through the CLI
from typer.testing import CliRunner  # noqa: E402

from qfx_onnx_cli.main import app  # noqa: E402


@pytest.fixture(scope="module")
def annotated_mlp(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    with np.load(MODELS / "digits.npz") as z:
        model = qfx_onnx.quantize(MODELS / "mlp.onnx", z["x"][:64])
    qfx_onnx.write_annotated(model, folder / "mlp.qfx.onnx")
    return folder / "mlp.qfx.onnx"


@pytest.mark.parametrize("command", ["inspect", "quantize", "finetune", "profile", "export-hls"])
def test_a_corrupt_npz_is_one_line_for_every_command(command, annotated_mlp, tmp_path):
    bad = tmp_path / "corrupt.npz"
    bad.write_bytes(b"PK\x03\x04garbage")
    model = MODELS / "mlp.onnx" if command in ("inspect", "quantize") else annotated_mlp
    args = [command, str(model), "--data", str(bad)]
    args += {"quantize": ["-o", str(tmp_path / "o.qfx.onnx")], "finetune": ["-o", str(tmp_path / "f.qfx.onnx")],
             "profile": ["-o", str(tmp_path / "p.png")], "export-hls": ["-o", str(tmp_path / "prj")]}.get(command, [])
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "corrupt.npz" in errors[0], result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.npz"]


def test_finetune_checks_labels_before_training_and_leaves_nothing(annotated_mlp, tmp_path):
    with np.load(MODELS / "digits.npz") as z:
        y = z["y"].copy()
        y[z["train_idx"][3]] = 12
        np.savez(tmp_path / "bad.npz", x=z["x"], y=y, train_idx=z["train_idx"], test_idx=z["test_idx"])
    out = tmp_path / "f.qfx.onnx"
    result = CliRunner().invoke(app, ["finetune", str(annotated_mlp), "--data", str(tmp_path / "bad.npz"), "-o", str(out)])
    assert result.exit_code == 1, result.output
    assert "bad.npz: label 12 is out of range for a model with 10 class outputs" in result.output
    assert "epoch" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npz"]  # no model, no checkpoint


def test_a_report_into_a_missing_folder_fails_before_any_work(tmp_path):
    result = CliRunner().invoke(app, ["quantize", str(MODELS / "mlp.onnx"), "--data", str(MODELS / "digits.npz"),
                                      "-o", str(tmp_path / "m.qfx.onnx"), "--report", str(tmp_path / "nodir" / "r.json")])
    assert result.exit_code == 1 and "nodir: output folder does not exist" in result.output
    assert "calibrat" not in result.output.replace("error", "") or "wrote" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_an_internal_error_is_one_line_with_exit_3(monkeypatch, tmp_path):
    import qfx_onnx.quant.api as api

    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(api, "quantize", broken)
    result = CliRunner().invoke(app, ["quantize", str(MODELS / "mlp.onnx"), "--data", str(MODELS / "digits.npz"),
                                      "-o", str(tmp_path / "m.qfx.onnx")])
    assert result.exit_code == 3
    lines = [line for line in result.output.splitlines() if "internal error" in line]
    assert len(lines) == 1 and "RuntimeError: boom second line" in lines[0] and "QFX_DEBUG=1" in lines[0]
    assert "Traceback" not in result.output and list(tmp_path.iterdir()) == []
