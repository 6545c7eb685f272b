"""Every IR op has one definition that every back end reads (qfx_onnx/ir/opdef.py).

* The walk: for every registered op, type propagation, the annotated-ONNX writer and reader, the
  HLS exporter and the estimator each have a rule for it, or the op refuses HLS by design with a
  one-line reason that export-hls shows as one ExportError naming node, op and reason.
* Adding an op is one place: a toy op defined in this module only (registered by a fixture,
  unregistered after) goes through quantize, type propagation, annotated write, onnxruntime,
  read-back and HLS C-simulation, bit-exact, with no library module touched.
"""

from __future__ import annotations

import inspect
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, defs, helper
from torch import fx

from qfx_onnx.errors import ExportError
from qfx_onnx.fixed.types import FixedType, add_type, mul_type
from qfx_onnx.hls.export import find_unsupported
from qfx_onnx.hls.kinds import LAYER_KINDS
from qfx_onnx.hls.project import export_hls
from qfx_onnx.importer import load_onnx
from qfx_onnx.ir import opdef
from qfx_onnx.ir.ops import IR_OPS, HlsForm, NoHls, ir_op, op_of
from qfx_onnx.quant.annotated import NODE_IR_OP
from qfx_onnx.quant.annotated_read import read_annotated
from qfx_onnx.quant.annotated_write import write_annotated
from qfx_onnx.quant.onnx_cast import OPSET
from qfx_onnx.quant.policy import Policy
from qfx_onnx.quant.quantize import quantize_graph
from qfx_onnx.quant.typeprop import TypeQuery, propagate

ALL_OPS = sorted(IR_OPS)
PLACES = {"alias", "remap", "split", "head", "step", "table", "shape"}


def _keywords(fn) -> list[str]:
    return [p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY]


# ------------------------------------------------------------------------------------ the walk
@pytest.mark.parametrize("name", ALL_OPS)
def test_every_op_has_a_rule_in_every_back_end(name):
    op = IR_OPS[name]
    assert op_of(op.fn) is op and op.kind in opdef.KINDS

    # type propagation and quantize: a type rule; a cast role for every op that computes a value
    assert callable(op.type_rule)
    assert op.cast_role in (None, *opdef.CAST_ROLES)
    if op.kind in ("linear", "arith", "nonlinear"):
        assert op.cast_role is not None, f"{name} computes a value but gets no cast"
    if op.kind in ("shape", "move") and name not in ("concat",):
        assert op.cast_role is None

    # annotated write: an emitter, or an ONNX op whose opset-18 schema takes every keyword as an attribute
    if op.emit is None:
        assert op.onnx_op is not None, f"{name} has neither an emitter nor an ONNX op"
        schema = defs.get_schema(op.onnx_op, OPSET)
        missing = [k for k in _keywords(op.fn) if k not in schema.attributes]
        assert not missing, f"{name}: {op.onnx_op}-{OPSET} takes {missing} as inputs: it needs an emitter"
    # annotated read: a restore rule only makes sense for an emission of its own (the writer refuses
    # to tag an emission whose op has no restore rule, see test_untagged_restore_is_refused)
    if op.restore is not None:
        assert op.emit is not None

    # HLS and the estimate: a placement with what it needs, or a stated refusal
    form = op.hls
    if isinstance(form, NoHls):
        assert form.reason and "\n" not in form.reason and ";" not in form.reason
        return
    assert form.place in PLACES
    assert (form.place == "shape") == (op.kind == "shape")
    if form.place == "head":  # a fixed kind, or a chooser that says which kinds it may return
        for name in (form.layer.kinds if callable(form.layer) else (form.layer,)):
            kind = LAYER_KINDS[name]
            assert callable(kind.build) and callable(kind.config) and callable(kind.call) and callable(kind.iterations)
    if form.place == "step":
        assert isinstance(form.products, int) and form.products >= 0
        args = ["a[i]", "b[i]", "c[i]"][:max(1, len(inspect.signature(op.fn).parameters))]
        temps = {k: f"t_{k}" for k in (form.temps([FixedType(8, 3)] * 3) if form.temps else {})}
        text = form.cpp("res_t", "v1", args, temps)
        assert isinstance(text, list) and all(isinstance(line, str) and line.endswith((";", "}")) for line in text)
        assert any(line.startswith("res_t v1") for line in text)
    if form.place == "table":
        assert op.kind == "nonlinear" and (form.table is None or callable(form.table))


def test_registry_defaults_and_errors():
    with pytest.raises(ValueError, match="needs a type_rule"):
        ir_op("arith", "Add")
    with pytest.raises(ValueError, match="unknown IR op kind"):
        ir_op("fancy")
    with pytest.raises(ValueError, match="registered twice"):
        ir_op("move", "Identity")(IR_OPS["identity"].fn)


def _graph_calling(op) -> fx.GraphModule:
    graph = fx.Graph()
    x = graph.placeholder("x")
    y = graph.call_function(op.fn, (x,))
    y.meta["onnx_node"] = f"node of {op.name}"
    graph.output(y)
    return fx.GraphModule(torch.nn.Module(), graph)


@pytest.mark.parametrize("name", [n for n in ALL_OPS if isinstance(IR_OPS[n].hls, NoHls)])
def test_refusal_names_node_op_and_reason(name):
    op = IR_OPS[name]
    bad = find_unsupported(_graph_calling(op), set())
    assert len(bad) == 1 and f"[{name}]" in bad[0] and f"node of {name}" in bad[0] and op.hls.reason in bad[0]


def test_refusal_is_the_one_line_cli_error(tmp_path):
    from typer.testing import CliRunner

    from qfx_onnx_cli.main import app
    import test_hls_models as zoo

    model = zoo.with_softmax()
    x = torch.from_numpy(zoo.inputs_for(model, 16))
    fpm = quantize_graph(load_onnx(model), [x], Policy(nonlinear={"exact": False}))  # softmax left in float
    annotated = tmp_path / "sm.qfx.onnx"
    write_annotated(fpm, annotated, example_input=x[:1])
    res = CliRunner().invoke(app, ["export-hls", str(annotated), "-o", str(tmp_path / "sm")])
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 1 and len(lines) == 1 and "Traceback" not in res.output
    assert lines[0].startswith("error:") and "softmax" in lines[0] and "exact fixed-point definition" in lines[0]
    assert not (tmp_path / "sm").exists()


def test_untagged_restore_is_refused(tmp_path, toy_op):
    """An emission tagged with an op that cannot be read back is an ExportError at write time."""
    fpm, x = _toy_model()
    opdef.remove(toy_op.name)
    toy_op.fn.ir_op = replace(toy_op, restore=None)
    opdef.add(toy_op.fn.ir_op)
    with pytest.raises(ExportError, match="without a restore rule"):
        write_annotated(fpm, tmp_path / "toy.qfx.onnx", example_input=x[:1])


# ------------------------------------------------------------------------------------ one place
def _toy_type(q: TypeQuery):
    return add_type(mul_type(q.types[0], q.types[0]), q.types[1]), 1


def _emit_toy(w, node, out, name):
    """``x * x + c`` as Mul and Add, the Add tagged so that the reader can restore the op."""
    square = w.fresh(f"{name}::square")
    w.node("Mul", [w.arg(node.args[0]), w.arg(node.args[0])], [square], square)
    w.node("Add", [square, w.arg(node.args[1])], [out], name, ir_op="toy_square_offset")


def _restore_toy(gm, node):
    mul = node.args[0] if op_of(node.target) is IR_OPS["add"] else None
    if not isinstance(mul, fx.Node) or op_of(mul.target) is not IR_OPS["mul"] or mul.args[0] is not mul.args[1]:
        return False
    node.target, node.args = IR_OPS["toy_square_offset"].fn, (mul.args[0], node.args[1])
    return True


def _toy_cpp(T, v, a, t):
    return [f"{T} {v} = {a[0]} * {a[0]} + {a[1]};"]


@pytest.fixture
def toy_op():
    def toy_square_offset(x, c):
        """``x * x + c``: an op this module alone defines."""
        return x * x + c

    ir_op("arith", None, type_rule=_toy_type, cast_role="act", emit=_emit_toy, restore=_restore_toy,
          hls=HlsForm.step(_toy_cpp, products=1))(toy_square_offset)
    yield IR_OPS["toy_square_offset"]
    opdef.remove("toy_square_offset")
    assert "toy_square_offset" not in IR_OPS


def _toy_model():
    """x (N, 6) -> Gemm -> Mul(g, g) -> Add(., c) -> y; the Mul/Add pair rewritten into the toy op,
    then quantized (8-bit casts) on random data."""
    rng = np.random.default_rng(0)
    inits = [onnx.numpy_helper.from_array((rng.standard_normal((4, 6)) * 0.5).astype(np.float32), "W"),
             onnx.numpy_helper.from_array(np.array([0.25, -0.5, 0.75, 1.0], np.float32), "c")]
    nodes = [helper.make_node("Gemm", ["x", "W"], ["g"], name="dense", transB=1),
             helper.make_node("Mul", ["g", "g"], ["m"], name="square"),
             helper.make_node("Add", ["m", "c"], ["y"], name="offset")]
    graph = helper.make_graph(nodes, "toy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    gm = load_onnx(model)
    add = next(n for n in gm.graph.nodes if op_of(n.target) is IR_OPS["add"])
    mul = add.args[0]
    add.target, add.args = IR_OPS["toy_square_offset"].fn, (mul.args[0], add.args[1])
    gm.graph.erase_node(mul)
    gm.recompile()
    x = torch.from_numpy(rng.standard_normal((32, 6)).astype(np.float32))
    return quantize_graph(gm, [x]), x


def test_a_new_op_is_one_definition(toy_op, tmp_path):
    fpm, x = _toy_model()
    gm = fpm.graph_module
    toy = next(n for n in gm.graph.nodes if op_of(n.target) is toy_op)

    # type propagation: the op's own rule
    info = propagate(gm, (x[:1].to(torch.float64),))
    g_t, c_t = info[toy.args[0]].type, info[toy.args[1]].type
    assert info[toy].type == add_type(mul_type(g_t, g_t), c_t)

    # annotated ONNX: onnxruntime agrees with the emulation bit for bit; the op reads back
    path = tmp_path / "toy.qfx.onnx"
    proto = write_annotated(fpm, path, example_input=x[:1])
    tagged = [n for n in proto.graph.node if any(p.key == NODE_IR_OP for p in n.metadata_props)]
    assert [(n.op_type, n.metadata_props[0].value) for n in tagged] == [("Add", "toy_square_offset")]
    want = fpm.predict(x.numpy())
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    np.testing.assert_array_equal(got.astype(np.float64), want)
    back = read_annotated(path)
    assert any(op_of(n.target) is toy_op for n in back.graph_module.graph.nodes)
    assert back.fixed_types() == fpm.fixed_types()
    np.testing.assert_array_equal(back.predict(x.numpy()), want)

    # HLS: the C++ statement of the op, its multiplier in the estimate, C simulation bit-exact
    result = export_hls(fpm, tmp_path / "prj", data=(x,), n_vectors=32, csim=True)
    assert result.csim.passed and result.csim.mismatches == 0
    parameters = (tmp_path / "prj" / "firmware" / "parameters.h").read_text()
    assert " * v1 + " in parameters or "v2 = v1 * v1 + " in parameters
    dense = result.report["layers"][0]
    assert sum(m["count"] for m in dense["multiplies"].values()) == 4 * 6 + 4


# ------------------------------------------------------------------------------------ a new layer kind
def _halves_type(q: TypeQuery):
    return add_type(q.types[0], q.types[0]), 2


def _build_halves(builder, ident, group, out):
    from qfx_onnx.hls.kinds import MapParams
    from qfx_onnx.hls.model import Layer

    x = group.head.args[0]
    return Layer(ident, "toy_halves", [builder.buffer(x)], out, builder.ctype(group.head, "accumulator"),
                 params=MapParams(int(np.prod(builder.shape(group.head)))))


def _halves_config(layer, options):
    n = layer.params.n_out
    x_t = layer.inputs[0].ctype.ident
    run = (f"static void run(const {x_t} x[{2 * n}], res_t y[{n}]) {{\n"
           f"  for (int i = 0; i < {n}; i++) y[i] = epilogue(head_t(x[i]) + head_t(x[i + {n}]), i);\n}}")
    return [run], [], set()


@pytest.fixture
def toy_kind():
    from qfx_onnx.hls.kinds import LayerKind, layer_kind

    def toy_sum_halves(x):
        """The first half of the last axis plus the second half."""
        n = x.shape[-1] // 2
        return x[..., :n] + x[..., n:]

    layer_kind(LayerKind("toy_halves", _build_halves, _halves_config,
                         lambda layer, cfg, array: [f"{cfg}::run({array(layer.inputs[0])}, {array(layer.output)});"]))
    ir_op("arith", None, type_rule=_halves_type, hls=HlsForm.head("toy_halves"))(toy_sum_halves)
    yield IR_OPS["toy_sum_halves"]
    opdef.remove("toy_sum_halves")
    del LAYER_KINDS["toy_halves"]


def test_a_new_layer_kind_is_one_registration(toy_kind, tmp_path):
    """An op heading a layer kind defined here: its C++ config, its call, its estimate and its
    fused cast, C-simulated bit-exact against the emulation."""
    rng = np.random.default_rng(1)
    init = onnx.numpy_helper.from_array((rng.standard_normal((8, 6)) * 0.5).astype(np.float32), "W")
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "W"], ["g"], name="dense", transB=1),
                               helper.make_node("Relu", ["g"], ["y"], name="relu")], "halves",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], [init])
    gm = load_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8))
    relu = next(n for n in gm.graph.nodes if op_of(n.target) is IR_OPS["relu"])
    relu.target = toy_kind.fn  # y = g[:, :4] + g[:, 4:], then its own cast (role elementwise)
    gm.recompile()
    x = torch.from_numpy(rng.standard_normal((32, 6)).astype(np.float32))
    fpm = quantize_graph(gm, [x])
    result = export_hls(fpm, tmp_path / "prj", data=(x,), n_vectors=32, csim=True)
    assert result.csim.passed and result.csim.mismatches == 0
    layer = next(e for e in result.report["layers"] if e["kind"] == "toy_halves")
    assert layer["iterations"] == 4 and layer["op"] == "toy_sum_halves"
    assert "config_" in (tmp_path / "prj" / "firmware" / "myproject.cpp").read_text().split("::run(")[0]


def test_templates_and_op_packages_are_installed_with_the_package():
    """pyproject lists every subpackage and its package-data globs cover every template file; the
    files are read through importlib.resources (what a wheel install sees), not repository paths."""
    import fnmatch
    import tomllib
    from importlib import resources
    from pathlib import Path

    import qfx_onnx
    from qfx_onnx.hls import files

    root = Path(qfx_onnx.__file__).parent
    config = tomllib.loads((root.parent / "pyproject.toml").read_text())["tool"]["setuptools"]
    subpackages = {".".join(p.parent.relative_to(root.parent).parts) for p in root.rglob("__init__.py")}
    assert subpackages <= set(config["packages"])
    globs = config["package-data"]["qfx_onnx.hls"]
    shipped = [p for p in (root / "hls" / "templates").iterdir() if p.is_file()]
    assert shipped and all(any(fnmatch.fnmatch(f"templates/{p.name}", g) for g in globs) for p in shipped)
    for p in shipped:
        if p.suffix == ".h":
            assert files.header(p.name) == resources.files("qfx_onnx.hls").joinpath("templates", p.name).read_text()
    assert "jinja2" in " ".join(tomllib.loads((root.parent / "pyproject.toml").read_text())["project"]["dependencies"])
