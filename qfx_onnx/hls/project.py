"""``export_hls``: a fixed-point model to a complete Vitis HLS project folder, optionally C-simulated.

The pipeline, each step a plain function:

1. :func:`test_inputs` picks the test vectors (rows of a dataset, or random codes of the input type);
2. :func:`~qfx_onnx.hls.export.build_hls_model` turns the graph into layers, buffers and constants;
3. :func:`expected_codes` runs the PyTorch emulation and reads the exact output codes;
4. :func:`~qfx_onnx.hls.estimate.estimate` models resources and latency;
5. :func:`render_files` renders every file from parameter dicts;
6. :func:`write_project` writes them into a temporary folder next to the target and renames it into
   place (an existing folder is replaced only with ``force``);
7. with ``csim``, :func:`~qfx_onnx.hls.csim.run_csim` compiles and runs the testbench.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qfx_onnx.atomic import current_umask
from qfx_onnx.errors import ExportError
from qfx_onnx.fixed.types import FixedType
from qfx_onnx.hls import codegen
from qfx_onnx.hls.files import header
from qfx_onnx.hls.csim import CsimResult, run_csim
from qfx_onnx.hls.estimate import estimate
from qfx_onnx.hls.export import ExportOptions, build_hls_model
from qfx_onnx.hls.model import HlsModel
from qfx_onnx.hls.names import Namer, top_name
from qfx_onnx.hls.shift_add import khot_term_type

DEFAULT_PART = "xcvu9p-flga2104-2-e"


@dataclass
class ExportResult:
    project: Path
    model: HlsModel
    report: dict
    csim: CsimResult | None = None


def _codes(values: torch.Tensor, t: FixedType, what: str) -> np.ndarray:
    scaled = values.detach().to(torch.float64).cpu().numpy() * math.ldexp(1.0, t.frac)
    codes = np.round(scaled)
    if not np.array_equal(codes, scaled) or codes.min(initial=0) < t.int_min or codes.max(initial=0) > t.int_max:
        raise ExportError(f"{what}: emulation values are not codes of {t}")
    return codes.astype(np.int64)


def _input_shapes(fpm) -> list[tuple[int, ...]]:
    info = getattr(fpm, "onnx_info", None)
    shapes = getattr(info, "input_shapes", None)
    if not shapes or any(s is None for s in shapes):
        raise ExportError("the model's input shapes are unknown: pass test data (--data)")
    out = []
    for s in shapes:
        if any(d is None for d in s[1:]):
            raise ExportError(f"input shape {s} has symbolic dims beyond the batch: pass test data (--data)")
        out.append((1, *[int(d) for d in s[1:]]))
    return out


def _input_quantizers(fpm) -> list:
    gm = fpm.graph_module
    out = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            casts = [u for u in node.users if u.op == "call_module"]
            if len(casts) != 1:
                raise ExportError(f"graph input {node.name!r} must be quantized by exactly one cast")
            out.append(gm.get_submodule(casts[0].target))
    return out


MAX_TEST_VECTORS = 100_000
"""The most test vectors a testbench holds: the codes are kept in memory and written as text, and
the C simulation runs them one by one (at -O0), so even this many takes minutes."""


def check_vector_count(n: int) -> None:
    """Raise ExportError unless ``1 <= n <= MAX_TEST_VECTORS`` (checked before any work)."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_TEST_VECTORS:
        raise ExportError(f"--test-vectors {n}: must be from 1 to {MAX_TEST_VECTORS:,}")


def test_inputs(fpm, data: tuple[torch.Tensor, ...] | None, n: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """``n`` test vectors per graph input: the first rows of ``data``, or (no data) random codes
    spread over each input type's whole range, as float64 values."""
    check_vector_count(n)
    if data is not None:
        if any(len(x) < 1 for x in data):
            raise ExportError("the test data holds no rows")
        return tuple(x[:n].to(torch.float64) for x in data)
    gen = np.random.default_rng(seed)
    out = []
    for shape, q in zip(_input_shapes(fpm), _input_quantizers(fpm)):
        t = q.frozen_types()[0]
        codes = gen.integers(t.int_min, t.int_max, size=(n, *shape[1:]), endpoint=True)
        out.append(torch.from_numpy(np.ldexp(codes.astype(np.float64), -t.frac)))
    return tuple(out)


def input_codes(fpm, model: HlsModel, inputs: tuple[torch.Tensor, ...]) -> np.ndarray:
    """One row per test vector: the codes of every input port, concatenated."""
    gm = fpm.graph_module
    rows = []
    for node, port, x in zip(model.input_nodes, model.inputs, inputs):
        with torch.no_grad():
            v = gm.get_submodule(node.target)(x.to(torch.float64))
        rows.append(_codes(v, port.ctype.type, f"input {port.ident}").reshape(len(x), -1))
    return np.concatenate(rows, axis=1)


def expected_codes(fpm, model: HlsModel, inputs: tuple[torch.Tensor, ...]) -> np.ndarray:
    """One row per test vector: the emulation's exact output codes of every port, concatenated."""
    with torch.no_grad():
        out = fpm(*inputs)
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    if len(outs) != len(model.outputs):
        raise ExportError(f"the model returns {len(outs)} outputs, the project has {len(model.outputs)} ports")
    rows = [_codes(v, port.ctype.type, f"output {port.ident}").reshape(len(inputs[0]), -1)
            for v, port in zip(outs, model.outputs)]
    return np.concatenate(rows, axis=1)


def render_files(model: HlsModel, report: dict, params: dict, in_codes: np.ndarray,
                 out_codes: np.ndarray) -> dict[str, str]:
    """Every file of the project, by relative path."""
    p = dict(params, top=model.top, ctypes=model.ctypes, constants=model.constants, layers=model.layers,
             buffers=model.buffers, inputs=model.inputs, outputs=model.outputs,
             ports=model.inputs + model.outputs, aux_names=model.aux_names, report=report,
             n_vectors=len(in_codes))
    files = {
        "firmware/defines.h": codegen.render_defines(p),
        "firmware/layers.h": header("layers.h"),
        "firmware/parameters.h": codegen.render_parameters(p),
        f"firmware/{model.top}.h": codegen.render_top_h(p),
        f"firmware/{model.top}.cpp": codegen.render_top_cpp(p),
        f"tb/tb_{model.top}.cpp": codegen.render_testbench(p),
        "tb/tb_data/input_codes.dat": codegen.render_codes(in_codes),
        "tb/tb_data/output_codes.dat": codegen.render_codes(out_codes),
        "build.tcl": codegen.render_build_tcl(p),
        "README.md": codegen.render_readme(p),
        "report.json": json.dumps(report, indent=2) + "\n",
    }
    for name in codegen.kind_headers(model.layers):  # the templates of layer kinds beyond layers.h
        files[f"firmware/{name}"] = header(name)
    for c in model.constants:
        files[f"firmware/weights/{c.ident}.h"] = codegen.render_weight(c)
    return files


def _khot_term_types(model: HlsModel) -> dict:
    """A typedef per K-hot layer for its exact shift operands (added to the model's types)."""
    from qfx_onnx.hls.model import CType

    namer = Namer()
    for t in model.ctypes:
        namer.reserve(t.ident)
    out = {}
    for layer in model.layers:
        if layer.weight is not None and layer.weight.khot:
            t = khot_term_type(layer.inputs[0].ctype.type, layer.weight)
            ct = CType(namer.name(layer.ident + "_shift", "t_"), t, "intermediate", layer.ident)
            model.ctypes.append(ct)
            out[layer.ident] = ct
    return out


def write_project(files: dict[str, str], out_dir: str | Path, *, force: bool,
                  protect: tuple[Path, ...] = ()) -> Path:
    """Write ``files`` into a temporary folder beside ``out_dir``, then rename it into place.

    An existing ``out_dir`` is an error unless ``force``; then it is replaced only after the new
    project is complete. A folder holding one of ``protect`` (the input model) is never replaced.
    """
    out = Path(out_dir).resolve()
    check_output_dir(out, force=force, protect=protect)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes 0o700; the project follows the umask
    except OSError as exc:
        raise ExportError(f"{out}: cannot write the HLS project ({exc.strerror})") from None
    try:
        for rel, text in files.items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / "prj")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(f"{out}: cannot write the HLS project ({exc.strerror})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


PROJECT_MARKERS = frozenset({"build.tcl", "firmware", "report.json"})
"""What every generated project holds: ``--force`` replaces only a folder that has all of them."""


def check_output_dir(out: Path, *, force: bool, protect: tuple[Path, ...] = ()) -> None:
    """Raise ExportError when ``out`` may not be written (see :func:`write_project`)."""
    out = Path(out).resolve()
    for p in protect:
        p = Path(p).resolve()
        if p == out or out in p.parents:
            raise ExportError(f"refusing to write {out}: it holds the input {p.name}")
    if out.exists():
        if not out.is_dir():
            raise ExportError(f"{out} exists and is not a folder")
        contents = {p.name for p in out.iterdir()}
        if contents and not force:
            raise ExportError(f"{out} already exists: pass --force to replace it")
        if contents and not PROJECT_MARKERS <= contents:  # --force replaces a generated project, nothing else
            raise ExportError(f"{out} is not an HLS project written by qfx-onnx (no {', '.join(sorted(PROJECT_MARKERS))}); "
                              "refusing to replace it, even with --force")


def export_hls(fpm, out_dir: str | Path, *, top: str = "myproject", io: str = "parallel",
               reuse_factor: int = 1, part: str = DEFAULT_PART, clock_ns: float = 5.0,
               force: bool = False, data: tuple[torch.Tensor, ...] | None = None, n_vectors: int = 20,
               khot_max: int = 0, csim: bool = False, jobs: int = 2,
               protect: tuple[Path, ...] = ()) -> ExportResult:
    """Generate the project for ``fpm`` in ``out_dir`` (see the module docstring)."""
    check_output_dir(Path(out_dir), force=force, protect=protect)
    if clock_ns <= 0:
        raise ExportError(f"--clock-ns must be positive, not {clock_ns}")
    options = ExportOptions(top=top_name(top), io=io, reuse_factor=reuse_factor, khot_max=khot_max)
    inputs = test_inputs(fpm, data, n_vectors)
    model = build_hls_model(fpm, inputs, options)
    term_types = _khot_term_types(model)
    in_codes = input_codes(fpm, model, inputs)
    out_codes = expected_codes(fpm, model, inputs)
    report = estimate(model, reuse_factor=reuse_factor, io=io, part=part, clock_ns=clock_ns)
    params = dict(io=io, reuse_factor=reuse_factor, part=part, clock_ns=clock_ns, term_types=term_types)
    files = render_files(model, report, params, in_codes, out_codes)
    project = write_project(files, out_dir, force=force, protect=protect)
    result = ExportResult(project, model, report)
    if csim:
        result.csim = run_csim(project, model.top, jobs=jobs)
    return result
