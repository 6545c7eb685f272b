"""C++ text helpers shared by the file renderers and the layer kinds: exact literals, the fused
element-wise chain (each op's statements come from its IR definition), K-hot shift-add bodies,
integer members and index-table functions of ``CONFIG_T`` structs."""

from __future__ import annotations

import textwrap

import numpy as np

from qfx_onnx.hls.model import CType, Layer, Operand, Step
from qfx_onnx.hls.shift_add import csd_digits
from qfx_onnx.ir.ops import IR_OPS

VALUES_PER_LINE = 8


def exact_decimal(code: int, frac: int) -> str:
    """The exact decimal text of ``code * 2**-frac`` as a C++ floating literal (``-0.2890625``)."""
    code = int(code)
    if frac <= 0:
        return f"{code << -frac}.0"
    sign = "-" if code < 0 else ""
    digits = str(abs(code) * 5**frac).rjust(frac + 1, "0")
    whole, part = digits[:-frac], digits[-frac:].rstrip("0")
    return f"{sign}{whole}.{part or '0'}"


def lines(items: list[str], per_line: int = VALUES_PER_LINE, indent: str = "    ") -> str:
    rows = [", ".join(items[i:i + per_line]) for i in range(0, len(items), per_line)]
    return (",\n").join(indent + r for r in rows)


def _operand(o: Operand, value: str, data_names: tuple[str, ...]) -> str | None:
    if o.kind == "value":
        return value
    if o.kind == "const":
        return f"{o.const.ident}[{o.index}]"
    if o.kind == "data":
        return f"{data_names[o.data]}[{o.index}]"
    return None


def render_op(step: Step, var: str, value: str, data_names: tuple[str, ...] = ("a", "b", "c")) -> list[str]:
    """C++ statements computing ``step`` exactly into ``<T> var``: the IR op's own ``hls.cpp`` rule
    (:mod:`qfx_onnx.ir.defs`) on the operand expressions and the idents of its temporaries' types."""
    args = [_operand(o, value, data_names) for o in step.operands]
    form = IR_OPS[step.op].hls
    return form.cpp(step.out.ident, var, args, {key: ct.ident for key, ct in step.temps.items()})


def render_chain(steps: list[Step], head: CType) -> tuple[list[str], str]:
    """Statements of the fused element-wise chain from ``v0`` (of type ``head``); the last variable."""
    lines, value, value_t = [], "v0", head.type
    for k, step in enumerate(steps, 1):
        var = f"v{k}"
        if step.kind == "cast":
            lines.append(f"{step.out.ident} {var} = qfx::cast<{step.out.ident}>({value});")
        elif step.kind == "lut":
            w = value_t.width
            lines.append(f"ap_uint<{w}> {var}_k = {value}.range({w - 1}, 0);")
            lines.append(f"{step.out.ident} {var} = {step.table.ident}[{var}_k.to_uint()];")
        elif step.kind == "table":  # the emulation's order: index cast, table, the op's cast
            s = step.ident
            lines.append(f"{s}::in_t {var}_x = qfx::cast<{s}::in_t>({value});")
            lines.append(f"{step.out.ident} {var} = qfx::cast<{step.out.ident}>(qfx_nl::table_lookup<{s}>({var}_x));")
        else:
            lines += render_op(step, var, value)
        value, value_t = var, step.out.type
    return lines, value


def indent(lines: list[str], n: int) -> str:
    return textwrap.indent("\n".join(lines), " " * n)


def _shifted(k: int, shift: int) -> str:
    return f"x{k}_{'l' if shift >= 0 else 'r'}{abs(shift)}"


def render_mac(layer: Layer, term_t: str, x: str) -> tuple[list[str], set[str]]:
    """Unrolled shift-add products of a K-hot layer, no multiplier; also the sign patterns used.

    Each input is shifted once per digit exponent it needs (``x3_l2 = T(x[3]) << 2``, ``r`` for a
    right shift), then each product is the signed sum of its digits' shifted inputs:
    ``khot_pm(acc[3], x3_l2, x3_r1)`` is ``acc[3] += x3_l2 - x3_r1`` (the code 2**2 - 2**-1 in
    weight LSBs; one small template per sign pattern keeps g++'s overload resolution cheap). A
    group is exactly one product, so every partial sum stays within the lossless accumulator.
    """
    w = layer.weight
    codes = w.codes.reshape(w.shape[0], -1)
    p = layer.params
    frac = w.ctype.type.frac
    used: dict[int, set[int]] = {}
    products, patterns = [], set()
    for o in range(codes.shape[0]):
        g = o // p.filt_per_group if layer.kind == "conv" else 0
        base = g * p.chan_per_group * p.window.k_h * p.window.k_w if layer.kind == "conv" else 0
        for k in np.flatnonzero(codes[o]).tolist():
            src = base + k
            digits = csd_digits(int(codes[o, k]))
            pattern = "".join("p" if sign > 0 else "m" for sign, _ in digits)
            patterns.add(pattern)
            terms = []
            for _, pos in digits:
                used.setdefault(src, set()).add(pos - frac)
                terms.append(_shifted(src, pos - frac))
            products.append(f"qfx::khot_{pattern}(acc[{o}], {', '.join(terms)});")
    decls = []
    for src in sorted(used):
        for shift in sorted(used[src]):
            fn = "shl" if shift >= 0 else "shr"
            decls.append(f"const {term_t} {_shifted(src, shift)} = qfx::{fn}<{term_t}>({x}[{src}], {abs(shift)});")
    return decls + products, patterns


def render_khot_helpers(patterns: set[str]) -> str:
    """``qfx::khot_<signs>(acc, a, b, ...)``: ``acc += a - b ...`` for each sign pattern used."""
    out = []
    for pat in sorted(patterns):
        names = [chr(ord("a") + j) for j in range(len(pat))]
        params = ", ".join(f"const T &{n}" for n in names)
        expr = "".join((" + " if j else "") + n if sgn == "p" else (" - " if j else "-") + n
                       for j, (sgn, n) in enumerate(zip(pat, names)))
        out.append(f"template <class A, class T> inline void khot_{pat}(A &acc, {params}) {{ acc += {expr}; }}")
    return "namespace qfx {\n" + "\n".join(out) + "\n}  // namespace qfx" if out else ""


def ints(names: tuple[str, ...], values: dict) -> list[str]:
    """``static const int <name> = <value>;`` for each of ``names``."""
    return [f"static const int {k} = {int(values[k])};" for k in names]


def table_fn(fn: str, var: str, values: np.ndarray) -> str:
    table = lines([str(v) for v in values.tolist()], 16, "      ")
    return (f"static int {fn}(int {var}) {{\n    static const int table[{values.size}] = {{\n{table}\n    }};\n"
            f"    return table[{var}];\n  }}")


WINDOW = ("in_h", "in_w", "out_h", "out_w", "k_h", "k_w", "stride_h", "stride_w", "pad_top", "pad_left", "dil_h", "dil_w")
