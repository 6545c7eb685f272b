"""User text reaches the terminal literally: no rich markup, no emoji codes, no crash.

Paths, node and tensor names, hook names and config keys are the user's; ``[/]`` once crashed the
error printer itself, ``[bold]`` vanished and ``mod:boom`` printed as an emoji.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper
from typer.testing import CliRunner

from onnx_builders import make_model, value_info
from qfx_onnx_cli.main import app

MODELS = Path(__file__).resolve().parent.parent / "models"
MARKUP = "[red]x[/red]"

pytestmark = pytest.mark.usefixtures("one_thread")


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def literal(result, exit_code: int, *texts: str) -> str:
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output and "MarkupError" not in repr(result.exception)
    for text in texts:
        assert text in result.output
    assert "\N{COLLISION SYMBOL}" not in result.output
    return result.output


@pytest.fixture
def bracket_dir(tmp_path):
    """``tmp/a[``: so that ``tmp/a[/]b.onnx`` is a real path holding a closing tag."""
    folder = tmp_path / "a["
    folder.mkdir()
    return folder


def test_error_with_a_closing_tag_in_the_path(bracket_dir):
    literal(invoke("quantize", bracket_dir / "]missing.onnx"), 1, "error: ", "a[/]missing.onnx: no such file")
    literal(invoke("export-hls", bracket_dir / "]missing.onnx", "-o", bracket_dir / "prj"), 1, "a[/]missing.onnx: no such file")
    garbage = bracket_dir / "]b[bold].onnx"
    garbage.write_bytes(b"not a model")
    literal(invoke("inspect", garbage), 1, "error: ", "]b[bold].onnx: not a readable ONNX model")


def test_output_lines_with_tags_in_the_path(bracket_dir, tmp_path):
    model = bracket_dir / "]b.onnx"
    shutil.copy(MODELS / "mlp.onnx", model)
    shutil.copy(MODELS / "digits.npz", bracket_dir / "[bold]d.npz")
    out = bracket_dir / "[bold]o.qfx.onnx"
    result = invoke("quantize", model, "--calib-samples", 64, "--verify-samples", 4, "-o", out)
    literal(result, 0, f"calibration data: {bracket_dir}/[bold]d.npz", f"wrote {out}")
    assert out.is_file()
    literal(invoke("inspect", model), 0, "]b.onnx: opset")


def test_bold_tag_in_a_missing_path_is_kept(tmp_path):
    literal(invoke("inspect", tmp_path / "[bold]m.onnx"), 1, "[bold]m.onnx")
    literal(invoke("export-hls", tmp_path / "[bold]m.onnx", "-o", tmp_path / "prj"), 1, "[bold]m.onnx: no such file")


def test_hook_name_is_not_an_emoji(tmp_path):
    literal(invoke("inspect", MODELS / "mlp.onnx", "--data", "mod:boom"), 1, "mod:boom: cannot import module 'mod'")
    literal(invoke("quantize", MODELS / "mlp.onnx", "--data", "qfx_no_such_mod:boom", "-o", tmp_path / "m.qfx.onnx"), 1,
            "qfx_no_such_mod:boom:")


@pytest.fixture
def markup_model(tmp_path):
    """Gemm then Relu, whose node names and hidden tensor name are rich markup."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["h[/]:boom:"], name=MARKUP, transB=1),
             helper.make_node("Relu", ["h[/]:boom:"], ["y"], name="[bold]relu")]
    inits = {"w": rng.standard_normal((3, 4)).astype(np.float32), "b": np.zeros(3, np.float32)}
    path = tmp_path / "m.onnx"
    onnx.save(make_model(nodes, [value_info("x", ["N", 4])], ["y"], initializers=inits), path)
    np.savez(tmp_path / "m.npz", x=rng.standard_normal((16, 4)).astype(np.float32))
    return path


def test_node_and_tensor_names_in_tables(markup_model, tmp_path):
    literal(invoke("inspect", markup_model), 0, MARKUP, "[bold]relu", "converted")
    out = literal(invoke("quantize", markup_model, "-o", tmp_path / "m.qfx.onnx", "--all"), 0, "h[/]:boom:")
    assert "bit for bit" in out


def test_unsupported_node_name_in_the_error(tmp_path):
    nodes = [helper.make_node("Sin", ["x"], ["y"], name=MARKUP)]
    path = tmp_path / "u.onnx"
    onnx.save(make_model(nodes, [value_info("x", [2])], ["y"]), path)
    literal(invoke("inspect", path), 2, f"Sin (node {MARKUP})")


@pytest.mark.parametrize("toml, needles", [
    ('[defaults]\n"[bold]weight_bits:boom:" = 6\n', ["[bold]weight_bits:boom:"]),
    ('["sec[/]"]\nx = 1\n', ["sec[/]"]),
    ('[[override]]\nnode = "*"\n"[red]bits[/red]" = 6\n', ["[red]bits[/red]"]),
])
def test_config_keys_and_sections(tmp_path, toml, needles):
    config = tmp_path / "p[bold].toml"
    config.write_text(toml)
    shutil.copy(MODELS / "mlp.onnx", tmp_path / "mlp.onnx")
    shutil.copy(MODELS / "digits.npz", tmp_path / "digits.npz")
    literal(invoke("quantize", tmp_path / "mlp.onnx", "--config", config, "--no-verify"), 1, "p[bold].toml", *needles)
    assert not (tmp_path / "mlp.qfx.onnx").exists()
