"""export-qonnx checked by the real tools: qonnx's executor, value by value and on whole models,
and hls4ml's ONNX front end (convert, compile with g++, predict).

The mode table of :mod:`qfx_onnx.qonnx_export` is not taken on trust: the first test runs every
QONNX (rounding_mode, narrow) pair through ``qonnx.core.onnx_exec.execute_onnx`` against every
ap_fixed (quantization, overflow) pair of the integer reference, ties and overflow included, and
finds which pairs agree.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner

qonnx = pytest.importorskip("qonnx")
from qonnx.core.datatype import DataType  # noqa: E402
from qonnx.core.modelwrapper import ModelWrapper  # noqa: E402
from qonnx.core.onnx_exec import execute_onnx  # noqa: E402
from qonnx.transformation.change_batchsize import ChangeBatchSize  # noqa: E402
from qonnx.transformation.infer_shapes import InferShapes  # noqa: E402

import qfx_onnx  # noqa: E402
from qfx_onnx.errors import ExportError  # noqa: E402
from qfx_onnx.fixed.reference import reference_cast  # noqa: E402
from qfx_onnx.fixed.types import FixedType, OverflowMode as O, QuantMode as Q  # noqa: E402
from qfx_onnx.quant.annotated import annotations, type_entries  # noqa: E402
from qfx_onnx.quant.onnx_cast import DOMAIN, IR_VERSION, OPSET, cast_function, function_name  # noqa: E402
from qfx_onnx.qonnx_export import QONNX_DOMAIN, export_qonnx, finn_datatype  # noqa: E402
from qfx_onnx.qonnx_modes import TO_QONNX as ROUNDING_MODES  # noqa: E402
from qfx_onnx_cli.main import app  # noqa: E402

MODELS = Path(__file__).resolve().parent.parent / "models"
DATA = MODELS / "digits.npz"
QONNX_ROUNDING = ("ROUND", "HALF_EVEN", "CEIL", "FLOOR", "UP", "DOWN", "HALF_UP", "HALF_DOWN")

pytestmark = pytest.mark.usefixtures("one_thread")


def run_qonnx(model: onnx.ModelProto, x: np.ndarray, full: bool = False) -> dict[str, np.ndarray]:
    """qonnx's executor on ``model`` with its batch set to ``len(x)``."""
    wrapper = ModelWrapper(model)
    if wrapper.graph.input[0].type.tensor_type.shape.dim[0].dim_param:
        wrapper = wrapper.transform(ChangeBatchSize(len(x))).transform(InferShapes())
    with warnings.catch_warnings():
        # qonnx warns when it must round a value its finn_datatype annotation forbids: make that fail
        warnings.filterwarnings("error", message=".*can't be represented with the set datatype annotation")
        return execute_onnx(wrapper, {wrapper.graph.input[0].name: x}, return_full_exec_context=full)


def quant_model(n: int, scale: float, bits: int, signed: int, narrow: int, rounding_mode: str) -> onnx.ModelProto:
    """One QONNX Quant node, written from the spec, independently of the exporter."""
    inits = [helper.make_tensor("s", TensorProto.FLOAT, [], [scale]), helper.make_tensor("z", TensorProto.FLOAT, [], [0.0]),
             helper.make_tensor("b", TensorProto.FLOAT, [], [float(bits)])]
    node = helper.make_node("Quant", ["x", "s", "z", "b"], ["y"], domain=QONNX_DOMAIN, signed=signed, narrow=narrow,
                            rounding_mode=rounding_mode)
    graph = helper.make_graph([node], "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(QONNX_DOMAIN, 1)])


def cast_only_model(t: FixedType, n: int) -> onnx.ModelProto:
    """An annotated model that casts its float input ``x`` to ``t`` (the strictest case: any float)."""
    cast = helper.make_node(function_name(t), ["x"], ["x::quant"], domain=DOMAIN)
    ident = helper.make_node("Identity", ["x::quant"], ["y"])
    graph = helper.make_graph([cast, ident], "cast", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n])])
    entry = onnx.TensorAnnotation(tensor_name="x::quant")
    for key, value in type_entries(t, "input").items():
        entry.quant_parameter_tensor_names.add(key=key, value=value)
    graph.quantization_annotation.append(entry)
    return helper.make_model(graph, functions=[cast_function(t)], ir_version=IR_VERSION,
                             opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)])


def probe(t: FixedType) -> np.ndarray:
    """float32 inputs in steps of a quarter LSB (every tie, both signs) well beyond the range."""
    lo, hi = t.int_min - 6, t.int_max + 6
    return (np.arange(lo * 4, hi * 4 + 1) / 4 * t.lsb).astype(np.float32)


# ------------------------------------------------------------------------------ the mode table


def test_mode_table_found_by_qonnx_executor():
    """For 4-bit types, the (rounding_mode, narrow) pairs on which qonnx's executor equals the
    ap_fixed reference, found by running all of them; the exporter's table must be exactly that."""
    found = {}
    for signed in (True, False):
        for q in Q:
            for o in O:
                t = FixedType(4, 2, signed=signed, q=q, o=o)
                x = probe(t)
                want = reference_cast(x.astype(np.float64), t)
                found[t] = {(mode, narrow) for mode in QONNX_ROUNDING for narrow in (0, 1)
                            if np.array_equal(run_qonnx(quant_model(len(x), t.lsb, 4, int(signed), narrow, mode), x)["y"], want)}
    # ap_ufixed: negative values clip to 0 before rounding, so only the rule on y >= 0 counts
    unsigned = {Q.TRN: {"FLOOR", "DOWN"}, Q.TRN_ZERO: {"FLOOR", "DOWN"}, Q.RND_CONV: {"ROUND", "HALF_EVEN"},
                Q.RND: {"HALF_UP"}, Q.RND_INF: {"HALF_UP"}, Q.RND_MIN_INF: {"HALF_DOWN"}, Q.RND_ZERO: {"HALF_DOWN"}}
    for t, pairs in found.items():
        saturating = t.o in (O.SAT, O.SAT_SYM) or (t.o is O.WRAP_SM and not t.signed)
        narrow = int(t.o is O.SAT_SYM and t.signed)
        if not saturating:
            assert pairs == set(), t  # a Quant always saturates
        elif not t.signed:
            assert pairs == {(m, 0) for m in unsigned[t.q]}, t
        elif t.q in ROUNDING_MODES:
            modes = {ROUNDING_MODES[t.q]} | ({"HALF_EVEN"} if t.q is Q.RND_CONV else set())
            assert pairs == {(m, narrow) for m in modes}, t
        else:
            assert pairs == set(), t  # signed AP_RND / AP_RND_MIN_INF: no tie rule of QONNX fits
    assert all((ROUNDING_MODES[t.q], 0) in found[t] for t in found if not t.signed and t.o is O.SAT and t.q in ROUNDING_MODES)


def test_half_up_float32_edge_of_qonnx_executor():
    """qonnx evaluates HALF_UP as ``floor(|y| + 0.5)`` in float32: at ``y = 0.5 - 2**-25`` the sum
    rounds to 1.0. Export is right by the spec's table (ties away from zero); this one float32
    value per sign is where qonnx's own executor departs from it (none of HALF_DOWN, ROUND, FLOOR,
    DOWN does). Values that reach a cast inside a model have at most their input type's fraction
    bits, far fewer than 25 below the LSB."""
    t = FixedType(8, 4, q=Q.RND_INF, o=O.SAT)
    x = (np.array([0.5 - 2.0**-25, -(0.5 - 2.0**-25), 0.5, -0.5, 0.25]) * t.lsb).astype(np.float32)
    got = run_qonnx(quant_model(len(x), t.lsb, 8, 1, 0, "HALF_UP"), x)["y"]
    want = reference_cast(x.astype(np.float64), t)
    assert list(np.flatnonzero(got != want)) == [0, 1]


@pytest.mark.parametrize("signed", [True, False])
def test_every_cast_exports_or_is_refused_by_name(signed):
    """Each ap_fixed mode pair on a float graph input: either the exported Quant equals the
    reference on every probe value under qonnx's executor, or ExportError names the tensor and the
    nearest expressible type."""
    exported = refused = 0
    for q in Q:
        for o in O:
            for width, n in ((1, 0), (4, 0), (4, 1)):
                if n and o is not O.WRAP:
                    continue
                t = FixedType(width, 2, signed=signed, q=q, o=o, n=n)
                x = probe(t)
                try:
                    proto = export_qonnx(cast_only_model(t, len(x)))
                except ExportError as exc:
                    message = str(exc)
                    assert "'x'" in message and "nearest expressible: ap_" in message and "\n" not in message
                    nearest = FixedType.parse(message.split("nearest expressible: ")[1].split(" ")[0].rstrip(";"))
                    if width > 1:  # the nearest type is itself exportable
                        export_qonnx(cast_only_model(nearest, len(x)))
                    refused += 1
                    continue
                got = run_qonnx(proto, x)["y"]
                np.testing.assert_array_equal(got, reference_cast(x.astype(np.float64), t), err_msg=str(t))
                exported += 1
    assert exported and refused
    if not signed:
        assert exported == 2 * 7 * 3  # every unsigned saturating type (SAT, SAT_SYM, WRAP_SM) at both widths


def test_finn_datatype_holds_every_value():
    for text in ("ap_fixed<8,3>", "ap_ufixed<8,3>", "ap_fixed<8,-2>", "ap_ufixed<6,0>", "ap_fixed<4,6>", "ap_ufixed<5,5>",
                 "ap_fixed<13,0>"):
        t = FixedType.parse(text)
        codes = np.arange(t.int_min, t.int_max + 1)
        assert DataType[finn_datatype(t)].allowed(codes * t.lsb).all(), text
    assert finn_datatype(FixedType.parse("ap_fixed<8,3>")) == "FIXED<8,3>"
    assert finn_datatype(FixedType.parse("ap_ufixed<8,8>")) == "UINT8"


# ------------------------------------------------------------------------------ whole models

MIXED_CONFIG = """
[defaults]
rounding = "AP_RND"

[[override]]
op = "Gemm"
role = "act"
rounding = "AP_RND_CONV"
"""


@pytest.fixture(scope="module")
def digits():
    d = np.load(DATA)
    return d["x"][d["train_idx"]][:128].astype(np.float32), d["x"][d["test_idx"]].astype(np.float32)


@pytest.mark.parametrize("name, flags", [
    ("mlp", dict(rounding="AP_RND_CONV")),
    ("cnn", dict(rounding="AP_TRN", overflow="AP_SAT_SYM", per_channel=True)),
    ("resnet", dict(rounding="AP_RND_ZERO")),
    ("dscnn", dict(rounding="AP_TRN_ZERO", weight_bits=6)),
    ("mlp", dict(rounding="AP_RND_INF", overflow="AP_SAT_SYM")),
    ("mlp", dict(config="MIXED")),  # AP_RND: constants checked by value, ap_ufixed as HALF_UP
])
def test_shipped_models_equal_emulation_in_qonnx_executor(name, flags, digits, tmp_path):
    train, test = digits
    if flags.get("config") == "MIXED":
        (tmp_path / "mixed.toml").write_text(MIXED_CONFIG)
        flags = dict(config=tmp_path / "mixed.toml")
    model = qfx_onnx.quantize(MODELS / f"{name}.onnx", train, calib_samples=128, **flags)
    annotated = tmp_path / f"{name}.qfx.onnx"
    qfx_onnx.write_annotated(model, annotated)
    proto = qfx_onnx.export_qonnx(annotated, tmp_path / f"{name}.qonnx.onnx")  # the public API
    check_exported(proto, annotated, test)


def check_exported(proto: onnx.ModelProto, annotated: Path, x: np.ndarray) -> None:
    """qonnx runs ``proto`` to the emulation's outputs bit for bit, every cast is one Quant node, and
    every annotated tensor's values are allowed by its finn_datatype."""
    source = onnx.load(annotated)
    casts = [n for n in source.graph.node if n.domain == DOMAIN]
    quants = [n for n in proto.graph.node if n.domain == QONNX_DOMAIN]
    assert [n.op_type for n in quants] == ["Quant"] * len(casts)
    assert [n.output[0] for n in quants] == [n.output[0] for n in casts]
    assert not proto.functions and DOMAIN not in {o.domain for o in proto.opset_import}
    onnx.checker.check_model(proto)
    context = run_qonnx(proto, x, full=True)
    want = qfx_onnx.read_annotated(annotated).predict(x)
    got = context[proto.graph.output[0].name]
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    notes = annotations(proto.graph, "qonnx")
    assert set(notes) == set(annotations(source.graph, "annotated"))
    for tensor, entries in notes.items():
        assert DataType[entries["finn_datatype"]].allowed(context[tensor]).all(), tensor


def test_khot_finetuned_model(digits, tmp_path):
    from qonnx_models import khot_finetuned_mlp

    train, test = digits
    model = khot_finetuned_mlp(MODELS, train)
    annotated = tmp_path / "khot.qfx.onnx"
    qfx_onnx.write_annotated(model, annotated)
    proto = export_qonnx(annotated)
    assert any(kv.key == "qfx.khot" for a in proto.graph.quantization_annotation for kv in a.quant_parameter_tensor_names)
    check_exported(proto, annotated, test)


def test_wrap_refused_where_values_can_overflow(digits, tmp_path):
    """AP_WRAP: weights and biases (constants whose values fit) export as saturating Quants; the
    float input and every activation, whose lossless input type exceeds the range, are refused in
    one message."""
    model = qfx_onnx.quantize(MODELS / "mlp.onnx", digits[0], calib_samples=128, rounding="AP_RND_CONV", overflow="AP_WRAP")
    qfx_onnx.write_annotated(model, tmp_path / "wrap.qfx.onnx")
    with pytest.raises(ExportError) as info:
        export_qonnx(tmp_path / "wrap.qfx.onnx", tmp_path / "wrap.qonnx.onnx")
    assert not (tmp_path / "wrap.qonnx.onnx").exists()
    message = str(info.value)
    refused = {m.split("'")[1] for m in message.split("tensor ")[1:]}
    assert refused == {"input", "/1/Gemm_output_0", "/2/Relu_output_0", "/3/Gemm_output_0", "/4/Relu_output_0", "logits"}
    assert "6 cast(s)" in message and "nearest expressible: ap_ufixed<8,1,AP_RND_CONV,AP_SAT>" in message


def test_signed_rnd_constant_exports_unless_a_value_is_a_negative_tie(digits, tmp_path):
    """A weight cast with AP_RND exports as ROUND (half to even) only because no value of it is a
    tie where the two differ; put one there (-1.5 LSB) and the weight is refused by name."""
    (tmp_path / "mixed.toml").write_text(MIXED_CONFIG)
    model = qfx_onnx.quantize(MODELS / "mlp.onnx", digits[0], calib_samples=128, config=tmp_path / "mixed.toml")
    proto = qfx_onnx.write_annotated(model, tmp_path / "mixed.qfx.onnx")
    lsb = model.fixed_types()["1.weight"].lsb
    weight = next(t for t in proto.graph.initializer if t.name == "1.weight::raw")
    for value, refused in ((-1.25, False), (-1.5, True)):
        values = onnx.numpy_helper.to_array(weight).copy()
        values.flat[0] = value * lsb
        weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
        if not refused:
            export_qonnx(proto)
            continue
        with pytest.raises(ExportError, match=r"tensor '1.weight' ap_fixed<8,\d,AP_RND,AP_SAT>: .* on its values"):
            export_qonnx(proto)


# ------------------------------------------------------------------------------ CLI and errors

runner = CliRunner()


@pytest.fixture(scope="module")
def mlp_files(tmp_path_factory, digits):
    folder = tmp_path_factory.mktemp("qonnx")
    for name, rounding in (("conv", "AP_RND_CONV"), ("rnd", "AP_RND")):
        model = qfx_onnx.quantize(MODELS / "mlp.onnx", digits[0], calib_samples=128, rounding=rounding)
        qfx_onnx.write_annotated(model, folder / f"{name}.qfx.onnx")
    return folder


def test_cli_writes_refuses_and_never_overwrites(mlp_files, digits):
    src = mlp_files / "conv.qfx.onnx"
    before = src.read_bytes()
    result = runner.invoke(app, ["export-qonnx", str(src)])
    assert result.exit_code == 0, result.output
    out = mlp_files / "conv.qonnx.onnx"
    assert "12 Quant nodes" in result.output
    check_exported(onnx.load(out), src, digits[1][:50])
    again = runner.invoke(app, ["export-qonnx", str(src)])
    assert again.exit_code == 1 and "already exists: pass --force" in again.output
    same = runner.invoke(app, ["export-qonnx", str(src), "-o", str(src), "--force"])
    assert same.exit_code == 1 and "refusing to overwrite" in same.output
    assert src.read_bytes() == before

    rnd = runner.invoke(app, ["export-qonnx", str(mlp_files / "rnd.qfx.onnx"), "-o", str(mlp_files / "rnd.qonnx.onnx")])
    assert rnd.exit_code == 1 and "Traceback" not in rnd.output
    line = " ".join(rnd.output.split())
    assert line.startswith("error:") and "'logits' ap_fixed<8,6,AP_RND,AP_SAT>" in line
    assert "nearest expressible: ap_fixed<8,6,AP_RND_INF,AP_SAT>" in line
    assert not (mlp_files / "rnd.qonnx.onnx").exists()

    flt = runner.invoke(app, ["export-qonnx", str(MODELS / "mlp.onnx"), "-o", str(mlp_files / "f.onnx")])
    assert flt.exit_code == 1 and "not an annotated qfx model" in flt.output

    as_json = runner.invoke(app, ["export-qonnx", str(src), "--json", "--force", "-q",
                                  "--hls4ml-config", str(mlp_files / "conv.hls4ml.json")])
    assert as_json.exit_code == 0
    payload = json.loads(as_json.stdout)
    assert payload["quant_nodes"][0] == {"tensor": "input::quant", "type": "ap_ufixed<8,1,AP_RND_CONV,AP_SAT>",
                                         "signed": 0, "narrow": 0, "rounding_mode": "ROUND"}
    assert json.loads((mlp_files / "conv.hls4ml.json").read_text()) == \
        {"LayerName": {"global_in": {"Precision": {"result": "ufixed<8,1,RND_CONV,SAT,0>"}}}}
    clash = runner.invoke(app, ["export-qonnx", str(src), "--force", "--hls4ml-config", str(out)])
    assert clash.exit_code == 1 and "needs a file of its own" in clash.output


# ------------------------------------------------------------------------------ hls4ml


@pytest.mark.slow
@pytest.mark.hls4ml
def test_hls4ml_predicts_the_mlp_bit_exactly(mlp_files, digits, tmp_path):
    """hls4ml's QONNX front end (qonnx cleanup, channels-last, Gemm to MatMul) on the exported MLP:
    convert, compile with g++, predict. Per-layer ('name') precision inferred by hls4ml from the
    Quant nodes plus export-qonnx's --hls4ml-config entry for the input layer: every output equals
    the emulation, on the digits and on random float inputs with all 24 significand bits (without
    the entry hls4ml truncates those to its default fixed<16,6> first: see bench_hls4ml.py)."""
    hls4ml = pytest.importorskip("hls4ml")
    from qonnx.transformation.channels_last import ConvertToChannelsLastAndClean
    from qonnx.transformation.gemm_to_matmul import GemmToMatMul
    from qonnx.util.cleanup import cleanup_model

    src = mlp_files / "conv.qfx.onnx"
    result = runner.invoke(app, ["export-qonnx", str(src), "-o", str(tmp_path / "m.onnx"),
                                 "--hls4ml-config", str(tmp_path / "m.json")])
    assert result.exit_code == 0, result.output
    layers = json.loads((tmp_path / "m.json").read_text())["LayerName"]
    assert layers == {"global_in": {"Precision": {"result": "ufixed<8,1,RND_CONV,SAT,0>"}}}

    wrapper = cleanup_model(ModelWrapper(str(tmp_path / "m.onnx")))
    wrapper = cleanup_model(wrapper.transform(ConvertToChannelsLastAndClean()).transform(GemmToMatMul()))
    config = hls4ml.utils.config.config_from_onnx_model(wrapper, granularity="name", backend="Vitis",
                                                        default_precision="fixed<16,6>")
    for name, entry in layers.items():
        config["LayerName"][name]["Precision"].update(entry["Precision"])
    hls = hls4ml.converters.convert_from_onnx_model(wrapper, output_dir=str(tmp_path / "hls4ml"), io_type="io_parallel",
                                                    backend="Vitis", hls_config=config)
    hls.compile()
    fixed = qfx_onnx.read_annotated(src)
    noise = np.random.default_rng(0).uniform(-0.2, 2.2, size=(500, 1, 8, 8)).astype(np.float32)
    for x in (np.ascontiguousarray(digits[1]), noise):
        want = fixed.predict(x)
        got = np.asarray(hls.predict(x)).reshape(want.shape)
        np.testing.assert_array_equal(got, want)
