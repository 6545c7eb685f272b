"""``fused_cast(x, T)``: :func:`~qfx_onnx.fixed.cast.cast` compiled into one elementwise loop.

``fused_cast`` hands cast's own code (:func:`qfx_onnx.fixed.kernels.float_cast` on the float path,
``cast`` itself on the int path) to ``torch.compile``, which fuses its steps into one loop that
reads ``x`` once and writes the result once. Nothing is restated here: under compilation the
kernels resolve NaN unconditionally (a ``where`` that inductor fuses) instead of after a check.
The type's constants are Python scalars baked into the loop, so there is one compiled kernel per
(type, dtype, device), built on first use and cached. Eager ``cast`` already does one pass per
step in place on one temporary, so fusing pays mainly on the int path and on CUDA.

Cost: the first call for a type compiles, about 2 s for float-path types and 3 to 15 s for
int-path types on a 2-core CPU, after inductor's own start-up (about 15 s once per process with an
empty on-disk cache); see ``benchmarks/README.md``. Use eager ``cast`` for one-off small tensors.
"""

from __future__ import annotations

import functools
import types
from typing import Callable

import torch

from qfx_onnx.fixed.cast import cast
from qfx_onnx.fixed.kernels import float_cast, float_spec, needs_int_path, work_dtype
from qfx_onnx.fixed.types import FixedType


def _float_cast(x: torch.Tensor, t: FixedType) -> torch.Tensor:
    """cast.py's float path (W <= 53, the bit-level overflow modes included), the body that is compiled."""
    return float_cast(x, float_spec(t), t.frac, work_dtype(x.dtype, t))


@functools.lru_cache(maxsize=256)
def _compiled(t: FixedType, dtype: torch.dtype, device_type: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The compiled kernel for one (type, dtype, device); ``dtype``/``device_type`` only key the cache."""
    if needs_int_path(t):
        body, args = cast, (t,)
    else:  # the constants, looked up here: dynamo would trace through float_spec's lru_cache
        body, args = float_cast, (float_spec(t), t.frac, work_dtype(dtype, t))

    def kernel(x: torch.Tensor) -> torch.Tensor:
        return body(x, *args)

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
