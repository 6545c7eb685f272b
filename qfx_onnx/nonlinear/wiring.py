"""Nonlinear IR ops as exact fixed-point ops: the ``fixed`` spec, its evaluation and its ONNX form.

After quantization every nonlinear op with an exact definition (sigmoid, tanh, exp, erf, gelu,
sqrt, reciprocal, div by an activation, softmax, layer_norm) carries a keyword ``fixed``: a spec
string ``key=value;...`` (plain data, so the fx graph holds it and the annotated ONNX stores it)
naming every type and size of its definition:

==============  ===============================================================================
``in``          the op's own **index cast**: the input is cast to this type first (equal to the
                input cast's type at quantization time, modes ``AP_RND, AP_SAT``; an identity then).
                If finetune later learns another binary point for the input, the op still reads
                its table through this cast, so the definition never depends on a learned value;
                :func:`attach_nonlinear` run again rebuilds the specs for the new types.
``out``         the table's (or kernel's) output type: the following cast's integer bits, with
                ``guard_bits`` more fractional bits (at most 24 bits: float32 carries it exactly
                into the annotated ONNX's cast); for a one-input table on an input of at most
                ``bits`` bits, the following cast's own type (one entry per code: op + cast are
                float64 ``f`` then the cast, exactly)
``bits``        table index bits (``2**bits`` entries at most; one entry per code when the
                input is that narrow, which for sigmoid/tanh is today's all-codes table)
``n``, ``eps``, ``gamma``, ``beta``, ``exp_bits``, ``recip_bits``, ``rsqrt_bits``, ``b``
                softmax / layer_norm / div specifics (see :func:`build`)
==============  ===============================================================================

The tables themselves are built from the spec once per process (:func:`build`, cached by the
text). Evaluation (:func:`evaluate`) is trainable: a table's gradient is the float function's, a
kernel's that of the float kernel, the index cast's the identity (straight-through).
"""

from __future__ import annotations

import functools
import math

import torch

from qfx_onnx.errors import ConfigError
from qfx_onnx.fixed.cast import cast
from qfx_onnx.fixed.tables import Log2Index, LookupTable, TableIndex
from qfx_onnx.fixed.types import FixedType
from qfx_onnx.nonlinear import units
from qfx_onnx.nonlinear.kernels import LayerNormConfig, SoftmaxConfig, layer_norm, softmax

TABLE_OPS = ("sigmoid", "tanh", "exp", "erf", "gelu", "sqrt", "reciprocal")
KERNEL_OPS = ("softmax", "layer_norm", "div")
EXACT_OPS = TABLE_OPS + KERNEL_OPS
MAX_OUT_BITS = 24  # float32 carries the raw result exactly into the annotated ONNX's cast


def spec_text(**fields) -> str:
    """``key=value;...`` sorted by key (the ``fixed`` keyword's value)."""
    return ";".join(f"{k}={fields[k]}" for k in sorted(fields))


def parse_spec(text: str) -> dict[str, str]:
    """The fields of a spec string; ConfigError for a malformed one."""
    try:
        return dict(part.split("=", 1) for part in text.split(";"))
    except ValueError:
        raise ConfigError(f"malformed nonlinear spec {text!r}") from None


def _ftype(text: str) -> FixedType:
    return FixedType.parse(text)


def _table(op: str, f: dict, approximate: str = "none") -> LookupTable:
    t, out, bits = _ftype(f["in"]), _ftype(f["out"]), int(f["bits"])
    if op == "sigmoid":
        return units.sigmoid_table(t, out, bits)
    if op == "tanh":
        return units.tanh_table(t, out, bits)
    if op == "erf":
        return units.erf_table(t, out, bits)
    if op == "gelu":
        return units.gelu_table(t, out, bits, approximate=approximate)
    if op == "exp":
        return LookupTable.build("exp", TableIndex.over(t, bits=bits), out, torch.exp)
    # sqrt, reciprocal: positive inputs over decades (log2 index); codes below the smallest
    # positive one read the first entry
    index = Log2Index.over(t, math.ldexp(1.0, -t.frac), None, bits)
    return LookupTable.build(op, index, out, torch.sqrt if op == "sqrt" else torch.reciprocal)


@functools.lru_cache(maxsize=512)
def build(op: str, text: str, approximate: str = "none"):
    """The tables / kernel config a spec defines (cached): a LookupTable for a one-input op, a
    SoftmaxConfig, a LayerNormConfig, or (div) the reciprocal LookupTable of the divisor."""
    f = parse_spec(text)
    if op in TABLE_OPS:
        return _table(op, f, approximate)
    if op == "softmax":
        return SoftmaxConfig.create(_ftype(f["in"]), int(f["n"]), out_type=_ftype(f["out"]),
                                    exp_bits=int(f["exp_bits"]), reciprocal_bits=int(f["recip_bits"]))
    if op == "layer_norm":
        return LayerNormConfig.create(_ftype(f["in"]), int(f["n"]), eps=float(f["eps"]), out_type=_ftype(f["out"]),
                                      rsqrt_bits=int(f["rsqrt_bits"]), gamma_type=_ftype(f["gamma"]),
                                      beta_type=_ftype(f["beta"]))
    if op == "div":
        b = _ftype(f["b"])
        index = Log2Index.over(b, math.ldexp(1.0, -b.frac), None, int(f["recip_bits"]))
        return LookupTable.build("reciprocal", index, _ftype(f["recip"]), torch.reciprocal)
    raise ConfigError(f"no exact fixed-point definition of {op}")


def _index_cast(x: torch.Tensor, t: FixedType) -> torch.Tensor:
    """``t(x)`` with a straight-through gradient."""
    return x + (cast(x.detach().to(torch.float64), t).to(x.dtype) - x).detach()


def recip_type(b: FixedType) -> FixedType:
    """The reciprocal table's entries for a divisor of type ``b``: ``ap_ufixed<18, I>`` holding
    ``1 / 2**-F_b``, the largest entry."""
    return FixedType(18, b.frac + 1, signed=False, q="AP_RND", o="AP_SAT")


def evaluate(op: str, text: str, *args, approximate: str = "none", axis: int = -1) -> torch.Tensor:
    """The exact op on float tensors holding fixed-point values (trainable, see the module docstring).
    ``softmax``/``layer_norm`` run over ``axis``, which for layer_norm must be the last one."""
    f = parse_spec(text)
    cfg = build(op, text, approximate)
    x = _index_cast(args[0], _ftype(f["in"])) if "in" in f else args[0]
    if op in TABLE_OPS:
        return cfg(x)
    if op == "softmax":
        dim = axis % x.dim()
        y = softmax(x.movedim(dim, -1), cfg)
        return y.movedim(-1, dim)
    if op == "layer_norm":
        scale, bias = args[1], args[2]
        n = cfg.n
        beta = bias if bias is not None else torch.zeros(n, dtype=x.dtype, device=x.device)
        return layer_norm(x, scale.reshape(n), beta.reshape(n), cfg)
    # div: out(a * reciprocal(b)); the product is exact in float64, ``out`` keeps it float32-exact
    b = _index_cast(args[1], _ftype(f["b"]))
    return _index_cast(args[0] * cfg(b), _ftype(f["out"]))


def table_out_type(after: FixedType, guard_bits: int, signed: bool | None = None) -> FixedType:
    """A result type with the integer bits of the cast ``after`` and ``guard_bits`` more
    fractional bits, at most :data:`MAX_OUT_BITS` wide, ``AP_RND, AP_SAT``."""
    width = max(1, min(MAX_OUT_BITS, after.width + guard_bits))
    return FixedType(width, after.integer, signed=after.signed if signed is None else signed, q="AP_RND", o="AP_SAT")


def index_type(t: FixedType) -> FixedType:
    """The index cast's type for an input of type ``t``: ``t`` with ``AP_RND, AP_SAT`` (the same
    values; the modes only matter if the input's type later changes)."""
    return t.with_modes("AP_RND", "AP_SAT", 0)


__all__ = ["EXACT_OPS", "KERNEL_OPS", "TABLE_OPS", "build", "evaluate", "index_type", "parse_spec", "spec_text",
           "table_out_type"]
