"""Trainable fixed-point quantizers: an ``ap_fixed`` cast whose binary point is learned (QFX).

``FixedQuantizer`` keeps a float parameter ``frac`` per tensor or per channel. The forward pass
uses ``F = round(frac)`` (round half to even) fractional bits and returns exactly what
``cast(x, FixedType(W, W - F, signed, q, o, n))`` returns, bit for bit, so training sees the values
that the annotated ONNX model and the HLS project compute.

Gradients (straight-through estimators):

* input: identity where the rounded code lies inside the type's code range; outside it zero when
  the overflow mode saturates (``AP_SAT``, ``AP_SAT_SYM``, ``AP_SAT_ZERO``, and ``AP_WRAP_SM`` on
  an unsigned type, which saturates), identity for wrapping modes.
* binary point (LSQ/TQT): with step ``s = 2**-F`` and ``xq = s * Q(x / s)``,
  ``d xq / d log2(s) = ln2 * (xq - x)`` inside the range (rounding passed straight through) and
  ``ln2 * b`` outside it, where ``b`` is the range end the element overflowed past
  (``s * code_max`` or ``s * code_min``: the saturated value, also used for ``AP_SAT_ZERO`` and
  wrapping modes, so that the gradient always asks for more range). ``F = -log2(s)`` flips the
  sign, and ``round(frac)`` passes the gradient straight through. Like LSQ, the result is
  multiplied by ``1 / sqrt(n * code_max)`` (``n`` elements per channel, ``code_max`` the largest
  code of the type, at least 1) so that the step's update is commensurate with the weights'.

Speed. Quantization-aware training casts every tensor of a small network, so ``forward`` keeps
per-call work low. The integer binary points and every constant derived from them (``2**F``,
``2**-F``, the code bounds, as tensors on the input's device) are cached in a ``_Plan``,
rebuilt only when ``frac`` changes (its version counter moves, as it does after an optimizer step
or ``set_frac``; a change made through ``frac.data`` is not seen). Reading the integers back is the
one device-to-host copy, once per change of ``frac``, none while it is frozen. Every float-path type
under saturation (``AP_SAT``/``AP_SAT_SYM``, unsigned ``AP_WRAP_SM``; any rounding mode; the work
dtype of ``cast`` equal to the input's) takes ``_fast_cast``: :mod:`qfx_onnx.fixed.kernels`'
rounding in place on one temporary, a float (not boolean) mask of the codes inside the range for
the backward pass, which reduces the binary-point gradient as two dot products. Other types take
the general ``_quantize_with`` (the same kernels, plus a -1/0/+1 state). Under ``torch.compile``
the fast path traces with the binary points as tensors (``_traced_forward``): they are graph
inputs, not constants to recompile for. All paths are bit-identical to ``cast``.
"""

from __future__ import annotations

import dataclasses
import math
from enum import Enum
from typing import Callable, Sequence

import torch
from torch import nn

from qfx_onnx.fixed import kernels
from qfx_onnx.fixed.cast import cast
from qfx_onnx.fixed.kernels import (FloatSpec, fix_nan_, float_spec, lazy_nan, needs_int_path, overflow_, round_,
                                     scaled, to_values_, work_dtype)
from qfx_onnx.fixed.types import MAX_ABS_FRAC, FixedType, OverflowMode, QuantMode

LN2 = math.log(2.0)


class CalibrationMethod(str, Enum):
    """How a binary point is set from observed values (``calibrate``/``finalize``'s ``method``)."""

    MAX = "max"  # the largest magnitude fits
    PERCENTILE = "percentile"  # the given percentile of magnitudes fits
    MSE = "mse"  # the binary point near max's with the least squared cast error


CALIBRATION_METHODS = tuple(m.value for m in CalibrationMethod)
MSE_WINDOW = (-2, 4)  # offsets from the max-abs binary point searched by method="mse"


class _BinaryPointSTE(torch.autograd.Function):
    """``xq = quantize(x)`` with the straight-through input gradient and the LSQ frac gradient."""

    @staticmethod
    def forward(ctx, x, frac, quantize, lo, hi, axis, saturating, grad_scale):
        xq, state = quantize(x)
        if ctx.needs_input_grad[1]:
            ctx.save_for_backward(state, x, xq, lo, hi)
        else:
            ctx.save_for_backward(state)
        ctx.axis, ctx.saturating, ctx.grad_scale = axis, saturating, grad_scale
        ctx.frac_meta = (frac.shape, frac.dtype, frac.device)
        return xq

    @staticmethod
    def backward(ctx, grad):
        state = ctx.saved_tensors[0]
        grad_x = grad_frac = None
        if ctx.needs_input_grad[0]:
            grad_x = grad.masked_fill(state != 0, 0.0) if ctx.saturating else grad
        if ctx.needs_input_grad[1]:
            _, x, xq, lo, hi = ctx.saved_tensors
            # d xq / d log2(s), over ln2
            d = torch.where(state == 0, xq - x, torch.where(state > 0, hi, lo))
            prod = grad * d
            if ctx.axis is None:
                total = prod.sum()
            else:
                total = prod.sum(dim=[i for i in range(prod.dim()) if i != ctx.axis])
            shape, dtype, device = ctx.frac_meta
            grad_frac = (total * (-LN2 * ctx.grad_scale)).to(device=device, dtype=dtype).reshape(shape)
        return grad_x, grad_frac, None, None, None, None, None, None


@dataclasses.dataclass(frozen=True)
class _FastConsts:
    """Constants of the fast path for one set of binary points, input dtype and device: Python
    floats for a per-tensor quantizer, tensors broadcasting along ``axis`` for a per-channel one."""

    axis: int | None
    spec: FloatSpec
    scale: float | torch.Tensor  # 2**F times the rounding grid (kernels.scaled)
    inv: float | torch.Tensor  # 2**-F: codes back to values
    low: float | torch.Tensor  # the saturated values lo * 2**-F and hi * 2**-F (NaN's result)
    high: float | torch.Tensor
    negative_frac: bool  # some F < 0: x * 2**F may underflow (kernels.scaled)


def _fast_cast(x: torch.Tensor, c: _FastConsts, want_inside: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(xq, inside): ``cast(x, T)`` bit for bit from kernels.py's arithmetic (saturating float-path
    types in x's own dtype), and with ``want_inside`` a float mask, 1.0 where the rounded code lies
    in the code range (0.0 elsewhere, NaN included)."""
    s = c.spec
    codes = round_(scaled(x, c.scale, x.dtype, c.negative_frac), s.q)
    inside = None
    if want_inside:
        clamped = torch.clamp(codes, s.lo, s.hi)
        inside = torch.eq(codes, clamped, out=codes)  # float 1.0 / 0.0: boolean masks are slower on CPU
        codes = clamped
    else:
        codes.clamp_(s.lo, s.hi)
    return fix_nan_(to_values_(codes, c.inv), x, s, c.low, c.high), inside


def _pow2(e: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``2**e`` for integer-valued ``e`` in the normal range of ``dtype``, built from its exponent bits:
    inductor inlines this scalar into every vector iteration of a fused loop, where ``exp2`` costs
    more than the cast itself."""
    bits, bias, int_dtype = (23, 127, torch.int32) if dtype == torch.float32 else (52, 1023, torch.int64)
    return ((e.to(int_dtype) + bias) << bits).view(dtype)


class _FastSTE(torch.autograd.Function):
    """``_BinaryPointSTE`` for a saturating type on the fast path: the same gradients, from a float
    mask. Outside the range ``xq`` is the saturated value, which is the LSQ term there."""

    @staticmethod
    def forward(ctx, x, frac, consts, grad_scale):
        xq, inside = _fast_cast(x, consts, want_inside=True)
        ctx.save_for_backward(inside, x, xq)
        ctx.consts, ctx.grad_scale, ctx.frac_meta = consts, grad_scale, (frac.shape, frac.dtype)
        return xq

    @staticmethod
    def backward(ctx, grad):
        inside, x, xq = ctx.saved_tensors
        grad_x = grad * inside if ctx.needs_input_grad[0] else None
        grad_frac = None
        if ctx.needs_input_grad[1]:
            axis = ctx.consts.axis
            dims = None if axis is None else [i for i in range(x.dim()) if i != axis]
            # d xq / d log2(s), over ln2: xq - x inside the range, xq outside it, so the sum of
            # grad * d is <grad, xq> - <grad_x, x>: two reductions, no new tensor the size of x.
            total = None
            if lazy_nan():  # eager; traced, the one-expression form below fuses into one loop
                g_in = grad_x if grad_x is not None else grad * inside
                if axis is None:
                    total = torch.dot(grad.reshape(-1), xq.reshape(-1)) - torch.dot(g_in.reshape(-1), x.reshape(-1))
                else:
                    total = torch.addcmul(grad * xq, g_in, x, value=-1.0).sum(dim=dims)
            if total is None or not (total.device.type == "cpu" and bool(torch.isfinite(total).all())):
                # x * 0.0 is NaN where x is not finite, and the formula wants 0 there
                d = torch.where(inside != 0, xq - x, xq).mul_(grad)
                total = d.sum() if axis is None else d.sum(dim=dims)
            shape, dtype = ctx.frac_meta
            grad_frac = total.mul_(-LN2 * ctx.grad_scale).to(dtype).reshape(shape)
        return grad_x, grad_frac, None, None


@dataclasses.dataclass
class _Plan:
    """What ``forward`` needs for the current binary points and one input dtype, device and rank."""

    key: tuple  # (frac's version, its data pointer, x.dtype, x.device, x.dim())
    frac: torch.Tensor  # the parameter the plan was made for (kept alive: its id stays unique)
    fracs: list[int]
    axis: int | None
    lo: torch.Tensor  # range ends s * code_min and s * code_max, for the general path
    hi: torch.Tensor
    fast: _FastConsts | None


class BinaryPointQuantizer(nn.Module):
    """Shared machinery of quantizers with a learnable binary point: the ``frac`` parameter (shape
    ``()`` or ``(C,)``), the autograd rule, frozen types and calibration.

    Subclasses define ``_type(f)``, ``_code_bounds()``, ``_fit_round(y)``, ``_quantize_with(x, fracs, axis)``
    and ``_saturating``.
    """

    reservoir_size = 4096  # values kept per channel by observe() for percentile/mse estimates
    _saturating = True
    fast_path = True  # False sends every forward through _quantize_with (for comparisons)
    _plan_cache: _Plan | None = None

    def __init__(self, width: int, signed: bool, frac: float | torch.Tensor | Sequence[float],
                 per_channel_axis: int | None, num_channels: int | None,
                 learn_frac: bool, enabled: bool) -> None:
        super().__init__()
        if per_channel_axis is not None and (num_channels is None or num_channels < 1):
            raise ValueError("a per-channel quantizer needs num_channels >= 1")
        if per_channel_axis is None and num_channels not in (None, 1):
            raise ValueError("num_channels is only meaningful with per_channel_axis")
        self.width, self.signed = int(width), bool(signed)
        self.per_channel_axis = per_channel_axis
        self.num_channels = int(num_channels) if per_channel_axis is not None else 1
        shape = (self.num_channels,) if per_channel_axis is not None else ()
        self.frac = nn.Parameter(torch.zeros(shape), requires_grad=learn_frac)
        self.set_frac(frac)
        self.enabled = bool(enabled)
        self.observing = False  # when True, forward() also calls observe(x)
        self._stats: dict | None = None

    # ----------------------------------------------------------------------------- binary point
    @property
    def learn_frac(self) -> bool:
        return self.frac.requires_grad

    def set_frac(self, frac: float | torch.Tensor | Sequence[float]) -> None:
        """Set the (float) fractional bits: a scalar, or one value per channel."""
        value = torch.as_tensor(frac, dtype=self.frac.dtype).to(self.frac.device)
        if value.dim() == 0:
            value = value.expand(self.frac.shape)
        if value.shape != self.frac.shape:
            raise ValueError(f"frac of shape {tuple(value.shape)} does not fit {tuple(self.frac.shape)}")
        with torch.no_grad():
            self.frac.copy_(value)

    def int_fracs(self) -> list[int]:
        """The integer binary points ``F = round(frac)`` (half to even), one per channel."""
        # Python's round() is half to even too; one device-to-host copy, no device kernels.
        values = self.frac.tolist()
        if not isinstance(values, list):
            values = [values]
        return [round(min(max(v, -MAX_ABS_FRAC), MAX_ABS_FRAC)) for v in values]

    def fixed_type(self, channel: int | None = None) -> FixedType:
        """The frozen type: the one a per-tensor quantizer casts to, or channel ``channel``'s."""
        fracs = self.int_fracs()
        if channel is None:
            if self.per_channel_axis is not None:
                raise ValueError("per-channel quantizer: pass channel=, or use frozen_types()")
            channel = 0
        return self._type(fracs[channel])

    def frozen_types(self) -> list[FixedType]:
        """One frozen type per channel (a single one for a per-tensor quantizer)."""
        return [self._type(f) for f in self.int_fracs()]

    def extra_repr(self) -> str:
        types = self.frozen_types()
        if len(set(types)) == 1:
            text = str(types[0]) if self.per_channel_axis is None else f"{len(types)} x {types[0]}"
        else:
            shown = ", ".join(str(t) for t in types[:4]) + (", ..." if len(types) > 4 else "")
            text = f"[{shown}]"
        axis = "" if self.per_channel_axis is None else f", per_channel_axis={self.per_channel_axis}"
        return f"{text}{axis}, learn_frac={self.learn_frac}, enabled={self.enabled}"

    # ---------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self.observe(x)
        if not self.enabled:
            return x
        axis = self._axis(x)
        per_channel = max(x.numel() // self.num_channels, 1)
        grad_scale = 1.0 / math.sqrt(per_channel * max(self._code_bounds()[1], 1))
        if torch.compiler.is_compiling() and self._traced_ok(x):
            return self._traced_forward(x, axis, grad_scale)
        plan = self._plan(x, axis)
        if plan.fast is not None and self.fast_path:
            frac = self.frac
            if torch.is_grad_enabled() and (x.requires_grad or frac.requires_grad):
                return _FastSTE.apply(x, frac, plan.fast, grad_scale)
            return _fast_cast(x, plan.fast, want_inside=False)[0]
        fracs = plan.fracs
        return _BinaryPointSTE.apply(x, self.frac, lambda v: self._quantize_with(v, fracs, axis), plan.lo,
                                     plan.hi, axis, self._saturating, grad_scale)

    def _traced_ok(self, x: torch.Tensor) -> bool:
        return False

    def _traced_forward(self, x: torch.Tensor, axis: int | None, grad_scale: float) -> torch.Tensor:
        """The fast path with the binary points as tensors (``torch.compile``: no read-back of
        ``frac``, no recompile when a binary point moves); the same kernels and gradients."""
        spec = self._spec
        f = torch.round(self.frac.detach().clamp(-MAX_ABS_FRAC, MAX_ABS_FRAC))  # half to even
        if axis is not None:
            shape = [1] * x.dim()
            shape[axis] = self.num_channels
            f = f.reshape(shape)
        inv = _pow2(-f, x.dtype)
        consts = _FastConsts(axis, spec, _pow2(f + math.log2(spec.grid), x.dtype), inv, inv * spec.lo, inv * spec.hi,
                             x.dtype == torch.float64)
        if torch.is_grad_enabled() and (x.requires_grad or self.frac.requires_grad):
            return _FastSTE.apply(x, self.frac, consts, grad_scale)
        return _fast_cast(x, consts, want_inside=False)[0]

    def _plan(self, x: torch.Tensor, axis: int | None) -> _Plan:
        """The cached plan, rebuilt when ``frac`` changed (reading its integers back) or x's dtype,
        device or rank did; if only ``frac`` moved and its integers did not, the constants stay."""
        frac = self.frac
        key = (frac._version, frac.data_ptr(), x.dtype, x.device, x.dim())
        plan = self._plan_cache
        if plan is not None and plan.frac is frac and plan.key == key:
            return plan
        fracs = self.int_fracs()
        if plan is not None and plan.frac is frac and plan.fracs == fracs and plan.key[2:] == key[2:]:
            plan.key = key  # frac moved but its integers did not (the usual optimizer step)
        else:
            lo_code, hi_code = self._code_bounds()
            lo = self._per_channel([math.ldexp(lo_code, -f) for f in fracs], x, axis, x.dtype)
            hi = self._per_channel([math.ldexp(hi_code, -f) for f in fracs], x, axis, x.dtype)
            plan = _Plan(key, frac, fracs, axis, lo, hi, self._fast_consts(fracs, x, axis))
        self._plan_cache = plan
        return plan

    def quantize_frozen(self, x: torch.Tensor) -> torch.Tensor:
        """The forward values without autograd bookkeeping (ignores ``enabled``)."""
        return self._quantize_with(x, self.int_fracs(), self._axis(x))[0]

    def _axis(self, x: torch.Tensor) -> int | None:
        if self.per_channel_axis is None:
            return None
        axis = self.per_channel_axis % x.dim() if x.dim() else 0
        if x.dim() == 0 or x.shape[axis] != self.num_channels:
            raise ValueError(f"per-channel quantizer with {self.num_channels} channels on axis "
                             f"{self.per_channel_axis} got a tensor of shape {tuple(x.shape)}")
        return axis

    @staticmethod
    def _per_channel(values: list[float], x: torch.Tensor, axis: int | None,
                     dtype: torch.dtype) -> torch.Tensor:
        """Python floats as a tensor on x's device that broadcasts along ``axis``."""
        t = torch.tensor(values, dtype=dtype, device=x.device)
        if axis is None:
            return t.reshape(())
        shape = [1] * x.dim()
        shape[axis] = len(values)
        return t.reshape(shape)

    # ------------------------------------------------------------------------------ calibration
    def calibrate(self, x: torch.Tensor, method: str = "max", percentile: float = 99.99,
                  mse_window: tuple[int, int] = MSE_WINDOW) -> None:
        """Set ``frac`` from the data ``x`` (all of it, exactly).

        ``max``: per channel the largest F (tightest type) at which neither the largest nor the
        smallest value of ``x`` overflows after rounding (for unsigned types negative values are
        ignored: nothing holds them). ``percentile``: the same with the data clipped to
        ``±percentile(|x|)``. ``mse``: the F in ``F_max + mse_window`` whose exact quantization
        has the smallest mean squared error (ties keep ``F_max``). All-zero channels get I = 1
        (signed) or I = 0. Non-finite values are ignored.
        """
        data = self._channels_first(x.detach())
        vmax, vmin, data = _extremes(data)
        self._set_from_stats(vmax, vmin, data, method, percentile, mse_window)

    def observe(self, x: torch.Tensor) -> None:
        """Accumulate calibration statistics over a batch without keeping the batch.

        Keeps the exact per-channel max and min and a uniform random sample of at most
        ``reservoir_size`` values per channel (priority sampling: each value draws a random key
        and the smallest keys stay), from which ``finalize`` estimates percentiles and MSE.
        """
        data = self._channels_first(x.detach())
        if data.shape[1] == 0:
            return
        vmax, vmin, data = _extremes(data)
        s = self._stats
        if s is None:
            s = self._stats = {"max": vmax, "min": vmin, "sample": data[:, :0], "keys": None, "batches": 0}
        else:
            s["max"], s["min"] = torch.maximum(s["max"], vmax), torch.minimum(s["min"], vmin)
        gen = torch.Generator(device=data.device)
        gen.manual_seed(s["batches"])  # reproducible calibration
        s["batches"] += 1
        keys = torch.rand(data.shape, generator=gen, device=data.device)
        sample = torch.cat([s["sample"], data.to(s["sample"].dtype)], dim=1)
        keys = keys if s["keys"] is None else torch.cat([s["keys"], keys], dim=1)
        if sample.shape[1] > self.reservoir_size:
            keys, idx = torch.topk(keys, self.reservoir_size, dim=1, largest=False)
            sample = torch.gather(sample, 1, idx)
        s["sample"], s["keys"] = sample, keys

    def finalize(self, method: str = "max", percentile: float = 99.99,
                 mse_window: tuple[int, int] = MSE_WINDOW) -> None:
        """Set ``frac`` from what ``observe`` accumulated, as ``calibrate`` would, then forget it.

        ``max`` uses the exact extremes; ``percentile`` and ``mse`` use the sample (capped by the
        exact extremes), so they are exact only while every value fit in the sample.
        """
        if self._stats is None:
            raise RuntimeError("finalize() called before observe() saw any data")
        s, self._stats = self._stats, None
        self._set_from_stats(s["max"], s["min"], s["sample"], method, percentile, mse_window)

    def reset_observer(self) -> None:
        self._stats = None

    def _channels_first(self, x: torch.Tensor) -> torch.Tensor:
        """x as (C, N): channel-major for per-channel quantizers, (1, numel) otherwise."""
        if self.per_channel_axis is None:
            return x.reshape(1, -1)
        axis = self._axis(x)
        return x.movedim(axis, 0).reshape(self.num_channels, -1)

    def _set_from_stats(self, vmax, vmin, sample, method, percentile, mse_window) -> None:
        if method not in CALIBRATION_METHODS:
            raise ValueError(f"unknown calibration method {method!r} (choose from {', '.join(CALIBRATION_METHODS)})")
        vmax, vmin = vmax.double().cpu(), vmin.double().cpu()
        if method == "percentile":
            if not 0.0 < percentile <= 100.0:
                raise ValueError(f"percentile must be in (0, 100], not {percentile}")
            p = _percentile(sample.abs(), percentile).cpu()
            vmax, vmin = torch.minimum(vmax, p), torch.maximum(vmin, -p)
        fracs = self._tightest(vmax, vmin)
        if method == "mse":
            fracs = self._mse_search(sample, fracs, mse_window)
        self.set_frac(torch.tensor(fracs, dtype=torch.float64).reshape(self.frac.shape))

    def _fits(self, vmax: torch.Tensor, vmin: torch.Tensor, fracs: list[int]) -> torch.Tensor:
        lo, hi = self._code_bounds()
        scale = torch.tensor([math.ldexp(1.0, f) for f in fracs], dtype=torch.float64)
        return (self._fit_round(vmax * scale) <= hi) & (self._fit_round(vmin * scale) >= lo)

    def _tightest(self, vmax: torch.Tensor, vmin: torch.Tensor) -> list[int]:
        """Per channel the largest F in range at which vmax and vmin do not overflow."""
        lo, hi = self._code_bounds()
        vmax = vmax.clamp(min=0.0)
        vmin = vmin.clamp(max=0.0) if self.signed else torch.zeros_like(vmin)
        fracs, empty = [], []
        for c in range(len(vmax)):
            est = []
            if vmax[c] > 0:
                est.append(math.floor(math.log2(max(hi, 0.5) / float(vmax[c]))))
            if vmin[c] < 0:
                est.append(math.floor(math.log2(min(lo, -0.5) / float(vmin[c]))))
            empty.append(not est)
            fracs.append(min(est) if est else 0)
        fracs = [max(-MAX_ABS_FRAC, min(MAX_ABS_FRAC, f)) for f in fracs]
        # The estimate is within a step or two; the exact rounding decides (fitting is monotone in F).
        while True:
            bad = ~self._fits(vmax, vmin, fracs)
            step = [c for c in range(len(fracs)) if bad[c] and fracs[c] > -MAX_ABS_FRAC]
            if not step:
                break
            for c in step:
                fracs[c] -= 1
        while True:
            up = [min(f + 1, MAX_ABS_FRAC) for f in fracs]
            ok = self._fits(vmax, vmin, up)
            step = [c for c in range(len(fracs)) if ok[c] and up[c] != fracs[c] and not empty[c]]
            if not step:
                break
            for c in step:
                fracs[c] += 1
        default = self.width - 1 if self.signed else self.width
        return [default if e else f for f, e in zip(fracs, empty)]

    def _mse_search(self, sample: torch.Tensor, fracs: list[int], window: tuple[int, int]) -> list[int]:
        offsets = [0] + [k for k in range(window[0], window[1] + 1) if k != 0]
        ref = sample.double()
        best = fracs
        best_err = None
        for k in offsets:
            cand = [max(-MAX_ABS_FRAC, min(MAX_ABS_FRAC, f + k)) for f in fracs]
            xq = self._quantize_with(sample, cand, 0)[0]
            err = ((xq.double() - ref) ** 2).mean(dim=1).cpu()
            if best_err is None:
                best_err = err
                continue
            better = err < best_err
            best = [c if b else f for c, f, b in zip(cand, best, better.tolist())]
            best_err = torch.where(better, err, best_err)
        return best

    # ----------------------------------------------------------------------- subclass interface
    def _type(self, f: int) -> FixedType:
        raise NotImplementedError

    def _code_bounds(self) -> tuple[int, int]:
        raise NotImplementedError

    def _fit_round(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _quantize_with(self, x: torch.Tensor, fracs: list[int], axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(xq, state): exact quantized values, and int8 -1/0/+1 for below/inside/above the range."""
        raise NotImplementedError

    def _fast_consts(self, fracs: list[int], x: torch.Tensor, axis: int | None) -> _FastConsts | None:
        """Constants for ``_fast_cast`` when it is exact for these binary points and x, else None."""
        return None


class FixedQuantizer(BinaryPointQuantizer):
    """``ap_fixed<W, W-F, q, o, n>`` (or ``ap_ufixed``) cast with a learnable binary point F.

    ``frac`` is the initial number of fractional bits (scalar, or one per channel of axis
    ``per_channel_axis``). ``enabled=False`` makes the module the identity.
    """

    def __init__(self, width: int, signed: bool, q: QuantMode | str, o: OverflowMode | str,
                 n: int = 0, frac: float | torch.Tensor | Sequence[float] = 0.0, *,
                 per_channel_axis: int | None = None, num_channels: int | None = None,
                 learn_frac: bool = True, enabled: bool = True) -> None:
        base = FixedType(width, width, bool(signed), q, o, n)  # validates W, the modes and N
        if width > 64:
            raise ValueError(f"fixed-point quantizers support W <= 64, not {width}")
        super().__init__(width, signed, frac, per_channel_axis, num_channels, learn_frac, enabled)
        self.q, self.o, self.n, self._base = base.q, base.o, base.n, base
        o_eff = OverflowMode.SAT if (self.o is OverflowMode.WRAP_SM and not self.signed) else self.o
        self._saturating = o_eff in (OverflowMode.SAT, OverflowMode.SAT_SYM, OverflowMode.SAT_ZERO)
        self._bounds = (base.sat_min_code if o_eff is OverflowMode.SAT_SYM else base.int_min, base.int_max)
        self._spec = None if needs_int_path(base) else float_spec(base)
        self._fast_ok = self._spec is not None and o_eff in (OverflowMode.SAT, OverflowMode.SAT_SYM)

    def _type(self, f: int) -> FixedType:
        return FixedType(self.width, self.width - f, self.signed, self.q, self.o, self.n)

    def _code_bounds(self) -> tuple[int, int]:
        return self._bounds

    def _fit_round(self, y: torch.Tensor) -> torch.Tensor:
        return round_(y * float(kernels.GRID.get(self.q, 2)), self.q)

    def _traced_ok(self, x: torch.Tensor) -> bool:
        # float32 work needs 2**(F+1) finite and W <= 24 (binary points are assumed in [0, 126]
        # there: a float32 model whose binary point left that range is not compiled exactly)
        return self._fast_ok and (x.dtype == torch.float64 or (x.dtype == torch.float32 and self.width <= 24))

    def _fast_consts(self, fracs, x, axis):
        if not self._fast_ok or x.dtype not in (torch.float32, torch.float64):
            return None
        if any(work_dtype(x.dtype, self._type(f)) != x.dtype for f in (min(fracs), max(fracs))):
            return None  # cast() would work in float64
        spec = self._spec
        if len(fracs) == 1:
            f = fracs[0]
            return _FastConsts(axis, spec, math.ldexp(spec.grid, f), math.ldexp(1.0, -f), math.ldexp(spec.lo, -f),
                               math.ldexp(spec.hi, -f), f < 0)

        def const(values: list[float]) -> torch.Tensor:
            return self._per_channel(values, x, axis, x.dtype)

        return _FastConsts(axis, spec, const([math.ldexp(spec.grid, f) for f in fracs]),
                           const([math.ldexp(1.0, -f) for f in fracs]), const([math.ldexp(spec.lo, -f) for f in fracs]),
                           const([math.ldexp(spec.hi, -f) for f in fracs]), min(fracs) < 0)

    def _quantize_with(self, x, fracs, axis):
        lo, hi = self._bounds
        s = self._spec
        # NaN read as an infinity of its sign, as cast() does: it decides the state's side
        y = x.to(torch.float64 if s is None else max((work_dtype(x.dtype, self._type(f)) for f in fracs),
                                                    key=lambda d: d.itemsize))
        y = torch.where(torch.isnan(y), torch.copysign(torch.full_like(y, float("inf")), y), y)
        grid = float(kernels.GRID.get(self.q, 2))
        qv = round_(scaled(y, self._per_channel([math.ldexp(grid, f) for f in fracs], x, axis, y.dtype), y.dtype,
                           min(fracs) < 0), self.q)
        state = (qv > hi).to(torch.int8) - (qv < lo).to(torch.int8)
        if s is None:
            # Bit-level overflow modes and wide types: cast() itself, channel by channel.
            if axis is None:
                return cast(x, self._type(fracs[0])), state
            parts = [cast(x.select(axis, c), self._type(f)) for c, f in enumerate(fracs)]
            return torch.stack(parts, dim=axis), state
        inv = self._per_channel([math.ldexp(1.0, -f) for f in fracs], x, axis, y.dtype)
        fl = None
        if kernels.needs_floor(s):
            fl = scaled(y, self._per_channel([math.ldexp(1.0, f) for f in fracs], x, axis, y.dtype), y.dtype,
                        min(fracs) < 0).floor_()
        out = to_values_(fix_nan_(overflow_(qv, s, fl), y, s, s.nan_lo, s.nan_hi), inv)  # inf - inf is NaN
        return out.to(x.dtype), state


def _extremes(data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row max and min of the finite values (0 for rows with none), and data with non-finite
    values replaced by 0."""
    if data.shape[1] == 0:
        raise ValueError("cannot calibrate on an empty tensor")
    finite = torch.isfinite(data)
    data = torch.where(finite, data, torch.zeros_like(data))
    vmax = data.amax(dim=1).double().clamp(min=0.0)
    vmin = data.amin(dim=1).double().clamp(max=0.0)
    return vmax, vmin, data


def _percentile(a: torch.Tensor, p: float) -> torch.Tensor:
    """Per-row percentile of a (C, N) tensor, linear interpolation (numpy's default), float64."""
    s = torch.sort(a.double(), dim=1).values
    pos = (s.shape[1] - 1) * p / 100.0
    i = math.floor(pos)
    j = min(i + 1, s.shape[1] - 1)
    return s[:, i] + (s[:, j] - s[:, i]) * (pos - i)
