"""Render an :class:`~qfx_onnx.hls.model.HlsModel` into the files of a Vitis HLS project.

Each file is rendered whole by one function (``render_*``), from a jinja2 template in
``qfx_onnx/hls/templates/`` (:mod:`qfx_onnx.hls.files`) and the layers' typed parameters (each
layer kind renders its ``CONFIG_T`` members, :mod:`qfx_onnx.hls.kinds`); nothing is spliced into
existing text. Identifiers come from the model (already sanitized); raw ONNX names
never appear in C++, not even in comments.

Constants are exact: each value is written as the exact decimal expansion of ``code * 2**-F``
(finite, since the denominator is a power of two); with at most 53 significant bits it is an exact
double literal, which converts to its ``ap_fixed`` type without rounding.
"""

from __future__ import annotations

import numpy as np

from qfx_onnx.hls.cpp import exact_decimal, indent, lines, render_chain, render_khot_helpers, render_op  # noqa: F401 (re-exported)
from qfx_onnx.hls.files import render
from qfx_onnx.hls.kinds import LAYER_KINDS
from qfx_onnx.hls.model import Constant, Layer
from qfx_onnx.nonlinear.cpp_emit import HEADER as NONLINEAR_HEADER
from qfx_onnx.nonlinear.cpp_emit import table_struct




# ------------------------------------------------------------------------------------ defines.h
def render_defines(p: dict) -> str:
    return render("defines.h.j2", ctypes=p["ctypes"], ports=p["ports"])


def render_weight(c: Constant) -> str:
    t = c.ctype.type
    values = [exact_decimal(v, t.frac) for v in c.codes.tolist()]
    return render("weight.h.j2", c=c, t=t, shape=str(list(c.shape)), guard=f"QFX_W_{c.ident.upper()}_H_",
                  values=lines(values))


def render_config(layer: Layer, options: dict) -> tuple[str, set[str]]:
    """The ``config_<layer>`` struct(s) of ``layer`` (its kind's members, then the fused
    element-wise ``epilogue``) and the K-hot sign patterns it uses."""
    members, extra, patterns = LAYER_KINDS[layer.kind].config(layer, options)
    tables = [table_struct(s.lookup, s.ident) for s in layer.steps if s.kind == "table"]  # before their use
    members = [f"typedef {layer.head_type.ident} head_t;", f"typedef {layer.output.ctype.ident} res_t;",
               f"static const int reuse_factor = {options['reuse_factor']};"] + members
    chain, last = render_chain(layer.steps, layer.head_type)
    members.append(f"static res_t epilogue(const head_t &v0, int i) {{\n#pragma HLS INLINE\n"
                   f"{indent(chain + [f'return {last};'], 2)}\n}}")
    struct = f"struct config_{layer.ident} {{\n{indent(members, 2)}\n}};"
    return "\n\n".join(tables + [struct] + extra), patterns


def render_parameters(p: dict) -> str:
    includes = "\n".join(f'#include "weights/{c.ident}.h"' for c in p["constants"])
    configs, patterns = [], set()
    for layer in p["layers"]:
        if LAYER_KINDS[layer.kind].config is not None:  # fanout2 needs no configuration
            text, used = render_config(layer, p)
            configs.append(f"// {layer.ident}: {layer.kind} ({layer.op})\n{text}")
            patterns |= used
    return render("parameters.h.j2", headers=kind_headers(p["layers"]), includes=includes,
                  helpers=render_khot_helpers(patterns), configs="\n\n".join(configs))


def kind_headers(layers: list[Layer]) -> list[str]:
    """The header files of the layer kinds ``layers`` use beyond ``layers.h``, in first-use order."""
    out: list[str] = []
    for layer in layers:
        names = [LAYER_KINDS[layer.kind].header]
        if any(s.kind == "table" for s in layer.steps):  # qfx_nl::table_lookup of a compact table
            names.append(NONLINEAR_HEADER)
        out += [name for name in names if name is not None and name not in out]
    return out


def render_top_h(p: dict) -> str:
    guard = f"QFX_{p['top'].upper()}_H_"
    return render("top.h.j2", top=p["top"], guard=guard, signature=_signature(p))


def _signature(p: dict) -> str:
    if p["io"] == "stream":
        args = [f"hls::stream<{b.ctype.ident}> &{b.ident}" for b in p["inputs"]]
        args += [f"hls::stream<{b.ctype.ident}> &{b.ident}" for b in p["outputs"]]
    else:
        args = [f"const {b.ctype.ident} {b.ident}[{b.size}]" for b in p["inputs"]]
        args += [f"{b.ctype.ident} {b.ident}[{b.size}]" for b in p["outputs"]]
    return ", ".join(args)


def render_top_cpp(p: dict) -> str:
    ports = {b.ident for b in p["inputs"]} | {b.ident for b in p["outputs"]}
    body: list[str] = []
    if p["io"] == "stream":
        body += [f"#pragma HLS INTERFACE axis port = {b.ident}" for b in p["inputs"] + p["outputs"]]
        body += ["#pragma HLS DATAFLOW", ""]
        rename = {b.ident: p["aux_names"][b.ident + ":buf"] for b in p["inputs"] + p["outputs"]}
        for b in p["inputs"] + p["outputs"]:
            body.append(f"{b.ctype.ident} {rename[b.ident]}[{b.size}];")
        for b in p["inputs"]:
            body.append(f"qfx::read_stream<{b.ctype.ident}, {b.size}>({b.ident}, {rename[b.ident]});")
    else:
        body += [f"#pragma HLS INTERFACE ap_vld port = {b.ident}" for b in p["inputs"] + p["outputs"]]
        body += [f"#pragma HLS ARRAY_PARTITION variable = {b.ident} complete" for b in p["inputs"] + p["outputs"]]
        body.append("")
        rename = {}
    for buf in p["buffers"]:
        if buf.ident not in ports:
            body.append(f"{buf.ctype.ident} {buf.ident}[{buf.size}];")
            if p["io"] == "parallel" and p["reuse_factor"] == 1:
                body.append(f"#pragma HLS ARRAY_PARTITION variable = {buf.ident} complete")
    body.append("")
    def array(b) -> str:  # the array holding buffer or constant b in the top function
        return rename.get(b.ident, b.ident)

    for layer in p["layers"]:
        body.append(f"// {layer.ident}: {layer.kind}")
        body += LAYER_KINDS[layer.kind].call(layer, f"config_{layer.ident}", array)
    if p["io"] == "stream":
        body.append("")
        for b in p["outputs"]:
            body.append(f"qfx::write_stream<{b.ctype.ident}, {b.size}>({rename[b.ident]}, {b.ident});")
    return render("top.cpp.j2", top=p["top"], signature=_signature(p), body=indent(body, 2))


# ------------------------------------------------------------------------------------ testbench
def render_testbench(p: dict) -> str:
    decls, sets, checks = [], [], []
    offset = 0
    for b in p["inputs"]:
        t = b.ctype.type
        decls.append(f"{b.ctype.ident} {b.ident}[{b.size}];")
        sets.append(f"for (int k = 0; k < {b.size}; k++) {b.ident}[k].range({t.width - 1}, 0) = "
                    f"(unsigned long long)in[{offset} + k];")
        offset += b.size
    n_in = offset
    offset = 0
    for j, b in enumerate(p["outputs"]):
        t = b.ctype.type
        decls.append(f"{b.ctype.ident} {b.ident}[{b.size}];")
        checks.append(f"for (int k = 0; k < {b.size}; k++) "
                      f"check(vectors, {j}, k, {b.ident}[k].range({t.width - 1}, 0).to_uint64(), ex[{offset} + k], "
                      f"{t.width}, {'true' if t.signed else 'false'});")
        offset += b.size
    n_out = offset
    if p["io"] == "stream":
        s = {b.ident: p["aux_names"][b.ident + ":stream"] for b in p["inputs"] + p["outputs"]}
        streams = [f"hls::stream<{b.ctype.ident}> {s[b.ident]};" for b in p["inputs"] + p["outputs"]]
        feed = [f"for (int k = 0; k < {b.size}; k++) {s[b.ident]}.write({b.ident}[k]);" for b in p["inputs"]]
        drain = [f"for (int k = 0; k < {b.size}; k++) {b.ident}[k] = {s[b.ident]}.read();" for b in p["outputs"]]
        call = [f"{p['top']}({', '.join(s[b.ident] for b in p['inputs'] + p['outputs'])});"]
        run = streams + feed + call + drain
    else:
        run = [f"{p['top']}({', '.join(b.ident for b in p['inputs'] + p['outputs'])});"]
    return render("tb.cpp.j2", top=p["top"], n_in=n_in, n_out=n_out, body=indent(decls + sets + run + checks, 4))


def render_codes(rows: np.ndarray) -> str:
    return "".join(" ".join(str(int(v)) for v in row) + "\n" for row in rows)


# ------------------------------------------------------------------------------------ build.tcl
def render_build_tcl(p: dict) -> str:
    return render("build.tcl.j2", top=p["top"], part=p["part"], clock_ns=p["clock_ns"])


# ------------------------------------------------------------------------------------ README
def render_readme(p: dict) -> str:
    from qfx_onnx.hls.estimate import __doc__ as model_doc

    rows = "\n".join(
        f"| {e['layer']} | {e['kind']} | {e['op']} | {', '.join(e['multiplies']) or '-'} | {e['multipliers']} | "
        f"{sum(m['count'] for m in e['multiplies'].values())} | {e['dsp']} | {e['lut']} | "
        f"{e['shift_add_terms']} | {e['weight_bits']} | {e['bram18']} | {e['latency']} |"
        for e in p["report"]["layers"])
    products = sum(m["count"] for e in p["report"]["layers"] for m in e["multiplies"].values())
    t = p["report"]["totals"]
    ports_in = ", ".join(f"`{b.ident}` ({b.size} x `{b.ctype.type}`)" for b in p["inputs"])
    ports_out = ", ".join(f"`{b.ident}` ({b.size} x `{b.ctype.type}`)" for b in p["outputs"])
    return render("README.md.j2", top=p["top"], io=p["io"], reuse_factor=p["reuse_factor"], part=p["part"],
                  clock_ns=p["clock_ns"], n_vectors=p["n_vectors"], ports_in=ports_in, ports_out=ports_out,
                  rows=rows, products=products, totals=t, model_doc=model_doc.strip())
