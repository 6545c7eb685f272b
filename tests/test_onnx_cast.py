"""The ONNX local-function cast run in onnxruntime against the integer-domain reference."""

import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from qfx_onnx.errors import ExportError
from qfx_onnx.fixed import FixedType, OverflowMode, QuantMode, reference_cast
from qfx_onnx.quant.onnx_cast import cast_model

from test_fixed_cast import edge_values

TYPES = [(8, 3, True, 0), (8, 3, False, 0), (5, -2, True, 1), (12, 15, True, 0), (8, 3, True, 2), (8, 3, False, 3),
         (1, 1, True, 0), (1, 0, False, 1), (2, 1, True, 2), (24, 8, True, 0), (16, 4, True, 5), (10, 2, True, 10),
         (24, 30, False, 2)]


def run(t: FixedType, x: np.ndarray) -> np.ndarray:
    model = cast_model(t)
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("q, o", list(itertools.product(QuantMode, OverflowMode)), ids=lambda m: m.value)
def test_onnxruntime_cast_is_bit_exact(q, o):
    rng = np.random.default_rng(3)
    for w, i, s, n in TYPES:
        t = FixedType(w, i, s, q, o, n)
        with np.errstate(over="ignore"):
            x = edge_values(t, rng).astype(np.float32)
        got = run(t, x)
        want = reference_cast(x.astype(np.float64), t).astype(np.float32)
        bad = np.nonzero(got.view(np.uint32) != want.view(np.uint32))[0]
        assert bad.size == 0, f"{t}: x={x[bad[:4]]} ort={got[bad[:4]]} ref={want[bad[:4]]}"


@pytest.mark.parametrize("text", ["ap_fixed<25,3>", "ap_int<8>", "ap_fixed<8,-130>"])
def test_types_float32_cannot_run_are_refused(text):
    with pytest.raises(ExportError):
        cast_model(FixedType.parse(text))
