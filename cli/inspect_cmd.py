"""``qfx-onnx inspect``: what the importer makes of a float model, and its float accuracy (or MSE) on
data; or, for an annotated model (quantize's or finetune's output), every quantized tensor, the
lossless types, float32 exactness, the HLS resource estimate and the fixed-point score."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.table import Table
from rich.text import Text

from qfx_onnx.batching import fixed_batch_of, run_in_chunks
from qfx_onnx.errors import DataError
from qfx_onnx_cli.export_hls_cmd import default_top  # the estimate is export-hls's, for the same top function
from qfx_onnx_cli.main import QfxCommand, app, run_command
from qfx_onnx.hls.export import IoMode
from qfx_onnx_cli.options import InspectData, Io, Json, Quiet
from qfx_onnx_cli.output import Output, estimate_table

AnyModel = Annotated[Path, typer.Argument(metavar="MODEL", show_default=False,
                                          help="Float ONNX model, or an annotated model written by quantize or "
                                               "finetune (.qfx.onnx).")]

_STATUS_STYLE = {"converted": "green", "folded": "cyan", "unsupported": "bold red"}


@app.command(cls=QfxCommand)
def inspect(
    model: AnyModel,
    data: InspectData = None,
    split: str | None = typer.Option(None, "--split", metavar="SPLIT", show_default="the test split when the .npz has one",
                                     help="Rows of --data to use: train, test or all."),
    batch_size: int = typer.Option(256, "--batch-size", help="Samples per forward pass with --data."),
    io: Io = IoMode.PARALLEL.value,
    reuse_factor: int = typer.Option(1, "--reuse-factor", help="Annotated models: the reuse factor of the resource "
                                                               "estimate (as export-hls --reuse-factor)."),
    quiet: Quiet = False,
    json_output: Json = False,
) -> None:
    """List the model's nodes with their support status; exit 2 if any op is unsupported.

    An annotated model (quantize's or finetune's .qfx.onnx): every quantized tensor in graph order
    with its role, type, range (observed on --data, else the type's own), K-hot constraint, the
    lossless type of the value reaching its cast and whether float32 onnxruntime is guaranteed
    exact; then the HLS resource estimate (as export-hls, nothing written) and, with labelled
    --data, the fixed-point accuracy (or MSE). --io and --reuse-factor apply to the estimate.

    --json: model, opset, supported, nodes (name, op, output_shape, status), inputs, outputs, score;
    annotated: model, annotated, source, format_version, tensors, layers, not_exact_float32,
    estimate, estimate_error, samples, score.
    """
    out = Output(json_mode=json_output, quiet=quiet)

    def body() -> None:
        from qfx_onnx.quant.describe import is_annotated

        if model.is_file() and is_annotated(model):
            _inspect_annotated(model, data, split, batch_size, io, reuse_factor, out)
        else:
            _inspect(model, data, split, batch_size, out)

    run_command(body)


def _inspect(model: Path, data: str | None, split: str | None, batch_size: int, out: Output) -> None:
    from qfx_onnx.importer.loader import build_graph, prepare, summarize_nodes
    from qfx_onnx.importer.registry import unsupported_error

    prepared = prepare(model, raise_unsupported=False)
    rows = summarize_nodes(prepared)
    table = Table(title=f"{prepared.label}: opset {prepared.opset}, {len(rows)} nodes")
    for column in ("#", "node", "op", "output shape", "status"):
        table.add_column(column, justify="right" if column == "#" else "left")
    for index, row in enumerate(rows):
        style = _STATUS_STYLE[row.status]
        table.add_row(str(index), row.name, row.op_type, _shape_text(row.output_shape), Text(row.status, style=style))
    out.table(table)
    payload = {"model": str(model), "opset": prepared.opset, "supported": not prepared.unsupported,
               "nodes": [{"name": r.name, "op": r.op_type, "output_shape": _shape_json(r.output_shape), "status": r.status}
                         for r in rows],
               "inputs": [], "outputs": [], "score": None}
    if prepared.unsupported:
        out.result(payload)
        raise unsupported_error(prepared.unsupported, prepared.opset, prepared.label)
    gm = build_graph(prepared)
    info = gm.onnx_info
    for name, shape in zip(info.input_names, info.input_shapes):
        out.line(f"input  {name}: {_shape_text(shape)}")
        payload["inputs"].append({"name": name, "shape": _shape_json(shape)})
    out.line(f"output {', '.join(info.output_names)}")
    payload["outputs"] = list(info.output_names)
    if data is None:
        out.final(f"{model.name}: {len(rows)} nodes, all supported")
    else:
        result = _score(gm, data, split, batch_size)
        name = Path(data).name
        if result is None:
            out.final(f"float accuracy: none, {name} has no labels (y); its inputs fit the model")
        else:
            out.final(f"float {result.name}: {result.value_text()} ({result.count} samples of {name})")
            payload["score"] = {"metric": result.metric, "value": result.value, "samples": result.count, "data": data}
    out.result(payload)


def _shape_text(shape) -> str:
    if shape is None:
        return "?"
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def _shape_json(shape) -> list | None:
    """A shape for --json: a list with null for a dynamic dimension; null when unknown."""
    return None if shape is None else list(shape)


def _score(gm: torch.fx.GraphModule, data: str, split: str | None, batch_size: int):
    """The first output measured against the labels (:func:`qfx_onnx.data.score`), or None
    when the data has no labels; the inputs are checked against the model either way."""
    from qfx_onnx.data import score

    if batch_size < 1:
        raise DataError(f"--batch-size {batch_size}: must be at least 1")
    x, y = _load(gm.onnx_info, data, split)
    if y is None:
        return None
    outputs = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            out = run_in_chunks(gm, [x[start:start + batch_size]], fixed_batch_of(gm))  # a fixed-batch graph: in chunks
            outputs.append(out[0] if isinstance(out, tuple) else out)
    return score(torch.cat(outputs), y, str(data))


def _inspect_annotated(model: Path, data: str | None, split: str | None, batch_size: int, io: str, reuse_factor: int,
                       out: Output) -> None:
    from qfx_onnx.quant.annotated import read_annotated
    from qfx_onnx.quant.describe import describe_model, metadata

    if batch_size < 1:
        raise DataError(f"--batch-size {batch_size}: must be at least 1")
    meta = metadata(model)
    with out.status("reading the annotated model"):
        fixed = read_annotated(model)
    x = y = None
    if data is not None:
        x, y = _load(fixed.onnx_info, data, split)
    with out.counter("measuring every tensor on the data" if x is not None else "deriving types and the estimate") as tick:
        described = describe_model(fixed, x, y, source=str(data), top=default_top(model), io=io, reuse_factor=reuse_factor, batch_size=batch_size,
                                   progress=tick)
    out.table(_tensor_table(model, described))
    for t in described.tensors:
        if not t.exact_float32:
            out.line(f"not guaranteed exact in float32 onnxruntime: {t.tensor}: {t.reason}")
    if described.estimate is not None:
        out.table(estimate_table(described.estimate))
    else:
        out.warn(f"no resource estimate: {described.estimate_error}")
    payload = {"model": str(model), "annotated": True, "source": meta["source"], "format_version": meta["format_version"],
               **described.to_dict()}
    if described.score is not None:
        payload["score"]["data"] = data
    n, inexact = len(described.tensors), len(described.not_exact_float32)
    summary = (f"{model.name}: {n} quantized tensors, {inexact} not guaranteed exact in float32 onnxruntime"
               + ("" if described.estimate is None else
                  f", {described.estimate['totals']['dsp']} DSP, {described.estimate['totals']['lut']} LUT (estimate)"))
    if data is None:
        out.final(summary)
    elif described.score is None:
        out.line(summary)
        out.final(f"fixed-point accuracy: none, {Path(data).name} has no labels (y); its inputs fit the model")
    else:
        out.line(summary)
        out.final(f"fixed-point {described.score.name}: {described.score.value_text()} "
                  f"({described.score.count} samples of {Path(data).name})")
    out.result(payload)


def _tensor_table(model: Path, described) -> Table:
    """Every quantized tensor in graph order (the annotated view of inspect)."""
    from qfx_onnx.quant.describe import khot_text, range_text

    where = f"observed on {described.samples} samples" if described.samples else "the types' own: no --data"
    table = Table(title=f"{model.name}: {len(described.tensors)} quantized tensors in graph order (ranges {where})")
    for column in ("#", "tensor", "role", "type", "range", "clipped", "K-hot", "lossless input (terms)", "float32"):
        table.add_column(column, justify="right" if column in ("#", "clipped") else "left")
    for t in described.tensors:
        clipped = "-" if t.clipped_fraction is None else f"{t.clipped_fraction:.2%}"
        lossless = f"{t.lossless} ({t.terms})" if t.lossless else "-"
        exact = Text("exact", style="green") if t.exact_float32 else Text("not guaranteed", style="yellow")
        table.add_row(str(t.index), t.tensor, t.role, t.type, range_text(t), clipped, khot_text(t), lossless, exact)
    return table


def _load(info, data: str, split: str | None):
    """(x, y) of ``data`` checked against the model's single input (y None without labels)."""
    from qfx_onnx.data import check_matches_model, load_arrays
    from qfx_onnx.quant.api import evaluation_split

    if split is None:
        split = evaluation_split(data)
    x, y = load_arrays(data, None if split == "all" else split, real_targets=True)
    if info is not None and len(info.input_names) != 1:
        raise DataError(f"{data}: the model has {len(info.input_names)} inputs; --data feeds exactly one")
    if info is not None and info.input_shapes and info.input_shapes[0] is not None:
        check_matches_model(x, info.input_shapes[0], str(data))
    return x, y
