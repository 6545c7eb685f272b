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
