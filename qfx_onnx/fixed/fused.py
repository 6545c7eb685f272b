"""``fused_cast(x, T)``: :func:`~qfx_onnx.fixed.cast.cast` compiled into one elementwise loop.

Eager ``cast`` launches 8 to 12 elementwise kernels, each a full pass over memory with a freshly
allocated temporary, so on CPU it costs 7 to 20 times one ``clamp`` pass (30 to 240 times on the
int path). ``fused_cast`` hands the same exact operations to ``torch.compile``, which fuses them
into one loop that reads ``x`` once and writes the result once. The type's constants are Python
scalars baked into the loop, so there is one compiled kernel per (type, dtype, device), built on
first use and cached.

The result is bit-identical to ``cast`` (``tests/test_fused.py`` checks every quantization and
overflow mode on ties, range boundaries, ±0, subnormals, ±inf and NaN). It is cast.py's own
algorithm; on the float path three operations are spelled differently, not computed differently,
because inductor's CPU code runs them slowly (scalar loops or mask conversions) while it
vectorizes compares, ``where`` and ``floor`` well:

- NaN is found as ``y != y`` instead of ``isnan(y)``;
- the rounding increment and ``AP_SAT_ZERO`` are nested ``where`` instead of ``&``/``|`` on
  boolean masks (with ``.to(dtype)`` or ``masked_fill``), 5 to 14x faster for float64 on AVX-512;
- ``AP_WRAP`` keeps the low W bits as ``v - floor(v * 2**-W) * 2**W`` instead of
  ``remainder(v, 2**W)`` (an ``fmod``). Both are exact: ``v`` is a finite integer-valued float,
  scaling by a power of two is exact, and the difference is an integer in ``[0, 2**W)`` with
  W <= 53 (24 for float32 work), hence representable.

Types on cast.py's int64 path (``ap_int``, W > 53, ``AP_WRAP`` with N > 0, signed ``AP_WRAP_SM``)
compile ``cast`` itself unchanged.

Cost: the first call for a type compiles, about 2 s for float-path types and 3 to 15 s for
int-path types on a 2-core CPU, after inductor's own start-up (about 15 s once per process with an
empty on-disk cache); see ``benchmarks/README.md``. Use eager ``cast`` for one-off small tensors.
"""

from __future__ import annotations

import functools
import types
from typing import Callable

import torch

from qfx_onnx.fixed.cast import _TINY, _needs_int_path, _overflow_float, _work_dtype, cast
from qfx_onnx.fixed.types import FixedType, OverflowMode as O, QuantMode as Q

_INF = float("inf")


def _scaled(x: torch.Tensor, t: FixedType, dtype: torch.dtype) -> torch.Tensor:
    """cast.py's ``_scaled`` (``x * 2**F``, NaN read as an infinity) with ``isnan`` spelled ``y != y``."""
    y = x.to(dtype)
    y = torch.where(y != y, torch.copysign(torch.full_like(y, _INF), y), y)
    y = y * (2.0**t.frac)
    if t.frac < 0:
        y = torch.where((y == 0) & (x != 0), torch.copysign(torch.full_like(y, _TINY), x.to(dtype)), y)
    return y


def _round(y: torch.Tensor, q: Q) -> torch.Tensor:
    """cast.py's ``_round`` (the same comparisons against ``floor(y)`` and ``floor(y) + 0.5``), with
    the increment as 1.0/0.0 from nested ``where`` rather than boolean algebra."""
    fl = torch.floor(y)
    if q is Q.TRN:
        return fl
    if q is Q.TRN_ZERO:
        return torch.trunc(y)
    if q is Q.RND_CONV:
        return torch.round(y)
    mid = fl + 0.5
    if q is Q.RND:
        up = torch.where(y >= mid, torch.where(y != fl, 1.0, 0.0), 0.0)
    elif q is Q.RND_MIN_INF:
        up = torch.where(y > mid, 1.0, 0.0)
    else:  # RND_ZERO, RND_INF: a tie goes up for negative / positive y
        side = (y < 0) if q is Q.RND_ZERO else (y > 0)
        tie_up = torch.where(y != fl, torch.where(side, 1.0, 0.0), 0.0)
        up = torch.where(y > mid, 1.0, torch.where(y == mid, tie_up, 0.0))
    return fl + up


def _overflow(qv: torch.Tensor, t: FixedType) -> torch.Tensor:
    """cast.py's ``_overflow_float``; ``AP_SAT_ZERO`` and ``AP_WRAP`` spelled as in the module doc."""
    if t.o is O.SAT_ZERO:
        return torch.where(qv < float(t.int_min), 0.0, torch.where(qv > float(t.int_max), 0.0, qv))
    if not (t.o is O.WRAP and t.n == 0):
        return _overflow_float(qv, t)  # clamps (AP_SAT, AP_SAT_SYM, unsigned AP_WRAP_SM)
    qv = torch.where(qv.abs() == _INF, 0.0, qv)  # inf has only zero bits below 2**W
    m = qv - torch.floor(qv * 2.0**-t.width) * 2.0**t.width
    if t.signed:
        m = torch.where(m > float(t.int_max), m - 2.0**t.width, m)
    return m


def _float_cast(x: torch.Tensor, t: FixedType) -> torch.Tensor:
    """cast.py's float path (W <= 53, no bit-level overflow mode), one expression for inductor."""
    y = _scaled(x, t, _work_dtype(x, t))
    qv = _overflow(_round(y, t.q), t)
    return (qv * 2.0**-t.frac + 0.0).to(x.dtype)


@functools.lru_cache(maxsize=256)
def _compiled(t: FixedType, dtype: torch.dtype, device_type: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The compiled kernel for one (type, dtype, device); ``dtype``/``device_type`` only key the cache."""
    body = cast if _needs_int_path(t) else _float_cast

    def kernel(x: torch.Tensor) -> torch.Tensor:
        return body(x, t)

    # Dynamo keeps compiled variants on the code object (recompile limit 8) and its automatic-dynamic
    # memory under the code's file, line and name; every closure made from this ``def`` would share
    # both, so 35 mode combinations would evict each other and the type's ints (W, N ...) would turn
    # symbolic. A renamed copy of the code per key keeps the type's constants constant.
    name = f"fused_cast_{t.c_name()}_{str(dtype).removeprefix('torch.')}_{device_type}"
    code = kernel.__code__.replace(co_name=name, co_qualname=name)
    fresh = types.FunctionType(code, kernel.__globals__, name, kernel.__defaults__, kernel.__closure__)
    return torch.compile(fresh, fullgraph=True)


def fused_cast(x: torch.Tensor, t: FixedType | str) -> torch.Tensor:
    """Bit-identical values to :func:`~qfx_onnx.fixed.cast.cast` (same dtype and device), in one pass.

    The first call for each (type, dtype, device) compiles one kernel for flat tensors of any
    length; other shapes reuse it. The result is contiguous. Tensors of fewer than two elements
    go to eager ``cast`` (inductor would specialize on those sizes), and invalid arguments raise
    exactly as ``cast`` does.
    """
    t = FixedType.coerce(t)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or t.width > 64 or x.numel() < 2:
        return cast(x, t)
    flat = x.contiguous().view(-1)  # strided inputs would compile again, per stride
    torch._dynamo.maybe_mark_dynamic(flat, 0)  # one kernel for every length, no recompile per shape
    return _compiled(t, x.dtype, x.device.type)(flat).view(x.shape)
