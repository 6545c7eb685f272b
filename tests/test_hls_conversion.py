"""The generated C++ converts ap_fixed -> ap_fixed at each quantizer (``qfx::cast`` in layers.h);
the emulation and the reference define the cast from a double. Here both are compared on every
code of a few source types into targets of all 7 x 5 quantization/overflow modes (signed and
unsigned, N saturation bits), with the real headers.

Includes sources whose bits all lie below the target's rounding bit: the headers' conversion
asserts on those (it reads the bit after the target LSB beyond the source MSB), which
``qfx::cast`` avoids by sign-extending the source first.
"""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from qfx_onnx.fixed.reference import reference_codes
from qfx_onnx.fixed.types import FixedType, OverflowMode, QuantMode
from qfx_onnx.hls.aptypes import compile_cpp, find_ap_types_include
from qfx_onnx.hls.cpp_layers import LAYERS_H
from qfx_onnx.hls.csim import CSIM_FLAGS

O = OverflowMode


def _cases() -> list[tuple[FixedType, FixedType]]:
    a, b, c = FixedType(10, 3, True), FixedType(9, 4, False), FixedType(6, -3, True)
    cases = []
    for q in QuantMode:
        for o in OverflowMode:
            cases.append((a, FixedType(5, 1, True, q, o)))
            cases.append((b, FixedType(4, 1, True, q, o)))
            if o is not O.WRAP_SM:  # the headers reject unsigned AP_WRAP_SM (exit)
                cases.append((a, FixedType(5, 2, False, q, o)))
        # every source bit below the target's rounding bit (the widening path)
        cases.append((c, FixedType(4, 4, True, q, O.SAT)))
        cases.append((c, FixedType(3, 2, False, q, O.WRAP)))
    for o, signed, n in ((O.WRAP, True, 2), (O.WRAP, True, 1), (O.WRAP_SM, True, 2), (O.WRAP_SM, True, 1),
                         (O.WRAP, False, 2), (O.SAT, True, 3)):
        cases.append((a, FixedType(5, 1, signed, QuantMode.RND, o, n)))
    return cases


def _program(cases) -> str:
    lines = ['#include "layers.h"', "#include <cstdio>", "int main() {"]
    sources = sorted({s for s, _ in cases}, key=str)
    for s in sources:
        lines.append(f"  for (long long c = {s.int_min}; c <= {s.int_max}; ++c) {{")
        lines.append(f"    {s} v; v.range({s.width - 1}, 0) = (unsigned long long)c;")
        for src, t in cases:
            if src == s:
                lines.append(f"    printf(\"%llu\\n\", (unsigned long long)qfx::cast<{t} >(v).range({t.width - 1}, 0).to_uint64());")
        lines.append("  }")
    lines += ["  return 0;", "}"]
    return "\n".join(lines) + "\n", sources


@pytest.fixture(scope="module")
def conversions(tmp_path_factory):
    cases = _cases()
    text, sources = _program(cases)
    folder = tmp_path_factory.mktemp("conversion")
    (folder / "layers.h").write_text(LAYERS_H)
    (folder / "conv.cpp").write_text(text)
    binary = compile_cpp([folder / "conv.cpp"], folder / "conv", [find_ap_types_include(), folder], CSIM_FLAGS)
    out = subprocess.run([str(binary)], capture_output=True, text=True, check=True).stdout.split()
    return cases, sources, np.array(out, dtype=np.uint64)


def test_fixed_to_fixed_conversion_matches_the_double_reference_in_every_mode(conversions):
    cases, sources, got = conversions
    k = 0
    bad = []
    seen_modes = set()
    for s in sources:
        codes = np.arange(s.int_min, s.int_max + 1)
        values = np.ldexp(codes.astype(np.float64), -s.frac)
        targets = [t for src, t in cases if src == s]
        block = got[k:k + len(codes) * len(targets)].reshape(len(codes), len(targets))
        k += len(codes) * len(targets)
        for j, t in enumerate(targets):
            expected = reference_codes(values, t).astype(np.int64) & ((1 << t.width) - 1)
            diff = np.flatnonzero(block[:, j].astype(np.int64) != expected)
            seen_modes.add((t.q, t.o))
            if diff.size:
                bad.append(f"{s} -> {t}: {diff.size} codes differ, e.g. {values[diff[0]]!r}")
    assert k == got.size
    assert len(seen_modes) == 35
    assert not bad, "\n".join(bad)


def test_widening_is_needed_for_sources_below_the_rounding_bit():
    # The case the workaround exists for: F2 - F >= W2 with a rounding mode.
    s, t = FixedType(6, -3, True), FixedType(4, 4, True, QuantMode.RND, O.SAT)
    assert (s.frac - t.frac) >= s.width
    assert "pad = drop - fixed_traits<src_T>::width + 1" in LAYERS_H
