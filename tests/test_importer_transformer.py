"""Transformer ops against onnxruntime: single nodes, the recognised GELU and LayerNorm
decompositions, an encoder block from both PyTorch exporters, and the shipped models/transformer.onnx."""

from __future__ import annotations

import copy
import io
import json
import math
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper
from torch import nn

from onnx_builders import assert_matches_ort, call_targets, make_model, node_model, run_graph, run_ort, value_info
from qfx_onnx.errors import UnsupportedAttributeError
from qfx_onnx.importer import load_onnx
from qfx_onnx.ir import IR_OPS

RNG = np.random.default_rng(11)
MODELS = Path(__file__).resolve().parent.parent / "models"

pytestmark = pytest.mark.usefixtures("one_thread")


def normal(*shape: int, scale: float = 1.0, offset: float = 0.0) -> np.ndarray:
    return (offset + scale * RNG.standard_normal(shape)).astype(np.float32)


# ------------------------------------------------------------------------------------------ single ops
def test_new_ir_ops_are_registered_with_their_kinds():
    kinds = {name: IR_OPS[name].kind for name in ("layer_norm", "gelu", "erf", "exp", "sqrt", "reciprocal", "reduce_max")}
    assert kinds == {"layer_norm": "nonlinear", "gelu": "nonlinear", "erf": "nonlinear", "exp": "nonlinear",
                     "sqrt": "nonlinear", "reciprocal": "nonlinear", "reduce_max": "arith"}


@pytest.mark.parametrize("axis", [-1, 1, 2])
@pytest.mark.parametrize("with_bias", [True, False])
def test_layer_normalization(axis, with_bias):
    x_shape = (2, 3, 5, 4)
    normalized = x_shape[axis % 4:]
    inputs = [("x", x_shape), ("scale", normal(*normalized, offset=1.0))] + ([("bias", normal(*normalized))] if with_bias else [])
    # (not an empty trailing input name for an absent bias: onnx 1.23's shape inference crashes on it)
    model = node_model("LayerNormalization", inputs, opset=17, axis=axis, epsilon=1e-3)
    feeds = {"x": normal(*x_shape, scale=3.0, offset=0.5)}
    gm = assert_matches_ort(model, feeds, rtol=1e-5, atol=1e-5)
    assert call_targets(gm) == ["layer_norm"]
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    assert node.kwargs == {"axis": axis % 4, "epsilon": pytest.approx(1e-3)}
    roles = {n.meta["onnx_name"]: n.meta["role"] for n in gm.graph.nodes if n.op == "get_attr"}
    assert roles == ({"scale": "weight", "bias": "bias"} if with_bias else {"scale": "weight"})


def test_layer_normalization_mean_output_read_is_refused():
    node = helper.make_node("LayerNormalization", ["x", "scale"], ["y", "mean"], name="ln")
    model = make_model([node], [value_info("x", (2, 4))], ["y", "mean"], opset=17, initializers={"scale": normal(4)})
    with pytest.raises(UnsupportedAttributeError, match=r"'ln' \(LayerNormalization.*Mean output 'mean'"):
        load_onnx(model)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_20(approximate):
    gm = assert_matches_ort(node_model("Gelu", [("x", (2, 3, 16))], opset=20, approximate=approximate))
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    assert node.target.__name__ == "gelu" and node.kwargs == {"approximate": approximate}


@pytest.mark.parametrize("op, target, low", [("Erf", "erf", None), ("Exp", "exp", None), ("Sqrt", "sqrt", 0.0), ("Reciprocal", "reciprocal", 0.25)])
@pytest.mark.parametrize("opset", [9, 13])
def test_unary_nonlinear(op, target, low, opset):
    x = normal(2, 3, 8, scale=2.0)
    if low is not None:  # Sqrt on non-negatives, Reciprocal away from zero
        x = (np.sign(x) * (np.abs(x) + low)).astype(np.float32) if op == "Reciprocal" else np.abs(x)
    gm = assert_matches_ort(node_model(op, [("x", (2, 3, 8))], opset=opset), {"x": x})
    assert call_targets(gm) == [target]


@pytest.mark.parametrize("exponent, targets", [(2.0, ["mul"]), (3.0, ["mul", "mul"]), (0.5, ["sqrt"]), (-1.0, ["reciprocal"]), (1.0, ["identity"])])
@pytest.mark.parametrize("opset", [7, 13, 15])
def test_pow_by_constant(exponent, targets, opset):
    model = node_model("Pow", [("x", (2, 5)), ("e", np.array(exponent, np.float32))], opset=opset)
    gm = assert_matches_ort(model, {"x": np.abs(normal(2, 5)) + 0.25})
    assert call_targets(gm) == targets


def test_pow_square_is_x_times_x():
    gm = load_onnx(node_model("Pow", [("x", (2, 5)), ("e", np.array([2.0], np.float32))]))
    square = next(n for n in gm.graph.nodes if n.op == "call_function")
    assert square.args[0] is square.args[1] and square.args[0].op == "placeholder"


@pytest.mark.parametrize("y", [np.array(1.5, np.float32), np.array([[2.0], [3.0]], np.float32), np.full((3, 2, 5), 2.0, np.float32), (2, 5)],
                         ids=["power-1.5", "two-powers", "broadcasts-the-base", "runtime"])
def test_pow_other_exponents_are_refused(y):
    with pytest.raises(UnsupportedAttributeError, match="'pow_node' \\(Pow"):
        load_onnx(node_model("Pow", [("x", (2, 5)), ("e", y)]))


@pytest.mark.parametrize("axes", [[1], [-1], [1, 2], None])
@pytest.mark.parametrize("keepdims", [0, 1])
@pytest.mark.parametrize("opset", [13, 18])
def test_reduce_max(axes, keepdims, opset):
    inputs = [("x", (2, 3, 4))]
    attrs = {"keepdims": keepdims}
    if opset >= 18:
        inputs.append(("axes", None if axes is None else np.array(axes, np.int64)))
    elif axes is not None:
        attrs["axes"] = axes
    gm = assert_matches_ort(node_model("ReduceMax", inputs, opset=opset, **attrs))
    assert call_targets(gm) == ["reduce_max"]


@pytest.mark.parametrize("axis", [1, -1, 2])
def test_softmax_any_axis(axis):
    gm = assert_matches_ort(node_model("Softmax", [("x", (2, 4, 8, 8))], opset=13, axis=axis))
    assert call_targets(gm) == ["softmax"]


def test_matmul_of_two_activations():
    """Attention scores: (batch, heads, tokens, d) @ (batch, heads, d, tokens); both are runtime."""
    gm = assert_matches_ort(node_model("MatMul", [("q", (2, 4, 8, 16)), ("k", (2, 4, 16, 8))]))
    matmul = next(n for n in gm.graph.nodes if n.op == "call_function")
    assert [a.op for a in matmul.args] == ["placeholder", "placeholder"]


def test_softmax_written_out():
    """A user's stable softmax: ``exp(x - max(x)) / sum(exp(x - max(x)))`` (ReduceMax, Exp, Div by an activation)."""
    nodes = [
        helper.make_node("ReduceMax", ["x"], ["m"], axes=[-1]), helper.make_node("Sub", ["x", "m"], ["d"]),
        helper.make_node("Exp", ["d"], ["e"]), helper.make_node("ReduceSum", ["e", "axes"], ["s"]),
        helper.make_node("Div", ["e", "s"], ["y"]),
    ]
    model = make_model(nodes, [value_info("x", (2, 4, 8))], ["y"], initializers={"axes": np.array([-1], np.int64)})
    gm = assert_matches_ort(model, {"x": normal(2, 4, 8, scale=4.0)})
    assert call_targets(gm) == ["reduce_max", "sub", "exp", "reduce_sum", "div"]


# ------------------------------------------------------------------------------------------ recognised decompositions
def _gelu_nodes(order: str, half: float = 0.5) -> tuple[list[onnx.NodeProto], dict[str, np.ndarray]]:
    """``x * 0.5 * (1 + erf(x / sqrt2))`` as TorchScript (``ts``), dynamo (``dynamo``) or
    ``0.5 * x`` first (``half_first``) writes it."""
    consts = {"sqrt2": np.array(math.sqrt(2), np.float32), "one": np.array(1.0, np.float32), "half": np.array(half, np.float32)}
    head = [helper.make_node("Div", ["x", "sqrt2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]), helper.make_node("Add", ["e", "one"], ["p"])]
    tails = {
        "ts": [helper.make_node("Mul", ["x", "p"], ["m"]), helper.make_node("Mul", ["m", "half"], ["y"])],
        "dynamo": [helper.make_node("Mul", ["half", "p"], ["m"]), helper.make_node("Mul", ["x", "m"], ["y"])],
        "half_first": [helper.make_node("Mul", ["x", "half"], ["m"]), helper.make_node("Mul", ["m", "p"], ["y"])],
    }
    return head + tails[order], consts


@pytest.mark.parametrize("order", ["ts", "dynamo", "half_first"])
def test_erf_gelu_is_recognised(order):
    nodes, consts = _gelu_nodes(order)
    model = make_model(nodes, [value_info("x", (2, 16))], ["y"], initializers=consts)
    gm = assert_matches_ort(model, {"x": normal(2, 16, scale=3.0)})
    assert call_targets(gm) == ["gelu"]
    assert not [n for n in gm.graph.nodes if n.op == "get_attr"] and not dict(gm.named_parameters())
    (gelu,) = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert gelu.meta["onnx_name"] == "y" and gelu.meta["role"] == "activation"
    assert gelu.meta["fused_from"] == sorted(f"{n.op_type}_{i}" for i, n in enumerate(nodes))


@pytest.mark.parametrize("cube_order", [("x", "sq"), ("sq", "x")])
def test_tanh_gelu_is_recognised(cube_order):
    """TorchScript's ``GELU(approximate="tanh")`` below opset 20; dynamo's writes the cube the other way."""
    consts = {"k": np.array(0.044715, np.float32), "c": np.array(math.sqrt(2 / math.pi), np.float32),
              "one": np.array(1.0, np.float32), "half": np.array(0.5, np.float32)}
    nodes = [
        helper.make_node("Mul", ["x", "x"], ["sq"]), helper.make_node("Mul", list(cube_order), ["cube"]),
        helper.make_node("Mul", ["k", "cube"], ["kc"]), helper.make_node("Add", ["x", "kc"], ["inner"]),
        helper.make_node("Mul", ["c", "inner"], ["arg"]), helper.make_node("Tanh", ["arg"], ["t"]),
        helper.make_node("Add", ["one", "t"], ["p"]), helper.make_node("Mul", ["x", "p"], ["m"]), helper.make_node("Mul", ["half", "m"], ["y"]),
    ]
    model = make_model(nodes, [value_info("x", (2, 16))], ["y"], initializers=consts)
    gm = assert_matches_ort(model, {"x": normal(2, 16, scale=3.0)})
    assert call_targets(gm) == ["gelu"]
    assert next(n for n in gm.graph.nodes if n.op == "call_function").kwargs == {"approximate": "tanh"}


def test_erf_gelu_lookalikes_stay_as_imported():
    nodes, consts = _gelu_nodes("ts", half=0.6)
    model = make_model(nodes, [value_info("x", (2, 16))], ["y"], initializers=consts)
    assert call_targets(assert_matches_ort(model)) == ["mul", "erf", "add", "mul", "mul"]
    nodes, consts = _gelu_nodes("ts")  # the erf is also a graph output: nothing may be fused away
    model = make_model(nodes, [value_info("x", (2, 16))], ["y", "e"], initializers=consts)
    assert "gelu" not in call_targets(assert_matches_ort(model))


def _layer_norm_nodes(axes: list[int]) -> list[onnx.NodeProto]:
    """TorchScript's LayerNorm below opset 17 (ReduceMean with an ``axes`` attribute: opset 13)."""
    return [
        helper.make_node("ReduceMean", ["x"], ["mean"], axes=axes),
        helper.make_node("Sub", ["x", "mean"], ["d"]),
        helper.make_node("Pow", ["d", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq"], ["var"], axes=axes),
        helper.make_node("Add", ["var", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["std"]),
        helper.make_node("Div", ["d", "std"], ["n"]),
        helper.make_node("Mul", ["n", "w"], ["s"]),
        helper.make_node("Add", ["s", "b"], ["y"]),
    ]


@pytest.mark.parametrize("axes, fused", [([-1], True), ([2], True), ([1, 2], True), ([1], False)])
def test_decomposed_layer_norm_is_recognised_over_trailing_axes(axes, fused):
    shape = (2, 3, 8)
    normalized = shape[min(a % 3 for a in axes):] if fused else (3, 1)
    consts = {"two": np.array(2.0, np.float32), "eps": np.array(1e-5, np.float32), "w": normal(*normalized, offset=1.0), "b": normal(*normalized)}
    model = make_model(_layer_norm_nodes(axes), [value_info("x", shape)], ["y"], initializers=consts)
    gm = assert_matches_ort(model, {"x": normal(*shape, scale=2.0, offset=1.0)}, atol=1e-5)
    if fused:
        assert call_targets(gm) == ["layer_norm"]
        (ln,) = [n for n in gm.graph.nodes if n.op == "call_function"]
        assert ln.kwargs == {"axis": min(a % 3 for a in axes), "epsilon": pytest.approx(1e-5)}
        assert [a.meta["role"] for a in ln.args[1:]] == ["weight", "bias"]
    else:
        assert "layer_norm" not in call_targets(gm) and "sqrt" in call_targets(gm)


# ------------------------------------------------------------------------------------------ encoder exports
class Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.q, self.k, self.v, self.out = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        q, k, v = (f(x).reshape(b, t, self.heads, self.head_dim).transpose(1, 2) for f in (self.q, self.k, self.v))
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.head_dim), dim=-1)
        return self.out((weights @ v).transpose(1, 2).reshape(b, t, w))


class EncoderBlock(nn.Module):
    """A post-norm encoder block (as nn.TransformerEncoderLayer's default) on (batch, 6, 16)
    tokens, tanh-GELU MLP, then the mean over tokens."""

    def __init__(self, width: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.attention, self.norm1, self.norm2 = Attention(width, heads), nn.LayerNorm(width), nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width), nn.GELU(approximate="tanh"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.attention(x))
        return self.norm2(x + self.mlp(x)).mean(dim=1)


EXPORTS = [("ts", 17, 1), ("ts", 17, None), ("ts", 14, None), ("dynamo", 18, 1), ("dynamo", 18, None), ("dynamo", 20, None)]


def export_encoder(exporter: str, opset: int, batch: int | None) -> onnx.ModelProto:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = EncoderBlock().eval()
    example = torch.randn(batch or 2, 6, 16)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "ts":
            buffer = io.BytesIO()
            axes = {"x": {0: "batch"}, "y": {0: "batch"}} if batch is None else None
            torch.onnx.export(model, (example,), buffer, dynamo=False, opset_version=opset, input_names=["x"],
                              output_names=["y"], dynamic_axes=axes)
            return onnx.load_from_string(buffer.getvalue())
        shapes = ({0: torch.export.Dim("batch")},) if batch is None else None
        program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset, input_names=["x"], output_names=["y"],
                                    dynamic_shapes=shapes, external_data=False, verbose=False)
        return program.model_proto


@pytest.mark.parametrize("exporter, opset, batch", EXPORTS, ids=[f"{e}{o}-{'dyn' if b is None else f'b{b}'}" for e, o, b in EXPORTS])
def test_encoder_block_exports_import_and_match_onnxruntime(exporter, opset, batch):
    model = export_encoder(exporter, opset, batch)
    onnx_ops = Counter(n.op_type for n in model.graph.node)
    x = normal(3, 6, 16)
    expected = np.concatenate([run_ort(model, {"x": x[i:i + 1]})[0] for i in range(3)]) if batch else run_ort(model, {"x": x})[0]
    gm = load_onnx(model)
    assert gm.onnx_info.fixed_batch is None  # a fixed-batch export is generalised to any batch
    np.testing.assert_allclose(run_graph(gm, {"x": x})[0], expected, rtol=1e-4, atol=2e-5)
    got64 = run_graph(copy.deepcopy(gm).double(), {"x": x}, torch.float64)[0]
    np.testing.assert_allclose(got64, expected, rtol=1e-4, atol=2e-5)
    targets = Counter(call_targets(gm))
    # whatever the exporter wrote (LayerNormalization or its decomposition, Gelu or Erf), one op each
    assert (targets["layer_norm"], targets["gelu"], targets["softmax"]) == (2, 2, 1), (onnx_ops, targets)
    assert not {"erf", "sqrt", "div", "reciprocal"} & set(targets)
    assert ("LayerNormalization" in onnx_ops) == (opset >= 17) and ("Gelu" in onnx_ops) == (opset >= 20)


# ------------------------------------------------------------------------------------------ the shipped model
def test_shipped_transformer_matches_onnxruntime_on_digits():
    info = json.loads((MODELS / "accuracy.json").read_text())["models"]["transformer"]
    with np.load(MODELS / "digits.npz", allow_pickle=False) as archive:
        x, y = archive["x"][archive["test_idx"]], archive["y"][archive["test_idx"]]
    model = onnx.load(MODELS / info["file"])
    expected = run_ort(model, {"input": x})[0]
    gm = load_onnx(model)
    got = run_graph(gm, {"input": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert (got.argmax(1) == expected.argmax(1)).all()
    assert float((got.argmax(1) == y).mean()) == pytest.approx(info["test_accuracy"], abs=1e-4)
    targets = Counter(call_targets(gm))
    assert (targets["layer_norm"], targets["gelu"], targets["softmax"], targets["erf"]) == (5, 2, 2, 0)
    scores = [n for n in gm.graph.nodes if n.op == "call_function" and n.target.__name__ == "matmul"
              and all(a.op == "call_function" for a in n.args)]
    assert len(scores) == 4  # q @ k^T and weights @ v in each of the 2 layers: products of two activations
