"""The checks that say "bit-exact" must be able to say "not": one wrong expected code makes the C
simulation report exactly that value and fail, in Python and through ``qfx-onnx export-hls --csim``;
one wrong weight in the annotated ONNX makes ``qfx-onnx quantize`` (``--verify``) fail with one line
naming the tensor.

The mlp's project is generated from its annotated file and compiled once; the other C simulations
reuse that binary (the testbench reads its codes from ``tb/tb_data`` at run time), so each
negative case costs a run, not a compile.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx import numpy_helper
from typer.testing import CliRunner

import qfx_onnx.hls.csim as csim
import qfx_onnx.hls.project as project
from qfx_onnx.data import load_arrays
from qfx_onnx.hls.csim import compile_csim, run_csim
from qfx_onnx.importer import load_onnx
from qfx_onnx.quant.annotated import read_annotated, write_annotated
from qfx_onnx.quant.quantize import quantize_graph
from qfx_onnx_cli.main import app

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits.npz"
VECTORS = 4
TOP = "mlp"
MISMATCH = re.compile(r"^mismatch: vector (\d+) output (\d+) element (\d+): got code (-?\d+), expected (-?\d+)$", re.M)


@pytest.fixture(scope="module")
def mlp_file(tmp_path_factory) -> Path:
    x, _ = load_arrays(DIGITS, "train")
    path = tmp_path_factory.mktemp("model") / f"{TOP}.qfx.onnx"
    write_annotated(quantize_graph(load_onnx(ROOT / "models" / "mlp.onnx"), [x[:256]]), path, source="mlp.onnx")
    return path


@pytest.fixture(scope="module")
def compiled(mlp_file, tmp_path_factory) -> tuple[Path, Path]:
    """(project, csim binary) of the mlp's project with random input codes (what the CLI does
    without --data), after a C simulation that passes."""
    folder = tmp_path_factory.mktemp("hls") / "prj"
    result = project.export_hls(read_annotated(mlp_file), folder, top=TOP, n_vectors=VECTORS)
    binary = compile_csim(result.project, TOP)
    sim = run_csim(result.project, TOP, binary=binary)
    assert sim.passed and (sim.vectors, sim.mismatches) == (VECTORS, 0), sim.output[-2000:]
    assert MISMATCH.search(sim.output) is None
    return result.project, binary


def _copy(prj: Path, to: Path) -> Path:
    shutil.copytree(prj, to)
    return to


def _codes(path: Path) -> list[list[int]]:
    return [[int(v) for v in line.split()] for line in path.read_text().splitlines()]


def _write_codes(path: Path, rows: list[list[int]]) -> None:
    path.write_text("".join(" ".join(map(str, row)) + "\n" for row in rows))


@pytest.mark.parametrize("vector, element, delta", [(0, 0, 1), (2, 7, -1), (VECTORS - 1, 9, 64)])
def test_one_wrong_expected_code_is_the_one_mismatch_reported(compiled, tmp_path, vector, element, delta):
    prj, binary = compiled
    prj = _copy(prj, tmp_path / "prj")
    path = prj / "tb" / "tb_data" / "output_codes.dat"
    rows = _codes(path)
    assert len(rows) == VECTORS and all(len(r) == 10 for r in rows)
    right = rows[vector][element]
    rows[vector][element] = right + delta
    _write_codes(path, rows)
    sim = run_csim(prj, TOP, binary=binary)
    assert not sim.passed and sim.returncode == 1
    assert (sim.vectors, sim.values, sim.mismatches) == (VECTORS, VECTORS * 10, 1)
    assert MISMATCH.findall(sim.output) == [(str(vector), "0", str(element), str(right), str(right + delta))]


def test_csim_result_fails_on_any_sign_of_trouble():
    """``passed`` needs exit 0, no mismatch and at least one vector, each on its own."""
    ok = dict(vectors=4, values=40, mismatches=0, returncode=0, output="", compile_s=0.0, run_s=0.0)
    assert csim.CsimResult(**ok).passed
    for bad in (dict(mismatches=1), dict(returncode=1), dict(vectors=0), dict(mismatches=-1)):
        assert not csim.CsimResult(**{**ok, **bad}).passed, bad


def test_every_wrong_code_is_counted(compiled, tmp_path):
    """A wrong row is 10 mismatches; the printout stops at 20 lines but the count does not."""
    prj, binary = compiled
    prj = _copy(prj, tmp_path / "prj")
    path = prj / "tb" / "tb_data" / "output_codes.dat"
    rows = [[c + 1 for c in row] for row in _codes(path)]
    _write_codes(path, rows)
    sim = run_csim(prj, TOP, binary=binary)
    assert sim.returncode == 1 and sim.mismatches == VECTORS * 10
    assert len(MISMATCH.findall(sim.output)) == min(20, VECTORS * 10)


def test_export_hls_csim_exits_non_zero_on_a_mismatch(compiled, mlp_file, tmp_path, monkeypatch):
    """Through the CLI: the expected codes the exporter writes get one wrong value, and the command
    fails with one line naming it. The compile is the fixture's (the same project, byte for byte)."""
    prj, binary = compiled
    real = project.expected_codes

    def one_wrong(*args, **kwargs):
        codes = real(*args, **kwargs).copy()
        codes[1, 3] += 1
        return codes

    monkeypatch.setattr(project, "expected_codes", one_wrong)
    compiles = []
    monkeypatch.setattr(csim, "compile_csim", lambda p, top, **kw: compiles.append((p, top)) or binary)
    out = tmp_path / "cli_prj"
    result = CliRunner().invoke(app, ["export-hls", str(mlp_file), "-o", str(out), "--csim",
                                      "--test-vectors", str(VECTORS)])
    assert compiles == [(out.resolve(), TOP)]
    assert (out / "firmware" / f"{TOP}.cpp").read_text() == (prj / "firmware" / f"{TOP}.cpp").read_text()
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "C simulation failed: 1 mismatching values" in errors[0], result.output
    assert "vector 1 output 0 element 3" in errors[0]


def test_export_hls_csim_exits_zero_when_every_code_matches(compiled, mlp_file, tmp_path, monkeypatch):
    """The control for the test above: the same command, codes untouched."""
    _, binary = compiled
    monkeypatch.setattr(csim, "compile_csim", lambda p, top, **kw: binary)
    result = CliRunner().invoke(app, ["export-hls", str(mlp_file), "-o", str(tmp_path / "ok"), "--csim",
                                      "--test-vectors", str(VECTORS)])
    assert result.exit_code == 0, result.output
    assert "csim: bit-exact" in result.output


def test_quantize_verify_exits_non_zero_naming_the_tensor(tmp_path, monkeypatch):
    """One weight of the annotated ONNX about to be written and verified is changed: onnxruntime
    disagrees with the emulation where exactness is guaranteed, and quantize fails with one line
    naming that tensor and leaves no model behind."""
    import qfx_onnx.quant.annotated_write as annotated_write

    real = annotated_write.build_annotated

    def corrupted(model, **kwargs):
        proto = real(model, **kwargs)
        weight = next(t for t in proto.graph.initializer if t.name == "3.weight::raw")
        values = numpy_helper.to_array(weight).copy()
        values[:4] += 0.5
        weight.CopyFrom(numpy_helper.from_array(values, weight.name))
        return proto

    monkeypatch.setattr(annotated_write, "build_annotated", corrupted)
    out = tmp_path / "mlp.qfx.onnx"
    result = CliRunner().invoke(app, ["quantize", str(ROOT / "models" / "mlp.onnx"), "--data", str(DIGITS),
                                      "-o", str(out), "--calib-samples", "128", "--verify-samples", "16"])
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "3.weight" in errors[0], result.output
    assert not out.exists()


def test_quantize_verify_passes_unchanged(tmp_path):
    """The control: the same command without the corruption verifies bit for bit and exits 0."""
    out = tmp_path / "mlp.qfx.onnx"
    result = CliRunner().invoke(app, ["quantize", str(ROOT / "models" / "mlp.onnx"), "--data", str(DIGITS),
                                      "-o", str(out), "--calib-samples", "128", "--verify-samples", "16"])
    assert result.exit_code == 0, result.output
    assert "bit for bit" in result.output and out.is_file()
