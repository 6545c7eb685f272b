"""K-hot codes: tables against brute force, exact nearest projection with its tie rule, CSD digit
counts, shift-add decomposition, and the quantizer."""

from __future__ import annotations

import functools
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from qfx_onnx.fixed import FixedType
from qfx_onnx.fixed.khot import (
    KHotQuantizer,
    _table_by_digits,
    count_ones,
    csd_weight,
    is_khot,
    khot_codes,
    khot_decompose,
    khot_project,
)

FAST = settings(max_examples=60, deadline=None)


@functools.lru_cache(maxsize=None)
def _min_signed_digits(n: int) -> int:
    """Fewest ±2**i summing to n >= 0, by recursion on the lowest digit (independent of the NAF)."""
    if n <= 1:
        return n
    if n % 2 == 0:
        return _min_signed_digits(n // 2)
    return 1 + min(_min_signed_digits((n - 1) // 2), _min_signed_digits((n + 1) // 2))


def _brute_codes(t: FixedType, k: int, signed_digits: bool) -> list[int]:
    weight = (lambda c: _min_signed_digits(abs(c))) if signed_digits else (lambda c: bin(abs(c)).count("1"))
    return [c for c in range(t.int_min, t.int_max + 1) if weight(c) <= k]


def test_csd_weight_is_the_minimal_signed_digit_count():
    n = torch.arange(-5000, 5000)
    want = torch.tensor([_min_signed_digits(abs(int(v))) for v in n])
    assert torch.equal(csd_weight(n), want)
    assert [csd_weight(v) for v in (0, 7, -7, 15, 0b10101, 0b1011)] == [0, 2, 2, 2, 3, 3]
    assert torch.equal(count_ones(n), torch.tensor([bin(abs(int(v))).count("1") for v in n]))
    assert count_ones(2**62 + 5) == 3 and count_ones(torch.tensor([2**62 + 5])).item() == 3
    assert is_khot(7, 2, signed_digits=True) and not is_khot(7, 2)
    assert is_khot(torch.tensor([8, 7]), 1).tolist() == [True, False]


@pytest.mark.parametrize("signed_digits", [False, True])
@pytest.mark.parametrize("signed", [False, True])
def test_tables_match_brute_force(signed, signed_digits):
    for width in range(1, 9):
        for k in range(0, 5):
            t = FixedType(width, 2, signed)
            assert khot_codes(t, k, signed_digits).tolist() == _brute_codes(t, k, signed_digits)
    for width in (9, 12):  # the digit-by-digit construction used for wide types
        for k in (1, 2, 3):
            t = FixedType(width, width, signed)
            got = _table_by_digits(t.int_min, t.int_max, width, k, signed_digits)
            assert got.tolist() == khot_codes(t, k, signed_digits).tolist()


def test_wide_tables_and_limits():
    t = FixedType(32, 0)
    codes = khot_codes(t, 2)
    # 0; ±(2**i and 2**i + 2**j for 0 <= j < i <= 30); and -2**31
    assert len(codes) == 1 + 2 * (31 + 31 * 30 // 2) + 1
    assert bool(is_khot(codes, 2).all()) and codes.tolist() == sorted(set(codes.tolist()))
    assert codes[0].item() == -(2**31) and codes[-1].item() == 2**30 + 2**29
    with pytest.raises(ValueError):
        khot_codes(FixedType(40, 0), 2)
    with pytest.raises(ValueError):
        khot_codes(FixedType(32, 0), 8, signed_digits=True)
    with pytest.raises(ValueError):
        khot_codes(FixedType(8, 0), -1)


def test_greedy_counterexample_and_tie_rule():
    t = FixedType(8, 8, True)  # integers: codes are the values
    x = torch.tensor([7.0, -7.0, 3.0, -3.0, 6.0, 12.0, 127.0, -200.0, 0.4, float("nan")])
    got = khot_project(x, t, 1)
    # 7 -> 8 (greedy would give 4); 3 and 6 and 12 are ties -> smaller magnitude; saturation at 64 / -128
    assert got[:9].tolist() == [8.0, -8.0, 2.0, -2.0, 4.0, 8.0, 64.0, -128.0, 0.0]
    assert torch.isnan(got[9])
    assert khot_project(torch.tensor([7.0, 11.0]), t, 2, signed_digits=True).tolist() == [7.0, 10.0]


def _exact_nearest(v: float, table: list[int], frac: int) -> list[int]:
    """The codes at the smallest exact distance from v * 2**frac (integer arithmetic)."""
    num, den = Fraction(v * 2.0**frac).as_integer_ratio()
    dist = [abs(num - c * den) for c in table]
    best = min(dist)
    return [c for c, d in zip(table, dist) if d == best]


@FAST
@given(width=st.integers(1, 8), signed=st.booleans(), k=st.integers(0, 4), signed_digits=st.booleans(),
       frac=st.integers(-4, 10), dtype=st.sampled_from([torch.float32, torch.float64]),
       seed=st.integers(0, 2**32 - 1))
def test_projection_is_the_nearest_khot_value(width, signed, k, signed_digits, frac, dtype, seed):
    t = FixedType(width, width - frac, signed)
    rng = np.random.default_rng(seed)
    table = _brute_codes(t, k, signed_digits)
    mids = [(a + b) / 2 for a, b in zip(table, table[1:])]  # exact ties
    v = np.concatenate([rng.choice(mids or [0.0], 20), rng.uniform(t.int_min - 3, t.int_max + 3, 40)])
    x = torch.tensor(v * 2.0**-frac, dtype=dtype)
    got = khot_project(x, t, k, signed_digits)
    assert got.dtype == dtype
    codes = got.double() * 2.0**frac
    for xv, c in zip(x.tolist(), codes.tolist()):
        assert c == int(c) and int(c) in table
        nearest = _exact_nearest(xv, table, frac)
        assert int(c) == min(nearest, key=lambda n: (abs(n), -n))  # tie: smaller magnitude, then positive


@given(code=st.integers(-(2**40), 2**40), signed_digits=st.booleans())
@settings(max_examples=200, deadline=None)
def test_decompose_reconstructs_the_code(code, signed_digits):
    terms = khot_decompose(code, signed_digits=signed_digits)
    assert sum(s * 2**sh for s, sh in terms) == code
    assert len(terms) == (csd_weight(code) if signed_digits else count_ones(code))
    assert [sh for _, sh in terms] == sorted({sh for _, sh in terms}, reverse=True)
    assert all(s in (1, -1) for s, _ in terms)
    if terms:
        with pytest.raises(ValueError):
            khot_decompose(code, len(terms) - 1, signed_digits)


@pytest.mark.parametrize("signed_digits", [False, True])
def test_quantizer_forward_projects_with_the_frozen_type(signed_digits):
    x = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(0)) * torch.tensor([0.1, 1.0, 10.0]).reshape(1, 3, 1)
    kq = KHotQuantizer(8, True, 2, frac=[9.0, 5.0, 2.0], signed_digits=signed_digits, per_channel_axis=1, num_channels=3)
    got = kq(x)
    for c, t in enumerate(kq.frozen_types()):
        assert torch.equal(got[:, c], khot_project(x[:, c], t, 2, signed_digits))
    codes = (got * torch.tensor([2.0**9, 2.0**5, 2.0**2]).reshape(1, 3, 1)).to(torch.int64)
    assert bool(is_khot(codes, 2, signed_digits).all())


def test_quantizer_gradients_and_calibration():
    kq = KHotQuantizer(6, True, 1, frac=2.0)  # 1-hot codes -32..16: values -8 .. 4
    x = torch.tensor([-9.0, -3.1, 0.3, 3.0, 4.0, 5.0], requires_grad=True)
    g = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 2.0])
    (kq(x) * g).sum().backward()
    assert x.grad.tolist() == [0.0, -2.0, 0.5, 3.0, -1.0, 0.0]
    # the binary point's gradient is 1/sqrt(n * largest K-hot code) times the derivative of
    # sum(g * psi(F)): psi = x + 2**-F * (K - x * 2**F0) inside the range, 2**-F * K outside it
    x64, g64, k = x.detach().double(), g.double(), kq(x).detach().double() * 4.0
    inside = x.grad != 0

    def psi(f: float) -> float:
        return float((g64 * torch.where(inside, x64 + 2.0**-f * (k - x64 * 4.0), 2.0**-f * k)).sum())

    fd = (psi(2.0 + 1e-5) - psi(2.0 - 1e-5)) / 2e-5
    assert kq.frac.grad.item() == pytest.approx(fd / (6 * 16) ** 0.5, rel=1e-6)
    kq.calibrate(torch.tensor([-1.0, 2.5]), "max")
    # tightest F with 2.5 * 2**F <= 16 and -1 * 2**F >= -32: F = 2
    assert kq.int_fracs() == [2]
    kq.calibrate(torch.randn(500, generator=torch.Generator().manual_seed(1)), "mse")
    assert "K=1 ones" in repr(kq)
