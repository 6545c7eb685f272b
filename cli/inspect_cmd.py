"""``qfx-onnx inspect``: what the importer makes of a model, and its float accuracy (or MSE) on data."""

from __future__ import annotations

from pathlib import Path

import torch
import typer
from rich.table import Table
from rich.text import Text

from qfx_onnx.batching import fixed_batch_of, run_in_chunks
from qfx_onnx.errors import DataError
from qfx_onnx_cli.main import QfxCommand, app, run_command
from qfx_onnx_cli.options import FloatModel, InspectData, Json, Quiet
from qfx_onnx_cli.output import Output

_STATUS_STYLE = {"converted": "green", "folded": "cyan", "unsupported": "bold red"}


@app.command(cls=QfxCommand)
def inspect(
    model: FloatModel,
    data: InspectData = None,
    split: str | None = typer.Option(None, "--split", metavar="SPLIT", show_default="the test split when the .npz has one",
                                     help="Rows of --data to use: train, test or all."),
    batch_size: int = typer.Option(256, "--batch-size", help="Samples per forward pass with --data."),
    quiet: Quiet = False,
    json_output: Json = False,
) -> None:
    """List the model's nodes with their support status; exit 2 if any op is unsupported.

    --json: model, opset, supported, nodes (name, op, output_shape, status), inputs, outputs, score.
    """
    out = Output(json_mode=json_output, quiet=quiet)
    run_command(lambda: _inspect(model, data, split, batch_size, out))


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
    from qfx_onnx.data import check_matches_model, load_arrays, score

    if batch_size < 1:
        raise DataError(f"--batch-size {batch_size}: must be at least 1")
    from qfx_onnx.quant.api import evaluation_split

    if split is None:
        split = evaluation_split(data)
    x, y = load_arrays(data, None if split == "all" else split, real_targets=True)
    if len(gm.onnx_info.input_names) != 1:
        raise DataError(f"{data}: the model has {len(gm.onnx_info.input_names)} inputs; --data feeds exactly one")
    check_matches_model(x, gm.onnx_info.input_shapes[0], str(data))
    if y is None:
        return None
    outputs = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            out = run_in_chunks(gm, [x[start:start + batch_size]], fixed_batch_of(gm))  # a fixed-batch graph: in chunks
            outputs.append(out[0] if isinstance(out, tuple) else out)
    return score(torch.cat(outputs), y, str(data))
