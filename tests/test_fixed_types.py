"""FixedType parsing, printing and the HLS result-type rules."""

import pytest
from hypothesis import given, strategies as st

from qfx_onnx.errors import FixedTypeError
from qfx_onnx.fixed import FixedType, OverflowMode, QuantMode, accum_type, add_type, mul_type, neg_type, sub_type, union_type

types = st.builds(
    FixedType,
    width=st.integers(1, 64),
    integer=st.integers(-20, 80),
    signed=st.booleans(),
    q=st.sampled_from(list(QuantMode)),
    o=st.sampled_from(list(OverflowMode)),
    n=st.integers(0, 1),
)


@given(types)
def test_text_round_trips(t):
    assert FixedType.parse(str(t)) == t
    assert str(FixedType.parse(str(t))) == str(t)


@pytest.mark.parametrize(
    "text, canonical",
    [
        ("ap_fixed<8,3>", "ap_fixed<8,3>"),
        ("ap_fixed<8, 3, AP_RND, AP_SAT>", "ap_fixed<8,3,AP_RND,AP_SAT>"),
        ("ap_fixed<8,3,AP_TRN,AP_WRAP,0>", "ap_fixed<8,3>"),
        ("ap_fixed<8,3,AP_TRN,AP_SAT>", "ap_fixed<8,3,AP_TRN,AP_SAT>"),
        ("ap_ufixed<16,-2,RND_CONV,SAT_SYM,3>", "ap_ufixed<16,-2,AP_RND_CONV,AP_SAT_SYM,3>"),
        ("ap_fixed<64,70,AP_RND_INF>", "ap_fixed<64,70,AP_RND_INF>"),
        ("ap_int<7>", "ap_int<7>"),
        ("ap_uint<64>", "ap_uint<64>"),
    ],
)
def test_parse_canonical(text, canonical):
    assert str(FixedType.parse(text)) == canonical


@pytest.mark.parametrize(
    "bad",
    ["ap_fixed<8>", "ap_fixed<0,0>", "ap_fixed<8,3,AP_FOO>", "ap_fixed<8,3,AP_RND,AP_BAR>", "fixed<8,3>",
     "ap_fixed<8,3,AP_RND,AP_SAT,9>", "ap_fixed<a,3>", "ap_fixed<8,3,AP_RND,AP_SAT,1,2>", "ap_int<0>", ""],
)
def test_invalid_text_is_a_clear_error(bad):
    with pytest.raises(FixedTypeError, match="."):
        FixedType.parse(bad)


def test_properties():
    t = FixedType.parse("ap_fixed<8,3>")
    assert (t.frac, t.lsb, t.int_min, t.int_max) == (5, 2**-5, -128, 127)
    assert (t.min_value, t.max_value) == (-4.0, 4.0 - 2**-5)
    u = FixedType.parse("ap_ufixed<4,-2>")
    assert (u.frac, u.min_value, u.max_value) == (6, 0.0, 15 * 2**-6)
    assert t.finn_datatype == "FIXED<8,3>"
    assert FixedType.parse("ap_int<4>").finn_datatype == "INT4"
    assert FixedType.parse("ap_ufixed<4,4>").finn_datatype == "UINT4"


def P(s):
    return FixedType.parse(s)


@pytest.mark.parametrize(
    "a, b, add, sub, mul",
    [
        ("ap_fixed<8,3>", "ap_fixed<8,3>", "ap_fixed<9,4>", "ap_fixed<9,4>", "ap_fixed<16,6>"),
        ("ap_fixed<8,3>", "ap_fixed<6,5>", "ap_fixed<11,6>", "ap_fixed<11,6>", "ap_fixed<14,8>"),
        ("ap_ufixed<8,3>", "ap_fixed<8,3>", "ap_fixed<10,5>", "ap_fixed<10,5>", "ap_fixed<16,6>"),
        ("ap_ufixed<8,3>", "ap_ufixed<4,1>", "ap_ufixed<9,4>", "ap_fixed<9,4>", "ap_ufixed<12,4>"),
    ],
)
def test_result_types(a, b, add, sub, mul):
    assert str(add_type(P(a), P(b))) == add
    assert str(sub_type(P(a), P(b))) == sub
    assert str(mul_type(P(a), P(b))) == mul


def test_neg_accum_union():
    assert str(neg_type(P("ap_ufixed<8,3>"))) == "ap_fixed<9,4>"
    assert str(accum_type(P("ap_fixed<16,6>"), 1)) == "ap_fixed<16,6>"
    assert str(accum_type(P("ap_fixed<16,6>"), 9)) == "ap_fixed<20,10>"
    assert str(accum_type(P("ap_fixed<16,6>"), 8)) == "ap_fixed<19,9>"
    assert str(union_type(P("ap_ufixed<8,3>"), P("ap_fixed<6,2>"))) == "ap_fixed<9,4>"


@given(types, st.integers(1, 5000))
def test_accumulator_holds_extreme_sums(t, k):
    acc = accum_type(t.with_modes("AP_TRN", "AP_WRAP", 0), k)
    assert k * t.int_max <= acc.int_max * 2 ** (acc.frac - t.frac)
    assert k * t.int_min >= acc.int_min * 2 ** (acc.frac - t.frac)
