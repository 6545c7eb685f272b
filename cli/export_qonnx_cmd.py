"""``qfx-onnx export-qonnx``: an annotated ONNX to a QONNX model (``Quant`` nodes) for FINN and hls4ml."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from onnx import helper
from rich.table import Table

from qfx_onnx.errors import OnnxModelError, OutputError, QfxError
from qfx_onnx_cli.main import QfxCommand, app, run_command
from qfx_onnx_cli.options import AnnotatedModel, Force, Json, Quiet, _data, check_new_file

NearestData = _data("With --nearest-modes: the inputs (test split when there is one) on which the change is measured.",
                    "none")
from qfx_onnx_cli.output import Output


def default_output(model: Path) -> Path:
    """``cnn.qfx.onnx`` -> ``cnn.qonnx.onnx`` beside it."""
    name = model.name
    for suffix in (".onnx", ".qfx"):
        name = name.removesuffix(suffix)
    return model.with_name(f"{name or 'model'}.qonnx.onnx")


@app.command("export-qonnx", cls=QfxCommand)
def export_qonnx(
    model: AnnotatedModel,
    output: Path | None = typer.Option(None, "-o", "--output", metavar="FILE",
                                       show_default="<model>.qonnx.onnx beside the model", help="QONNX file to write."),
    hls4ml_config: Path | None = typer.Option(
        None, "--hls4ml-config", metavar="FILE", show_default="none",
        help="Also write, as JSON {\"LayerName\": {...}}, the hls4ml layer entries that make hls4ml exact: merge them "
             "into config_from_onnx_model(..., granularity='name')['LayerName']."),
    nearest_modes: bool = typer.Option(
        False, "--nearest-modes",
        help="Export a cast QONNX cannot express with the nearest expressible type (the one the error names) and "
             "report how much that changes the outputs on --data (needed). The QONNX model is then not bit-exact "
             "with MODEL where it reports a change; for exactness quantize with --rounding AP_RND_CONV instead."),
    data: NearestData = None,
    force: Force = False,
    quiet: Quiet = False,
    json_output: Json = False,
) -> None:
    """Write the model as QONNX: every ap_fixed cast becomes a Quant node (scale 2^-F, zero point 0,
    bitwidth W, signed, narrow for AP_SAT_SYM, the matching rounding_mode) that qonnx's executor,
    FINN and hls4ml read; other nodes stay standard ONNX.

    A cast QONNX cannot express (AP_RND, AP_RND_MIN_INF, AP_WRAP, AP_SAT_ZERO, signed 1-bit) is an
    error naming the tensor and the nearest expressible type, unless it provably gives the same
    values (a constant, or an input type with nothing to round or to clip). To export to QONNX,
    quantize with modes QONNX has: qfx-onnx quantize ... --rounding AP_RND_CONV --overflow AP_SAT.

    --json: output, quant_nodes (tensor, type, signed, narrow, rounding_mode), annotated tensors,
    nearest_modes (with --nearest-modes: changed {tensor: [from, to]}, samples, values, differing,
    differing_samples, max_lsb).
    """
    args = dict(locals())
    out = Output(json_mode=args.pop("json_output"), quiet=args.pop("quiet"))
    run_command(lambda: _export_qonnx(**args, out=out))


def _export_qonnx(model: Path, output: Path | None, hls4ml_config: Path | None, nearest_modes: bool, data: str | None,
                  force: bool, out: Output) -> None:
    from qfx_onnx.atomic import write_atomic
    from qfx_onnx.qonnx_export import QONNX_DOMAIN, export_qonnx as export, export_qonnx_nearest, hls4ml_layer_config

    if not model.is_file():
        raise OnnxModelError(f"{model}: no such file")
    output = output or default_output(model)
    check_new_file(output, force)
    if hls4ml_config is not None:
        check_new_file(hls4ml_config, force)
        if hls4ml_config.resolve() in (output.resolve(), model.resolve()):
            raise OutputError(f"{hls4ml_config}: the hls4ml config needs a file of its own")
    if nearest_modes != (data is not None):
        raise QfxError("--nearest-modes needs --data to measure what it changes (and --data is only for --nearest-modes)")
    nearest = None
    if nearest_modes:
        from qfx_onnx.data import load_arrays
        from qfx_onnx.quant.api import evaluation_split

        x, _ = load_arrays(data, evaluation_split(data), real_targets=True)
        with out.status("writing the QONNX model, measuring the nearest modes"):
            proto, nearest = export_qonnx_nearest(model, x.numpy(), output)
        for tensor, (old, new) in nearest.changed.items():
            out.warn(f"tensor {tensor!r}: {old} exported as {new}")
        if nearest.changed:
            out.warn(f"nearest modes on {len(nearest.changed)} cast(s), measured on {data}: {nearest.describe()}")
    else:
        with out.status("writing the QONNX model"):
            proto = export(model, output)
    if hls4ml_config is not None:
        layers = hls4ml_layer_config(proto)
        write_atomic(hls4ml_config, json.dumps({"LayerName": layers}, indent=2) + "\n", what="hls4ml config")
        out.line(f"wrote {hls4ml_config} (hls4ml layer entries: {', '.join(layers) or 'none'})")
    notes = {a.tensor_name: {kv.key: kv.value for kv in a.quant_parameter_tensor_names}
             for a in proto.graph.quantization_annotation}
    rows = []
    for node in proto.graph.node:
        if node.domain == QONNX_DOMAIN and node.op_type == "Quant":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            rows.append({"tensor": node.output[0], "type": notes.get(node.output[0], {}).get("qfx.ap_type", ""),
                         "signed": attrs["signed"], "narrow": attrs["narrow"],
                         "rounding_mode": attrs["rounding_mode"].decode()})
    table = Table(title=f"{output.name}: {len(rows)} Quant nodes in graph order")
    for col in ("tensor", "type", "signed", "narrow", "rounding_mode"):
        table.add_column(col)
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    out.table(table)
    out.result({"output": str(output), "quant_nodes": rows, "annotated": len(notes),
                "hls4ml_config": None if hls4ml_config is None else str(hls4ml_config),
                "nearest_modes": None if nearest is None else {
                    "changed": {k: list(v) for k, v in nearest.changed.items()}, "samples": nearest.samples,
                    "values": nearest.values, "differing": nearest.differing,
                    "differing_samples": nearest.differing_samples, "max_lsb": nearest.max_lsb}})
    out.final(f"wrote {output} ({len(rows)} Quant nodes, {len(notes)} annotated tensors)")
