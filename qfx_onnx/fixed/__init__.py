"""Fixed-point types, the integer-domain reference, the torch emulation and trainable quantizers."""

from qfx_onnx.fixed.cast import cast, cast_codes
from qfx_onnx.fixed.reference import reference_cast, reference_codes
from qfx_onnx.fixed.types import (
    FixedType,
    OverflowMode,
    QuantMode,
    accum_type,
    add_type,
    mul_type,
    neg_type,
    sub_type,
    union_type,
)

__all__ = [
    "FixedType", "OverflowMode", "QuantMode", "accum_type", "add_type", "cast", "cast_codes",
    "mul_type", "neg_type", "reference_cast", "reference_codes", "sub_type", "union_type",
]
