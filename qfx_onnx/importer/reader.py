"""Reading an ONNX file safely: no traceback for a bad file, no external data outside its folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import onnx
from onnx import external_data_helper

from qfx_onnx.errors import OnnxModelError

# Initializers above this many elements are left out of the copies that the checker and shape
# inference see: both serialize the whole model, so each would otherwise hold the weights twice
# more. Smaller tensors stay, as do all non-float ones (Reshape shapes, Slice bounds, ...), which
# shape inference's data propagation reads.
_WEIGHT_FREE_MIN_ELEMENTS = 1024
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


def read_model(source: str | os.PathLike | onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """The checked ModelProto of ``source`` (a path or a ModelProto) and a name for messages.

    External data is loaded only after every ``location`` is shown to resolve to a file inside the
    model's folder (relative, no ``..``, no symlink leading out). A ModelProto whose tensors use
    external data is refused, having no folder to resolve them in. Every failure is an
    OnnxModelError whose one-line message names the file.
    """
    if isinstance(source, onnx.ModelProto):
        model, label = source, source.graph.name or "<model>"
        if any(external_data_helper.uses_external_data(t) for t in _all_tensors(model.graph)):
            raise OnnxModelError(f"{label}: the model uses external data; load it from its file path instead")
    else:
        path = Path(source)
        label = path.name
        if not path.is_file():
            raise OnnxModelError(f"{label}: no such file")
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # protobuf raises several unrelated types for a corrupt file
            raise OnnxModelError(f"{label}: not a readable ONNX model ({_reason(exc)})") from None
        _load_external_data(model, path.parent, label)
    try:
        for tensor in model.graph.initializer:
            if _is_large_weight(tensor):  # weight_free() drops its data: check it on its own
                onnx.checker.check_tensor(tensor)
        onnx.checker.check_model(weight_free(model))
    except Exception as exc:  # ValidationError, or a C++ error for malformed protos
        raise OnnxModelError(f"{label}: invalid ONNX model ({_reason(exc)})") from None
    return model, label


def weight_free(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` without the data of its large float initializers, for the checker and
    shape inference.

    Each float initializer of more than ``_WEIGHT_FREE_MIN_ELEMENTS`` elements in the main graph
    becomes a graph input of the same element type and shape (unless it is one already); all else
    is copied as it is. ``model`` is not modified, and its weights are never copied.
    """
    copy = onnx.ModelProto()
    copy_fields(model, copy, skip={"graph"})
    graph, source = copy.graph, model.graph
    copy_fields(source, graph, skip={"initializer"})
    inputs = {value.name for value in source.input}
    for tensor in source.initializer:
        if not _is_large_weight(tensor):
            graph.initializer.append(tensor)
        elif tensor.name not in inputs:
            graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
    return copy


def _is_large_weight(tensor: onnx.TensorProto) -> bool:
    count = 1
    for dim in tensor.dims:
        count *= dim
    return tensor.data_type in _FLOAT_TYPES and count > _WEIGHT_FREE_MIN_ELEMENTS


def copy_fields(source, target, skip: set[str]) -> None:
    """Copy every set field of protobuf message ``source`` into ``target`` except those in ``skip``."""
    for field, value in source.ListFields():
        if field.name in skip:
            continue
        if field.is_repeated:
            getattr(target, field.name).extend(value)
        elif field.type == field.TYPE_MESSAGE:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


def _reason(exc: Exception) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor stored in ``graph``: initializers and node attributes, subgraphs included."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _all_tensors(attr.g)
            for sub in attr.graphs:
                yield from _all_tensors(sub)


def _load_external_data(model: onnx.ModelProto, folder: Path, label: str) -> None:
    base = folder.resolve()
    for tensor in _all_tensors(model.graph):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = external_data_helper.ExternalDataInfo(tensor)
        _check_location(info.location, base, tensor.name, label)
        try:
            external_data_helper.load_external_data_for_tensor(tensor, str(base))
        except Exception as exc:
            raise OnnxModelError(f"{label}: cannot read external data {info.location!r} of tensor {tensor.name!r} ({_reason(exc)})") from None
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]


def _check_location(location: str, base: Path, tensor: str, label: str) -> None:
    def refuse(why: str) -> OnnxModelError:
        return OnnxModelError(f"{label}: external data {location!r} of tensor {tensor!r} {why}; refused")

    if not location:
        raise refuse("has no location")
    if os.path.isabs(location) or Path(location).drive or location.startswith(("/", "\\")):
        raise refuse("is an absolute path")
    if ".." in Path(location.replace("\\", "/")).parts:
        raise refuse("leaves the model's folder")
    target = (base / location).resolve()
    if not target.is_relative_to(base):
        raise refuse("resolves outside the model's folder (symlink)")
    if not target.is_file():
        raise refuse("is not a file next to the model")
