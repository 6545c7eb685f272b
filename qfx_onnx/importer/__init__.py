"""ONNX import: a float ONNX model becomes a ``torch.fx.GraphModule`` whose shape is a contract.

Graph nodes
    One ``placeholder`` per ONNX graph input that has no initializer (an input that also has an
    initializer, as in old model-zoo files, is a constant). One ``get_attr`` per constant tensor
    used by the graph, registered on the root module under a sanitized unique identifier: float
    tensors as ``nn.Parameter`` (trainable), others as buffers. ``call_function`` nodes call IR ops
    of :mod:`qfx_onnx.ir.ops` (or ``operator.getitem`` on the tuple of a ``split``). One ``output``
    node: the single output node when the model has one output, else a tuple in ONNX order.

Metadata (``node.meta``) on every node
    ``onnx_name``: the ONNX tensor the node produces (graph input, initializer, node output). Steps
    inside a decomposition (BatchNorm's mul, an average's sum, a split's tuple) have no
    ``onnx_name``: their values are lossless intermediates. Synthesized constants are named
    ``f"{node}::{what}"`` (``bn1::scale``, ``bn1::shift``, ``pool::recip``, ``act::alpha``, ``fc::B``).
    ``onnx_node`` and ``onnx_op``: the ONNX node that produced the value (nodes without a name get
    ``f"{op_type}_{index}"``); None for graph inputs, initializers and the output node.
    ``onnx_dtype``: numpy dtype name of the value ("float32", "int64"; None on the output node).
    ``role``: "input" (placeholders), "weight" (constant Conv/ConvTranspose/Gemm/MatMul/PRelu
    weights, Gather tables), "bias" (Conv/ConvTranspose bias, Gemm C), "constant" (other float
    constants), "shape" (integer constants and shape arithmetic), "activation" (float op outputs),
    "internal" (decomposition steps, the output node).
    ``pinned_type`` (a FixedType, or a list of per-channel types along ``pinned_axis``): the type
    an imported quantizer (QONNX ``Quant``/``BipolarQuant``/``Trunc``, an ONNX QDQ pair) fixes on
    the value; the quantizer keeps it (see :mod:`qfx_onnx.importer.quant_ops`).

``gm.onnx_info`` is an :class:`OnnxInfo` (graph name, opset, input/output names, input shapes
with None for dynamic dims). It survives ``copy.deepcopy(gm)``; a pass that builds a new
GraphModule must copy it over.
"""

from qfx_onnx.importer.context import OnnxInfo
from qfx_onnx.importer.loader import load_onnx

__all__ = ["OnnxInfo", "load_onnx"]
