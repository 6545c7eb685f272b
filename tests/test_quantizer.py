"""FixedQuantizer: forward bit-identical to ``cast`` with the frozen type, STE and LSQ gradients,
calibration from data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from qfx_onnx.fixed import FixedType, OverflowMode, QuantMode, cast
from qfx_onnx.fixed.quantizer import FixedQuantizer

QS = list(QuantMode)
OS = list(OverflowMode)
SAT_MODES = (OverflowMode.SAT, OverflowMode.SAT_SYM, OverflowMode.SAT_ZERO)
FAST = settings(max_examples=60, deadline=None)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int64)


def _expected(x, width, signed, q, o, n, fracs, axis):
    if axis is None:
        return cast(x, FixedType(width, width - fracs[0], signed, q, o, n))
    parts = [cast(x.select(axis, c), FixedType(width, width - f, signed, q, o, n)) for c, f in enumerate(fracs)]
    return torch.stack(parts, dim=axis)


def _values(rng: np.random.Generator, shape, width: int, frac: int) -> np.ndarray:
    """Codes near and beyond the range, half-LSB ties, random reals, and a few specials."""
    n = int(np.prod(shape))
    span = 2.0 ** min(width + 1, 60)
    codes = rng.integers(-int(span), int(span) + 1, size=n) / 2.0  # halves: rounding ties
    reals = rng.standard_normal(n) * 2.0 ** (width - 1) * rng.choice([0.01, 1.0, 4.0], size=n)
    v = np.where(rng.random(n) < 0.5, codes, reals) * 2.0**-frac
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-300, -1e-300, 5e-324, -5e-324])
    pick = rng.random(n) < 0.03
    v[pick] = rng.choice(specials, size=int(pick.sum()))
    return v.reshape(shape)


modes = st.tuples(st.sampled_from(QS), st.sampled_from(OS))


@FAST
@given(width=st.one_of(st.integers(1, 26), st.integers(27, 64)), signed=st.booleans(), qo=modes,
       n_frac=st.floats(0, 1), channels=st.sampled_from([None, 1, 3]),
       fracs=st.lists(st.integers(-12, 40), min_size=3, max_size=3),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**32 - 1))
def test_forward_matches_cast_with_frozen_type(width, signed, qo, n_frac, channels, fracs, dtype, seed):
    q, o = qo
    n = int(round(n_frac * width))
    rng = np.random.default_rng(seed)
    if channels is None:
        fracs, axis = fracs[:1], None
        quant = FixedQuantizer(width, signed, q, o, n, frac=fracs[0] + 0.3)
        shape = (5, 7)
    else:
        fracs, axis = fracs[:channels], 1
        quant = FixedQuantizer(width, signed, q, o, n, frac=torch.tensor(fracs) - 0.4,
                               per_channel_axis=-2, num_channels=channels)
        shape = (4, channels, 6)
    assert quant.int_fracs() == fracs
    x = torch.tensor(_values(rng, shape, width, max(fracs)), dtype=dtype)
    got = quant(x)
    want = _expected(x, width, signed, q, o, n, fracs, axis)
    assert got.dtype == dtype
    assert torch.equal(_bits(got), _bits(want))
    assert [str(t) for t in quant.frozen_types()] == [
        str(FixedType(width, width - f, signed, q, o, n)) for f in fracs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_matches_cast_on_special_values_in_every_mode(dtype):
    # Underflow of x * 2**F (negative F), infinities, NaN, -0.0 and range ends, per channel.
    fracs = [-30, -1, 0, 3, 140]
    specials = [0.0, -0.0, 5e-324, -5e-324, 1e-40, -1e-40, 1e-300, -1e-300, 0.5, -0.5, 1.5, -2.5,
                float("inf"), float("-inf"), float("nan"), 127.5, -128.0, 3e38, -3e38]
    x = torch.tensor(specials, dtype=dtype).reshape(-1, 1).expand(-1, len(fracs)).contiguous()
    for q in QS:
        for o in OS:
            for width, signed, n in ((8, True, 0), (8, False, 0), (6, True, 2), (30, True, 1)):
                quant = FixedQuantizer(width, signed, q, o, n, frac=fracs, per_channel_axis=1, num_channels=len(fracs))
                want = _expected(x, width, signed, q, o, n, fracs, 1)
                assert torch.equal(_bits(quant(x)), _bits(want)), (q, o, width, signed, n)


def test_frac_rounds_half_to_even_and_disabled_is_identity():
    quant = FixedQuantizer(8, True, "AP_RND", "AP_SAT", frac=2.5)
    assert quant.fixed_type() == FixedType.parse("ap_fixed<8,6,AP_RND,AP_SAT>")
    quant.set_frac(3.5)
    assert quant.fixed_type().frac == 4
    x = torch.randn(50) * 100
    quant.enabled = False
    assert quant(x) is x


def _in_range(x, t: FixedType, sym: bool) -> torch.Tensor:
    """Whether the rounded code of x lies in t's code range, from a wide cast that cannot overflow."""
    wide = FixedType(t.width + 12, t.integer + 12, True, t.q, OverflowMode.SAT)
    code = cast(x.double(), wide) * 2.0**t.frac
    lo = -t.int_max if sym else t.int_min
    return (code >= lo) & (code <= t.int_max)


@FAST
@given(width=st.integers(2, 12), signed=st.booleans(), q=st.sampled_from(QS), o=st.sampled_from(OS),
       frac=st.integers(-3, 8), per_channel=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_input_gradient_is_straight_through(width, signed, q, o, frac, per_channel, seed):
    rng = np.random.default_rng(seed)
    if per_channel:
        quant = FixedQuantizer(width, signed, q, o, frac=[frac, frac + 1], per_channel_axis=0, num_channels=2)
    else:
        quant = FixedQuantizer(width, signed, q, o, frac=frac)
    x = torch.tensor(_values(rng, (2, 40), width, frac + 1), dtype=torch.float64)
    x = torch.nan_to_num(x, nan=0.0, posinf=1e6, neginf=-1e6).requires_grad_(True)
    quant(x).backward(torch.ones_like(x))
    saturating = o in SAT_MODES or (o is OverflowMode.WRAP_SM and not signed)
    for c, t in enumerate(quant.frozen_types() * (1 if per_channel else 2)):
        inside = _in_range(x.detach()[c], t, o is OverflowMode.SAT_SYM and signed)
        want = inside.double() if saturating else torch.ones_like(inside, dtype=torch.float64)
        assert torch.equal(x.grad[c], want)


def test_input_gradient_zero_outside_for_saturation_ones_for_wrap():
    x = torch.tensor([-10.0, -1.0, 0.3, 1.0, 10.0], requires_grad=True)
    FixedQuantizer(4, True, "AP_RND", "AP_SAT", frac=2)(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]  # codes -8..7: values -2 .. 1.75
    x.grad = None
    FixedQuantizer(4, True, "AP_RND", "AP_WRAP", frac=2)(x).sum().backward()
    assert x.grad.tolist() == [1.0] * 5


def test_frac_gradient_formula_on_one_element():
    # xq = round(0.3 * 4) / 4 = 0.25 inside the range: dxq/dF = -ln2 * (xq - x)
    quant = FixedQuantizer(8, True, "AP_RND", "AP_SAT", frac=2.0)
    quant(torch.tensor([0.3])).sum().backward()
    g = 1 / math.sqrt(1 * 127)
    assert quant.frac.grad.item() == pytest.approx(-math.log(2) * (0.25 - 0.3) * g, rel=1e-6)
    # 100 saturates at xq = 127 / 4: dxq/dF = -ln2 * xq
    quant.frac.grad = None
    quant(torch.tensor([100.0])).sum().backward()
    assert quant.frac.grad.item() == pytest.approx(-math.log(2) * 127 / 4 * g, rel=1e-6)


def _mse_frac_grad(quant, x):
    quant.frac.grad = None
    ((quant(x) - x) ** 2).mean().backward()
    return quant.frac.grad.clone()


def test_frac_gradient_sign_reduces_mse():
    x = torch.randn(4000, generator=torch.Generator().manual_seed(0))
    quant = FixedQuantizer(8, True, "AP_RND", "AP_SAT", frac=9.0)  # range +-0.25: far too small
    assert _mse_frac_grad(quant, x) > 0  # descent lowers F: more integer bits
    quant.set_frac(-2.0)  # step 4: far too coarse
    assert _mse_frac_grad(quant, x) < 0  # descent raises F


def test_frac_gradient_matches_finite_difference_of_expected_mse():
    # For dense data the LSQ estimate equals d/dF of the MSE of a quantizer with a continuous step.
    x = torch.randn(400_000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    quant = FixedQuantizer(4, True, "AP_RND", "AP_SAT", frac=2.0)  # clips at -2 / 1.75, step 1/4
    g = 1 / math.sqrt(x.numel() * 7)
    lsq = _mse_frac_grad(quant, x).item() / g

    def mse(f):
        s = 2.0**-f
        return (((torch.round(x / s).clamp(-8, 7) * s) - x) ** 2).mean().item()

    h = 0.02
    numeric = (mse(2 + h) - mse(2 - h)) / (2 * h)
    assert lsq == pytest.approx(numeric, rel=0.05)


def test_per_channel_frac_gradient_is_per_tensor_gradient_of_each_channel():
    x = torch.randn(3, 50, generator=torch.Generator().manual_seed(2)) * torch.tensor([[0.1], [1.0], [10.0]])
    pc = FixedQuantizer(6, True, "AP_RND_CONV", "AP_SAT_SYM", frac=[5.0, 3.0, 1.0], per_channel_axis=0, num_channels=3)
    grad = _mse_frac_grad(pc, x)
    for c, f in enumerate([5.0, 3.0, 1.0]):
        one = FixedQuantizer(6, True, "AP_RND_CONV", "AP_SAT_SYM", frac=f)
        one.frac.grad = None
        (((one(x[c]) - x[c]) ** 2).sum() / x.numel()).backward()
        assert grad[c].item() == pytest.approx(one.frac.grad.item(), rel=1e-5)


def test_frozen_frac_gets_no_gradient():
    quant = FixedQuantizer(8, True, "AP_RND", "AP_SAT", frac=3.0, learn_frac=False)
    x = torch.tensor([-20.0, -16.06, -3.3, 0.1, 15.9, 15.95, 20.0], requires_grad=True)  # range -16 .. 15.875
    quant(x).sum().backward()
    assert quant.frac.grad is None
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]  # straight through where the code fits


# ---------------------------------------------------------------------------------- calibration
def _clipped(v: float, t: FixedType) -> bool:
    sym = t.o is OverflowMode.SAT_SYM and t.signed
    return not bool(_in_range(torch.tensor([v], dtype=torch.float64), t, sym)[0])


@FAST
@given(width=st.integers(2, 16), signed=st.booleans(), q=st.sampled_from(QS), o=st.sampled_from(OS),
       scale=st.floats(1e-6, 1e6), seed=st.integers(0, 2**32 - 1))
def test_calibrate_max_is_tightest_type_without_clipping(width, signed, q, o, scale, seed):
    x = torch.tensor(np.random.default_rng(seed).standard_normal(300) * scale)
    quant = FixedQuantizer(width, signed, q, o, frac=0.0)
    quant.calibrate(x, "max")
    t = quant.fixed_type()
    extremes = [x.max().item()] + ([x.min().item()] if signed else [])
    assert not any(_clipped(v, t) for v in extremes)
    tighter = FixedType(width, t.integer - 1, signed, q, o)
    assert any(_clipped(v, tighter) for v in extremes)


def test_calibrate_percentile_clips_only_the_tail():
    x = torch.cat([torch.randn(10_000, generator=torch.Generator().manual_seed(3)), torch.tensor([1000.0])])
    quant = FixedQuantizer(8, True, "AP_RND", "AP_SAT")
    quant.calibrate(x, "max")
    f_max = quant.int_fracs()[0]
    quant.calibrate(x, "percentile", percentile=100.0)
    assert quant.int_fracs()[0] == f_max
    quant.calibrate(x, "percentile", percentile=99.0)
    t = quant.fixed_type()
    p = float(np.percentile(x.abs().numpy(), 99.0))
    assert not _clipped(p, t) and _clipped(p, t.with_width(8, t.integer - 1))
    assert t.frac > f_max


@FAST
@given(width=st.integers(2, 10), signed=st.booleans(), q=st.sampled_from(QS), o=st.sampled_from(OS),
       heavy=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_calibrate_mse_never_worse_than_max(width, signed, q, o, heavy, seed):
    rng = np.random.default_rng(seed)
    x = torch.tensor(rng.standard_t(2 if heavy else 30, size=(4, 200)))
    quant = FixedQuantizer(width, signed, q, o, per_channel_axis=0, num_channels=4)
    quant.calibrate(x, "max")
    err_max = ((quant.quantize_frozen(x) - x) ** 2).mean(dim=1)
    quant.calibrate(x, "mse")
    err_mse = ((quant.quantize_frozen(x) - x) ** 2).mean(dim=1)
    assert (err_mse <= err_max).all()


def test_calibrate_mse_clips_an_outlier_per_channel():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5000, generator=gen)
    x[0, 0] = 16.5  # channel 0: one outlier, which costs a whole bit of resolution; channel 1: none
    pc = FixedQuantizer(8, True, "AP_RND", "AP_SAT", per_channel_axis=0, num_channels=2)
    pc.calibrate(x, "max")
    f_max = pc.int_fracs()
    pc.calibrate(x, "mse")
    f_mse = pc.int_fracs()
    assert f_mse[0] > f_max[0]
    for c in range(2):
        one = FixedQuantizer(8, True, "AP_RND", "AP_SAT")
        one.calibrate(x[c], "mse")
        assert one.int_fracs()[0] == f_mse[c]


def test_streaming_calibration_matches_one_shot():
    gen = torch.Generator().manual_seed(5)
    batches = [torch.randn(8, 3, 10, generator=gen) * torch.tensor([1.0, 30.0, 0.01]).reshape(1, 3, 1) for _ in range(5)]
    whole = torch.cat(batches)
    for method in ("max", "percentile", "mse"):
        a = FixedQuantizer(8, True, "AP_RND", "AP_SAT", per_channel_axis=1, num_channels=3)
        b = FixedQuantizer(8, True, "AP_RND", "AP_SAT", per_channel_axis=1, num_channels=3)
        a.calibrate(whole, method, percentile=95.0)
        b.observing = True
        for batch in batches:
            b(batch)
        b.finalize(method, percentile=95.0)
        assert a.int_fracs() == b.int_fracs(), method


def test_streaming_keeps_a_bounded_sample_and_exact_max():
    quant = FixedQuantizer(8, True, "AP_RND", "AP_SAT")
    quant.reservoir_size = 100
    gen = torch.Generator().manual_seed(6)
    for i in range(10):
        quant.observe(torch.randn(1000, generator=gen) * (10.0 if i == 7 else 1.0))
    assert quant._stats["sample"].shape == (1, 100)
    peak = quant._stats["max"].item()
    quant.finalize("max")
    assert not _clipped(peak, quant.fixed_type())
    with pytest.raises(RuntimeError):
        quant.finalize("max")


def test_all_zero_channel_and_bad_arguments():
    pc = FixedQuantizer(8, False, "AP_TRN", "AP_SAT", per_channel_axis=0, num_channels=2)
    pc.calibrate(torch.tensor([[0.0, 0.0], [3.0, -7.0]]), "max")
    assert [t.integer for t in pc.frozen_types()] == [0, 2]
    with pytest.raises(ValueError):
        pc.calibrate(torch.ones(2, 3), "minmax")
    with pytest.raises(ValueError):
        pc.fixed_type()
    with pytest.raises(ValueError):
        pc(torch.ones(3, 2))
    with pytest.raises(ValueError):
        pc.set_frac([1.0, 2.0, 3.0])
    with pytest.raises(ValueError):
        FixedQuantizer(8, True, "AP_RND", "AP_SAT", per_channel_axis=0)
    assert "2 x ap_ufixed<8,0,AP_TRN,AP_SAT>" in repr(FixedQuantizer(
        8, False, "AP_TRN", "AP_SAT", frac=8, per_channel_axis=0, num_channels=2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x = torch.randn(4, 3, 9, dtype=torch.float32) * 8
    quant = FixedQuantizer(10, True, "AP_RND", "AP_SAT", frac=[2.0, -1.0, 30.0], per_channel_axis=1, num_channels=3)
    want = quant(x)
    quant.cuda()
    xc = x.cuda().requires_grad_(True)
    got = quant(xc)
    assert got.device.type == "cuda" and torch.equal(got.cpu(), want)
    got.sum().backward()
    assert quant.frac.grad.device.type == "cuda"
    quant.calibrate(xc.detach(), "mse")
    quant.observe(xc.detach())
    quant.finalize("percentile")


# ------------------------------------------------------------------------------ fast training path
FAST_Q = list(QuantMode)  # every rounding mode takes the fast path under saturation
FAST_TYPES = [(True, OverflowMode.SAT), (True, OverflowMode.SAT_SYM), (False, OverflowMode.SAT),
              (False, OverflowMode.WRAP_SM)]  # unsigned AP_WRAP_SM saturates


def _edge_inputs(dtype: torch.dtype, width: int, signed: bool, frac: int) -> torch.Tensor:
    """Ties at half an LSB and their float neighbours (y = 0.5 - ulp/2, where floor(y + 0.5) is
    wrong), range ends, both NaN signs, infinities, zeros, subnormals and huge values."""
    lsb = 2.0**-frac
    hi = 2 ** (width - 1 if signed else width)
    codes = torch.cat([torch.arange(-4, 5), torch.arange(hi - 3, hi + 3), torch.arange(-hi - 3, -hi + 3)]).to(dtype)
    ties = (codes + 0.5) * lsb
    around = torch.cat([ties, torch.nextafter(ties, ties + 1), torch.nextafter(ties, ties - 1), codes * lsb])
    nan = torch.tensor([float("nan")], dtype=dtype)
    info = torch.finfo(dtype)
    specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), info.tiny, -info.tiny, info.tiny / 4,
                             -info.tiny / 4, info.max, -info.max], dtype=dtype)
    return torch.cat([around, -around, specials, nan, -nan])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("q", FAST_Q)
def test_fast_path_is_bit_identical_to_cast_on_edge_values(dtype, q):
    fracs = [0, 1, 7, 20, 126] + ([127, 600] if dtype == torch.float64 else [])
    for signed, o in FAST_TYPES:
        for width in (1, 2, 8, 16, 21):
            for f in fracs:
                quant = FixedQuantizer(width, signed, q, o, frac=float(f))
                x = _edge_inputs(dtype, width, signed, f).requires_grad_(True)
                got = quant(x)
                assert quant._plan_cache.fast is not None, (q, o, width, f)
                want = cast(x.detach(), FixedType(width, width - f, signed, q, o))
                assert torch.equal(_bits(got.detach()), _bits(want)), (q, o, signed, width, f)


def test_negative_nan_saturates_low_and_positive_nan_high():
    # x86 arithmetic makes NaN with the sign bit set (0 * inf); cast() reads it as -inf.
    x = torch.tensor([float("nan"), 0.0]) * torch.tensor([1.0, float("inf")])
    x = torch.cat([x, x.neg()])
    quant = FixedQuantizer(8, True, "AP_RND", "AP_SAT", frac=4.0)
    assert torch.equal(quant(x), cast(x, FixedType.parse("ap_fixed<8,4,AP_RND,AP_SAT>")))
    assert sorted(quant(x).tolist()) == [-8.0, -8.0, 127 / 16, 127 / 16]


def test_fast_path_declines_where_cast_changes_dtype_or_underflows():
    x = torch.randn(10)
    for width, f in ((8, -1), (8, 127), (25, 3)):
        quant = FixedQuantizer(width, True, "AP_RND", "AP_SAT", frac=float(f))
        assert torch.equal(quant(x), cast(x, FixedType(width, width - f, True, "AP_RND", "AP_SAT")))
        assert quant._plan_cache.fast is None
    for q, o, fast in ((QuantMode.RND_ZERO, OverflowMode.SAT, True), (QuantMode.RND, OverflowMode.WRAP, False),
                       (QuantMode.RND, OverflowMode.SAT_ZERO, False)):
        quant = FixedQuantizer(8, True, q, o, frac=3.0)
        quant(x)
        assert (quant._plan_cache.fast is not None) == fast


def _grads(quant: FixedQuantizer, x: torch.Tensor, weight: torch.Tensor):
    quant.frac.grad = None
    x = x.detach().clone().requires_grad_(True)
    (quant(x) * weight).sum().backward()
    return x.grad, quant.frac.grad.clone()


@FAST
@given(width=st.integers(1, 16), signed=st.booleans(), q=st.sampled_from(FAST_Q),
       o=st.sampled_from([OverflowMode.SAT, OverflowMode.SAT_SYM]), frac=st.integers(0, 12),
       per_channel=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**32 - 1))
def test_fast_path_gradients_match_the_general_path(width, signed, q, o, frac, per_channel, dtype, seed):
    rng = np.random.default_rng(seed)
    if per_channel:
        quant = FixedQuantizer(width, signed, q, o, frac=[frac, frac + 2, 0], per_channel_axis=1, num_channels=3)
        shape = (5, 3, 4)
    else:
        quant = FixedQuantizer(width, signed, q, o, frac=frac)
        shape = (6, 7)
    x = torch.tensor(_values(rng, shape, width, frac), dtype=dtype)
    weight = torch.tensor(rng.standard_normal(shape), dtype=dtype)
    grad_x, grad_frac = _grads(quant, x, weight)
    assert quant._plan_cache.fast is not None
    quant.fast_path = False
    want_x, want_frac = _grads(quant, x, weight)
    assert torch.equal(grad_x, want_x)
    # The same terms g * d (|d| < 2**(W - F) + LSB), summed in another order: equal up to the
    # rounding of the sums, which is relative to sum |g * d|.
    eps = torch.finfo(dtype).eps
    scale = math.log(2) / math.sqrt(x.numel() // quant.num_channels)
    bound = weight.abs().sum().item() * 2.0 ** (width - min(quant.int_fracs()) + 1) * scale
    assert torch.allclose(grad_frac, want_frac, rtol=0.0, atol=16 * eps * bound)


def test_binary_points_are_read_back_once_per_change_of_frac(monkeypatch):
    quant = FixedQuantizer(8, True, "AP_RND", "AP_SAT", frac=3.4)
    x = torch.randn(100)
    reads = []
    original = FixedQuantizer.int_fracs
    monkeypatch.setattr(FixedQuantizer, "int_fracs", lambda self: reads.append(1) or original(self))
    for _ in range(3):
        quant(x).sum().backward()
    assert len(reads) == 1  # frozen between steps: no device-to-host read, same plan
    plan = quant._plan_cache
    opt = torch.optim.SGD(quant.parameters(), lr=1e-3)
    opt.step()  # moves frac a little: its integer stays 3, so the constants are kept
    quant(x)
    assert len(reads) == 2 and quant._plan_cache is plan


def test_every_way_of_changing_frac_reaches_the_forward_pass():
    x = torch.randn(200, dtype=torch.float32) * 3
    quant = FixedQuantizer(8, True, "AP_RND", "AP_SAT", frac=3.0)

    def check(f):
        want = cast(x.to(quant.frac.dtype), FixedType(8, 8 - f, True, "AP_RND", "AP_SAT"))
        assert torch.equal(quant(x.to(quant.frac.dtype)), want)

    check(3)
    quant.set_frac(5.0)
    check(5)
    with torch.no_grad():
        quant.frac.sub_(3.0)
    check(2)
    quant.frac.grad = torch.tensor(-10.0)
    torch.optim.SGD(quant.parameters(), lr=0.1).step()
    check(3)
    quant.load_state_dict({"frac": torch.tensor(6.0)})
    check(6)
    quant.double()
    check(6)
    quant.frac = nn.Parameter(torch.tensor(1.0, dtype=torch.float64))
    check(1)


def test_forward_without_autograd_skips_the_bookkeeping():
    quant = FixedQuantizer(8, True, "AP_RND", "AP_SAT", frac=4.0)
    x = torch.randn(30, requires_grad=True)
    with torch.no_grad():
        y = quant(x)
    assert y.grad_fn is None and not y.requires_grad
    assert torch.equal(y, cast(x.detach(), FixedType.parse("ap_fixed<8,4,AP_RND,AP_SAT>")))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_every_mode_forward_and_gradients_match_cpu():
    # the fast path (NaN resolved by torch.where on CUDA) and the general path, per channel
    x = torch.cat([torch.randn(6, 3, 5) * 8, torch.full((1, 3, 5), float("nan")), torch.full((1, 3, 5), -float("inf"))])
    for q in QuantMode:
        for o in (OverflowMode.SAT, OverflowMode.SAT_SYM, OverflowMode.SAT_ZERO, OverflowMode.WRAP):
            quant = FixedQuantizer(8, True, q, o, frac=[2.0, 0.0, 5.0], per_channel_axis=1, num_channels=3)
            xc = x.clone().requires_grad_(True)
            want = quant(xc)
            want.nan_to_num().sum().backward()
            want_grads = (xc.grad.clone(), quant.frac.grad.clone())
            quant.frac.grad = None
            quant.cuda()
            xg = x.cuda().requires_grad_(True)
            got = quant(xg)
            got.nan_to_num().sum().backward()
            assert torch.equal(got.detach().cpu(), want.detach()), (q, o)
            assert torch.equal(xg.grad.cpu(), want_grads[0]), (q, o)
            assert torch.allclose(quant.frac.grad.cpu(), want_grads[1], rtol=1e-5, atol=1e-5, equal_nan=True), (q, o)
