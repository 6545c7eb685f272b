"""Fixed-batch exports run at any batch: generalised where sound, in chunks where not.

Fidelity is always against onnxruntime running the ORIGINAL file at its declared batch, chunk by
chunk, on the same samples.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper
from typer.testing import CliRunner

import qfx_onnx
from qfx_onnx.batching import run_in_chunks
from qfx_onnx.errors import UnsupportedAttributeError
from qfx_onnx.importer import load_onnx
from qfx_onnx.quant.verify import verify_annotated
from qfx_onnx_cli.main import app
from onnx_builders import make_model, value_info

I64 = np.int64
RNG = np.random.default_rng(0)


def per_chunk_ort(model: onnx.ModelProto, x: np.ndarray, batch: int) -> np.ndarray:
    """onnxruntime on the model as declared: chunks of ``batch`` samples, outputs joined."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def flatten_classifier(batch: int) -> onnx.ModelProto:
    """Conv -> Relu -> Reshape to the constant [batch, 32] -> Gemm, as a fixed-batch export has it."""
    w = RNG.standard_normal((2, 3, 3, 3)).astype(np.float32)
    fc = RNG.standard_normal((5, 32)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Reshape", ["r", "target"], ["f"]),
        helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1),
    ]
    inits = {"w": w, "fc": fc, "target": np.array([batch, 32], I64)}
    return make_model(nodes, [value_info("x", [batch, 3, 4, 4])], [value_info("y", [batch, 5])], initializers=inits)


def token_concat(batch: int) -> onnx.ModelProto:
    """A learned token of shape (batch, 1, 8) concatenated to the sequence: only valid at ``batch``."""
    nodes = [
        helper.make_node("Concat", ["token", "x"], ["seq"], axis=1),
        helper.make_node("MatMul", ["seq", "w"], ["h"]),
        helper.make_node("ReduceMean", ["h"], ["y"], axes=[1], keepdims=0),
    ]
    inits = {"token": RNG.standard_normal((batch, 1, 8)).astype(np.float32), "w": RNG.standard_normal((8, 3)).astype(np.float32)}
    return make_model(nodes, [value_info("x", [batch, 4, 8])], [value_info("y", [batch, 3])], initializers=inits)


@pytest.mark.parametrize("batch", [1, 2])
def test_reshape_target_holding_the_batch_is_generalised(batch, caplog):
    model = flatten_classifier(batch)
    with caplog.at_level(logging.INFO):
        gm = load_onnx(model)
    assert gm.onnx_info.fixed_batch is None and gm.onnx_info.input_shapes == ((None, 3, 4, 4),)
    assert "generalised the declared batch" in caplog.text
    x = RNG.standard_normal((6 * batch + 1 if batch > 1 else 7, 3, 4, 4)).astype(np.float32)
    n = len(x) - len(x) % batch
    want = per_chunk_ort(model, x[:n], batch)
    got = gm(torch.from_numpy(x[:n])).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_a_graph_that_cannot_be_generalised_runs_in_chunks(caplog):
    model = token_concat(1)
    with caplog.at_level(logging.WARNING):
        gm = load_onnx(model)
    assert gm.onnx_info.fixed_batch == 1
    assert "runs it in chunks of 1" in caplog.text
    x = RNG.standard_normal((5, 4, 8)).astype(np.float32)
    got = run_in_chunks(gm, [torch.from_numpy(x)], gm.onnx_info.fixed_batch).detach().numpy()
    np.testing.assert_allclose(got, per_chunk_ort(model, x, 1), rtol=1e-5, atol=1e-6)


def test_chunks_pad_the_last_one_and_trim_it_away():
    model = token_concat(2)
    gm = load_onnx(model)
    assert gm.onnx_info.fixed_batch == 2
    x = RNG.standard_normal((5, 4, 8)).astype(np.float32)
    got = run_in_chunks(gm, [torch.from_numpy(x)], 2).detach().numpy()
    padded = np.concatenate([x, x[-1:]])
    np.testing.assert_allclose(got, per_chunk_ort(model, padded, 2)[:5], rtol=1e-5, atol=1e-6)


def test_quantize_and_verify_a_chunked_graph_bit_exact(tmp_path):
    model = token_concat(1)
    x = torch.from_numpy(RNG.standard_normal((9, 4, 8)).astype(np.float32))
    fixed = qfx_onnx.quantize(model, x)
    assert fixed.graph_module.onnx_info.fixed_batch == 1
    path = tmp_path / "t.qfx.onnx"
    qfx_onnx.write_annotated(fixed, path)
    result = verify_annotated(fixed, path, x)
    assert result.ok, result.summary()
    emulated = fixed(x)
    assert emulated.shape == (9, 3)
    assert [layer for layer in result.layers if layer.tensor == "y"]


def test_training_through_chunks_gives_the_batched_gradient():
    """A chunked forward joins outputs with autograd: the loss gradient equals the per-sample sum."""
    model = token_concat(1)
    x = torch.from_numpy(RNG.standard_normal((4, 4, 8)).astype(np.float32))
    fixed = qfx_onnx.quantize(model, x)
    fixed.set_casts_enabled(False)
    loss = fixed(x).pow(2).sum()
    loss.backward()
    batched = {n: p.grad.clone() for n, p in fixed.named_parameters() if p.grad is not None}
    fixed.zero_grad()
    for i in range(4):
        fixed(x[i:i + 1]).pow(2).sum().backward()
    for name, p in fixed.named_parameters():
        if name in batched:
            torch.testing.assert_close(p.grad, batched[name])
    assert batched


def test_cli_quantize_of_a_chunked_graph(tmp_path):
    path, data = tmp_path / "token.onnx", tmp_path / "seq.npz"
    onnx.save(token_concat(1), path)
    x = RNG.standard_normal((20, 4, 8)).astype(np.float32)
    np.savez(data, x=x, y=RNG.integers(0, 3, 20))
    result = CliRunner().invoke(app, ["quantize", str(path), "--data", str(data), "-o", str(tmp_path / "t.qfx.onnx")])
    assert result.exit_code == 0, result.output
    assert "bit for bit" in result.output


def test_the_input_model_is_not_modified():
    model = flatten_classifier(1)
    before = model.SerializeToString()
    load_onnx(model)
    assert model.SerializeToString() == before


def dropout_model(consumed: bool) -> onnx.ModelProto:
    nodes = [helper.make_node("Dropout", ["x"], ["d", "mask"], name="drop", ratio=0.5),
             helper.make_node("Relu", ["d"], ["y"])]
    outputs = [value_info("y", ["N", 4])]
    if consumed:
        nodes.append(helper.make_node("Cast", ["mask"], ["m"], to=onnx.TensorProto.FLOAT))
        outputs.append(value_info("m", ["N", 4]))
    return make_model(nodes, [value_info("x", ["N", 4])], outputs, opset=9)


def test_an_optional_output_nothing_reads_is_accepted():
    gm = load_onnx(dropout_model(consumed=False))
    x = torch.randn(3, 4)
    torch.testing.assert_close(gm(x), torch.relu(x))


def test_an_optional_output_that_is_read_is_an_error_naming_node_and_output():
    with pytest.raises(UnsupportedAttributeError, match=r"node 'drop' \(Dropout.*'mask'"):
        load_onnx(dropout_model(consumed=True))


class Shuffle(torch.nn.Module):
    """ShuffleNetV2's channel split and shuffle, sizes from ``x.size()`` as torchvision writes it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        b, c, h, w = x.size()
        left, right = x[:, :c // 2], x[:, c // 2:]
        y = torch.cat([left, torch.relu(self.conv(right))], dim=1)
        return y.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)


@pytest.mark.parametrize("dynamic", [True, False])
def test_shape_arithmetic_from_x_size_folds(tmp_path, dynamic):
    torch.manual_seed(0)
    net = Shuffle().eval()
    path = tmp_path / "shuffle.onnx"
    torch.onnx.export(net, (torch.randn(1, 8, 5, 5),), str(path), dynamo=False, opset_version=17, input_names=["x"],
                      dynamic_axes={"x": {0: "b"}} if dynamic else None)
    gm = load_onnx(path)
    assert gm.onnx_info.fixed_batch is None
    assert not any(n.meta.get("role") == "shape" and n.op == "call_function" for n in gm.graph.nodes)
    x = torch.randn(3, 8, 5, 5)
    torch.testing.assert_close(gm(x), net(x), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# other exporters' idioms


def test_tf2onnx_style_nhwc_graph():
    """tf2onnx: NHWC input named ``input_1:0`` with an ``unk__`` batch, Transpose to NCHW and back,
    ReduceMean over H and W, MatMul + Add bias, Softmax, and a flatten as Reshape to [-1, C]."""
    w = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
    n = helper.make_node
    nodes = [
        n("Transpose", ["input_1:0"], ["nchw"], perm=[0, 3, 1, 2], name="model/conv/Conv2D__6"),
        n("Conv", ["nchw", "w"], ["c"], pads=[1, 1, 1, 1], name="model/conv/Conv2D"),
        n("Relu", ["c"], ["r"], name="model/conv/Relu"),
        n("Transpose", ["r"], ["nhwc"], perm=[0, 2, 3, 1], name="model/conv/Relu__8"),
        n("ReduceMean", ["nhwc"], ["gap"], axes=[1, 2], keepdims=0, name="model/gap/Mean"),
        n("Reshape", ["gap", "flat"], ["f"], name="model/flatten/Reshape"),
        n("MatMul", ["f", "fc"], ["m"], name="model/dense/MatMul"),
        n("Add", ["m", "bias"], ["logits"], name="model/dense/BiasAdd"),
        n("Softmax", ["logits"], ["dense:0"], axis=-1, name="model/dense/Softmax"),
    ]
    inits = {"w": w, "flat": np.array([-1, 4], I64), "fc": RNG.standard_normal((4, 5)).astype(np.float32),
             "bias": RNG.standard_normal(5).astype(np.float32)}
    model = make_model(nodes, [value_info("input_1:0", ["unk__12", 6, 6, 3])], [value_info("dense:0", ["unk__12", 5])],
                       initializers=inits)
    from onnx_builders import assert_matches_ort, random_feeds
    assert_matches_ort(model, random_feeds(model, batch=3))


def test_opset_8_zoo_idioms():
    """Old model-zoo files: shapes from Constant nodes, BatchNormalization-7 with ``spatial``,
    Upsample-7 with ``scales``, Dropout with its mask declared, weights listed as graph inputs."""
    n = helper.make_node
    c = 3
    bn = {"scale": RNG.uniform(0.5, 2, c), "b": RNG.standard_normal(c), "mean": RNG.standard_normal(c), "var": RNG.uniform(0.5, 2, c)}
    bn = {k: v.astype(np.float32) for k, v in bn.items()}
    nodes = [
        n("Conv", ["x", "w"], ["c1"], pads=[1, 1, 1, 1]),
        n("BatchNormalization", ["c1", "scale", "b", "mean", "var"], ["bn"], spatial=1, epsilon=1e-5),
        n("Relu", ["bn"], ["r"]),
        n("Upsample", ["r"], ["up"], scales=[1.0, 1.0, 2.0, 2.0], mode="nearest"),
        n("Dropout", ["up"], ["d", "mask"], ratio=0.3),
        n("Constant", [], ["shape"], value=onnx.numpy_helper.from_array(np.array([0, -1], I64))),
        n("Reshape", ["d", "shape"], ["f"]),
        n("Gemm", ["f", "fc", "fc_b"], ["y"], transB=1),
    ]
    inits = {"w": RNG.standard_normal((c, 2, 3, 3)).astype(np.float32), "fc": RNG.standard_normal((4, c * 16)).astype(np.float32),
             "fc_b": RNG.standard_normal(4).astype(np.float32), **bn}
    inputs = [value_info("x", ["N", 2, 2, 2])] + [value_info(k, list(v.shape)) for k, v in inits.items()]
    model = make_model(nodes, inputs, [value_info("y", ["N", 4])], opset=8, initializers=inits)
    from onnx_builders import assert_matches_ort, random_feeds
    assert_matches_ort(model, random_feeds(model, batch=3))


def test_cli_inspect_of_a_chunked_graph_scores_every_sample(tmp_path):
    model = token_concat(1)
    path, data = tmp_path / "token.onnx", tmp_path / "seq.npz"
    onnx.save(model, path)
    x = RNG.standard_normal((30, 4, 8)).astype(np.float32)
    y = per_chunk_ort(model, x, 1).argmax(axis=1)
    y[:10] = (y[:10] + 1) % 3  # 20 of 30 right
    np.savez(data, x=x, y=y)
    result = CliRunner().invoke(app, ["inspect", str(path), "--data", str(data)])
    assert result.exit_code == 0, result.output
    assert "66.67% (30 samples" in result.output
