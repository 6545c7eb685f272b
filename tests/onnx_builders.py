"""Helpers for importer tests: build tiny ONNX models and compare the import with onnxruntime."""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterator, Sequence

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper

from qfx_onnx.importer import load_onnx

Spec = Any  # a shape tuple (a float32 graph input), an ndarray (an initializer), or None (absent)


def value_info(name: str, shape: Sequence[int | str | None] | None, elem_type: int = onnx.TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, shape)


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[str | onnx.ValueInfoProto],
    *,
    opset: int = 13,
    initializers: dict[str, np.ndarray] | None = None,
    name: str = "test_graph",
) -> onnx.ModelProto:
    """A checked model of ``nodes``; outputs given by name get their types from shape inference."""
    inits = [onnx.numpy_helper.from_array(np.asarray(v), k) for k, v in (initializers or {}).items()]
    graph_outputs = [helper.make_empty_tensor_value_info(o) if isinstance(o, str) else o for o in outputs]
    graph = helper.make_graph(list(nodes), name, list(inputs), graph_outputs, inits)
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=max(7, helper.find_min_ir_version_for(opsets)))
    model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    onnx.checker.check_model(model)
    return model


def node_model(op_type: str, inputs: Sequence[tuple[str, Spec]], *, outputs: Sequence[str] = ("y",), opset: int = 13, **attrs: Any) -> onnx.ModelProto:
    """A single-node model: ``inputs`` are ``(name, spec)`` pairs in the op's input order."""
    graph_inputs, initializers, names = [], {}, []
    for name, spec in inputs:
        if spec is None:
            names.append("")
            continue
        names.append(name)
        if isinstance(spec, np.ndarray):
            initializers[name] = spec
        else:
            graph_inputs.append(value_info(name, spec))
    node = helper.make_node(op_type, names, list(outputs), name=f"{op_type.lower()}_node", **attrs)
    return make_model([node], graph_inputs, outputs, opset=opset, initializers=initializers)


def random_feeds(model: onnx.ModelProto, seed: int = 0, batch: int = 2) -> dict[str, np.ndarray]:
    """Standard-normal float32 data for every graph input (symbolic dims get ``batch``)."""
    rng = np.random.default_rng(seed)
    init_names = {t.name for t in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in init_names:
            continue
        shape = [d.dim_value if d.HasField("dim_value") else batch for d in vi.type.tensor_type.shape.dim]
        feeds[vi.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one thread: on these tiny tensors a busy machine's thread pool costs 100x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def run_graph(gm: torch.fx.GraphModule, feeds: dict[str, np.ndarray], dtype: torch.dtype | None = None) -> list[np.ndarray]:
    """Run ``gm`` on ``feeds`` (in ``gm.onnx_info`` input order); float inputs cast to ``dtype``."""
    args = []
    for name in gm.onnx_info.input_names:
        tensor = torch.from_numpy(feeds[name])
        args.append(tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor)
    with torch.no_grad(), single_thread():
        out = gm(*args)
    outs = out if isinstance(out, tuple) else (out,)
    return [o.numpy() for o in outs]


def assert_matches_ort(
    model: onnx.ModelProto,
    feeds: dict[str, np.ndarray] | None = None,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-6,
) -> torch.fx.GraphModule:
    """Import ``model`` and check its outputs against onnxruntime, in float32 and then with every
    parameter and input in float64 (the fixed-point emulation runs that way). Returns the import."""
    feeds = random_feeds(model) if feeds is None else feeds
    expected = run_ort(model, feeds)
    gm = load_onnx(model)
    got = run_graph(gm, feeds)
    assert len(got) == len(expected)
    for e, g in zip(expected, got):
        assert g.shape == e.shape, (g.shape, e.shape)
        assert g.dtype == e.dtype, (g.dtype, e.dtype)
        np.testing.assert_allclose(g, e, rtol=rtol, atol=atol)
    gm64 = copy.deepcopy(gm).double()
    for e, g in zip(expected, run_graph(gm64, feeds, torch.float64)):
        if np.issubdtype(e.dtype, np.floating):
            assert g.dtype == np.float64
            np.testing.assert_allclose(g, e, rtol=max(rtol, 1e-5), atol=max(atol, 1e-5))
        else:
            np.testing.assert_array_equal(g, e)
    return gm


def call_targets(gm: torch.fx.GraphModule) -> list[str]:
    """The names of the IR ops (or other callables) the graph calls, in order."""
    return [n.target.__name__ for n in gm.graph.nodes if n.op == "call_function"]
