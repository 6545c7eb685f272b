"""Softmax and LayerNormalization in fixed point, with every intermediate type explicit.

Each kernel is a frozen config (types, tables, constants) and a torch emulation on float64 tensors
holding fixed-point values. The emulation is the definition; the ONNX form
(:mod:`qfx_onnx.nonlinear.onnx_emit`) and the C++ form (``cpp/nnet_qfx_nonlinear.h``) repeat it
step by step. Sums are exact (lossless accumulator types, so the order of additions cannot
matter), products are exact until the stated cast, and every intermediate fits 53 bits, so float64
holds each value exactly.

Softmax over the last axis of ``x`` (``n`` values of ``in_type``), after hls4ml's "stable" softmax:

    m = max_j x_j                               in_type          (exact)
    d_j = x_j - m                               diff_type        (exact: sub_type(in, in), <= 0)
    e_j = exp_table[d_j]                        exp table out type
    s = sum_j e_j                               sum_type         (exact: accum_type(exp, n))
    r = reciprocal_table[s]                     reciprocal table out type
    y_j = out_type(e_j * r)                     out_type         (product exact, then cast)

LayerNormalization over the last axis (ONNX ``LayerNormalization`` with ``axis=-1``):

    S = sum_j x_j                               accum_type(in, n) (exact)
    mean = mean_type(S * inv_n)                 inv_n = inv_n_type(1/n), a constant
    c_j = x_j - mean                            centered_type    (exact: sub_type(in, mean))
    Q = sum_j c_j**2                            accum_type(mul_type(c, c), n) (exact)
    var = var_type(Q * inv_n)
    r = rsqrt_table[var]                        1/sqrt(var + eps), eps folded into the table
    z_j = norm_type(c_j * r)
    y_j = out_type(z_j * gamma_j + beta_j)      gamma, beta cast to gamma_type, beta_type

Training: the forward is exact; the backward is the gradient of the float kernel
(``torch.softmax`` / ``torch.nn.functional.layer_norm``), a smooth straight-through estimate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qfx_onnx.errors import ConfigError
from qfx_onnx.fixed.cast import cast
from qfx_onnx.fixed.tables import LookupTable
from qfx_onnx.fixed.types import FixedType, accum_type, mul_type, sub_type
from qfx_onnx.nonlinear.units import DEFAULT_BITS, exp_table, reciprocal_table, rsqrt_table

EXACT_BITS = 53


def _rs(w: int, i: int, signed: bool = True) -> FixedType:
    return FixedType(w, i, signed=signed, q="AP_RND", o="AP_SAT")


def _check_exact(where: str, **types: FixedType) -> None:
    for name, t in types.items():
        if t.width > EXACT_BITS:
            raise ConfigError(f"{where}: {name} {t} is wider than {EXACT_BITS} bits; narrow the "
                              "intermediate types so every step stays float64-exact")


@dataclass(frozen=True, eq=False)
class SoftmaxConfig:
    """Types and tables of a softmax over ``n`` values; build with :meth:`create`."""

    in_type: FixedType
    n: int
    diff_type: FixedType
    exp: LookupTable
    sum_type: FixedType
    reciprocal: LookupTable
    out_type: FixedType

    @classmethod
    def create(cls, in_type: FixedType | str, n: int, out_type: FixedType | str | None = None,
               exp_type: FixedType | str = "ap_ufixed<16,1,AP_RND,AP_SAT>", exp_bits: int | None = DEFAULT_BITS,
               reciprocal_type: FixedType | str | None = None,
               reciprocal_bits: int | None = DEFAULT_BITS, reciprocal_index: str = "log2") -> "SoftmaxConfig":
        """Defaults: ``out_type`` ``ap_ufixed<W_in, 1, AP_RND, AP_SAT>`` (probabilities in [0, 1]),
        exp entries ``ap_ufixed<16,1>``, reciprocal over ``[1, n]`` (the sum is at least
        ``exp(0) = 1``) in ``ap_ufixed<18,1>`` with a log2 index, tables of at most 1024 entries."""
        t = FixedType.coerce(in_type)
        if n < 1:
            raise ConfigError(f"softmax over {n} values")
        diff = sub_type(t, t)
        e = exp_table(diff, exp_type, exp_bits)
        s = accum_type(e.out_type, n)
        r = reciprocal_table(s, reciprocal_type, reciprocal_bits, lo=1.0, hi=float(max(n, 2)), index=reciprocal_index)
        out = _rs(t.width, 1, False) if out_type is None else FixedType.coerce(out_type)
        _check_exact("softmax", diff_type=diff, sum_type=s, product=mul_type(e.out_type, r.out_type), out_type=out)
        return cls(t, n, diff, e, s, r, out)


def softmax_exact(x: torch.Tensor, cfg: SoftmaxConfig) -> torch.Tensor:
    """The fixed-point softmax of float64 ``x`` (values of ``cfg.in_type``) over the last axis."""
    if x.shape[-1] != cfg.n:
        raise ConfigError(f"softmax configured for {cfg.n} values, got a last axis of {x.shape[-1]}")
    x = x.to(torch.float64)
    d = x - x.amax(dim=-1, keepdim=True)
    e = cfg.exp.torch_lookup(d)
    r = cfg.reciprocal.torch_lookup(e.sum(dim=-1, keepdim=True))
    return cast(e * r, cfg.out_type)


def softmax(x: torch.Tensor, cfg: SoftmaxConfig) -> torch.Tensor:
    """Trainable :func:`softmax_exact`: exact forward, ``torch.softmax`` gradient."""
    return _ExactForward.apply(lambda a: softmax_exact(a, cfg), lambda a: torch.softmax(a, -1), x)


@dataclass(frozen=True, eq=False)
class LayerNormConfig:
    """Types, constant and table of a LayerNormalization over ``n`` values; build with :meth:`create`."""

    in_type: FixedType
    n: int
    inv_n_type: FixedType
    mean_type: FixedType
    var_type: FixedType
    rsqrt: LookupTable
    norm_type: FixedType
    gamma_type: FixedType
    beta_type: FixedType
    out_type: FixedType
    eps: float

    @property
    def sum_type(self) -> FixedType:
        return accum_type(self.in_type, self.n)

    @property
    def centered_type(self) -> FixedType:
        return sub_type(self.in_type, self.mean_type)

    @property
    def square_sum_type(self) -> FixedType:
        return accum_type(mul_type(self.centered_type, self.centered_type), self.n)

    @property
    def inv_n(self) -> float:
        """``1/n`` as ``inv_n_type`` holds it."""
        return float(cast(torch.tensor([1.0 / self.n], dtype=torch.float64), self.inv_n_type)[0])

    @classmethod
    def create(cls, in_type: FixedType | str, n: int, eps: float = 1e-5, out_type: FixedType | str | None = None,
               mean_type: FixedType | str | None = None, var_type: FixedType | str | None = None,
               rsqrt_type: FixedType | str | None = None, rsqrt_bits: int | None = DEFAULT_BITS,
               rsqrt_index: str = "log2",
               norm_type: FixedType | str | None = None, gamma_type: FixedType | str | None = None,
               beta_type: FixedType | str | None = None,
               inv_n_type: FixedType | str = "ap_ufixed<18,1,AP_RND,AP_SAT>") -> "LayerNormConfig":
        """Defaults, from ``in_type = ap_fixed<W, I>`` (F = W - I):

        * ``mean_type`` ``ap_fixed<W+4, I>`` (4 more fractional bits), ``AP_RND, AP_SAT``;
        * ``var_type`` ``ap_ufixed<2I-1 + F+8, 2I-1>``: a variance of values in
          ``[-2**(I-1), 2**(I-1))`` is at most ``2**(2I-2)``; 8 more fractional bits let the log2
          rsqrt table resolve variances down to ``2**(mant_bits - F - 8)``;
        * ``norm_type`` ``ap_fixed<16, I_z>`` with ``2**(I_z-1) > sqrt(n)`` (``|z| <= sqrt(n-1)``);
        * ``gamma_type``/``beta_type`` ``ap_fixed<16, 4>``; ``out_type`` ``in_type`` with
          ``AP_RND, AP_SAT``; the rsqrt table (log2 index, at most 1024 entries) covers ``var_type``.
        """
        t = FixedType.coerce(in_type)
        if n < 1:
            raise ConfigError(f"layer_norm over {n} values")
        co = lambda v, d: d if v is None else FixedType.coerce(v)  # noqa: E731
        f, i = t.frac, t.integer
        mean = co(mean_type, _rs(t.width + 4, i))
        var = co(var_type, _rs(max(1, 2 * i - 1) + f + 8, max(1, 2 * i - 1), False))
        rs = rsqrt_table(var, rsqrt_type, rsqrt_bits, eps=eps, index=rsqrt_index)
        z_int = math.floor(math.log2(math.sqrt(n))) + 2
        cfg = cls(t, n, FixedType.coerce(inv_n_type), mean, var, rs, co(norm_type, _rs(16, z_int)),
                  co(gamma_type, _rs(16, 4)), co(beta_type, _rs(16, 4)),
                  co(out_type, t.with_modes("AP_RND", "AP_SAT")), eps)
        # a product by 1/n needs only the significant bits of its code (1 when n is a power of two)
        inv_bits = _significant_bits(cfg.inv_n, cfg.inv_n_type)
        _check_exact("layer_norm", sum_type=cfg.sum_type, mean_product=cfg.sum_type.with_width(cfg.sum_type.width + inv_bits),
                     square_sum_type=cfg.square_sum_type,
                     var_product=cfg.square_sum_type.with_width(cfg.square_sum_type.width + inv_bits),
                     norm_product=mul_type(cfg.centered_type, rs.out_type),
                     affine_product=mul_type(cfg.norm_type, cfg.gamma_type))
        return cfg


def _significant_bits(value: float, t: FixedType) -> int:
    code = int(math.ldexp(value, t.frac))
    if code == 0:
        raise ConfigError(f"layer_norm: 1/n rounds to 0 in {t}")
    return code.bit_length() - ((code & -code).bit_length() - 1)


def layer_norm_exact(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                     cfg: LayerNormConfig) -> torch.Tensor:
    """The fixed-point LayerNormalization of float64 ``x`` over the last axis; ``gamma`` and
    ``beta`` (shape ``[n]``) are cast to their types first."""
    if x.shape[-1] != cfg.n:
        raise ConfigError(f"layer_norm configured for {cfg.n} values, got a last axis of {x.shape[-1]}")
    x = x.to(torch.float64)
    inv_n = cfg.inv_n
    mean = cast(x.sum(dim=-1, keepdim=True) * inv_n, cfg.mean_type)
    c = x - mean
    var = cast((c * c).sum(dim=-1, keepdim=True) * inv_n, cfg.var_type)
    z = cast(c * cfg.rsqrt.torch_lookup(var), cfg.norm_type)
    g = cast(gamma.to(torch.float64), cfg.gamma_type)
    b = cast(beta.to(torch.float64), cfg.beta_type)
    return cast(z * g + b, cfg.out_type)


def layer_norm(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, cfg: LayerNormConfig) -> torch.Tensor:
    """Trainable :func:`layer_norm_exact`: exact forward, float LayerNorm gradient for x, gamma, beta."""
    return _ExactForward.apply(
        lambda a, g, b: layer_norm_exact(a, g, b, cfg),
        lambda a, g, b: torch.nn.functional.layer_norm(a, (cfg.n,), g, b, cfg.eps), x, gamma, beta)


class _ExactForward(torch.autograd.Function):
    """``exact(*inputs)`` forward; backward through ``smooth(*inputs)`` (float64)."""

    @staticmethod
    def forward(ctx, exact, smooth, *inputs):
        ctx.smooth = smooth
        ctx.save_for_backward(*inputs)
        with torch.no_grad():
            return exact(*inputs).to(inputs[0].dtype)

    @staticmethod
    def backward(ctx, grad):
        inputs = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:]
        with torch.enable_grad():
            xs = [t.detach().to(torch.float64).requires_grad_(need) for t, need in zip(inputs, needs)]
            wanted = [x for x in xs if x.requires_grad]
            grads = iter(torch.autograd.grad(ctx.smooth(*xs), wanted, grad.to(torch.float64)) if wanted else [])
        out = [next(grads).to(t.dtype) if need else None for t, need in zip(inputs, needs)]
        return (None, None, *out)
