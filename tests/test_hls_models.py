"""Small ONNX models for the HLS exporter's tests, and a check that they import as onnxruntime runs them.

* :func:`zoo2d`: strided/depthwise/dilated conv, LeakyRelu, HardSigmoid, Sigmoid, Tanh, data x data
  Mul and Sub, Clip, Transpose, Slice, Pad, Resize, Concat (with the graph input), AveragePool
  (ceil_mode), MaxPool, residual Add, GlobalMaxPool, ReduceSum, Flatten, Gemm, MatMul, Relu and
  two graph outputs.
* :func:`zoo1d`: 1-D conv, PRelu, 1-D MaxPool, Split, Neg, 3-input Sum, HardSwish, Gather, Gemm.
* :func:`hostile`: node and tensor names full of ``*/``, quotes, newlines, ``#include``, C++
  keywords and non-ASCII text.
* :func:`with_softmax`: a Gemm followed by Softmax (no HLS form when left in float).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnx_builders import assert_matches_ort

HOSTILE_NAMES = [
    'in"put */ #include <stdio.h>\nint x;', "w'*/\n#define main evil", '*/ #include "evil.h"\n// \\',
    'out\n"*/ }; int main() { return 3; } /*', "b\u00e9\u00e0s \t\r\n/**/", 'relu node " */', "123 starts with digit",
    "class", "__reserved", "ap_fixed",
]


def _vi(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _model(nodes, inputs, outputs, inits, opset: int = 13, name: str = "zoo") -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, [helper.make_empty_tensor_value_info(o) for o in outputs],
                              [onnx.numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model)
    return model


def _weights(seed: int):
    rng = np.random.default_rng(seed)
    return lambda *shape: (rng.standard_normal(shape) * 0.5).astype(np.float32)


def zoo2d() -> onnx.ModelProto:
    f = _weights(0)
    inits = dict(W1=f(4, 2, 3, 3), B1=f(4), W2=f(4, 1, 3, 3), lo=np.array(-0.5, np.float32),
                 hi=np.array(1.5, np.float32), st=np.array([1], np.int64), en=np.array([4], np.int64),
                 ax=np.array([3], np.int64), pads=np.array([0, 0, 0, 1, 0, 0, 0, 0], np.int64),
                 sc=np.array([1, 1, 2, 2], np.float32), Wg=f(5, 12), Bg=f(5), Wm=f(5, 3),
                 rax=np.array([2, 3], np.int64))
    n = helper.make_node
    nodes = [
        n("Conv", ["x", "W1", "B1"], ["c1"], name="conv_s2", strides=[2, 2], pads=[1, 1, 1, 1]),
        n("LeakyRelu", ["c1"], ["l1"], name="leaky", alpha=0.1),
        n("Conv", ["l1", "W2"], ["c2"], name="dw_dil", group=4, dilations=[2, 2], pads=[2, 2, 2, 2]),
        n("HardSigmoid", ["c2"], ["h"], name="hsig"),
        n("Sigmoid", ["c2"], ["s"], name="sig"),
        n("Tanh", ["c1"], ["t"], name="tanh"),
        n("Mul", ["h", "s"], ["m"], name="mul"),
        n("Sub", ["m", "t"], ["d"], name="sub"),
        n("Clip", ["d", "lo", "hi"], ["cl"], name="clip"),
        n("Transpose", ["cl"], ["tr"], name="transpose", perm=[0, 1, 3, 2]),
        n("Slice", ["tr", "st", "en", "ax"], ["sl"], name="slice"),
        n("Pad", ["sl", "pads"], ["pd"], name="pad"),
        n("Resize", ["pd", "", "sc"], ["rs"], name="resize", mode="nearest"),
        n("Concat", ["rs", "x"], ["cc"], name="concat", axis=1),
        n("AveragePool", ["cc"], ["ap"], name="avgpool", kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
        n("MaxPool", ["cc"], ["mp"], name="maxpool", kernel_shape=[2, 2], strides=[2, 2]),
        n("Add", ["ap", "mp"], ["a"], name="add"),
        n("GlobalMaxPool", ["a"], ["g1"], name="gmp"),
        n("ReduceSum", ["a", "rax"], ["rsum"], name="rsum", keepdims=1),
        n("Concat", ["g1", "rsum"], ["cat2"], name="concat2", axis=1),
        n("Flatten", ["cat2"], ["fl"], name="flatten"),
        n("Gemm", ["fl", "Wg", "Bg"], ["yg"], name="gemm", transB=1),
        n("MatMul", ["yg", "Wm"], ["y"], name="matmul"),
        n("Relu", ["yg"], ["y2"], name="relu"),
    ]
    return _model(nodes, [_vi("x", ["N", 2, 8, 8])], ["y", "y2"], inits)


def zoo1d() -> onnx.ModelProto:
    f = _weights(1)
    inits = dict(W=f(4, 3, 5), B=f(4), slope=np.abs(f(4, 1)) * 0.3, idx=np.array([0, 2, 3, 7, 5], np.int64),
                 Wg=f(6, 10), split=np.array([2, 2], np.int64))
    n = helper.make_node
    nodes = [
        n("Conv", ["x", "W", "B"], ["c"], name="conv1d", pads=[2, 2], dilations=[1]),
        n("PRelu", ["c", "slope"], ["p"], name="prelu"),
        n("MaxPool", ["p"], ["mp"], name="maxpool1d", kernel_shape=[2], strides=[2]),
        n("Split", ["mp", "split"], ["s0", "s1"], name="split", axis=1),
        n("Neg", ["s1"], ["n1"], name="neg"),
        n("Sum", ["s0", "n1", "s0"], ["sm"], name="sum3"),
        n("HardSwish", ["sm"], ["hs"], name="hswish"),
        n("Gather", ["hs", "idx"], ["ga"], name="gather", axis=2),
        n("Flatten", ["ga"], ["fl"], name="flatten"),
        n("Gemm", ["fl", "Wg"], ["y"], name="gemm", transB=1),
    ]
    return _model(nodes, [_vi("x", ["N", 3, 16])], ["y"], inits, opset=14)


def hostile() -> onnx.ModelProto:
    f = _weights(2)
    x, w, conv, y, b, relu, mid, w2, gemm, act = HOSTILE_NAMES
    n = helper.make_node
    nodes = [n("Conv", [x, w, b], [mid], name=conv, pads=[1, 1, 1, 1]),
             n("Relu", [mid], [act], name=relu),
             n("Flatten", [act], ["flat*/"], name="flatten\n"),
             n("Gemm", ["flat*/", w2], [y], name=gemm, transB=1)]
    return _model(nodes, [_vi(x, ["N", 1, 4, 4])], [y], {w: f(3, 1, 3, 3), b: f(3), w2: f(4, 48)})


def with_softmax() -> onnx.ModelProto:
    f = _weights(3)
    n = helper.make_node
    nodes = [n("Gemm", ["x", "W"], ["g"], name="dense", transB=1),
             n("Softmax", ["g"], ["y"], name="softmax\n*/", axis=1)]
    return _model(nodes, [_vi("x", ["N", 6])], ["y"], {"W": f(4, 6)})


def inputs_for(model: onnx.ModelProto, n: int = 64, seed: int = 0) -> np.ndarray:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    shape = [n] + [d.dim_value for d in dims[1:]]
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("build", [zoo2d, zoo1d, hostile])
def test_test_models_import_as_onnxruntime_runs_them(build):
    model = build()
    feeds = {model.graph.input[0].name: inputs_for(model, 3)}
    assert_matches_ort(model, feeds, rtol=1e-4, atol=1e-5)
