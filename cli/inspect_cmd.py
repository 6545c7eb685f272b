"""``qfx-onnx inspect``: what the importer makes of a model, and its float accuracy (or MSE) on data."""

from __future__ import annotations

from pathlib import Path

import torch
import typer
from rich.table import Table
from rich.text import Text

from qfx_onnx.batching import fixed_batch_of, run_in_chunks
from qfx_onnx.errors import DataError
from qfx_onnx_cli.main import app, console, run_command

_STATUS_STYLE = {"converted": "green", "folded": "cyan", "unsupported": "bold red"}


@app.command()
def inspect(
    model: Path = typer.Argument(..., help="Float ONNX model."),
    data: Path | None = typer.Option(None, "--data", help="Data (.npz with x and optionally y, .npy, or module:function): check it fits the model "
                                                       "and report the float accuracy (class labels y) or MSE (real-valued y)."),
    split: str | None = typer.Option(None, "--split", help="Rows of --data to use: train, test or all (default: the test split when the .npz has one)."),
    batch_size: int = typer.Option(256, help="Samples per forward pass with --data."),
) -> None:
    """List the model's nodes with their support status; exit 2 if any op is unsupported."""
    run_command(lambda: _inspect(model, data, split, batch_size))


def _inspect(model: Path, data: Path | None, split: str | None, batch_size: int) -> None:
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
    console.print(table)
    if prepared.unsupported:
        raise unsupported_error(prepared.unsupported, prepared.opset, prepared.label)
    gm = build_graph(prepared)
    info = gm.onnx_info
    for name, shape in zip(info.input_names, info.input_shapes):
        console.print(f"input  {name}: {_shape_text(shape)}")
    console.print(f"output {', '.join(info.output_names)}")
    if data is not None:
        result = _score(gm, data, split, batch_size)
        if result is None:
            console.print(f"float accuracy: none, {data.name} has no labels (y); its inputs fit the model")
        else:
            console.print(f"float {result.name}: {result.value_text()} ({result.count} samples of {data.name})")


def _shape_text(shape) -> str:
    if shape is None:
        return "?"
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def _score(gm: torch.fx.GraphModule, data: Path, split: str | None, batch_size: int):
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
