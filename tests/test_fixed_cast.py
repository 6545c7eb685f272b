"""The torch cast against the integer-domain numpy reference, for every mode combination."""

import itertools
import math
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from qfx_onnx.fixed import FixedType, OverflowMode, QuantMode, cast, cast_codes, reference_cast, reference_codes

MODES = list(itertools.product(QuantMode, OverflowMode))


def edge_values(t: FixedType, rng: np.random.Generator, n: int = 400) -> np.ndarray:
    """Values that stress a type: ties at half an LSB, either side of them, range ends, specials."""
    lsb = t.lsb
    span = min(t.width, 52)
    codes = rng.integers(-(2**span), 2**span, n).astype(np.float64)
    ties = (codes + 0.5) * lsb
    hi, lo = t.max_value, t.min_value
    ends = np.array([hi, lo, hi + lsb / 2, lo - lsb / 2, hi + lsb, lo - lsb, -hi, -hi - lsb / 2])
    special = np.array([0.0, -0.0, np.inf, -np.inf, 1e300, -1e300, 5e-324, -5e-324, 1e-300, -1e-300, 2.0**70, -(2.0**70)])
    scale = max(abs(lo), hi, lsb)
    return np.concatenate([
        ties, np.nextafter(ties, np.inf), np.nextafter(ties, -np.inf), ends, np.nextafter(ends, np.inf),
        np.nextafter(ends, -np.inf), special, rng.normal(0, scale, n), rng.normal(0, 4 * scale, n),
    ])


def as_signed_pattern(codes: np.ndarray) -> np.ndarray:
    return codes.view(np.int64) if codes.dtype == np.uint64 else codes


TYPES = [(8, 3, True, 0), (8, 3, False, 0), (5, -2, True, 1), (12, 15, True, 0), (8, 3, True, 2), (8, 3, False, 3),
         (1, 1, True, 0), (1, 0, False, 1), (2, 1, True, 2), (24, 8, True, 0), (33, 10, True, 0), (53, 20, True, 0),
         (54, 20, True, 1), (64, 30, True, 0), (64, 64, False, 0), (64, 2, True, 3), (64, 0, False, 64)]


@pytest.mark.parametrize("q, o", MODES, ids=lambda m: m.value)
def test_torch_matches_reference_all_modes(q, o):
    # a stable seed per mode pair: hash() of a string differs in every process (PYTHONHASHSEED)
    rng = np.random.default_rng([zlib.crc32(q.value.encode()), zlib.crc32(o.value.encode())])
    for w, i, s, n in TYPES:
        t = FixedType(w, i, s, q, o, n)
        x = edge_values(t, rng)
        ref = reference_codes(x, t)
        got = cast_codes(torch.from_numpy(x), t).numpy()
        bad = np.nonzero(as_signed_pattern(ref) != got)[0]
        assert bad.size == 0, f"{t}: x={x[bad[:3]]!r} ref={ref[bad[:3]]} torch={got[bad[:3]]}"
        values = cast(torch.from_numpy(x), t).numpy()
        np.testing.assert_array_equal(values, reference_cast(x, t), err_msg=str(t))


@pytest.mark.parametrize("q, o", MODES, ids=lambda m: m.value)
def test_float32_inputs_exact_for_narrow_types(q, o):
    rng = np.random.default_rng(7)
    for w, i, s in [(8, 3, True), (16, 4, False), (24, 0, True), (6, 9, True), (10, -3, False)]:
        t = FixedType(w, i, s, q, o)
        with np.errstate(over="ignore"):
            x32 = edge_values(t, rng).astype(np.float32)
        got = cast(torch.from_numpy(x32), t)
        assert got.dtype == torch.float32
        want = reference_cast(x32.astype(np.float64), t).astype(np.float32)
        np.testing.assert_array_equal(got.numpy(), want, err_msg=str(t))


type_strategy = st.builds(
    lambda w, i, s, q, o, n: FixedType(w, i, s, q, o, min(n, w)),
    st.integers(1, 64), st.integers(-40, 100), st.booleans(),
    st.sampled_from(list(QuantMode)), st.sampled_from(list(OverflowMode)), st.integers(0, 3),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(type_strategy, st.lists(st.floats(allow_nan=False, width=64), min_size=1, max_size=40), st.integers(0, 2**31))
def test_property_random_types(t, xs, seed):
    rng = np.random.default_rng(seed)
    # mix hypothesis' floats with values on this type's grid and exact ties
    grid = (rng.integers(-(2 ** min(t.width, 50)), 2 ** min(t.width, 50), 20) + rng.choice([0.0, 0.5], 20)) * t.lsb
    x = np.concatenate([np.array(xs), grid])
    ref = as_signed_pattern(reference_codes(x, t))
    got = cast_codes(torch.from_numpy(x), t).numpy()
    np.testing.assert_array_equal(got, ref, err_msg=str(t))


def test_ap_int_quirks_match_reference():
    x = np.array([-0.3, -0.5, -0.7, 0.3, 2.9, -2.9, 300.7, -300.7, 1e30, np.inf, -0.0])
    for t in ["ap_int<8>", "ap_uint<8>", "ap_int<1>", "ap_int<64>", "ap_uint<64>"]:
        ref = as_signed_pattern(reference_codes(x, t))
        np.testing.assert_array_equal(cast_codes(torch.from_numpy(x), t).numpy(), ref, err_msg=t)
    # ap_int_base(double) truncates toward zero but gives +1 for values in (-0.5, 0)
    assert reference_codes(np.array([-0.3, -2.9]), "ap_int<8>").tolist() == [1, -2]


def test_negative_zero_becomes_positive_zero():
    out = cast(torch.tensor([-0.0, -1e-9]), "ap_fixed<8,3,AP_RND>")
    assert not torch.signbit(out).any()


def test_shapes_and_dtypes_preserved():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    for dtype in (torch.float32, torch.float64):
        y = cast(x.to(dtype), "ap_fixed<10,2,AP_RND_CONV,AP_SAT>")
        assert y.shape == x.shape and y.dtype == dtype


def test_wide_types_need_float64_to_be_exact():
    t = FixedType.parse("ap_fixed<40,20>")
    x = torch.tensor([math.pi * 1000], dtype=torch.float64)
    exact = cast(x, t)
    assert exact.item() == reference_cast(x.numpy(), t)[0]
    assert cast(x.float(), t).dtype == torch.float32  # rounded to float32: documented, not exact


def test_non_float_input_is_rejected():
    with pytest.raises(TypeError):
        cast(torch.arange(3), "ap_fixed<8,3>")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    x = torch.from_numpy(edge_values(FixedType.parse("ap_fixed<12,4>"), np.random.default_rng(0)))
    for q, o in MODES:
        t = FixedType(12, 4, True, q, o, 1)
        np.testing.assert_array_equal(cast(x.cuda(), t).cpu().numpy(), cast(x, t).numpy())
        np.testing.assert_array_equal(cast(x.float().cuda(), t).cpu().numpy(), cast(x.float(), t).numpy())


def _float32_patterns(rng: np.random.Generator, n: int) -> np.ndarray:
    """n random float32 bit patterns (every class: normals, subnormals, ±0, ±inf, NaN of both signs)."""
    bits = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    return bits.view(np.float32)


@pytest.mark.parametrize("q, o", MODES, ids=lambda m: m.value)
def test_nan_of_either_sign_and_float32_bit_patterns_match_reference(q, o):
    # NaN is read as an infinity of its sign (x86 makes -NaN: 0 * inf); the largest float below a
    # tie (nextafter) is where floor(y + 0.5) goes wrong; codes beyond 2**23 are where float32
    # rounding of y + 0.5 would; random bit patterns cover every float32 class.
    rng = np.random.default_rng([zlib.crc32(q.value.encode()), zlib.crc32(o.value.encode()), 32])
    nan = np.float64("nan")
    for w, i, s, n in [(8, 3, True, 0), (8, 3, False, 0), (30, 10, True, 0), (24, 0, True, 0), (24, 24, False, 0),
                       (8, 3, True, 2), (12, -4, False, 1), (16, 16, True, 3)]:
        t = FixedType(w, i, s, q, o, n)
        ties = (rng.integers(-(2**w), 2**w, 64) + 0.5) * t.lsb
        big = np.array([2.0**23, 2.0**24, 2.0**24 - 1, 2.0**23 + 1, 3 * 2.0**22 + 1, 2.0**53 - 1, 2.0**52 + 1]) * t.lsb
        x64 = np.concatenate([[nan, -nan, np.nextafter(0.5, 0) * t.lsb, -np.nextafter(0.5, 0) * t.lsb], ties,
                              np.nextafter(ties, 0), np.nextafter(ties, np.inf), big, -big])
        np.testing.assert_array_equal(cast(torch.from_numpy(x64), t).numpy(), reference_cast(x64, t), err_msg=str(t))
        with np.errstate(over="ignore"):
            x32 = np.concatenate([x64.astype(np.float32), _float32_patterns(rng, 4000),
                                  np.nextafter(ties.astype(np.float32), np.float32(0))])
        with np.errstate(invalid="ignore"):
            want = reference_cast(x32.astype(np.float64), t)
        got = cast(torch.from_numpy(x32), t).numpy()
        if w <= 24:
            np.testing.assert_array_equal(got, want.astype(np.float32), err_msg=str(t))
        assert np.array_equal(cast(torch.from_numpy(x32.astype(np.float64)), t).numpy(), want), str(t)


float_path_type = st.builds(
    lambda w, f, s, q, o: FixedType(w, w - f, s, q, o),
    st.integers(1, 24), st.integers(0, 126), st.booleans(),
    st.sampled_from(list(QuantMode)), st.sampled_from([m for m in OverflowMode]),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(float_path_type, st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=64), st.integers(0, 2**31))
def test_property_float32_work_dtype_matches_reference(t, patterns, seed):
    # float32 inputs of types the kernels compute in float32 (W <= 24, 0 <= F <= 126): any bit pattern,
    # plus the type's ties and the floats either side of them.
    rng = np.random.default_rng(seed)
    ties = ((rng.integers(-(2 ** t.width), 2 ** t.width, 16) + 0.5) * t.lsb).astype(np.float32)
    x = np.concatenate([np.array(patterns, dtype=np.uint32).view(np.float32), ties,
                        np.nextafter(ties, np.float32(np.inf)), np.nextafter(ties, np.float32(-np.inf))])
    got = cast(torch.from_numpy(x), t)
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), reference_cast(x.astype(np.float64), t).astype(np.float32), err_msg=str(t))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_reference_on_every_float_class():
    # On CUDA the kernels resolve NaN without a read-back (torch.where); every mode, NaN of both
    # signs, float32 bit patterns and the floats beside ties, against the numpy reference.
    rng = np.random.default_rng(5)
    for q, o in MODES:
        for w, i, s, n in [(8, 3, True, 0), (8, 3, False, 2), (30, 10, True, 1), (24, 24, False, 0), (64, 30, True, 0)]:
            t = FixedType(w, i, s, q, o, n)
            ties = (rng.integers(-(2**min(w, 50)), 2**min(w, 50), 256) + 0.5) * t.lsb
            x64 = np.concatenate([[np.nan, -np.nan], ties, np.nextafter(ties, 0), edge_values(t, rng, 100)])
            with np.errstate(invalid="ignore"):
                np.testing.assert_array_equal(cast(torch.from_numpy(x64).cuda(), t).cpu().numpy(),
                                              reference_cast(x64, t), err_msg=str(t))
            x32 = np.concatenate([_float32_patterns(rng, 2048), x64.astype(np.float32)])
            want = cast(torch.from_numpy(x32), t)
            got = cast(torch.from_numpy(x32).cuda(), t).cpu()
            assert torch.equal(got.view(torch.int32), want.view(torch.int32)), str(t)
