"""Annotated ONNX: the written model is valid and runs in onnxruntime, the annotation is complete,
write -> read -> write is the identity, and malformed files are refused with one-line errors."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper

from qfx_onnx.data import load_arrays
from qfx_onnx.errors import ExportError, OnnxModelError
from qfx_onnx.fixed import FixedType, OverflowMode, QuantMode, reference_cast
from qfx_onnx.importer import load_onnx
from qfx_onnx.quant.annotated import (
    KEY_AXIS, KEY_FINN, KEY_ROLE, KEY_TYPE, LOSSLESS, read_annotated, write_annotated,
)
from qfx_onnx.quant.onnx_cast import DOMAIN, IR_VERSION, OPSET, cast_function_per_channel, channel_function_name, channel_scales
from qfx_onnx.quant.policy import Policy
from qfx_onnx.quant.quantize import FixedPointModel, quantize_graph

from onnx_builders import make_model, value_info
from test_fixed_cast import edge_values

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["mlp", "cnn", "resnet", "dscnn"]


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.lru_cache(maxsize=None)
def data(split: str) -> torch.Tensor:
    return load_arrays(ROOT / "models" / "digits.npz", split)[0]


@functools.lru_cache(maxsize=None)
def fixed_model(name: str, per_channel: bool = False, bits: int = 8) -> FixedPointModel:
    """A shipped model after PTQ with the default policy at ``bits``-bit weights and activations
    (cached: tests only read it)."""
    policy = Policy(weight_bits=bits, act_bits=bits)
    return quantize_graph(load_onnx(ROOT / "models" / f"{name}.onnx"), [data("train")[:256]], policy,
                          per_channel_weights=per_channel)


def run_ort(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def bits(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float32).view(np.uint32)


def notes(proto: onnx.ModelProto) -> dict[str, dict[str, str]]:
    return {a.tensor_name: {kv.key: kv.value for kv in a.quant_parameter_tensor_names} for a in proto.graph.quantization_annotation}


def rich_model() -> onnx.ModelProto:
    """One model with most IR ops: asymmetric pads, pooling with ceil_mode, activations with
    constant operands, split, resize, pad, gather, squeeze, a nonlinear op and an uncast output."""
    rng = np.random.default_rng(0)

    def f(*shape):
        return (rng.standard_normal(shape) * 0.5).astype(np.float32)

    def i64(*values):
        return np.array(values, dtype=np.int64)

    inits = {
        "w1": f(6, 2, 3, 3), "b1": f(6), "slope": np.abs(f(6, 1, 1)), "lo": np.array(-1.0, np.float32),
        "hi": np.array(1.5, np.float32), "pads": i64(0, 0, 1, 0, 0, 0, 0, 1), "scales": np.array([1, 1, 2, 2], np.float32),
        "split": i64(6, 6), "starts": i64(0), "ends": i64(4), "axes1": i64(1), "axes23": i64(2, 3),
        "w2": f(17, 5), "idx": i64(1, 0, 3), "shape": i64(0, -1), "sq": i64(2),
    }
    n = helper.make_node
    nodes = [
        n("Conv", ["x", "w1", "b1"], ["c1"], name="conv", pads=[1, 0, 2, 1]),
        n("LeakyRelu", ["c1"], ["l1"], name="leaky", alpha=0.1),
        n("PRelu", ["l1", "slope"], ["p1"], name="prelu"),
        n("Clip", ["p1", "lo", "hi"], ["k1"], name="clip"),
        n("AveragePool", ["k1"], ["a1"], name="avg", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1),
        n("MaxPool", ["k1"], ["m1"], name="maxp", kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
        n("Sub", ["a1", "m1"], ["s1"], name="sub"),
        n("HardSigmoid", ["s1"], ["h1"], name="hsig", alpha=0.25, beta=0.5),
        n("HardSwish", ["s1"], ["h2"], name="hswish"),
        n("Concat", ["h1", "h2"], ["cat"], name="cat", axis=1),
        n("Pad", ["cat", "pads"], ["pd"], name="pad"),
        n("Resize", ["pd", "", "scales"], ["rs"], name="resize", mode="nearest"),
        n("Split", ["rs", "split"], ["sp0", "sp1"], name="split", axis=1),
        n("Neg", ["sp1"], ["ng"], name="neg"),
        n("Sum", ["sp0", "ng", "sp0"], ["sm"], name="sum"),
        n("Slice", ["sm", "starts", "ends", "axes1"], ["sl"], name="slice"),
        n("ReduceSum", ["sl", "axes23"], ["rsum"], name="rsum", keepdims=0),
        n("Sigmoid", ["sl"], ["sg"], name="sig"),
        n("ReduceMean", ["sg"], ["rmean"], name="rmean", axes=[2, 3], keepdims=0),
        n("Concat", ["rsum", "rmean"], ["feat"], name="feat", axis=1),
        n("Gather", ["feat", "idx"], ["g"], name="gather", axis=1),
        n("Concat", ["feat", "g", "g", "g"], ["feat2"], name="feat2", axis=1),
        n("Transpose", ["feat2"], ["tr"], name="tr", perm=[0, 1]),
        n("Unsqueeze", ["tr", "sq"], ["us"], name="unsq"),
        n("Squeeze", ["us", "sq"], ["sqz"], name="sqz"),
        n("MatMul", ["sqz", "w2"], ["mm"], name="mm"),
        n("Reshape", ["mm", "shape"], ["rp"], name="reshape"),
        n("Softmax", ["rp"], ["out"], name="softmax", axis=-1),
    ]
    return make_model(nodes, [value_info("x", ["N", 2, 8, 8])], ["out", "rp"], opset=14, initializers=inits)


@functools.lru_cache(maxsize=None)
def rich_fixed() -> FixedPointModel:
    return quantize_graph(load_onnx(rich_model()), [torch.randn(64, 2, 8, 8, generator=torch.Generator().manual_seed(0))])


# --------------------------------------------------------------------------------------------------
# the written model


@pytest.mark.parametrize("name", MODELS)
def test_written_model_is_valid_annotated_and_runs_like_the_emulation(name, tmp_path):
    fixed = fixed_model(name)
    path = tmp_path / f"{name}.qfx.onnx"
    proto = write_annotated(fixed, path, source=str(ROOT / "models" / f"{name}.onnx"))
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    assert proto.ir_version == IR_VERSION == 10
    assert {(o.domain, o.version) for o in proto.opset_import} == {("", OPSET), (DOMAIN, 1)}
    assert {p.key: p.value for p in proto.metadata_props} == {"qfx.format_version": "1", "qfx.source": f"{name}.onnx"}
    assert [i.name for i in proto.graph.input] == ["input"] and [o.name for o in proto.graph.output] == ["logits"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # the batch stays dynamic
    assert proto.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 10

    annotated = notes(proto)
    casts = [n for n in proto.graph.node if n.domain == DOMAIN]
    assert len(casts) == len(fixed.fixed_types())
    for tensor, t in fixed.fixed_types().items():
        entry = annotated["input::quant" if tensor == "input" else tensor]
        assert entry[KEY_TYPE] == str(t) and entry[KEY_ROLE] in ("input", "weight", "bias", "constant", "act", "elementwise")
        assert entry.get(KEY_FINN) == t.finn_datatype
    for node in proto.graph.node:  # every lossless accumulator is typed
        if node.op_type in ("Conv", "Gemm"):
            assert annotated[node.output[0]][KEY_ROLE] == LOSSLESS
            assert FixedType.parse(annotated[node.output[0]][KEY_TYPE]).width > 8

    for batch in (3, 17):  # bit for bit, at any batch size
        x = data("test")[:batch]
        want = fixed(x).detach().to(torch.float32).numpy()
        assert np.array_equal(bits(run_ort(proto, x.numpy())), bits(want))


def test_special_ops_are_emitted_as_exact_standard_ops(tmp_path):
    dscnn = write_annotated(fixed_model("dscnn"), tmp_path / "dscnn.onnx")
    ops = [n.op_type for n in dscnn.graph.node]
    assert "AveragePool" not in ops and "BatchNormalization" not in ops and "GlobalAveragePool" not in ops
    pool = next(n for n in dscnn.graph.node if n.name == "/2/AveragePool::sum_pool")
    assert pool.op_type == "Conv" and helper.get_attribute_value(next(a for a in pool.attribute if a.name == "group")) == 32
    kernel = next(t for t in dscnn.graph.initializer if t.name == pool.input[1])
    assert kernel.dims == [32, 1, 2, 2] and np.all(onnx.numpy_helper.to_array(kernel) == 1)
    reduce = next(n for n in dscnn.graph.node if n.op_type == "ReduceSum")
    assert len(reduce.input) == 2  # opset 18: axes as an input

    cnn = write_annotated(fixed_model("cnn"), tmp_path / "cnn.onnx")
    bn = [n for n in cnn.graph.node if n.name.startswith("/1/BatchNormalization") and n.domain == ""]
    assert [n.op_type for n in bn] == ["Mul", "Add"]
    assert bn[0].input[1] == "/1/BatchNormalization::scale" and bn[1].output[0] == "/1/BatchNormalization_output_0::raw"
    names = {t.name for t in cnn.graph.initializer}
    assert {"0.weight::raw", "/1/BatchNormalization::scale::raw", "/1/BatchNormalization::shift::raw"} <= names


def test_rich_model_runs_and_round_trips(tmp_path):
    fixed = rich_fixed()
    proto = write_annotated(fixed, tmp_path / "rich.onnx")
    op_types = {n.op_type for n in proto.graph.node}
    assert {"PRelu", "Clip", "Split", "Slice", "Pad", "Resize", "Squeeze", "Unsqueeze", "Gather", "Sum"} <= op_types
    assert not {"LeakyRelu", "HardSigmoid", "HardSwish", "AveragePool", "ReduceMean"} & op_types
    x = torch.randn(5, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    out, rp = session.run(["out", "rp"], {"x": x.numpy()})
    want_out, want_rp = fixed(x)
    assert np.array_equal(bits(rp), bits(want_rp.detach()))
    assert np.abs(out - want_out.detach().numpy()).max() <= 2.0**-8  # softmax: onnxruntime's float32, then a cast
    again = write_annotated(read_annotated(tmp_path / "rich.onnx"), tmp_path / "rich2.onnx")
    assert again.SerializeToString() == proto.SerializeToString()


def test_runtime_shape_arithmetic_and_per_channel_gemm_and_matmul(tmp_path):
    """A dynamic-batch flatten computed at run time (Shape, Slice, Mul, Concat, Reshape on int64:
    the batch entry is arithmetic, so import cannot fold it) and per-channel weights on MatMul
    (last axis) and on a Gemm whose alpha is folded into B."""
    rng = np.random.default_rng(1)
    inits = {"w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "s0": np.array([0], np.int64),
             "s1": np.array([1], np.int64), "minus": np.array([-1], np.int64), "one": np.array([1], np.int64),
             "fc": rng.standard_normal((36, 5)).astype(np.float32), "g": rng.standard_normal((5, 3)).astype(np.float32),
             "c": rng.standard_normal((3,)).astype(np.float32)}
    n = helper.make_node
    nodes = [n("Conv", ["x", "w"], ["c1"], name="conv"), n("Shape", ["c1"], ["s"], name="shape"),
             n("Slice", ["s", "s0", "s1"], ["b0"], name="batch"), n("Mul", ["b0", "one"], ["b"], name="times_one"),
             n("Concat", ["b", "minus"], ["tgt"], name="tgt", axis=0),
             n("Reshape", ["c1", "tgt"], ["flat"], name="reshape"), n("MatMul", ["flat", "fc"], ["mm"], name="mm"),
             n("Gemm", ["mm", "g", "c"], ["y"], name="gemm", alpha=0.5)]
    model = make_model(nodes, [value_info("x", ["batch", 3, 5, 5])], ["y"], opset=13, initializers=inits)
    x = torch.randn(32, 3, 5, 5, generator=torch.Generator().manual_seed(3))
    fixed = quantize_graph(load_onnx(model), [x], per_channel_weights=True)
    proto = write_annotated(fixed, tmp_path / "dyn.onnx")
    assert {"Shape", "Slice", "Concat", "Reshape"} <= {node.op_type for node in proto.graph.node}
    assert notes(proto)["fc"][KEY_AXIS] == "1" and notes(proto)["gemm::B"][KEY_AXIS] == "1"
    for batch in (1, 7):
        assert np.array_equal(bits(run_ort(proto, x[:batch].numpy())), bits(fixed(x[:batch]).detach()))
    again = write_annotated(read_annotated(proto), tmp_path / "dyn2.onnx")
    assert again.SerializeToString() == proto.SerializeToString()


# --------------------------------------------------------------------------------------------------
# round trip


@pytest.mark.parametrize("name, per_channel", [(m, False) for m in MODELS] + [("cnn", True)])
def test_write_read_write_is_the_identity(name, per_channel, tmp_path):
    fixed = fixed_model(name, per_channel=per_channel)
    first = write_annotated(fixed, tmp_path / "a.onnx", source=f"{name}.onnx")
    back = read_annotated(tmp_path / "a.onnx")
    second = write_annotated(back, tmp_path / "b.onnx")  # qfx.source is remembered
    assert second.SerializeToString() == first.SerializeToString()
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert back.fixed_types() == fixed.fixed_types()
    assert [s.role for s in back.sites] == [s.role for s in fixed.sites]
    x = data("test")[:40]
    assert torch.equal(back(x), fixed(x))
    assert read_annotated(first).fixed_types() == fixed.fixed_types()  # a ModelProto reads too


def test_per_channel_weights_are_annotated_with_their_axis(tmp_path):
    fixed = fixed_model("cnn", per_channel=True)
    proto = write_annotated(fixed, tmp_path / "pc.onnx")
    entry = notes(proto)["0.weight"]
    types = fixed.fixed_types()["0.weight"]
    assert isinstance(types, list) and len(types) == 16
    assert entry[KEY_TYPE] == ";".join(map(str, types)) and entry[KEY_AXIS] == "0"
    cast = next(n for n in proto.graph.node if n.output[0] == "0.weight")
    assert cast.op_type == channel_function_name(types[0]) and list(cast.input[1:]) == ["0.weight::scale", "0.weight::inv_scale"]
    x = data("test")[:20]
    assert np.array_equal(bits(run_ort(proto, x.numpy())), bits(fixed(x).detach()))


@pytest.mark.parametrize("q, o, n", [(QuantMode.RND, OverflowMode.SAT, 0), (QuantMode.TRN, OverflowMode.WRAP, 2),
                                     (QuantMode.RND_CONV, OverflowMode.WRAP_SM, 1), (QuantMode.RND_INF, OverflowMode.SAT_SYM, 0),
                                     (QuantMode.TRN_ZERO, OverflowMode.WRAP_SM, 3)], ids=str)
def test_per_channel_cast_function_is_bit_exact(q, o, n):
    """The per-channel local function against the integer-domain reference, channel by channel."""
    rng = np.random.default_rng(5)
    types = [FixedType(8, i, True, q, o, n) for i in (3, -2, 8, 0)]
    rows = [edge_values(t, rng, n=100) for t in types]
    with np.errstate(over="ignore"):
        x = np.stack(rows).astype(np.float32)
    scale, inv_scale = channel_scales(types, 0, 2)
    fn = cast_function_per_channel(types[0])
    node = helper.make_node(fn.name, ["x", "s", "i"], ["y"], domain=DOMAIN)
    graph = helper.make_graph([node], "pc", [value_info("x", list(x.shape))], [value_info("y", list(x.shape))],
                              [onnx.numpy_helper.from_array(scale, "s"), onnx.numpy_helper.from_array(inv_scale, "i")])
    model = helper.make_model(graph, functions=[fn], ir_version=IR_VERSION,
                              opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)])
    onnx.checker.check_model(model, full_check=True)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    for row, t in enumerate(types):
        want = reference_cast(x[row].astype(np.float64), t).astype(np.float32)
        assert np.array_equal(bits(got[row]), bits(want)), t


# --------------------------------------------------------------------------------------------------
# refusals


def test_a_float_model_is_not_an_annotated_one():
    with pytest.raises(OnnxModelError, match=r"not an annotated qfx model \(run qfx-onnx quantize first\)"):
        read_annotated(ROOT / "models" / "cnn.onnx")


def _edited(tmp_path, edit) -> Path:
    proto = write_annotated(fixed_model("mlp"), tmp_path / "ok.onnx")
    edit(proto)
    path = tmp_path / "edited.onnx"
    onnx.save(proto, str(path))
    return path


def _set_note(proto, tensor, key, value):
    entry = next(a for a in proto.graph.quantization_annotation if a.tensor_name == tensor)
    kv = next(kv for kv in entry.quant_parameter_tensor_names if kv.key == key)
    kv.value = value


def _drop_note(proto, tensor):
    kept = [a for a in proto.graph.quantization_annotation if a.tensor_name != tensor]
    del proto.graph.quantization_annotation[:]
    proto.graph.quantization_annotation.extend(kept)


def _retype_function(proto):
    cast = next(n for n in proto.graph.node if n.output[0] == "1.weight")
    fn = next(f for f in proto.functions if f.name == cast.op_type)
    const = next(n for n in fn.node if n.op_type == "Constant")
    const.attribute[0].t.float_data[0] = 3.0


@pytest.mark.parametrize("edit, message", [
    (lambda p: _set_note(p, "1.weight", KEY_TYPE, "ap_fixed<8,3,AP_RND,AP_SAT>"), "annotated .* but its cast calls"),
    (lambda p: _drop_note(p, "/1/Gemm_output_0"), "has no annotation"),
    (lambda p: _set_note(p, "1.weight", KEY_TYPE, "ap_fixed<8,2,AP_BAD>"), "1.weight"),
    (lambda p: _set_note(p, "1.weight", KEY_ROLE, LOSSLESS), "role 'lossless'"),
    (lambda p: _set_note(p, "/1/Gemm_output_0::raw", KEY_ROLE, "act"), "no cast produces it"),
    (_retype_function, "not the cast it names"),
], ids=["type", "missing", "unparsable", "role", "uncast", "function-body"])
def test_inconsistent_annotations_are_refused(tmp_path, edit, message):
    with pytest.raises(OnnxModelError, match=message) as info:
        read_annotated(_edited(tmp_path, edit))
    assert "\n" not in str(info.value)


def test_per_channel_scales_must_match_the_annotation(tmp_path):
    proto = write_annotated(fixed_model("cnn", per_channel=True), tmp_path / "pc.onnx")
    scale = next(t for t in proto.graph.initializer if t.name == "0.weight::scale")
    values = onnx.numpy_helper.to_array(scale).copy()
    values.flat[0] *= 2
    scale.CopyFrom(onnx.numpy_helper.from_array(values, scale.name))
    with pytest.raises(OnnxModelError, match="per-channel scales of tensor '0.weight'"):
        read_annotated(proto)


def test_never_overwrites_the_input_file(tmp_path):
    fixed = fixed_model("mlp")
    path = tmp_path / "m.onnx"
    write_annotated(fixed, path)
    before = path.read_bytes()
    with pytest.raises(ExportError, match="refusing to overwrite"):
        write_annotated(fixed, path, source=str(path))
    back = read_annotated(path)
    with pytest.raises(ExportError, match="refusing to overwrite"):
        write_annotated(back, path)
    assert path.read_bytes() == before
    write_annotated(back, tmp_path / "copy.onnx")
    assert sorted(os.listdir(tmp_path)) == ["copy.onnx", "m.onnx"]  # no temp files left behind


def test_unwritable_target_and_disabled_casts_are_export_errors(tmp_path):
    fixed = fixed_model("mlp")
    with pytest.raises(ExportError, match="cannot write"):
        write_annotated(fixed, tmp_path / "missing" / "m.onnx")
    fixed.set_casts_enabled(False)
    try:
        with pytest.raises(ExportError, match="cast is disabled"):
            write_annotated(fixed, tmp_path / "m.onnx")
    finally:
        fixed.set_casts_enabled(True)
    assert not (tmp_path / "m.onnx").exists()


def test_types_float32_cannot_cast_exactly_are_refused(tmp_path):
    fixed = quantize_graph(load_onnx(ROOT / "models" / "mlp.onnx"), [data("train")[:32]])
    quant = fixed.quantizers()["1.weight"]
    quant.set_frac(130.0)  # 2**130 is beyond float32
    with pytest.raises(ExportError, match="1.weight"):
        write_annotated(fixed, tmp_path / "m.onnx")
