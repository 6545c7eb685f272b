"""``fused_cast`` gives the same bits as ``cast``.

Compiling costs seconds per type, so compiled kernels are checked on five types that cover the
float path's four overflow branches and the int path, both dtypes, an unsigned type and a negative
binary point (``benchmarks/bench_cast.py`` checks six more combinations on 10**7 values). All 35
mode combinations are checked on the uncompiled body against the numpy reference (fused.py compiles
kernels.py's float path and, for int-path types, ``cast`` itself; nothing is restated).
"""

from __future__ import annotations

import itertools

import pytest
import torch

import numpy as np

from qfx_onnx.fixed import FixedType, OverflowMode, QuantMode, cast, reference_cast
from qfx_onnx.fixed.kernels import needs_int_path as _needs_int_path
from qfx_onnx.fixed.fused import _float_cast, fused_cast


def edge_values(t: FixedType, dtype: torch.dtype) -> torch.Tensor:
    """Every tie and every code from 1.5x below to 1.5x above the range, the range ends, ±0, ±inf,
    NaN, subnormals, tiny and huge magnitudes, values near 2**24 and 2**53 codes, and noise."""
    span = min(3 * 2 ** t.width // 2, 1 << 12)
    k = torch.arange(-span, span, dtype=torch.float64)
    lsb = t.lsb
    big = [2.0**24, 2.0**53, 2.0**60]
    special = [0.0, -0.0, float("inf"), -float("inf"), float("nan"), 5e-324, -5e-324, 1e-300, -1e-300,
               1e300, -1e300, 2.0**-60, -(2.0**-60), t.max_value, t.min_value,
               t.max_value + lsb / 2, t.min_value - lsb / 2, t.max_value + lsb, t.min_value - lsb]
    special += [s * b * lsb + d * lsb for b in big for s in (1, -1) for d in (0.0, 0.5, 1.0)]
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(4096, generator=gen, dtype=torch.float64) * 2.0 ** (t.integer + 1)
    return torch.cat([k * lsb, (k + 0.5) * lsb, torch.tensor(special, dtype=torch.float64), noise]).to(dtype)


def assert_same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    int_dtype = torch.int64 if a.dtype == torch.float64 else torch.int32
    diff = (a.contiguous().view(int_dtype) != b.contiguous().view(int_dtype)).nonzero()
    if diff.numel():
        i = diff[0].item()
        raise AssertionError(f"{diff.numel()} differ, first at {i}: {a.flatten()[i]} vs {b.flatten()[i]}")


ALL_COMBOS = list(itertools.product(QuantMode, OverflowMode))
SHAPES = [(8, 3, True), (6, 2, False), (5, 7, True), (24, 4, True), (40, 10, True)]


@pytest.mark.parametrize("q,o", ALL_COMBOS, ids=lambda m: m.value)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_float_path_matches_cast_for_every_mode(q, o, dtype):
    for w, i, signed in SHAPES:
        t = FixedType(w, i, signed=signed, q=q, o=o)
        if _needs_int_path(t):
            continue  # fused_cast compiles cast itself for these
        x = edge_values(t, dtype)
        want = reference_cast(x.double().numpy(), t)
        got = _float_cast(x, t)
        assert got.dtype == dtype
        if dtype == torch.float64 or w <= 24:
            assert_same_bits(got, torch.from_numpy(want).to(dtype))


COMPILED = [  # every overflow path, both dtypes, unsigned, F < 0; benchmarks/bench_cast.py adds the rest
    ("ap_fixed<8,3,AP_TRN,AP_WRAP>", torch.float32),
    ("ap_ufixed<6,2,AP_RND_CONV,AP_WRAP>", torch.float64),
    ("ap_fixed<5,7,AP_RND_ZERO,AP_SAT_SYM>", torch.float64),
    ("ap_fixed<16,6,AP_RND_MIN_INF,AP_SAT_ZERO>", torch.float32),
    ("ap_fixed<8,3,AP_RND_INF,AP_WRAP_SM>", torch.float32),  # int path
]


@pytest.mark.parametrize("text,dtype", COMPILED, ids=lambda v: str(v))
def test_compiled_kernel_matches_cast(text, dtype):
    t = FixedType.parse(text)
    x = edge_values(t, dtype)
    assert_same_bits(fused_cast(x, t), cast(x, t))


def test_other_shapes_reuse_the_kernel():
    text, dtype = COMPILED[0]
    x = edge_values(FixedType.parse(text), dtype)
    for v in (x[:1], x[:0], x[: 6 * 7].reshape(6, 7), x[: 6 * 7].reshape(6, 7).t(), x[::3]):
        out = fused_cast(v, text)
        assert out.shape == v.shape
        assert_same_bits(out, cast(v, text).contiguous())


def test_invalid_arguments_raise_like_cast():
    with pytest.raises(TypeError):
        fused_cast(torch.arange(4), "ap_fixed<8,3>")
    with pytest.raises(ValueError):
        fused_cast(torch.zeros(4), "ap_fixed<65,3>")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_cast_on_cuda_matches_cpu_cast():
    # triton kernels from the same code: a float-path type per overflow branch and an int-path type
    for text in ("ap_fixed<8,3,AP_RND,AP_SAT>", "ap_ufixed<6,2,AP_RND_ZERO,AP_SAT_ZERO>",
                 "ap_fixed<8,3,AP_TRN,AP_WRAP>", "ap_fixed<8,3,AP_RND_CONV,AP_WRAP_SM,2>"):
        t = FixedType.parse(text)
        for dtype in (torch.float32, torch.float64):
            x = edge_values(t, dtype)
            assert_same_bits(fused_cast(x.cuda(), t).cpu(), cast(x, t))
