"""The HLS exporter apart from whole-model C simulation: exact constants, name sanitization (with a
C simulation of a tiny model through the CLI), unsupported ops, the output folder rules, K-hot
selection, and the resource model's arithmetic."""

from __future__ import annotations

import json
import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from qfx_onnx.errors import ExportError
from qfx_onnx.hls.codegen import exact_decimal
from qfx_onnx.hls.estimate import bram18, dsp_per_product
from qfx_onnx.hls.names import Namer, sanitize, top_name
from qfx_onnx.hls.project import export_hls
from qfx_onnx.fixed.types import FixedType
from qfx_onnx.importer import load_onnx
from qfx_onnx.quant.annotated import write_annotated
from qfx_onnx.quant.policy import Policy
from qfx_onnx.quant.quantize import quantize_graph
from qfx_onnx_cli.main import app

import test_hls_models as zoo
from test_hls_csim import DIGITS, digits, ptq

runner = CliRunner()
IDENT = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
LITERAL = re.compile(r"-?\d+\.\d+")


def _cnn_project(tmp_path: Path, **kw):
    return export_hls(ptq("cnn"), tmp_path / "cnn", top="cnn", data=(digits("test"),), n_vectors=4, **kw)


# ------------------------------------------------------------------------------------ constants
def test_exact_decimal_is_the_exact_value_and_an_exact_double():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        frac = int(rng.integers(-40, 80))
        width = int(rng.integers(1, 54))
        code = int(rng.integers(-(1 << (width - 1)), 1 << (width - 1)))
        text = exact_decimal(code, frac)
        assert Fraction(text) == Fraction(code) * Fraction(2) ** -frac, (code, frac, text)
        assert Fraction(float(text)) == Fraction(text), "the literal must be an exact double"
    assert exact_decimal(-37, 7) == "-0.2890625"
    assert exact_decimal(3, -2) == "12.0"
    assert exact_decimal(0, 5) == "0.0"


def test_weight_headers_hold_the_exact_codes(tmp_path):
    result = _cnn_project(tmp_path)
    assert result.model.constants
    for c in result.model.constants:
        text = (tmp_path / "cnn" / "firmware" / "weights" / f"{c.ident}.h").read_text()
        body = text[text.index("= {") + 3:text.rindex("};")]
        literals = LITERAL.findall(body)
        assert len(literals) == c.size
        t = c.ctype.type
        codes = [Fraction(v) * Fraction(2) ** t.frac for v in literals]
        assert all(q.denominator == 1 for q in codes)
        assert [int(q) for q in codes] == c.codes.tolist()
        assert all(t.int_min <= int(q) <= t.int_max for q in codes)
        assert all(Fraction(float(v)) == Fraction(v) for v in literals)


# ------------------------------------------------------------------------------------ names
def test_sanitize_keeps_only_identifier_characters():
    namer = Namer()
    names = [namer.name(n, "t_") for n in zoo.HOSTILE_NAMES + zoo.HOSTILE_NAMES]
    assert len(set(names)) == len(names)
    assert all(IDENT.match(n) and "__" not in n for n in names)
    assert sanitize("*/\n#include") == "include"
    assert top_name("class */") == "qfx_class" and top_name("9lives") == "qfx_9lives"
    assert Namer().name("int") == "q_int"


FORBIDDEN = ["*/", "/*", "#include <stdio.h>", '"evil.h"', "#define main", "return 3", "int x;",
             "\u00e9", "\r", "\t", "w'"]


def test_hostile_names_never_reach_the_cpp_and_csim_passes_through_the_cli(tmp_path):
    model = zoo.hostile()
    x = torch.from_numpy(zoo.inputs_for(model, 32))
    fpm = quantize_graph(load_onnx(model), [x])
    annotated = tmp_path / "hostile.qfx.onnx"
    write_annotated(fpm, annotated, example_input=x[:1])
    np.save(tmp_path / "x.npy", x.numpy())
    out = tmp_path / "prj"
    res = runner.invoke(app, ["export-hls", str(annotated), "-o", str(out), "--csim", "--data", str(tmp_path / "x.npy"),
                              "--test-vectors", "8", "--top", "class */"])
    assert res.exit_code == 0, res.output
    assert "0 mismatches" in res.output and "bit-exact" in res.output
    generated = [p for p in out.rglob("*") if p.is_file() and p.suffix in (".h", ".cpp", ".tcl", ".md")]
    assert len(generated) > 8
    for path in generated:
        text = path.read_text()
        for bad in FORBIDDEN:
            assert bad not in text, f"{bad!r} leaked into {path.name}"
        for raw in zoo.HOSTILE_NAMES:
            assert re.fullmatch(r"\w+", raw) or raw not in text  # plain words may occur as words
    assert (out / "firmware" / "qfx_class.cpp").is_file()
    for t in re.findall(r"typedef .*? (\w+);", (out / "firmware" / "defines.h").read_text()):
        assert IDENT.match(t)
    report = json.loads((out / "report.json").read_text())  # raw names may live here, JSON-escaped
    assert report["top"] == "qfx_class"


# ------------------------------------------------------------------------------------ errors
def test_unsupported_op_is_one_error_naming_node_and_op(tmp_path):
    model = zoo.with_softmax()
    x = torch.from_numpy(zoo.inputs_for(model, 16))
    fpm = quantize_graph(load_onnx(model), [x], Policy(nonlinear={"exact": False}))  # a softmax left in float
    with pytest.raises(ExportError) as info:
        export_hls(fpm, tmp_path / "sm", data=(x,), n_vectors=2)
    message = str(info.value)
    assert "Softmax" in message and "'softmax\\n*/'" in message and "\n" not in message
    assert not (tmp_path / "sm").exists()

    annotated = tmp_path / "sm.qfx.onnx"
    write_annotated(fpm, annotated, example_input=x[:1])
    res = runner.invoke(app, ["export-hls", str(annotated), "-o", str(tmp_path / "sm")])
    assert res.exit_code == 1
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Softmax" in lines[0]
    assert "Traceback" not in res.output


def test_bad_options_are_errors(tmp_path):
    fpm = ptq("mlp")
    for kw in (dict(io="serial"), dict(reuse_factor=0), dict(khot_max=-1), dict(clock_ns=0)):
        with pytest.raises(ExportError):
            export_hls(fpm, tmp_path / "bad", data=(digits("test"),), n_vectors=2, **kw)


@pytest.mark.parametrize("count", ["0", "-3", "100001", "1000000000"])
def test_test_vector_counts_are_bounded_before_any_work(tmp_path, count):
    """A count that would size memory past the stated bound is refused before the model is read."""
    missing_model = tmp_path / "never_read.qfx.onnx"
    missing_model.write_bytes(b"not onnx: reading it would be a different error")
    result = CliRunner().invoke(app, ["export-hls", str(missing_model), "-o", str(tmp_path / "prj"), "--test-vectors", count])
    assert result.exit_code == 1
    assert f"--test-vectors {count}: must be from 1 to 100,000" in result.output
    assert not (tmp_path / "prj").exists()


def test_output_folder_needs_force_and_is_replaced_whole(tmp_path):
    fpm = ptq("mlp")
    out = tmp_path / "prj"
    out.mkdir()
    export_hls(fpm, out, data=(digits("test"),), n_vectors=2)  # an empty folder is no one's work
    (out / "stale.txt").write_text("old")
    with pytest.raises(ExportError, match="--force"):
        export_hls(fpm, out, data=(digits("test"),), n_vectors=2)
    assert (out / "stale.txt").is_file()
    export_hls(fpm, out, data=(digits("test"),), n_vectors=2, force=True)
    assert not (out / "stale.txt").exists() and (out / "build.tcl").is_file()
    # --force replaces a generated project only, never a user's folder that happens to be named
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    with pytest.raises(ExportError, match="not an HLS project written by qfx-onnx"):
        export_hls(fpm, mine, data=(digits("test"),), n_vectors=2, force=True)
    assert (mine / "notes.txt").read_text() == "precious"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary folder left behind"
    model = tmp_path / "in" / "m.qfx.onnx"
    model.parent.mkdir()
    model.write_text("x")
    with pytest.raises(ExportError, match="holds the input"):
        export_hls(fpm, model.parent, data=(digits("test"),), n_vectors=2, force=True, protect=(model,))


def test_cli_options_reach_the_project(tmp_path):
    fpm = ptq("mlp")
    annotated = tmp_path / "mlp.qfx.onnx"
    write_annotated(fpm, annotated, example_input=digits("test")[:1])
    out = tmp_path / "prj"
    args = ["export-hls", str(annotated), "-o", str(out), "--io", "stream", "--reuse-factor", "4",
            "--part", "xc7z020clg400-1", "--clock-ns", "4", "--data", str(DIGITS), "--test-vectors", "3"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    tcl = (out / "build.tcl").read_text()
    assert "set_part {xc7z020clg400-1}" in tcl and "create_clock -period 4.0" in tcl
    for step in ("open_project", "set_top mlp", "add_files", "open_solution", "csim_design", "csynth_design",
                 "cosim_design", "export_design"):
        assert step in tcl
    assert len((out / "tb" / "tb_data" / "input_codes.dat").read_text().splitlines()) == 3
    assert "hls::stream<" in (out / "firmware" / "mlp.h").read_text()
    report = json.loads((out / "report.json").read_text())
    assert report["reuse_factor"] == 4 and report["io"] == "stream"
    res = runner.invoke(app, args)
    assert res.exit_code == 1 and "already exists" in res.output
    assert runner.invoke(app, args + ["--force"]).exit_code == 0


def test_estimate_says_the_same_in_the_cli_and_the_generated_readme(tmp_path):
    """Multiplier instances and products per inference, the same numbers in both places; a max
    pool (channels unrolled like conv) is never slower than the conv feeding it."""
    fpm = ptq("cnn")
    annotated = tmp_path / "cnn.qfx.onnx"
    write_annotated(fpm, annotated, example_input=digits("test")[:1])
    out = tmp_path / "prj"
    res = CliRunner().invoke(app, ["export-hls", str(annotated), "-o", str(out), "--test-vectors", "2"], env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    readme = (out / "README.md").read_text()
    for e in report["layers"]:
        products = sum(m["count"] for m in e["multiplies"].values())
        row = next(line for line in readme.splitlines() if line.startswith(f"| {e['layer']} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[4:6] == [str(e["multipliers"]), str(products)]
        cli_row = next(line for line in res.output.splitlines() if f" {e['layer']} " in line)
        assert f" {e['multipliers']} " in cli_row and f" {products} " in cli_row
    convs = [e for e in report["layers"] if e["kind"] == "conv"]
    assert convs and all(e["multipliers"] < sum(m["count"] for m in e["multiplies"].values()) for e in convs)
    layers = report["layers"]
    for before, pool in zip(layers, layers[1:]):
        if pool["kind"] == "pool" and before["kind"] == "conv":
            assert pool["latency"] <= before["latency"], (before, pool)
    assert "*multipliers*: multiplier instances in hardware" in readme


# ------------------------------------------------------------------------------------ K-hot
def test_khot_max_selects_weights_whose_codes_have_few_digits(tmp_path):
    from qfx_onnx.hls.shift_add import csd_digits

    for code in range(-300, 301):
        assert sum(s * 2**p for s, p in csd_digits(code)) == code
    all_8bit = _cnn_project(tmp_path, khot_max=4)  # 8-bit codes never need more than 4 signed digits
    linear = [layer for layer in all_8bit.model.layers if layer.kind in ("conv", "dense")]
    assert all(layer.weight.khot == 4 for layer in linear)
    assert all(e["dsp"] == 0 for e in all_8bit.report["layers"] if e["kind"] == "dense")
    none = _cnn_project(tmp_path, khot_max=1, force=True)
    assert not any(layer.weight.khot for layer in none.model.layers if layer.kind in ("conv", "dense"))


# ------------------------------------------------------------------------------------ estimate
def test_dsp_tiling_and_bram_arithmetic():
    fx = lambda w, s=True: FixedType(w, 1, signed=s)  # noqa: E731
    assert dsp_per_product(fx(8), fx(8)) == 1
    assert dsp_per_product(fx(27), fx(18)) == 1
    assert dsp_per_product(fx(18), fx(27)) == 1
    assert dsp_per_product(fx(28), fx(18)) == 2
    assert dsp_per_product(fx(27, False), fx(18)) == 2  # an unsigned operand needs a sign bit
    assert dsp_per_product(fx(4), fx(16)) == 0  # narrow operand: LUTs
    assert dsp_per_product(fx(40), fx(40)) == 6
    assert bram18(1024, 18) == 1 and bram18(2048, 18) == 2 and bram18(512, 36) == 1 and bram18(100, 8) == 1


def test_report_counts_products_per_layer(tmp_path):
    result = _cnn_project(tmp_path, reuse_factor=2)
    layers = {e["layer"]: e for e in result.report["layers"]}
    conv = [layer for layer in result.model.layers if layer.kind == "conv"][0]
    p, win = conv.params, conv.params.window
    taps = win.out_h * win.out_w * p.n_filt * p.chan_per_group * win.k_h * win.k_w
    assert sum(m["count"] for m in layers[conv.ident]["multiplies"].values()) >= taps
    assert layers[conv.ident]["dsp"] == sum(m["dsp"] for m in layers[conv.ident]["multiplies"].values())
    assert layers[conv.ident]["latency"] >= win.out_h * win.out_w * 2
    totals = result.report["totals"]
    assert totals["dsp"] == sum(e["dsp"] for e in layers.values()) > 0
    assert totals["weight_bits"] == sum(c.size * c.ctype.type.width for c in result.model.constants)
    readme = (tmp_path / "cnn" / "README.md").read_text()
    assert "DSP48E2" in readme and "BRAM18K" in readme


def test_outputs_that_are_inputs_or_read_elsewhere_get_their_own_port(tmp_path):
    from onnx import helper

    from test_hls_csim import simulate

    n = helper.make_node
    model = zoo._model([n("Identity", ["x"], ["y1"], name="id"), n("Relu", ["x"], ["y2"], name="r"),
                        n("Sigmoid", ["x"], ["y3"], name="s")], [zoo._vi("x", ["N", 5])], ["y1", "y2", "y3"], {})
    x = torch.from_numpy(zoo.inputs_for(model, 32))
    fpm = quantize_graph(load_onnx(model), [x])
    result = simulate(fpm, tmp_path / "io", "io", x=x, io="stream")
    assert len(result.model.outputs) == 3 and len({b.ident for b in result.model.outputs}) == 3
    assert "copy" in {layer.op for layer in result.model.layers}



def test_test_vectors_come_from_real_data_or_a_warning(tmp_path):
    """Without --data: the .npz beside the model gives the vectors; with none there, random codes
    and a warning that says why that is a weak testbench."""
    fpm = ptq("mlp")
    alone, beside = tmp_path / "alone", tmp_path / "beside"
    alone.mkdir()
    beside.mkdir()
    for folder in (alone, beside):
        write_annotated(fpm, folder / "mlp.qfx.onnx", example_input=digits("test")[:1])
    x = digits("test")[:5].numpy()
    np.savez(beside / "samples.npz", x=x)
    res = runner.invoke(app, ["export-hls", str(alone / "mlp.qfx.onnx"), "-o", str(alone / "prj"), "--test-vectors", "3"])
    assert res.exit_code == 0, res.output
    assert "no --data: the testbench uses random input codes" in res.output
    res = runner.invoke(app, ["export-hls", str(beside / "mlp.qfx.onnx"), "-o", str(beside / "prj"), "--test-vectors", "3"])
    assert res.exit_code == 0, res.output
    assert "random input codes" not in res.output and "samples.npz (the .npz beside the model)" in res.output
    rows = (beside / "prj" / "tb" / "tb_data" / "input_codes.dat").read_text().splitlines()
    t = fpm.fixed_types()["input"]
    want = np.round(x[:3].reshape(3, -1) * 2.0 ** t.frac).astype(int)
    assert [list(map(int, r.split())) for r in rows] == want.tolist()
