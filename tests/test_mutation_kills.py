"""Tests written to kill the mutants that survived ``benchmarks/mutation.py``.

Each test names the mutant(s) it kills; each one fails with that mutant applied and passes on the
real code (checked by re-running the mutation script with ``--only``).
"""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import test_derived_types as dt
from onnx_builders import node_model
from qfx_onnx.errors import ExportError
from qfx_onnx.fixed import FixedType, OverflowMode, QuantMode, cast
from qfx_onnx.hls.estimate import dsp_per_product
from qfx_onnx.hls.project import export_hls
from qfx_onnx.hls.shift_add import khot_weight
from qfx_onnx.importer import load_onnx
from qfx_onnx.quant.quantize import quantize_graph
from qfx_onnx.quant.typeprop import exact_type_of

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------- cast: float32 beyond 24 bits
def _wide_values(t: FixedType, rng: np.random.Generator) -> torch.Tensor:
    """float32 values around a 25- or 26-bit type: random codes beyond 24 bits, ties, range ends."""
    codes = np.concatenate([rng.integers(-(2**(t.width + 1)), 2**(t.width + 1), 300),
                            [t.int_max, t.int_max + 1, t.int_min, t.int_min - 1, 2**t.width, -(2**t.width)]])
    codes = codes.astype(np.float64)
    return torch.tensor(np.concatenate([codes, codes + 0.5]) * t.lsb, dtype=torch.float32)


@pytest.mark.parametrize("width", [25, 26])
@pytest.mark.parametrize("signed", [True, False])
def test_float32_cast_of_a_wide_type_is_the_float64_cast_rounded(width, signed):
    """cast() promises float32 results "rounded to nearest" for types wider than 24 bits: the same
    as the exact float64 cast rounded once. Kills ``cast_float32_w25`` (float32 work dtype at
    W = 25, where ``fl + 0.5`` and the code bounds are no longer exact in float32)."""
    rng = np.random.default_rng([width, signed])
    for q, o in itertools.product(QuantMode, OverflowMode):
        t = FixedType(width, 5, signed, q, o)
        x = _wide_values(t, rng)
        got = cast(x, t)
        assert got.dtype == torch.float32
        assert torch.equal(got, cast(x.double(), t).float()), t


# -------------------------------------------------------------- typeprop: uncast constants
@pytest.mark.parametrize("values", [[-3.0], [-0.75, 0.5], [-4.0, 3.0], [-5.0, 1.25], [0.375, 7.0], [-1.0, 0.0], [0.0]])
def test_exact_type_of_holds_the_constants_and_is_the_narrowest(values):
    """The type given to an uncast constant holds every value, and one integer bit less does not
    (a signed type needs its sign bit). Kills ``prop_exact_sign_bit``.

    Not tight when every value is negative: ``[-1.0]`` gets ``ap_fixed<2,2>`` where ``ap_fixed<1,1>``
    holds it (``int(hi).bit_length()`` of a negative maximum counts a bit), a harmless spare bit.
    """
    v = np.array(values)
    t = exact_type_of(v)
    assert t is not None and t.signed == bool((v < 0).any())
    assert dt.codes_of(v, t) is not None, f"{t} does not hold {values}"
    if t.width > 1:
        assert dt.codes_of(v, dt.narrower(t)) is None, f"{dt.narrower(t)} holds {values} too"


# --------------------------------------------------------- typeprop: accumulators at extremes
def _check_case(case: dt.Case, op: str) -> None:
    """The derived type of the one ``op`` node holds the exact extreme result, tightly (the same
    checks as tests/test_derived_types.py, for cases of its kind that it does not build)."""
    gm = dt.load_onnx(case.model)
    fpm = dt.quantize_with_types(gm, {s.tensor: case.types.get(s.tensor, dt.OUT) for s in dt.find_cast_sites(gm)})
    inputs = tuple(torch.from_numpy(f) for f in case.feeds)
    info = dt.propagate(fpm.graph_module, inputs)
    values = dt.record_values(fpm.graph_module, inputs)
    (check,) = case.checks
    nodes = [n for n in fpm.graph_module.graph.nodes
             if n.op == "call_function" and getattr(dt.op_of(n.target), "name", None) == op]
    assert len(nodes) == 1, f"{len(nodes)} {op} nodes"
    t, got = info[nodes[0]].type, values[nodes[0]].numpy()
    np.testing.assert_array_equal(got, check.want, err_msg=f"{op}: the emulation is not exact")
    assert check.extreme.value in (check.want.min(), check.want.max())
    assert dt.codes_of(check.want, t) is not None, f"{op}: {t} does not hold {check.want.ravel().tolist()}"
    assert dt.codes_of(np.array([check.extreme.value]), dt.narrower(t)) is None, f"{op}: {t} is not tight"


def test_gemm_with_trans_a_accumulates_the_rows_of_a():
    """Gemm with transA = 1: A is [K, M], so each output sums K = 8 products, not M = 2.
    Kills ``prop_gemm_transA``."""
    x = dt._rows(dt.X, 8).T  # [K=8, M=2]: column 0 all at X's minimum, column 1 at its maximum
    w = dt._rows(dt.W, 8)  # [N=2, K=8] with transB
    model = node_model("Gemm", [("x", (8, 2)), ("w", w.astype(np.float32))], transA=1, transB=1)
    want = x.T @ w.T
    big = dt.Extreme((dt.X, dt.lo(dt.X)), (dt.W, dt.lo(dt.W)), 8)
    _check_case(dt.Case(model, {"x": dt.X, "w": dt.W}, (x,), [dt.Check("gemm", want, big)]), "gemm")


def test_conv_transpose_accumulates_every_input_channel():
    """ConvTranspose of 2 input channels with a 2x2 kernel: the centre output pixel sums
    2 * 4 = 8 products. Kills ``prop_conv_transpose_terms`` (which counts the 4 kernel taps only)."""
    x = np.stack([np.full((2, 2, 2), dt.lo(dt.X)), np.full((2, 2, 2), dt.hi(dt.X))])
    w = np.full((2, 1, 2, 2), dt.lo(dt.W))  # [C_in, C_out, kh, kw]
    model = node_model("ConvTranspose", [("x", (2, 2, 2, 2)), ("w", w.astype(np.float32))], kernel_shape=[2, 2])
    want = torch.nn.functional.conv_transpose2d(torch.from_numpy(x), torch.from_numpy(w)).numpy()
    big = dt.Extreme((dt.X, dt.lo(dt.X)), (dt.W, dt.lo(dt.W)), 8)
    _check_case(dt.Case(model, {"x": dt.X, "w": dt.W}, (x,), [dt.Check("conv_transpose", want, big)]),
                "conv_transpose")


# ------------------------------------------------------------------------------ HLS: K-hot claim
def test_a_khot_claim_one_digit_short_is_an_error():
    """A quantizer that says K = 1 while a code needs 2 signed digits (3 = 4 - 1) is refused, at
    exactly one digit over. Kills ``shift_claim_check``."""
    claims_one = SimpleNamespace(khot=1)
    with pytest.raises(ExportError, match="khot=1 but a code needs 2 digits"):
        khot_weight(claims_one, np.array([0, 2, 3, -4]), khot_max=0)
    assert khot_weight(claims_one, np.array([0, 2, -4, 8]), khot_max=0) == 1
    assert khot_weight(SimpleNamespace(khot=2), np.array([3, 5, -7]), khot_max=0) == 2


# ------------------------------------------------------------------------- HLS: resource model
def test_dsp_tiles_add_port_minus_one_bits_each():
    """The documented tiling: a signed operand of w bits on a p-bit port takes 1 tile up to p bits
    and one more per p - 1 further bits. 53 = 27 + 26 bits fit 2 tiles of the 27-bit port, 54 need 3;
    on the 18-bit port 35 = 18 + 17 fit 2, 36 need 3. Kills ``est_tiles`` (p bits per further tile)."""
    fx = lambda w: FixedType(w, 1)  # noqa: E731
    assert dsp_per_product(fx(53), fx(18)) == 2
    assert dsp_per_product(fx(54), fx(18)) == 3
    assert dsp_per_product(fx(35), fx(27)) == 2
    assert dsp_per_product(fx(36), fx(27)) == 3
    assert dsp_per_product(fx(18), fx(54)) == 3  # operand order does not matter


@pytest.mark.parametrize("n_in, reuse", [(8, 1), (9, 1), (8, 2)])
def test_dense_latency_is_iterations_times_reuse_plus_the_adder_tree(tmp_path, n_in, reuse):
    """latency = iterations * R + ceil(log2(terms)) + 2 for a sum of products (estimate.py's model):
    one row of a Gemm with ``n_in`` products per output. Kills ``est_depth``."""
    rng = np.random.default_rng(n_in)
    w = (rng.standard_normal((3, n_in)) * 0.5).astype(np.float32)
    model = node_model("Gemm", [("x", (1, n_in)), ("w", w), ("b", np.zeros(3, np.float32))], transB=1)
    x = torch.from_numpy(rng.standard_normal((64, n_in)))
    fpm = quantize_graph(load_onnx(model), [x])
    result = export_hls(fpm, tmp_path / "prj", top="dense", n_vectors=2, reuse_factor=reuse)
    (layer,) = [e for e in result.report["layers"] if e["kind"] == "dense"]
    assert layer["iterations"] == 1
    assert layer["latency"] == reuse + math.ceil(math.log2(n_in)) + 2


# -------------------------------------------------------------------- typeprop: HardSigmoid
def test_hard_sigmoid_type_holds_the_clamp_value_one_on_a_coarse_grid():
    """HardSigmoid(alpha = 4, beta = 8) of ``ap_fixed<4,6>`` (LSB 4): ``alpha*x + beta`` lies on a
    grid of 8 and passes 1, so the clamp writes 1 into the op's type, which must hold it (the C++
    ``if (v > 1) v = 1;`` assigns into that type). Kills ``prop_hard_sigmoid_bit``."""
    model = node_model("HardSigmoid", [("x", (1, 6))], alpha=4.0, beta=8.0)
    gm = dt.load_onnx(model)
    types = {s.tensor: dt.OUT for s in dt.find_cast_sites(gm)}
    types.update({"x": FixedType.parse("ap_fixed<4,6>"), "hardsigmoid_node::alpha": FixedType.parse("ap_ufixed<1,3>"),
                  "hardsigmoid_node::beta": FixedType.parse("ap_ufixed<1,4>")})
    fpm = dt.quantize_with_types(gm, types)
    x = torch.tensor([[-32.0, -4.0, 0.0, 4.0, 8.0, 28.0]], dtype=torch.float64)
    info = dt.propagate(fpm.graph_module, (x,))
    values = dt.record_values(fpm.graph_module, (x,))
    (node,) = [n for n in fpm.graph_module.graph.nodes
               if n.op == "call_function" and getattr(dt.op_of(n.target), "name", None) == "hard_sigmoid"]
    got = values[node].numpy()
    np.testing.assert_array_equal(got, [[0.0, 0.0, 1.0, 1.0, 1.0, 1.0]])
    assert dt.codes_of(got, info[node].type) is not None, f"{info[node].type} does not hold {got.tolist()}"
