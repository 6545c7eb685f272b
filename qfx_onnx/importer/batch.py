"""Fixed-batch exports made to take any batch.

``torch.onnx.export(..., dynamo=True)`` and TorchScript exports without ``dynamic_axes`` declare
the batch of the example input (usually 1) on every graph input, and bake it into shape
constants: the ``Reshape`` to ``[1, 512]`` before a classifier, the ``[1, 2, 24, 4, 4]`` of a
channel shuffle, the ``Expand`` of a broadcast constant. :func:`generalize_batch` rewrites such a
graph so that it runs at any batch:

* every graph input's (and matching output's) first dim becomes the symbolic dim ``batch``;
* a constant ``Reshape`` target whose first entry is the declared batch, applied to a tensor
  whose first dim is that batch, gets 0 ("copy the input's dim", or -1 when ``allowzero``);
* inferred intermediate shapes (``value_info``) are dropped, to be inferred again.

The rewrite is then *proven* before it is used: onnxruntime runs the original graph on random
samples chunk by chunk at its declared batch, and the rewritten graph on all of them at once;
the outputs must agree to float32 rounding (1e-4 relative). Where the rewrite fails to load, to
run or to agree (a batch-sized constant concatenated to an activation, a reduction over the
batch), the original graph is kept and the caller is told its declared batch: every stage then
runs it in chunks of that batch (:func:`qfx_onnx.batching.run_in_chunks`) and says so once.
"""

from __future__ import annotations

import logging
import re

import numpy as np
import onnx

from qfx_onnx.importer.reader import copy_fields

log = logging.getLogger(__name__)

BATCH_DIM = "batch"
_CHECK_CHUNKS = 3
_RTOL, _ATOL = 1e-4, 1e-5


def declared_batch(model: onnx.ModelProto, constants: dict[str, np.ndarray]) -> int | None:
    """The batch that every runtime graph input of ``model`` declares as a static first dim, or
    None (some input has a dynamic or no first dim, or they disagree)."""
    batches = set()
    for value in model.graph.input:
        if value.name in constants:
            continue
        dims = value.type.tensor_type.shape.dim if value.type.HasField("tensor_type") else []
        if not dims or not dims[0].HasField("dim_value"):
            return None
        batches.add(dims[0].dim_value)
    return batches.pop() if len(batches) == 1 else None


def generalize_batch(model: onnx.ModelProto, constants: dict[str, np.ndarray], opset: int, label: str) -> tuple[onnx.ModelProto, int | None]:
    """``model`` made to take any batch, and None; or ``model`` unchanged and its declared batch
    when it cannot be (see the module docstring). A model whose batch is already dynamic is
    returned as it is.

    ``model`` is weight-free (:func:`~qfx_onnx.importer.reader.weight_free`); ``constants`` holds
    every initializer's value, and gains the rewritten shape targets. Never raises for a model
    that cannot be generalised.
    """
    batch = declared_batch(model, constants)
    if batch is None or batch < 1:
        return model, None
    first_dims, values = _declared_values(model, constants, opset, label)
    candidate, new_constants, rewritten = _rewrite(model, constants, batch, first_dims, values)
    why = _disagreement(model, candidate, {**constants, **new_constants}, batch)
    if why is None:
        constants.update(new_constants)
        log.info("%s: generalised the declared batch %d to any batch (%d shape constants rewritten)", label, batch, rewritten)
        return candidate, None
    log.warning("%s: the graph is fixed to batch %d and cannot run at other batches (%s); every stage runs it in chunks of %d",
                label, batch, why, batch)
    return model, batch


def _declared_values(model: onnx.ModelProto, constants: dict[str, np.ndarray], opset: int,
                     label: str) -> tuple[dict[str, int], dict[str, np.ndarray]]:
    """On the model as declared: the first dim of every tensor shape inference sizes, and the
    value of every integer tensor known before it runs (shape constants, also those built from
    Constant, Shape, Gather, Unsqueeze, Concat ... at the declared batch)."""
    from qfx_onnx.importer.fold import fold_constants  # batch runs before folding proper
    from qfx_onnx.importer.loader import _node_names, _tensor_infos, _with_folded

    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception:
        inferred = model
    infos = _tensor_infos(inferred.graph, constants)
    first_dims = {name: info.shape[0] for name, info in infos.items() if info.shape and info.shape[0] is not None}
    # only integer-valued nodes: the weights' folding is left to the importer proper
    skip = {i for i, node in enumerate(model.graph.node)
            if not all(o and infos.get(o) is not None and infos[o].dtype is not None and infos[o].dtype.kind in "iu"
                       for o in node.output)}
    values = {name: v for name, v in constants.items() if v.dtype.kind in "iu"}
    try:
        folded = fold_constants(model.graph.node, _node_names(model.graph), values, infos, opset, skip=skip).folded
    except Exception as exc:  # a shape subgraph the reference cannot evaluate: no rewrite through it
        log.debug("%s: shape constants not evaluated for batch generalisation (%s)", label, exc)
        return first_dims, values
    if folded:  # split sizes and slice bounds now known: shape inference sizes what follows them
        try:
            again = onnx.shape_inference.infer_shapes(_with_folded(model, folded, values), check_type=False,
                                                      strict_mode=False, data_prop=True)
        except Exception:
            again = None
        if again is not None:
            for name, info in _tensor_infos(again.graph, {}).items():
                if info.shape and info.shape[0] is not None:
                    first_dims.setdefault(name, info.shape[0])
    return first_dims, values


def _rewrite(model: onnx.ModelProto, constants: dict[str, np.ndarray], batch: int, first_dims: dict[str, int],
             values: dict[str, np.ndarray]) -> tuple[onnx.ModelProto, dict[str, np.ndarray], int]:
    """The candidate graph, the new shape constants it reads, and how many it rewrote."""
    out = onnx.ModelProto()
    copy_fields(model, out, skip={"graph"})
    copy_fields(model.graph, out.graph, skip={"value_info", "node", "initializer"})
    out.graph.initializer.extend(model.graph.initializer)
    for value in [*out.graph.input, *out.graph.output]:
        if value.name in constants or not value.type.HasField("tensor_type"):
            continue
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value == batch:
            dims[0].dim_param = BATCH_DIM  # clears dim_value (a oneof)
    new_constants: dict[str, np.ndarray] = {}
    for node in model.graph.node:
        copy = out.graph.node.add()
        copy.CopyFrom(node)
        if node.op_type != "Reshape" or len(node.input) < 2:
            continue
        target = values.get(node.input[1])
        if target is None or target.ndim != 1 or target.size == 0 or target[0] != batch or first_dims.get(node.input[0]) != batch:
            continue
        target = target.astype(np.int64).copy()
        allowzero = next((a.i for a in node.attribute if a.name == "allowzero"), 0)
        if allowzero and -1 in target:
            continue
        target[0] = -1 if allowzero else 0
        name = f"{node.input[1]}::any_batch"
        k = 1
        while name in constants or name in new_constants:
            name, k = f"{node.input[1]}::any_batch_{k}", k + 1
        new_constants[name] = target
        out.graph.initializer.append(onnx.numpy_helper.from_array(target, name))
        copy.input[1] = name
    return out, new_constants, len(new_constants)


def _ort_reason(exc: Exception) -> str:
    """The gist of an onnxruntime error: the node and its status message, without source locations."""
    text = " ".join(str(exc).split())
    node = re.search(r"running (\w+) node\. Name:'([^']*)'", text)
    message = text.split("Status Message:")[-1]
    message = re.sub(r"^\s*\S+\.(?:h|cc|cpp):\d+ \S+\s*", "", message).strip()
    where = f"{node.group(1)} node {node.group(2)!r}: " if node and node.group(2) else f"{node.group(1)}: " if node else ""
    return (where + message)[:160]


def _disagreement(original: onnx.ModelProto, candidate: onnx.ModelProto, constants: dict[str, np.ndarray], batch: int) -> str | None:
    """None when onnxruntime gives the same outputs for the candidate on ``_CHECK_CHUNKS`` chunks
    at once as for the original chunk by chunk; else why not, in a few words."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    inputs = [v for v in original.graph.input if v.name not in constants]
    weights = {v.name: constants[v.name] for v in original.graph.input if v.name in constants}
    feeds = {}
    for value in inputs:
        tensor = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in tensor.shape.dim]
        shape = [batch * _CHECK_CHUNKS, *dims[1:]]
        feeds[value.name] = (rng.standard_normal(shape) if np.issubdtype(dtype, np.floating) else np.zeros(shape)).astype(dtype)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 4  # a failing candidate is expected: onnxruntime must not print it
    quiet = ort.RunOptions()
    quiet.log_severity_level = 4
    try:
        reference = ort.InferenceSession(original.SerializeToString(), options, providers=["CPUExecutionProvider"])
        chunks = [reference.run(None, {**weights, **{k: v[i * batch:(i + 1) * batch] for k, v in feeds.items()}}, quiet)
                  for i in range(_CHECK_CHUNKS)]
    except Exception:  # the original does not run in onnxruntime either: leave it to the importer
        return None
    try:
        session = ort.InferenceSession(candidate.SerializeToString(), options, providers=["CPUExecutionProvider"])
        together = session.run(None, {**weights, **feeds}, quiet)
    except Exception as exc:
        return f"onnxruntime at batch {batch * _CHECK_CHUNKS}: {_ort_reason(exc)}"
    for k, got in enumerate(together):
        want = [chunk[k] for chunk in chunks]
        if np.ndim(got) == 0 or any(np.ndim(w) == 0 for w in want):
            return f"output #{k} is a scalar"
        want = np.concatenate(want, axis=0)
        if got.shape != want.shape:
            return f"output #{k} has shape {got.shape}, expected {want.shape}"
        if want.dtype.kind == "f":
            if not np.allclose(got, want, rtol=_RTOL, atol=_ATOL * max(1.0, float(np.abs(want).max(initial=0)))):
                return f"output #{k} differs between batched and per-chunk runs"
        elif not np.array_equal(got, want):
            return f"output #{k} differs between batched and per-chunk runs"
    return None
