"""Graphs of any depth: no step of the pipeline recurses (or copies) deeper as the graph grows.

``copy.deepcopy`` of a FixedPointModel raised RecursionError from about 240 ONNX nodes (CIFAR
ResNet-20, MobileNetV3-Small, EfficientNet-B0 in finetune). Here a generated chain of residual
Gemm blocks goes through import, quantize (with the report and the onnxruntime verification the
CLI runs), the annotated ONNX round trip, one finetuning step with a checkpoint that loads back,
and HLS project generation, at Python's default recursion limit; and :func:`copy_module`, which
finetune uses for its copies, is checked to be faithful and independent.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

import qfx_onnx
from qfx_onnx.data import ArrayDataset, load_arrays
from qfx_onnx.fxcopy import copy_module
from qfx_onnx.hls.project import export_hls
from qfx_onnx.importer import load_onnx
from qfx_onnx.quant.annotated import read_annotated, verify_annotated, write_annotated
from qfx_onnx.quant.quantize import CAST_MODULE_PREFIX, FixedPointModel
from qfx_onnx.quant.report import layer_exactness, measure_tensors
from qfx_onnx.train import FinetuneConfig, finetune
from qfx_onnx.train import checkpoint as ckpt

MODELS = Path(__file__).resolve().parent.parent / "models"
DATA = MODELS / "digits.npz"

WIDTH, CLASSES = 4, 3
DEFAULT_RECURSION_LIMIT = 1000  # CPython's

pytestmark = pytest.mark.usefixtures("one_thread", "default_recursion_limit")


@pytest.fixture
def default_recursion_limit():
    """Run at CPython's default limit, whatever the environment set it to."""
    before = sys.getrecursionlimit()
    sys.setrecursionlimit(DEFAULT_RECURSION_LIMIT)
    yield
    sys.setrecursionlimit(before)


def deep_model(blocks: int, seed: int = 0) -> onnx.ModelProto:
    """``4 * blocks + 1`` ONNX nodes: ``blocks`` times ``x = (x + relu(gemm(x))) * 0.5`` on
    ``WIDTH`` features, then a Gemm head. The halving keeps the values in range at any depth."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for i in range(blocks):
        inits += [numpy_helper.from_array((rng.standard_normal((WIDTH, WIDTH)) * 0.25).astype(np.float32), f"b{i}.w"),
                  numpy_helper.from_array((0.2 + 0.1 * rng.standard_normal(WIDTH)).astype(np.float32), f"b{i}.b"),
                  numpy_helper.from_array(np.array(0.5, np.float32), f"b{i}.half")]
        nodes += [helper.make_node("Gemm", [x, f"b{i}.w", f"b{i}.b"], [f"b{i}.g"], name=f"b{i}/gemm", transB=1),
                  helper.make_node("Relu", [f"b{i}.g"], [f"b{i}.r"], name=f"b{i}/relu"),
                  helper.make_node("Add", [x, f"b{i}.r"], [f"b{i}.s"], name=f"b{i}/add"),
                  helper.make_node("Mul", [f"b{i}.s", f"b{i}.half"], [f"b{i}.y"], name=f"b{i}/mul")]
        x = f"b{i}.y"
    inits.append(numpy_helper.from_array(rng.standard_normal((CLASSES, WIDTH)).astype(np.float32), "head.w"))
    nodes.append(helper.make_node("Gemm", [x, "head.w"], ["logits"], name="head", transB=1))
    graph = helper.make_graph(nodes, "deep", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", WIDTH])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def deep_data(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, WIDTH, generator=gen), torch.randint(0, CLASSES, (n,), generator=gen)


def states(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_states(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------------------- copy
@pytest.fixture(scope="module", params=["cnn", "deep"])
def model_and_data(request):
    """The shipped CNN, and a chain of 601 ONNX nodes (about 2,100 fx nodes) that deepcopy fails on."""
    if request.param == "cnn":
        x, y = load_arrays(DATA, "train")
        x, y = x[:64], y[:64]
        return qfx_onnx.quantize(MODELS / "cnn.onnx", x), x, y
    x, y = deep_data(32)
    return qfx_onnx.quantize(deep_model(150), x, calib_samples=32), x, y


def test_copy_gives_identical_outputs_and_structure(model_and_data):
    model, x, _ = model_and_data
    copied = copy_module(model)
    assert type(copied) is FixedPointModel
    with torch.no_grad():
        assert torch.equal(copied(x), model(x))
    assert_same_states(states(copied), states(model))
    assert copied.fixed_types() == model.fixed_types()
    assert copied.onnx_info == model.onnx_info == copied.graph_module.onnx_info
    assert copied.graph_module.code == model.graph_module.code

    old_nodes, new_nodes = list(model.graph_module.graph.nodes), list(copied.graph_module.graph.nodes)
    assert [n.name for n in new_nodes] == [n.name for n in old_nodes]
    assert [n.meta.get("onnx_name") for n in new_nodes] == [n.meta.get("onnx_name") for n in old_nodes]
    new_graph = copied.graph_module.graph
    assert new_graph is not model.graph_module.graph and all(n.graph is new_graph for n in new_nodes)
    # every reference to a node (the sites, each cast's meta["qfx_site"]) points into the copy
    assert [s.tensor for s in copied.sites] == [s.tensor for s in model.sites]
    in_copy = set(new_nodes)
    assert all(s.node in in_copy for s in copied.sites)
    assert not {id(s) for s in copied.sites} & {id(s) for s in model.sites}
    for node in new_nodes:
        if node.op == "call_module" and node.target.startswith(CAST_MODULE_PREFIX):
            assert node.meta["qfx_site"] is copied.sites[int(node.target.removeprefix(CAST_MODULE_PREFIX))]


def test_copy_is_independent(model_and_data):
    model, x, y = model_and_data
    x, y = x[:16], y[:16]
    before, before_out = states(model), model(x).detach()
    copied = copy_module(model).float().train()
    shared = {t.data_ptr() for t in model.state_dict().values()} & {t.data_ptr() for t in copied.state_dict().values()}
    assert not shared
    opt = torch.optim.SGD(copied.parameters(), lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(copied(x), y).backward()
        opt.step()
    with torch.no_grad():
        copied.graph_module.get_submodule(f"{CAST_MODULE_PREFIX}0").frac.add_(1.0)  # a binary point moved
    assert_same_states(states(model), before)
    assert torch.equal(model(x), before_out)
    after = states(copied)
    assert any(not torch.equal(after[k].double(), before[k]) for k in before if not k.endswith(".frac"))
    assert model.graph_module.get_submodule(f"{CAST_MODULE_PREFIX}0") is not copied.graph_module.get_submodule(f"{CAST_MODULE_PREFIX}0")
    assert next(model.parameters()).dtype == torch.float64


# ------------------------------------------------------------------------------------ pipeline
@pytest.mark.parametrize("blocks", [pytest.param(75, id="301-nodes"),
                                    pytest.param(500, id="2001-nodes", marks=pytest.mark.slow)])
def test_deep_graph_through_the_whole_pipeline(blocks, tmp_path):
    proto = deep_model(blocks)
    assert len(proto.graph.node) == 4 * blocks + 1
    x, y = deep_data(32)
    gm = load_onnx(proto)
    fixed = qfx_onnx.quantize(gm, x, calib_samples=32)
    assert len(fixed.graph_module.graph.nodes) > 3 * len(proto.graph.node)

    # what `qfx-onnx quantize` does after calibrating: report, write, verify
    with torch.no_grad():
        logits = fixed(x)
        assert torch.isfinite(logits).all() and logits.abs().max() > 0
        assert len(measure_tensors(fixed, torch.split(x, 16))) == len(fixed.quantizers())
        assert layer_exactness(fixed, x[:1])
    path = tmp_path / "deep.qfx.onnx"
    write_annotated(fixed, path, source="deep.onnx")
    check = verify_annotated(fixed, path, x[:4])
    assert check.ok, check.summary()

    back = read_annotated(path)
    assert back.fixed_types() == fixed.fixed_types()
    with torch.no_grad():
        assert torch.equal(back(x), logits)

    # one finetuning step (one epoch of one batch), evaluated and checkpointed; the checkpoint loads back
    train, test = ArrayDataset(x, y, "train"), ArrayDataset(x[:8], y[:8], "test")
    config = FinetuneConfig(epochs=1, batch_size=len(x), lr=1e-2, checkpoint_dir=str(tmp_path / "ckpt"))
    result = finetune(back, train, test, config)
    assert result.epochs_run == 1 and [r["epoch"] for r in result.history] == [0, 1]
    saved = ckpt.load(tmp_path / "ckpt" / ckpt.FILE_NAME)
    assert saved["epoch"] == 1 and saved["best"]["epoch"] == result.best_epoch
    read_annotated(path).load_state_dict(saved["model"])

    tuned = tmp_path / "deep.ft.qfx.onnx"
    write_annotated(result.model, tuned)
    final = read_annotated(tuned)
    assert final.fixed_types() == result.model.fixed_types()

    project = export_hls(final, tmp_path / "hls", top="deep", n_vectors=2)
    assert len(project.model.layers) >= 2 * blocks
    assert (project.project / "firmware" / "deep.cpp").is_file()


def test_load_state_equals_strict_load_state_dict_and_refuses_what_does_not_fit():
    from torch import nn

    from qfx_onnx.fxcopy import load_state

    src, dst, ref = (nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)).double() for _ in range(3))
    for p in src.parameters():
        nn.init.normal_(p)
    src[1].running_mean.fill_(0.25)
    state = {k: v.float() for k, v in src.state_dict().items()}  # another dtype, as finetune's float32 net
    load_state(dst, state)
    ref.load_state_dict(state)
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(dst.state_dict().values(), ref.state_dict().values()))
    assert dst[0].weight.dtype == torch.float64
    with pytest.raises(RuntimeError, match="missing keys"):
        load_state(dst, {k: v for k, v in state.items() if k != "0.bias"})
    with pytest.raises(RuntimeError, match="0.weight has shape"):
        load_state(dst, {**state, "0.weight": torch.zeros(2, 4)})
