"""Derived lossless types at the extremes: every intermediate type that type propagation
(:mod:`qfx_onnx.quant.typeprop`) or the K-hot shift-add emission derives holds the exact result when
every operand sits at an end of its type, and the same type one integer bit narrower does not.

Random data never reaches these ends (an accumulator one bit too narrow passed every other test),
so each case feeds operands at their types' minimum and maximum codes, in sign pairings that reach
both the largest and the most negative result. For each checked node:

* the emulation's float64 value equals an independent computation (numpy on the operand values;
  every value here is exact in float64), and the extreme result is among its values;
* every value is a code of the derived type (on its grid, inside its range);
* some value lies outside the type one integer bit narrower (``W-1, I-1``): the bound is tight;
* the real ``ap_fixed.h`` agrees: accumulating the extreme element's operands with the header's own
  ``*`` and ``+=`` into the derived type gives the exact value, and into the narrower type does not
  (one generated C++ program, compiled once per session).

Layer kinds: dense (Gemm with and without bias, MatMul), conv (with bias), depthwise conv, average
pool and global average pool (the sums and the multiply by the reciprocal), BatchNorm (``x*a`` and
``+ b``), Add, Sub, and the K-hot shift operand type of :func:`qfx_onnx.hls.shift_add.khot_term_type`.
"""

from __future__ import annotations

import math
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from qfx_onnx.fixed.types import FixedType
from qfx_onnx.hls.aptypes import compile_cpp, find_ap_types_include
from qfx_onnx.hls.fxutil import record_values
from qfx_onnx.hls.model import Constant, CType
from qfx_onnx.hls.shift_add import csd_digits, khot_term_type
from qfx_onnx.importer import load_onnx
from qfx_onnx.ir.ops import op_of
from qfx_onnx.quant.quantize import find_cast_sites, quantize_with_types
from qfx_onnx.quant.typeprop import propagate

from onnx_builders import node_model

pytestmark = pytest.mark.usefixtures("one_thread")

X = FixedType.parse("ap_fixed<6,2>")  # data, signed: codes -32..31, values -2 .. 1.9375
U = FixedType.parse("ap_ufixed<6,2>")  # data after a ReLU: codes 0..63, values 0 .. 3.9375
W = FixedType.parse("ap_fixed<5,1>")  # weights: codes -16..15, values -1 .. 0.9375
ACC8 = FixedType.parse("ap_fixed<14,6>")  # the lossless accumulator of 8 products of U (or X) and W
OUT = FixedType.parse("ap_fixed<32,16,AP_RND,AP_SAT>")  # every other cast; never looked at


def lo(t: FixedType) -> float:
    return t.min_value


def hi(t: FixedType) -> float:
    return t.max_value


def narrower(t: FixedType) -> FixedType:
    """The same type with one integer bit (and so one bit of width) less."""
    return FixedType(t.width - 1, t.integer - 1, signed=t.signed)


def codes_of(values: np.ndarray, t: FixedType) -> np.ndarray | None:
    """The codes of ``values`` in ``t``, or None when one is off the grid or outside the range."""
    scaled = np.ldexp(np.asarray(values, dtype=np.float64), t.frac)
    if not np.array_equal(scaled, np.round(scaled)):
        return None
    if scaled.min() < t.int_min or scaled.max() > t.int_max:
        return None
    return scaled.astype(np.int64)


# ----------------------------------------------------------------------------- the extremes
@dataclass(frozen=True)
class Extreme:
    """One extreme result written out for the C++ check: ``terms`` copies of ``a * b`` (or of
    ``a`` when ``b`` is None) plus each ``(type, value, sign)`` addend."""

    a: tuple[FixedType, float]
    b: tuple[FixedType, float] | None = None
    terms: int = 1
    addends: tuple[tuple[FixedType, float, int], ...] = ()

    @property
    def value(self) -> float:
        term = self.a[1] * (self.b[1] if self.b else 1.0)
        return self.terms * term + sum(sign * v for _, v, sign in self.addends)


@dataclass(frozen=True)
class Check:
    op: str  # the typeprop op name of the node whose derived type is checked
    want: np.ndarray  # its exact values, computed with numpy from the operand values
    extreme: Extreme  # the element that needs every bit of the derived type


@dataclass
class Case:
    model: onnx.ModelProto
    types: dict[str, FixedType]  # tensor -> type; every other cast gets OUT
    feeds: tuple[np.ndarray, ...]
    checks: list[Check] = field(default_factory=list)


def _rows(t: FixedType, n: int) -> np.ndarray:
    """Two rows: every element at the type's minimum, then every element at its maximum."""
    return np.array([[lo(t)] * n, [hi(t)] * n])


def gemm(x_t: FixedType, bias_t: FixedType | None) -> Case:
    x = _rows(x_t, 8)
    w = _rows(W, 8)  # filter 0 all at W's minimum, filter 1 all at its maximum
    inputs = [("x", (2, 8)), ("w", w.astype(np.float32))]
    types = {"x": x_t, "w": W}
    acc = x @ w.T
    if bias_t is None:
        big = Extreme((x_t, lo(x_t)), (W, lo(W)), 8) if x_t.signed else Extreme((x_t, hi(x_t)), (W, lo(W)), 8)
    else:
        b = np.array([lo(bias_t), hi(bias_t)])
        inputs.append(("b", b.astype(np.float32)))
        types["b"] = bias_t
        acc = acc + b
        big = Extreme((x_t, hi(x_t)), (W, lo(W)), 8, ((bias_t, lo(bias_t), 1),))
    return Case(node_model("Gemm", inputs, transB=1), types, (x,), [Check("gemm", acc, big)])


def matmul() -> Case:
    x = _rows(U, 4)
    w = _rows(W, 4).T  # column 0 at W's minimum, column 1 at its maximum
    model = node_model("MatMul", [("x", (2, 4)), ("w", w.astype(np.float32))])
    return Case(model, {"x": U, "w": W}, (x,), [Check("matmul", x @ w, Extreme((U, hi(U)), (W, lo(W)), 4))])


def conv(x_t: FixedType, group: int, bias: bool, channels: int = 2, k: int = 2) -> Case:
    """``channels`` of kxk in, 2 filters of kxk (depthwise with ``group=2``), one output pixel."""
    x = np.stack([np.full((channels, k, k), lo(x_t)), np.full((channels, k, k), hi(x_t))])
    per_filter = channels // group
    w = np.stack([np.full((per_filter, k, k), lo(W)), np.full((per_filter, k, k), hi(W))])
    inputs = [("x", (2, channels, k, k)), ("w", w.astype(np.float32))]
    types = {"x": x_t, "w": W}
    terms = per_filter * k * k
    xg = x.reshape(2, group, terms)
    acc = np.einsum("ngk,gk->ng", xg, w.reshape(group, terms)) if group > 1 else \
        x.reshape(2, -1) @ w.reshape(2, -1).T
    x_end = lo(x_t) if x_t.signed else hi(x_t)
    big = Extreme((x_t, x_end), (W, lo(W)), terms)
    if bias:
        # filter 0's bias at the end its products' sum reaches (the top for signed x, else the bottom)
        bias_t = FixedType.parse("ap_fixed<13,5>")
        b = np.array([hi(bias_t), lo(bias_t)] if x_t.signed else [lo(bias_t), hi(bias_t)])
        inputs.append(("b", b.astype(np.float32)))
        types["b"] = bias_t
        acc = acc + b
        big = Extreme((x_t, x_end), (W, lo(W)), terms, ((bias_t, b[0], 1),))
    model = node_model("Conv", inputs, kernel_shape=[k, k], group=group)
    return Case(model, types, (x,), [Check("conv", acc.reshape(2, 2, 1, 1), big)])


def average_pool(x_t: FixedType, global_: bool) -> Case:
    x = np.stack([np.full((1, 2, 2), lo(x_t)), np.full((1, 2, 2), hi(x_t))])
    recip = FixedType.parse("ap_ufixed<3,-1>")  # 0.25 exactly
    if global_:
        model = node_model("GlobalAveragePool", [("x", (2, 1, 2, 2))])
        op, recip_name = "reduce_sum", "globalaveragepool_node::recip"
    else:
        model = node_model("AveragePool", [("x", (2, 1, 2, 2))], kernel_shape=[2, 2])
        op, recip_name = "sum_pool", "averagepool_node::recip"
    sums = x.sum(axis=(2, 3), keepdims=True)
    end = lo(x_t) if x_t.signed else hi(x_t)
    checks = [Check(op, sums, Extreme((x_t, end), None, 4)),
              Check("mul", sums * 0.25, Extreme((x_t, end), (recip, 0.25), 4))]
    return Case(model, {"x": x_t, recip_name: recip}, (x,), checks)


def batch_norm() -> Case:
    """``x*a + b`` per channel: a at W's minimum and maximum, b at the ends of the product type."""
    x = np.array([lo(X), hi(X)]).reshape(2, 1, 1, 1) * np.ones((2, 2, 1, 1))
    a = np.array([lo(W), hi(W)])
    prod_t = FixedType.parse("ap_fixed<11,3>")  # mul_type(X, W)
    b = np.array([hi(prod_t), lo(prod_t)])
    model = node_model("BatchNormalization", [("x", (2, 2, 1, 1)), ("g", a.astype(np.float32)),
                                              ("beta", b.astype(np.float32)), ("mean", np.zeros(2, np.float32)),
                                              ("var", np.ones(2, np.float32))], epsilon=0.0)
    types = {"x": X, "batchnormalization_node::scale": W, "batchnormalization_node::shift": prod_t}
    prod = x * a.reshape(1, 2, 1, 1)
    return Case(model, types, (x,), [
        Check("mul", prod, Extreme((X, lo(X)), (W, lo(W)))),
        Check("add", prod + b.reshape(1, 2, 1, 1), Extreme((X, lo(X)), (W, lo(W)), 1, ((prod_t, hi(prod_t), 1),))),
    ])


def binary(op_type: str, x_t: FixedType, y_t: FixedType) -> Case:
    """Add or Sub of two graph inputs; rows pair every end of x with every end of y."""
    pairs = [(lo(x_t), lo(y_t)), (lo(x_t), hi(y_t)), (hi(x_t), lo(y_t)), (hi(x_t), hi(y_t))]
    x = np.array([[p[0]] * 3 for p in pairs])
    y = np.array([[p[1]] * 3 for p in pairs])
    model = node_model(op_type, [("x", (4, 3)), ("y", (4, 3))], outputs=("out",))
    if op_type == "Add":
        want = x + y
        big = Extreme((x_t, lo(x_t)), None, 1, ((y_t, lo(y_t), 1),)) if x_t.signed and y_t.signed else \
            Extreme((x_t, hi(x_t)), None, 1, ((y_t, hi(y_t), 1),))
    else:
        want = x - y
        big = Extreme((x_t, lo(x_t)), None, 1, ((y_t, hi(y_t), -1),))
    return Case(model, {"x": x_t, "y": y_t}, (x, y), [Check(op_type.lower(), want, big)])


CASES = {
    "dense": lambda: gemm(X, None),
    "dense_unsigned_bias": lambda: gemm(U, ACC8),
    "matmul": matmul,
    "conv": lambda: conv(X, 1, False),
    "conv_unsigned_bias": lambda: conv(U, 1, True),
    "conv_9_terms_unsigned": lambda: conv(U, 1, False, channels=1, k=3),  # not a power of two
    "depthwise_conv": lambda: conv(X, 2, False),
    "depthwise_conv_bias": lambda: conv(X, 2, True),
    "average_pool": lambda: average_pool(X, False),
    "average_pool_unsigned": lambda: average_pool(U, False),
    "global_average_pool": lambda: average_pool(X, True),
    "global_average_pool_unsigned": lambda: average_pool(U, True),
    "batch_norm": batch_norm,
    "add": lambda: binary("Add", X, X),
    "add_mixed_signs": lambda: binary("Add", U, X),
    "sub": lambda: binary("Sub", X, X),
    "sub_unsigned": lambda: binary("Sub", U, U),
}
NOT_TIGHT = {("average_pool", "mul"), ("average_pool_unsigned", "mul"), ("global_average_pool", "mul"),
             ("global_average_pool_unsigned", "mul")}  # times a constant 1/4: the rule cannot know it


def derived(name: str) -> list[tuple[Check, FixedType, np.ndarray]]:
    """(check, the derived type of its node, the emulation's values) for every check of a case."""
    case = CASES[name]()
    gm = load_onnx(case.model)
    fpm = quantize_with_types(gm, {s.tensor: case.types.get(s.tensor, OUT) for s in find_cast_sites(gm)})
    inputs = tuple(torch.from_numpy(f) for f in case.feeds)
    info = propagate(fpm.graph_module, inputs)
    values = record_values(fpm.graph_module, inputs)
    out = []
    for check in case.checks:
        nodes = [n for n in fpm.graph_module.graph.nodes
                 if n.op == "call_function" and getattr(op_of(n.target), "name", None) == check.op]
        assert len(nodes) == 1, f"{name}: {len(nodes)} {check.op} nodes"
        out.append((check, info[nodes[0]].type, values[nodes[0]].numpy()))
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_derived_type_holds_the_extremes_and_is_tight(name):
    for check, t, got in derived(name):
        where = f"{name} {check.op}: {t}"
        assert t is not None, where
        np.testing.assert_array_equal(got, check.want, err_msg=f"{where}: the emulation is not exact")
        assert check.extreme.value in (check.want.min(), check.want.max()), where
        assert codes_of(check.want, t) is not None, f"{where} does not hold {check.want.ravel().tolist()}"
        if (name, check.op) in NOT_TIGHT:
            continue
        assert codes_of(check.want, narrower(t)) is None, f"{where}: {narrower(t)} holds it too (not tight)"
        assert codes_of(np.array([check.extreme.value]), narrower(t)) is None, where


# ------------------------------------------------------------------------------------ K-hot
def khot_constant(codes: list[int], t: FixedType) -> Constant:
    return Constant("w", CType("w_t", t, "weight"), np.array(codes, dtype=np.int64), (1, len(codes)), khot=2)


def khot_products(x_t: FixedType, w: Constant) -> tuple[FixedType, list[float]]:
    """The term type and every ``x * 2**e`` a shift-add emits for x at both ends of ``x_t``."""
    term_t = khot_term_type(x_t, w)
    shifts = {p - w.ctype.type.frac for c in w.codes.tolist() if c for _, p in csd_digits(c)}
    return term_t, [math.ldexp(x, e) for x in (lo(x_t), hi(x_t)) for e in shifts]


KHOT = {  # weight codes of ap_fixed<6,3> (frac 3): digits from 2**4 down to 2**0, so shifts +1 .. -3
    "signed": (X, [12, -16, 1, 0]),
    "unsigned": (U, [12, -16, 1, 0]),
    "right_shifts_only": (X, [1, 3, -2]),
}


@pytest.mark.parametrize("name", sorted(KHOT))
def test_khot_shift_operand_type_holds_every_shifted_extreme(name):
    x_t, codes = KHOT[name]
    term_t, shifted = khot_products(x_t, khot_constant(codes, FixedType.parse("ap_fixed<6,3>")))
    assert codes_of(np.array(shifted), term_t) is not None, f"{term_t} does not hold {shifted}"
    # shl<T>(x, s) is T(x) << s: T must hold x itself too
    assert codes_of(np.array([lo(x_t), hi(x_t)]), term_t) is not None


@pytest.mark.xfail(strict=True, reason="khot_term_type keeps one spare integer bit (harmless: it is only wider)")
@pytest.mark.parametrize("name", ["signed", "unsigned"])
def test_khot_shift_operand_type_is_tight(name):
    x_t, codes = KHOT[name]
    term_t, shifted = khot_products(x_t, khot_constant(codes, FixedType.parse("ap_fixed<6,3>")))
    assert codes_of(np.array(shifted), narrower(term_t)) is None, f"{narrower(term_t)} holds {shifted} too"


# ------------------------------------------------------------------------------- the header
def _cpp_value(t: FixedType, v: float) -> str:
    return f"{t.with_modes()}({float(v)!r})"


def _cpp_block(tag: str, e: Extreme, r: FixedType, n: FixedType) -> str:
    term = _cpp_value(*e.a) + (f" * {_cpp_value(*e.b)}" if e.b else "")
    lines = [f"  {{ {r.with_modes()} r = 0; {n.with_modes()} n = 0;",
             f"    for (int k = 0; k < {e.terms}; k++) {{ r += {term}; n += {term}; }}"]
    for t, v, sign in e.addends:
        op = "+=" if sign > 0 else "-="
        lines.append(f"    r {op} {_cpp_value(t, v)}; n {op} {_cpp_value(t, v)};")
    lines.append(f'    printf("{tag} %.17g %.17g\\n", r.to_double(), n.to_double()); }}')
    return "\n".join(lines)


@pytest.fixture(scope="module")
def header_results(tmp_path_factory) -> dict[str, tuple[float, float, float]]:
    """tag -> (exact value, C++ result in the derived type, C++ result one integer bit narrower)."""
    blocks, exact = [], {}
    for name in sorted(CASES):
        for check, t, _ in derived(name):
            if (name, check.op) in NOT_TIGHT:
                continue
            tag = f"{name}.{check.op}"
            blocks.append(_cpp_block(tag, check.extreme, t, narrower(t)))
            exact[tag] = check.extreme.value
    for name, (x_t, codes) in sorted(KHOT.items()):
        w = khot_constant(codes, FixedType.parse("ap_fixed<6,3>"))
        term_t = khot_term_type(x_t, w)
        wide = FixedType(term_t.width + 8, term_t.integer + 8)  # a sum that cannot overflow
        for k, code in enumerate(c for c in codes if c):
            for end, x in (("lo", lo(x_t)), ("hi", hi(x_t))):
                # the emitted form: each digit's shift of T(x), summed with its sign (qfx::khot_*)
                tag = f"khot.{name}.{code}.{end}"
                shifts = " ".join(f"s {'+' if sign > 0 else '-'}= {('(T(x) << %d)' % e) if e >= 0 else ('(T(x) >> %d)' % -e)};"
                                  for sign, p in csd_digits(code) for e in [p - w.ctype.type.frac])
                blocks.append(f"  {{ typedef {term_t.with_modes()} T; {x_t.with_modes()} x = {float(x)!r}; "
                              f"{wide.with_modes()} s = 0; {shifts}\n"
                              f'    printf("{tag} %.17g %.17g\\n", s.to_double(), s.to_double()); }}')
                exact[tag] = x * code * w.ctype.type.lsb
    source = '#include <cstdio>\n#include "ap_fixed.h"\n\nint main() {\n' + "\n".join(blocks) + "\n  return 0;\n}\n"
    work = tmp_path_factory.mktemp("derived_cpp")
    (work / "derived.cpp").write_text(source)
    binary = compile_cpp([work / "derived.cpp"], work / "derived", [find_ap_types_include()], ("-O0", "-w"))
    proc = subprocess.run([str(binary)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = {}
    for line in proc.stdout.splitlines():
        tag, r, n = line.split(" ")
        got[tag] = (exact[tag], float(r), float(n))
    assert set(got) == set(exact)
    return got


def test_the_header_holds_the_extremes_in_the_derived_type_and_not_one_bit_less(header_results):
    wrong = [f"{tag}: exact {e}, derived type gives {r}" for tag, (e, r, _) in header_results.items() if r != e]
    loose = [f"{tag}: {e} survives one integer bit less" for tag, (e, _, n) in header_results.items()
             if n == e and not tag.startswith("khot.")]
    assert not wrong, "ap_fixed.h overflows the derived type:\n" + "\n".join(wrong)
    assert not loose, "the derived type is wider than it needs to be:\n" + "\n".join(loose)
    assert len(header_results) > 20
