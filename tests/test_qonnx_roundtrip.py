"""QONNX out and back in: an annotated model exported with export-qonnx and quantized again keeps
every type the QONNX model carries and computes the same outputs bit for bit; imported types stay
as given through finetune unless --recalibrate-imported; and the Vitis HLS project of the
round-tripped model, compiled once, equals qonnx's own executor on the QONNX file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

qonnx = pytest.importorskip("qonnx")
from qonnx.core.modelwrapper import ModelWrapper  # noqa: E402
from qonnx.core.onnx_exec import execute_onnx  # noqa: E402
from qonnx.transformation.change_batchsize import ChangeBatchSize  # noqa: E402
from qonnx.transformation.infer_shapes import InferShapes  # noqa: E402

import qfx_onnx  # noqa: E402
from qfx_onnx.fixed.types import FixedType, OverflowMode as O  # noqa: E402
from qfx_onnx.qonnx_modes import expressible_modes  # noqa: E402
from qfx_onnx.quant.annotated import KEY_IMPORTED, annotations  # noqa: E402
from qfx_onnx_cli.main import app  # noqa: E402

MODELS = Path(__file__).resolve().parent.parent / "models"
DATA = MODELS / "digits.npz"

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()


@pytest.fixture(scope="module")
def digits():
    d = np.load(DATA)
    return d["x"][d["train_idx"]][:128].astype(np.float32), d["x"][d["test_idx"]].astype(np.float32)


def run_qonnx(path: Path, x: np.ndarray) -> np.ndarray:
    wrapper = ModelWrapper(str(path))
    if wrapper.graph.input[0].type.tensor_type.shape.dim[0].dim_param:
        wrapper = wrapper.transform(ChangeBatchSize(len(x))).transform(InferShapes())
    out = execute_onnx(wrapper, {wrapper.graph.input[0].name: x})
    return out[wrapper.graph.output[0].name]


def exported(t: FixedType | list[FixedType]) -> FixedType | list[FixedType]:
    """The type a Quant node carries for ``t``: the modes QONNX writes (an ap_ufixed's AP_SAT_SYM
    is AP_SAT; the mode table, qfx_onnx.qonnx_modes)."""
    if isinstance(t, list):
        return [exported(u) for u in t]
    q, o, _ = expressible_modes(t)
    return t.with_modes(q=q, o=O.SAT_SYM if t.signed and o is O.SAT_SYM else O.SAT, n=0)


def check_round_trip(model, folder: Path, train: np.ndarray, test: np.ndarray) -> None:
    """model -> annotated -> QONNX -> quantize: the same (exported) type on every Quant output and
    the same outputs as the original emulation, bit for bit, and as qonnx's executor."""
    annotated, qonnx_path = folder / "m.qfx.onnx", folder / "m.qonnx.onnx"
    qfx_onnx.write_annotated(model, annotated)
    proto = qfx_onnx.export_qonnx(annotated, qonnx_path)
    back = qfx_onnx.quantize(qonnx_path, train, calib_samples=128)
    want, got = model.fixed_types(), back.fixed_types()
    input_name = proto.graph.input[0].name
    # the input's Quant writes <input>::quant: it is the input's cast again, named by the input
    quants = [n.output[0].removesuffix("::quant") for n in proto.graph.node if n.op_type == "Quant"]
    assert input_name in quants and set(got) == set(quants) == set(want)
    for tensor in quants:
        assert got[tensor] == exported(want[tensor]), tensor
    expected = model.predict(test)
    np.testing.assert_array_equal(back.predict(test), expected)
    np.testing.assert_array_equal(run_qonnx(qonnx_path, test[:200]), expected[:200])


@pytest.mark.parametrize("name, flags", [
    ("mlp", dict(rounding="AP_RND_CONV")),
    ("cnn", dict(rounding="AP_TRN", overflow="AP_SAT_SYM", per_channel=True)),  # BatchNorm, per-channel weights
])
def test_shipped_models_round_trip(name, flags, digits, tmp_path):
    train, test = digits
    model = qfx_onnx.quantize(MODELS / f"{name}.onnx", train, calib_samples=128, **flags)
    check_round_trip(model, tmp_path, train, test)


def test_khot_finetuned_model_round_trips(digits, tmp_path):
    from qonnx_models import khot_finetuned_mlp

    train, test = digits
    check_round_trip(khot_finetuned_mlp(MODELS, train), tmp_path, train, test)


# ------------------------------------------------------------------------------ finetune


def _finetune_imported(digits, folder: Path, recalibrate: bool):
    """The MLP exported to QONNX, quantized back (every cast imported), finetuned for one step
    with a large binary-point learning rate; returns (types before, types after, annotations)."""
    from qfx_onnx.data import ArrayDataset, load_arrays
    from qfx_onnx.train import FinetuneConfig, finetune

    train, _ = digits
    model = qfx_onnx.quantize(MODELS / "mlp.onnx", train, calib_samples=128, rounding="AP_RND_CONV")
    qfx_onnx.write_annotated(model, folder / "m.qfx.onnx")
    qfx_onnx.export_qonnx(folder / "m.qfx.onnx", folder / "m.qonnx.onnx")
    imported = qfx_onnx.quantize(folder / "m.qonnx.onnx", train, calib_samples=128)
    proto = qfx_onnx.write_annotated(imported, folder / "i.qfx.onnx")
    marked = {t for t, e in annotations(proto.graph, "i").items() if e.get(KEY_IMPORTED) == "1"}
    assert len(marked) == len(imported.fixed_types())  # every cast is an imported Quant's
    fixed = qfx_onnx.read_annotated(folder / "i.qfx.onnx")  # the mark survives the file
    before = fixed.fixed_types()
    x, y = load_arrays(DATA, "train")
    config = FinetuneConfig(epochs=1, batch_size=64, val_fraction=0, lr=1e-3, frac_lr=3.0, recalibrate_imported=recalibrate)
    result = finetune(fixed, ArrayDataset(x[:64], y[:64], "train[:64]"), None, config)
    out = qfx_onnx.write_annotated(result.model, folder / "f.qfx.onnx")
    return before, result.model.fixed_types(), annotations(out.graph, "f")


def test_finetune_keeps_imported_binary_points(digits, tmp_path):
    before, after, notes = _finetune_imported(digits, tmp_path, recalibrate=False)
    assert after == before
    assert sum(e.get(KEY_IMPORTED) == "1" for e in notes.values()) == len(before)


def test_finetune_recalibrate_imported_lets_them_move(digits, tmp_path):
    before, after, notes = _finetune_imported(digits, tmp_path, recalibrate=True)
    moved = [t for t in before if before[t] != after[t]]
    assert moved  # the same step that left them alone above moves them now
    assert not any(e.get(KEY_IMPORTED) == "1" for e in notes.values())


def test_cli_finetune_keeps_imported_unless_recalibrate_imported(digits, tmp_path):
    """The same through qfx-onnx finetune: no imported binary point moves without the flag; with
    --recalibrate-imported they do, and the written file no longer marks them imported."""
    import json

    train, _ = digits
    model = qfx_onnx.quantize(MODELS / "mlp.onnx", train, calib_samples=128, rounding="AP_RND_CONV")
    qfx_onnx.write_annotated(model, tmp_path / "m.qfx.onnx")
    qfx_onnx.export_qonnx(tmp_path / "m.qfx.onnx", tmp_path / "m.qonnx.onnx")
    qfx_onnx.write_annotated(qfx_onnx.quantize(tmp_path / "m.qonnx.onnx", train, calib_samples=128), tmp_path / "i.qfx.onnx")
    d = np.load(DATA)
    np.savez(tmp_path / "d.npz", x=d["x"][:128], y=d["y"][:128])
    moved = {}
    for flags in ([], ["--recalibrate-imported"]):
        out = tmp_path / f"f{len(flags)}.qfx.onnx"
        result = runner.invoke(app, [str(a) for a in ["finetune", tmp_path / "i.qfx.onnx", "--data", tmp_path / "d.npz",
                                                      "-o", out, "--epochs", 1, "--batch-size", 128, "--val-fraction", 0,
                                                      "--frac-lr", 3, "--json", "-q", "--no-verify", *flags]])
        assert result.exit_code == 0, result.output
        moved[bool(flags)] = json.loads(result.stdout)["moved"]
        marks = [e.get(KEY_IMPORTED) for e in annotations(onnx.load(out).graph, "f").values() if e.get("qfx.role") != "lossless"]
        assert marks == (["1"] * len(marks) if not flags else [None] * len(marks)) and marks
    assert moved == {False: 0, True: moved[True]} and moved[True] > 0


# ------------------------------------------------------------------------------ CLI and csim


@pytest.mark.slow
def test_cli_round_trip_csim_equals_qonnx_executor(digits, tmp_path):
    """export-qonnx, quantize on the QONNX file, export-hls --csim (one g++ compile): the C
    simulation reproduces the emulation, and its expected codes replaced by qonnx's executor's
    outputs on the same inputs, the same binary still reports 0 mismatches."""
    from qfx_onnx.hls.csim import run_csim

    train, test = digits
    model = qfx_onnx.quantize(MODELS / "mlp.onnx", train, calib_samples=128, rounding="AP_RND_CONV")
    qfx_onnx.write_annotated(model, tmp_path / "m.qfx.onnx")
    np.savez(tmp_path / "d.npz", x=test[:64])
    steps = [["export-qonnx", tmp_path / "m.qfx.onnx", "-o", tmp_path / "m.qonnx.onnx"],
             ["quantize", tmp_path / "m.qonnx.onnx", "--data", tmp_path / "d.npz", "-o", tmp_path / "r.qfx.onnx"],
             ["export-hls", tmp_path / "r.qfx.onnx", "-o", tmp_path / "hls", "--data", tmp_path / "d.npz",
              "--test-vectors", 32, "--csim", "--jobs", 1]]
    for step in steps:
        result = runner.invoke(app, [str(a) for a in step])
        assert result.exit_code == 0, result.output
    assert "csim: bit-exact with the PyTorch emulation" in result.output and "0 mismatches" in result.output

    hls = tmp_path / "hls"
    types = qfx_onnx.read_annotated(tmp_path / "r.qfx.onnx").fixed_types()
    t_in, t_out = types["input"], types["logits"]
    codes = np.loadtxt(hls / "tb" / "tb_data" / "input_codes.dat", ndmin=2)
    x = (codes * t_in.lsb).astype(np.float32).reshape(len(codes), *test.shape[1:])
    np.testing.assert_array_equal(x, test[:len(codes)])  # digits are on the input grid
    want = run_qonnx(tmp_path / "m.qonnx.onnx", x).reshape(len(codes), -1) / t_out.lsb
    assert np.array_equal(want, np.round(want))
    (hls / "tb" / "tb_data" / "output_codes.dat").write_text("".join(" ".join(str(int(v)) for v in row) + "\n" for row in want))
    top = next(hls.glob("firmware/*.cpp")).stem
    csim = run_csim(hls, top, binary=hls / "csim" / f"csim_{top}")
    assert csim.passed and csim.vectors == len(codes), csim.output[-500:]


# ------------------------------------------------------------------------------ default rounding


def test_default_rounding_refused_with_the_command_or_nearest_modes_measured(digits, tmp_path):
    """A default-quantized (AP_RND) model: export-qonnx refuses it naming the quantize command that
    exports; --nearest-modes without --data is refused; with --data it exports the nearest modes
    and reports exactly the change qonnx's executor on the written file shows against the
    original emulation (count of differing values and largest difference in output LSBs)."""
    import json

    train, test = digits
    model = qfx_onnx.quantize(MODELS / "mlp.onnx", train, calib_samples=128)  # default AP_RND
    src, dst = tmp_path / "rnd.qfx.onnx", tmp_path / "rnd.qonnx.onnx"
    qfx_onnx.write_annotated(model, src)
    refused = runner.invoke(app, ["export-qonnx", str(src), "-o", str(dst)])
    assert refused.exit_code == 1 and "--rounding AP_RND_CONV" in refused.output and not dst.exists()
    assert "to export to QONNX, quantize with" in " ".join(refused.output.split())
    no_data = runner.invoke(app, ["export-qonnx", str(src), "-o", str(dst), "--nearest-modes"])
    assert no_data.exit_code != 0 and "needs --data" in no_data.output and not dst.exists()

    np.savez(tmp_path / "d.npz", x=test)
    result = runner.invoke(app, ["export-qonnx", str(src), "-o", str(dst), "--nearest-modes", "--data",
                                 str(tmp_path / "d.npz"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["nearest_modes"]
    assert set(report["changed"]) == {"/1/Gemm_output_0", "/3/Gemm_output_0", "logits"}
    assert all(new.endswith("AP_RND_INF,AP_SAT>") for _, new in report["changed"].values())
    got, want = run_qonnx(dst, test), model.predict(test)
    lsb = model.fixed_types()["logits"].lsb
    assert report["samples"] == len(test) and report["values"] == want.size
    assert report["differing"] == int(np.count_nonzero(got != want)) > 0  # AP_RND and HALF_UP differ at negative ties
    assert report["max_lsb"] == float(np.abs(got - want).max() / lsb)


def test_transformer_with_exact_nonlinear_ops_round_trips_through_the_cli(tmp_path, digits):
    """The exact nonlinear ops' emission (Gathers on tables, tagged) survives export-qonnx and
    imports again as the same ops with the same specs; the imported Quant after each is its output
    cast (no cast of ours before it), so the round-tripped model computes the original's bits."""
    import onnxruntime as ort

    annotated, qonnx_path, again = tmp_path / "t.qfx.onnx", tmp_path / "t.qonnx.onnx", tmp_path / "t.rt.qfx.onnx"
    for args in (["quantize", str(MODELS / "transformer.onnx"), "--data", str(DATA), "--rounding", "AP_RND_CONV",
                  "--calib-samples", "64", "-o", str(annotated)],
                 ["export-qonnx", str(annotated), "-o", str(qonnx_path)],
                 ["quantize", str(qonnx_path), "--data", str(DATA), "--calib-samples", "64", "-o", str(again)]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    assert "0 not guaranteed exact" in " ".join(result.output.split())
    x = digits[1][:64]
    outs = []
    for path in (annotated, again):
        session = ort.InferenceSession(str(path))
        outs.append(session.run(None, {session.get_inputs()[0].name: x})[0])
    assert np.array_equal(outs[0], outs[1])
    assert np.array_equal(run_qonnx(qonnx_path, x), outs[0])
