"""One CLI: shared options declared once, defaults in --help, --json and --quiet everywhere, one
--force rule, and tables at full width when stdout is not a terminal. Through the real CLI."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from qfx_onnx.fixed.quantizer import CalibrationMethod
from qfx_onnx.fixed.types import OverflowMode, QuantMode
from qfx_onnx.hls.export import IoMode
from qfx_onnx_cli import quantize_cmd
from qfx_onnx_cli.main import app

MODELS = Path(__file__).resolve().parent.parent / "models"
COMMANDS = ("inspect", "quantize", "finetune", "export-hls", "export-qonnx")
WRITERS = ("quantize", "finetune", "export-hls", "export-qonnx")
SHARED = ("--data", "--eval-data", "--force", "--quiet", "--json", "--calibration", "--calib-samples", "--per-channel",
          "--verify", "--weight-bits", "--bias-bits", "--act-bits", "--elementwise-bits", "--input-bits")

pytestmark = pytest.mark.usefixtures("one_thread")


def invoke(*args, env=None):
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def ok(result):
    assert result.exit_code == 0, result.output
    return result


def one_line_error(result, *needles):
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """mlp.onnx, 300 train + 100 test digits, and the model quantized once through the CLI."""
    folder = tmp_path_factory.mktemp("cli")
    shutil.copy(MODELS / "mlp.onnx", folder / "mlp.onnx")
    with np.load(MODELS / "digits.npz", allow_pickle=False) as z:
        np.savez(folder / "small.npz", x=z["x"], y=z["y"], train_idx=z["train_idx"][:300], test_idx=z["test_idx"][:100])
    ok(invoke("quantize", folder / "mlp.onnx", "--data", folder / "small.npz", "-o", folder / "mlp.qfx.onnx",
              "--calib-samples", 128, "--verify-samples", 8))
    return folder


def _commands() -> dict:
    group = typer.main.get_command(app)
    return {name: group.commands[name] for name in COMMANDS}


def _options(command) -> dict:
    return {opt: p for p in command.params for opt in p.opts if opt.startswith("--")}


# --- help --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", COMMANDS)
def test_help_shows_defaults_usage_and_no_bool_placeholders(name):
    text = ok(invoke(name, "--help", env={"COLUMNS": "250"})).output
    assert f"Usage: qfx-onnx {name} [OPTIONS] MODEL" in text
    assert "{model}" not in text and "<bool>" not in text
    assert not re.search(r"\w \.\s", text), "an empty default placeholder (\"Width of weights .\")"
    for param in _commands()[name].params:
        if param.param_type_name != "option" or param.is_flag or param.required or param.hidden:
            continue
        shown = isinstance(param.show_default, str) or param.default is not None
        assert shown, f"{name} {param.opts[0]}: no default in --help"


def test_defaults_read_in_help():
    quantize = ok(invoke("quantize", "--help", env={"COLUMNS": "250"})).output
    finetune = ok(invoke("finetune", "--help", env={"COLUMNS": "250"})).output
    assert re.search(r"--weight-bits\s+BITS\s+Total width W of weights\.\s+\[default: \(8\)\]", quantize)
    assert re.search(r"--weight-bits\s+BITS\s+Total width W of weights\.\s+\[default: \(unchanged\)\]", finetune)
    assert re.search(r"--rounding\s+MODE.*\[default: \(AP_RND\)\]", quantize)
    for text in (quantize, finetune):
        assert re.search(r"--calibration\s+METHOD.*\[default: max\]", text)
        assert "--method" not in text  # the old spelling is a hidden alias
    assert re.search(r"--checkpoint-dir\s+FOLDER.*\[default: \(<output>\.ckpt beside the output\)\]", finetune)


def test_shared_options_are_declared_once():
    commands = _commands()
    options = {name: _options(cmd) for name, cmd in commands.items()}
    for name in COMMANDS:
        assert {"--quiet", "--json"} <= set(options[name]), name
    for name in WRITERS:
        assert "--force" in options[name], name
    for flag in SHARED:
        having = [name for name in COMMANDS if flag in options[name]]
        assert having, flag
        params = [options[name][flag] for name in having]
        first = params[0]
        for name, p in zip(having, params):
            assert (p.opts, p.secondary_opts, p.metavar, p.bare_type()) == \
                (first.opts, first.secondary_opts, first.metavar, first.bare_type()), f"{flag} differs in {name}"
            if flag != "--data" and not flag.endswith("-bits"):  # --data and widths say what the command does
                assert p.help == first.help and p.default == first.default, f"{flag} differs in {name}"
    # every command that reads samples takes them the same way (export-qonnx: for --nearest-modes)
    assert {n for n in COMMANDS if "--data" in options[n]} == {"quantize", "finetune", "export-hls", "inspect", "export-qonnx"}
    assert {options[n]["--data"].bare_type() for n in COMMANDS if "--data" in options[n]} == {"str"}  # a path or module:function everywhere


def test_choices_come_from_the_library_enums():
    quantize = ok(invoke("quantize", "--help", env={"COLUMNS": "400"})).output
    export = ok(invoke("export-hls", "--help", env={"COLUMNS": "400"})).output
    for enum, text in ((QuantMode, quantize), (OverflowMode, quantize), (CalibrationMethod, quantize), (IoMode, export)):
        for member in enum:
            assert member.value in text, (enum.__name__, member.value)


def test_calibration_spellings(work, tmp_path):
    model, data = work / "mlp.onnx", work / "small.npz"
    one_line_error(invoke("quantize", model, "--data", data, "-o", tmp_path / "a.onnx", "--calibration", "median"),
                   "--calibration 'median'", "max, percentile or mse")
    one_line_error(invoke("quantize", model, "--data", data, "-o", tmp_path / "a.onnx", "--method", "mse",
                          "--calibration", "percentile"), "give one")
    result = ok(invoke("quantize", model, "--data", data, "-o", tmp_path / "a.onnx", "--method", "mse", "--json",
                       "--no-verify", "--calib-samples", 64))
    assert json.loads(result.stdout)["calibration"] == "mse"
    one_line_error(invoke("finetune", work / "mlp.qfx.onnx", "--data", data, "-o", tmp_path / "f.onnx",
                          "--calibration", "median"), "--calibration 'median'")


# --- --json and --quiet ------------------------------------------------------------------------

def test_json_of_every_command(work, tmp_path):
    data = work / "small.npz"
    got = json.loads(ok(invoke("inspect", work / "mlp.onnx", "--data", data, "--json")).stdout)
    assert got["supported"] and got["score"]["metric"] == "accuracy" and len(got["nodes"]) >= 3
    assert got["inputs"][0]["shape"][0] is None  # a dynamic dimension is null

    result = ok(invoke("quantize", work / "mlp.onnx", "--data", data, "-o", tmp_path / "q.onnx", "--json",
                       "--report", tmp_path / "q.report.json", "--calib-samples", 64, "--verify-samples", 8))
    got = json.loads(result.stdout)
    assert got["output"] == str(tmp_path / "q.onnx") and got["verify"]["ok"]
    assert got["score"]["fixed"] == got["fixed_accuracy"] and got["tensors"]
    report = json.loads((tmp_path / "q.report.json").read_text())
    assert report["tensors"] == got["tensors"]
    assert "fixed-point tensors" in result.stderr  # the table went to the people, on stderr

    result = ok(invoke("finetune", work / "mlp.qfx.onnx", "--data", data, "-o", tmp_path / "f.onnx", "--epochs", 1,
                       "--batch-size", 100, "--json"))
    got = json.loads(result.stdout)
    assert got["output"] == str(tmp_path / "f.onnx") and got["epochs_run"] == 1 and got["verify"]["ok"]
    assert got["checkpoints"] == str(tmp_path / "f.onnx.ckpt") and (tmp_path / "f.onnx.ckpt" / "last.pt").is_file()
    assert set(got["binary_points"]) and {"before", "after"} == set(next(iter(got["binary_points"].values())))

    got = json.loads(ok(invoke("export-hls", tmp_path / "f.onnx", "-o", tmp_path / "prj", "--json")).stdout)
    assert got["project"] == str(tmp_path / "prj") and got["csim"] is None
    assert got["estimate"]["totals"]["dsp"] >= 0 and got["layers"] == len(got["estimate"]["layers"])


def test_quiet_everywhere(work, tmp_path):
    data = work / "small.npz"
    runs = {
        "inspect": invoke("inspect", work / "mlp.onnx", "--data", data, "-q"),
        "quantize": invoke("quantize", work / "mlp.onnx", "--data", data, "-o", tmp_path / "q.onnx", "-q",
                           "--calib-samples", 64, "--verify-samples", 8),
        "export-hls": invoke("export-hls", work / "mlp.qfx.onnx", "-o", tmp_path / "prj", "-q"),
    }
    for name, result in runs.items():
        lines = ok(result).stdout.strip().splitlines()
        assert len(lines) == 1 and "┃" not in result.stdout, (name, result.stdout)
    assert runs["quantize"].stdout.startswith(f"wrote {tmp_path / 'q.onnx'}")


# --- the --force rule --------------------------------------------------------------------------

def test_no_command_overwrites_without_force(work, tmp_path):
    data = work / "small.npz"
    model = tmp_path / "mlp.onnx"
    shutil.copy(work / "mlp.onnx", model)
    taken = {name: tmp_path / name for name in ("mlp.qfx.onnx", "o.onnx", "r.json", "f.onnx")}
    for path in taken.values():
        path.write_text("keep me")
    ckpt = tmp_path / "g.onnx.ckpt"
    ckpt.mkdir()
    (ckpt / "last.pt").write_text("keep me")
    (tmp_path / "prj").mkdir()
    (tmp_path / "prj" / "x").write_text("keep me")
    cases = [
        (["quantize", model, "--data", data], taken["mlp.qfx.onnx"]),  # the default output
        (["quantize", model, "--data", data, "-o", taken["o.onnx"]], taken["o.onnx"]),
        (["quantize", model, "--data", data, "-o", tmp_path / "new.onnx", "--report", taken["r.json"]], taken["r.json"]),
        (["finetune", work / "mlp.qfx.onnx", "--data", data, "-o", taken["f.onnx"]], taken["f.onnx"]),
        (["finetune", work / "mlp.qfx.onnx", "--data", data, "-o", tmp_path / "g.onnx"], ckpt / "last.pt"),
        (["export-hls", work / "mlp.qfx.onnx", "-o", tmp_path / "prj"], tmp_path / "prj"),
    ]
    for args, path in cases:
        one_line_error(invoke(*args), str(path.resolve() if path.is_dir() else path), "already exists", "--force")
    assert all(p.read_text() == "keep me" for p in [*taken.values(), ckpt / "last.pt", tmp_path / "prj" / "x"])
    assert not (tmp_path / "new.onnx").exists() and not (tmp_path / "g.onnx").exists()

    ok(invoke("quantize", model, "--data", data, "--force", "--calib-samples", 64, "--verify-samples", 8,
              "--report", taken["r.json"]))
    assert taken["mlp.qfx.onnx"].stat().st_size > 1000 and json.loads(taken["r.json"].read_text())["tensors"]
    ok(invoke("finetune", work / "mlp.qfx.onnx", "--data", data, "-o", tmp_path / "g.onnx", "--force", "--epochs", 1,
              "--batch-size", 100, "-q"))
    assert (tmp_path / "g.onnx").stat().st_size > 1000
    one_line_error(invoke("quantize", model, "--data", data, "-o", model, "--force"), "refusing to overwrite the input")


# --- tables ------------------------------------------------------------------------------------

def test_tables_are_whole_when_stdout_is_not_a_terminal(work, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    cli = [sys.executable, "-c", "from qfx_onnx_cli.main import app; app()"]  # stdout is a pipe
    proc = subprocess.run([*cli, "quantize", str(work / "mlp.onnx"),
                           "--data", str(work / "small.npz"), "-o", str(tmp_path / "w.onnx"), "--act-bits", "16",
                           "--rounding", "AP_RND_CONV", "--overflow", "AP_SAT_SYM", "--calib-samples", "64",
                           "--no-verify"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if "AP_RND_CONV,AP_SAT_SYM>" in line]
    assert len(rows) >= 8 and all(re.search(r"│ ap_u?fixed<\d+,-?\d+,AP_RND_CONV,AP_SAT_SYM> +│", row) for row in rows), proc.stdout
    assert any("ap_fixed<16,6,AP_RND_CONV,AP_SAT_SYM>" in row for row in rows)  # logits
    assert "observed range" in proc.stdout and "SQNR dB" in proc.stdout
    # COLUMNS set small does not cut a table that goes to a log either
    result = ok(invoke("export-hls", work / "mlp.qfx.onnx", "-o", tmp_path / "prj", env={"COLUMNS": "60"}))
    assert "operand bits" in result.stdout and "latency" in result.stdout and "…" not in result.stdout


def test_quantize_table_in_graph_order_with_a_stated_cut(work, tmp_path, monkeypatch):
    monkeypatch.setattr(quantize_cmd, "TABLE_ROWS", 6)
    args = ["quantize", work / "mlp.onnx", "--data", work / "small.npz", "--calib-samples", 64, "--no-verify", "--json"]
    result = ok(invoke(*args, "-o", tmp_path / "a.onnx"))
    tensors = json.loads(result.stdout)["tensors"]
    assert len(tensors) > 6
    table = [line for line in result.stderr.splitlines() if line.startswith("│")]
    names = [row.split("│")[1].strip() for row in table]
    sqnr = {t["tensor"]: float(t["sqnr_db"]) for t in tensors}  # "inf" is a string; float() reads it
    noisiest = sorted(sqnr, key=sqnr.get)[:6]
    assert sorted(names) == sorted(noisiest), result.stderr
    order = [t["tensor"] for t in tensors]
    assert noisiest != sorted(noisiest, key=order.index)  # so that the next line tells the two orders apart
    assert names == sorted(names, key=order.index)  # graph order, not sorted by SQNR
    assert f"showing the 6 noisiest of {len(tensors)} tensors, in graph order; --all for every one" in result.stderr

    result = ok(invoke(*args, "-o", tmp_path / "b.onnx", "--all"))
    table = [line for line in result.stderr.splitlines() if line.startswith("│")]
    assert [row.split("│")[1].strip() for row in table] == order and "showing" not in result.stderr
    # SQNR: the table's "inf" is the JSON's "inf" (never null)
    for row, t in zip(table, json.loads(result.stdout)["tensors"]):
        assert row.split("│")[6].strip() == (t["sqnr_db"] if isinstance(t["sqnr_db"], str) else f"{t['sqnr_db']:.1f}")
    assert "inf" in [t["sqnr_db"] for t in tensors] and None not in [t["sqnr_db"] for t in tensors]


def test_tensor_table_prints_long_tensor_names_whole_off_a_terminal():
    """A user's tensor name is printed whole in a file or pipe (greppable), never cut with an ellipsis."""
    import io

    from qfx_onnx.quant.report import QuantReport, TensorStats, tensor_table
    from qfx_onnx_cli.output import LogConsole

    name = "/layers/layers.1/norm2/" + "very_long_segment/" * 4 + "LayerNormalization_output_0"
    report = QuantReport()
    entry = TensorStats(name, "act", "ap_fixed<8,4,AP_RND,AP_SAT>")
    report.tensors = [entry]
    out = io.StringIO()
    LogConsole(file=out, markup=False, force_terminal=False).print(tensor_table(report))
    assert name in out.getvalue()
