"""The attention data path, bit-exact in all three executions: the float64 emulation, onnxruntime
on the annotated ONNX, and g++ C-simulation of the HLS project against the real ap_fixed.h.

* :func:`heads_model` (hand-built ONNX): a positional-embedding constant added to the tokens, Q/K/V
  projections, the head split (Reshape (N, T, C) -> (N, T, H, d), Transpose -> (N, H, T, d), K
  transposed to (N, H, d, T)), scores ``Q K^T`` (MatMul of two activations, rank 4) times a
  constant scale, ReduceMax of the scores over the last axis, ``P = Sigmoid(scores)`` (a runtime
  tensor: softmax is another branch's), context ``P V``, the head merge and a mean over tokens
  (ReduceMean); and a constant (T, T) token-mixing matrix times the tokens (a constant first
  operand, broadcast over the batch). Outputs: the scores, their row maxima, the pooled context
  and the mixed tokens.
* :class:`AttentionBlock` (PyTorch, TorchScript exporter, opset 17, dynamic batch): a full
  attention block with softmax replaced by ReLU, residual, mean plus max pooling over the tokens
  (ReduceMean, ReduceMax over axis 1) and a linear head; exported with ``--io stream``.

Each model is quantized with the Python API on the digits data (each 8-pixel row a token),
verified against onnxruntime, and C-simulated in one compile.
"""

from __future__ import annotations

import functools
import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from qfx_onnx.data import load_arrays
from qfx_onnx.errors import ExportError
from qfx_onnx.hls.project import export_hls
from qfx_onnx.importer import load_onnx
from qfx_onnx.ir.ops import IR_OPS, op_of
from qfx_onnx.quant.annotated import read_annotated, verify_annotated, write_annotated
from qfx_onnx.quant.quantize import quantize_graph

ROOT = Path(__file__).resolve().parents[1]
T, C, H = 8, 8, 2  # tokens, width, heads
D = C // H
VECTORS = 16


@functools.lru_cache(maxsize=2)
def digits(split: str) -> torch.Tensor:
    return load_arrays(ROOT / "models" / "digits.npz", split)[0]


def heads_model() -> onnx.ModelProto:
    rng = np.random.default_rng(11)

    def f(*shape):
        return (rng.standard_normal(shape) * 0.5).astype(np.float32)

    inits = dict(pos=f(T, C) * 0.5, mix=f(T, T), Wq=f(C, C), Wk=f(C, C), Wv=f(C, C), scale=np.array(D ** -0.5, np.float32),
                 tokens=np.array([-1, T, C], np.int64), split=np.array([0, T, H, D], np.int64),
                 merge=np.array([0, T, C], np.int64), last=np.array([-1], np.int64), tok=np.array([1], np.int64))
    n = helper.make_node
    nodes = [
        n("Reshape", ["x", "tokens"], ["xt"], name="to_tokens"),
        n("Add", ["xt", "pos"], ["xp"], name="add_pos"),
        n("MatMul", ["xp", "Wq"], ["q"], name="q_proj"),
        n("MatMul", ["xp", "Wk"], ["k"], name="k_proj"),
        n("MatMul", ["xp", "Wv"], ["v"], name="v_proj"),
        n("Reshape", ["q", "split"], ["q4"], name="q_split"),
        n("Reshape", ["k", "split"], ["k4"], name="k_split"),
        n("Reshape", ["v", "split"], ["v4"], name="v_split"),
        n("Transpose", ["q4"], ["qh"], name="q_heads", perm=[0, 2, 1, 3]),
        n("Transpose", ["k4"], ["kt"], name="k_heads_t", perm=[0, 2, 3, 1]),
        n("Transpose", ["v4"], ["vh"], name="v_heads", perm=[0, 2, 1, 3]),
        n("MatMul", ["qh", "kt"], ["qk"], name="scores"),
        n("Mul", ["qk", "scale"], ["s"], name="scale"),
        n("ReduceMax", ["s", "last"], ["smax"], name="row_max", keepdims=1),
        n("Sigmoid", ["s"], ["p"], name="gate"),
        n("MatMul", ["p", "vh"], ["ctx"], name="context"),
        n("Transpose", ["ctx"], ["ct"], name="merge_t", perm=[0, 2, 1, 3]),
        n("Reshape", ["ct", "merge"], ["cm"], name="merge"),
        n("ReduceMean", ["cm", "tok"], ["y"], name="mean_pool", keepdims=0),
        n("MatMul", ["mix", "xp"], ["mixed"], name="token_mix"),
    ]
    graph = helper.make_graph(
        nodes, "heads", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, T, C])],
        [helper.make_empty_tensor_value_info(name) for name in ("s", "smax", "y", "mixed")],
        [onnx.numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = onnx.shape_inference.infer_shapes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8))
    onnx.checker.check_model(model)
    return model


class AttentionBlock(torch.nn.Module):
    """One pre-projection attention block without softmax (ReLU of the scaled scores instead)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.pos = torch.nn.Parameter(torch.randn(T, C) * 0.2)
        self.qkv = torch.nn.Linear(C, 3 * C)
        self.out = torch.nn.Linear(C, C)
        self.head = torch.nn.Linear(C, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        t = x.reshape(n, T, C) + self.pos
        q, k, v = self.qkv(t).split(C, dim=-1)
        q, k, v = (a.reshape(n, T, H, D).transpose(1, 2) for a in (q, k, v))  # (N, H, T, D)
        p = torch.relu(q @ k.transpose(-2, -1) * D ** -0.5)
        ctx = (p @ v).transpose(1, 2).reshape(n, T, C)
        r = t + self.out(ctx)
        return self.head(r.mean(dim=1) + r.amax(dim=1))


def torch_block() -> onnx.ModelProto:
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notices
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(AttentionBlock().eval(), (digits("train")[:2],), buffer, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    return onnx.load_from_string(buffer.getvalue())


def three_ways(model: onnx.ModelProto | torch.fx.GraphModule, tmp_path: Path, name: str, io: str = "parallel"):
    """Quantize on digits, write the annotated ONNX and verify onnxruntime on it bit-exact, read it
    back as export-hls does and C-simulate it bit-exact; the export result."""
    gm = model if isinstance(model, torch.fx.GraphModule) else load_onnx(model)
    fpm = quantize_graph(gm, [digits("train")[:256]])
    path = tmp_path / f"{name}.onnx"
    write_annotated(fpm, path)
    check = verify_annotated(fpm, path, digits("test")[:64])
    assert check.ok, check.summary()
    back = read_annotated(path)  # what export-hls reads
    assert back.fixed_types() == fpm.fixed_types()
    result = export_hls(back, tmp_path / name, top=name, io=io, data=(digits("test"),), n_vectors=VECTORS, csim=True)
    assert result.csim.passed, result.csim.output[-3000:]
    assert (result.csim.vectors, result.csim.mismatches) == (VECTORS, 0)
    assert result.csim.values == VECTORS * sum(b.size for b in result.model.outputs)
    return result


def _layers(result, kind: str) -> list[dict]:
    return [e for e in result.report["layers"] if e["kind"] == kind]


def test_scores_context_and_head_split_are_bit_exact(tmp_path):
    result = three_ways(heads_model(), tmp_path, "heads")
    scores, context, mixed = _layers(result, "matmul_act")
    assert mixed["onnx_node"] == "token_mix" and mixed["iterations"] == T and mixed["weight_bits"] == T * T * 8
    assert (scores["onnx_node"], context["onnx_node"]) == ("scores", "context")
    # one pipelined iteration per (head, query row); every product of a row is a multiplier:
    # T columns x D terms (scores, plus the T products of its fused scale), D columns x T terms
    # (context); 8-bit x 8-bit: one DSP each, never K-hot (both operands are variables)
    assert scores["iterations"] == context["iterations"] == H * T
    assert scores["multipliers"] == T * D + T and context["multipliers"] == D * T
    assert scores["dsp"] == T * D + T and context["dsp"] == D * T and scores["shift_add_terms"] == 0
    assert sum(e["count"] for e in scores["multiplies"].values()) == H * T * T * D + H * T * T
    assert context["latency"] == H * T + 3 + 2  # iterations x II + log2(T terms) + 2
    (dense,) = {e["kind"] for e in result.report["layers"] if e["onnx_node"] == "q_proj"}
    assert dense == "dense"
    # ReduceMean is written as ReduceSum then Mul by 1/n: read back, its sum is "mean_pool::reduce_sum"
    assert {e["onnx_node"].split("::")[0] for e in _layers(result, "reduce")} == {"row_max", "mean_pool"}
    config = (tmp_path / "heads" / "firmware" / "parameters.h").read_text()
    assert '#include "matmul.h"' in config and (tmp_path / "heads" / "firmware" / "matmul.h").is_file()


def test_torch_attention_block_is_bit_exact(tmp_path):
    result = three_ways(torch_block(), tmp_path, "block", io="stream")  # DATAFLOW, fanout copies
    assert len(_layers(result, "matmul_act")) == 2
    assert {e["op"] for e in _layers(result, "reduce")} == {"reduce_sum", "reduce_max"}
    assert result.report["totals"]["dsp"] >= sum(e["dsp"] for e in _layers(result, "matmul_act")) > 0


def test_shipped_transformer_data_path_is_bit_exact(tmp_path):
    """models/transformer.onnx (4 heads, 2 layers) with its nonlinear units (Softmax,
    LayerNormalization, Gelu: another branch's) replaced by ReLU, so that everything else it
    computes, the four MatMuls of two activations and the head split/merge included, goes
    through all three executions."""
    gm = load_onnx(ROOT / "models" / "transformer.onnx")
    replaced = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and op_of(node.target) in (IR_OPS["softmax"], IR_OPS["layer_norm"], IR_OPS["gelu"]):
            node.target, node.args, node.kwargs = IR_OPS["relu"].fn, (node.args[0],), {}
            replaced += 1
    assert replaced == 2 + 5 + 2
    gm.graph.eliminate_dead_code()
    gm.recompile()
    result = three_ways(gm, tmp_path, "encoder")
    products = _layers(result, "matmul_act")
    assert len(products) == 4 and all(e["iterations"] == 4 * 8 for e in products)  # heads x tokens


def test_product_with_a_vector_is_refused_in_one_line(tmp_path):
    """``v @ x`` with ``v`` a 1-D constant is no matrix product of activations: one ExportError
    naming the node, before any file is written."""
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "tokens"], ["xt"], name="to_tokens"),
         helper.make_node("MatMul", ["v", "xt"], ["y"], name="vec_times_tokens")], "vector",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, T, C])],
        [helper.make_empty_tensor_value_info("y")],
        [onnx.numpy_helper.from_array(np.linspace(-1, 1, T).astype(np.float32), "v"),
         onnx.numpy_helper.from_array(np.array([-1, T, C], np.int64), "tokens")])
    model = onnx.shape_inference.infer_shapes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    fpm = quantize_graph(load_onnx(model), [digits("train")[:64]])
    with pytest.raises(ExportError, match=r"^node 'vec_times_tokens' \(matmul\): .*rank 2 or more.*\(8,\) x \(1, 8, 8\)$"):
        export_hls(fpm, tmp_path / "vec", data=(digits("test"),), n_vectors=2)
    assert not (tmp_path / "vec").exists()


@pytest.mark.parametrize("out_batch, shape", [((1, 4), (1, 4, 8, 2)), ((2, 3), (2, 1, 4, 5)), ((2, 3), (3, 4, 5)),
                                              ((3, 2), (4, 5)), ((2, 3, 4), (3, 1, 2, 2))])
def test_batch_offsets_follow_numpy_broadcasting(out_batch, shape):
    """matmul_act's ``a_base``/``b_base``: the offset of each batch's matrix, as numpy broadcasts."""
    from qfx_onnx.hls.kinds import _batch_part

    expr = _batch_part(out_batch, shape).replace("/", "//")  # C++ int division of non-negative ints
    matrices = np.arange(int(np.prod(shape))).reshape(shape)
    expected = np.broadcast_to(matrices[..., 0, 0], out_batch).reshape(-1)
    assert [eval(expr, {"bi": bi}) for bi in range(expected.size)] == expected.tolist()
