"""IR ops: the torch functions that imported graphs call, one per ONNX-level operation.

Contract (every pass relies on it):

* An IR op is a plain torch function with ONNX semantics and explicit keyword attributes named as
  in ONNX (``strides``, ``pads``, ``group`` ...). It works for float32 and float64 tensors of any
  batch size.
* Numbers that multiply or offset data (BatchNorm scale/shift, LeakyReLU alpha, average-pool
  reciprocals, Clip bounds, Gemm alpha/beta) are never Python scalars inside an op: the importer
  makes them ``get_attr`` constants so the quantizer can give them a fixed-point type. (Only
  ``"nonlinear"`` ops, evaluated by table, keep scalar parameters, e.g. LRN's alpha; clamps to
  0 and 1 in hard_sigmoid are bounds, not factors.)
* ``kind`` tells later passes how the op treats fixed-point values:
    - ``"linear"``: a sum of products (conv, gemm, matmul). Exact in float64 while the lossless
      accumulator fits 53 bits; the result is rounded once, by the cast after it.
    - ``"arith"``: +, -, *, neg, max, min, relu, clip, where: exact in float64 on exact inputs.
    - ``"move"``: data movement (reshape, transpose, concat, slice, pad with zeros, resize-nearest,
      gather): value preserving, the output may inherit the input's type.
    - ``"shape"``: int64 shape arithmetic (Shape and the twins below); never quantized.
    - ``"nonlinear"``: functions that float64 cannot evaluate exactly in hardware terms (sigmoid,
      tanh, softmax ...); the fixed-point graph evaluates them through a lookup table.
* ``onnx_op`` is the ONNX op type the annotated-ONNX writer emits by default, copying the op's
  keyword attributes to ONNX attributes; ops that need a different emission register an emitter.
  Keyword attributes are normalized at import: explicit ``pads`` (auto_pad resolved), non-negative
  axes where the rank is known, and values that ONNX passes as constant inputs in newer opsets
  (``axes``, ``starts``, ``scales`` ...) become keyword lists too. ``sum_pool`` has no ONNX op of
  its own (``onnx_op`` None): a writer emits it, e.g., as AveragePool times the window size.
  Multi-input ops whose ONNX form takes these as inputs (ReduceSum-13, Resize ...) likewise need
  the writer to turn keywords back into inputs.
* Positional arguments are tensors (fx nodes in the graph), None for an absent optional input,
  or for ``reshape`` a tuple of ints; ``concat`` takes a list and ``nary_sum`` varargs.
* ``split`` is the one multi-output op: it returns a tuple, read by ``operator.getitem`` nodes.
* An op whose output is an integer tensor (shape arithmetic) is the ``"shape"``-kind twin listed
  in ``SHAPE_TWINS`` (``shape_gather`` for ``gather`` ...): same semantics, never quantized.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from qfx_onnx.fixed.cast import cast as _fixed_point_cast

IR_OPS: dict[str, "IrOp"] = {}

KINDS = ("linear", "arith", "move", "shape", "nonlinear")


@dataclass(frozen=True)
class IrOp:
    name: str
    fn: Callable
    kind: str
    onnx_op: str | None


def ir_op(kind: str, onnx_op: str | None = None) -> Callable[[Callable], Callable]:
    """Register ``fn`` as an IR op of ``kind``; the function itself is the fx call target."""
    if kind not in KINDS:
        raise ValueError(f"unknown IR op kind {kind!r}")

    def register(fn: Callable) -> Callable:
        op = IrOp(fn.__name__, fn, kind, onnx_op)
        if op.name in IR_OPS:
            raise ValueError(f"IR op {op.name!r} registered twice")
        IR_OPS[op.name] = op
        fn.ir_op = op
        return fn

    return register


def op_of(target: object) -> IrOp | None:
    """The IR op behind an fx ``call_function`` target, or None for anything else."""
    return getattr(target, "ir_op", None)


# --------------------------------------------------------------------------------------------------
# Helpers shared by the ops below (not IR ops themselves).


def _torch_pads(begins: Sequence[int], ends: Sequence[int]) -> list[int]:
    """ONNX-ordered begin/end pads of the trailing dims as ``F.pad``'s list (last dim first)."""
    out: list[int] = []
    for begin, end in zip(reversed(begins), reversed(ends)):
        out += [begin, end]
    return out


def _spatial_pads(pads: Sequence[int]) -> tuple[list[int], list[int]]:
    half = len(pads) // 2
    return list(pads[:half]), list(pads[half:])


def pool_output_size(size: int, kernel: int, stride: int, pad_begin: int, pad_end: int, dilation: int, ceil_mode: int) -> int:
    """Output length of a pooling window sweep, as onnxruntime computes it.

    With ``ceil_mode`` a last partial window is kept only if it starts inside the input or the
    begin padding (a window that would start in the end padding is dropped).
    """
    span = (kernel - 1) * dilation + 1
    room = size + pad_begin + pad_end - span
    out = (-(-room // stride) if ceil_mode else room // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + pad_begin:
        out -= 1
    return out


def pool_padding(sizes: Sequence[int], kernel_shape, strides, pads, dilations, ceil_mode) -> tuple[list[int], list[int]]:
    """Begin and end pads that make a floor-mode sweep produce the ``ceil_mode`` output.

    The end pads grow by the part of the last window that hangs past the explicit padding.
    """
    begins, ends = _spatial_pads(pads)
    grown = []
    for size, k, s, b, e, d in zip(sizes, kernel_shape, strides, begins, ends, dilations):
        out = pool_output_size(size, k, s, b, e, d, ceil_mode)
        needed = (out - 1) * s + (k - 1) * d + 1
        grown.append(max(e, needed - size - b))
    return begins, grown


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


def _spatial_rank(x: torch.Tensor, what: str) -> int:
    rank = x.dim() - 2
    if rank not in _CONV:
        raise ValueError(f"{what} supports 1-D to 3-D spatial inputs, got rank {x.dim()}")
    return rank


def _clamp_index(i: int, n: int, low: int, high: int) -> int:
    return min(max(i + n if i < 0 else i, low), high)


# --------------------------------------------------------------------------------------------------
# linear: sums of products


@ir_op("linear", "Conv")
def conv(x, w, b=None, *, strides, pads, dilations, group):
    """ONNX Conv with explicit (possibly asymmetric) ``pads``: begins for each spatial dim, then ends."""
    rank = _spatial_rank(x, "conv")
    begins, ends = _spatial_pads(pads)
    padding: Sequence[int] = begins
    if begins != ends:
        x = F.pad(x, _torch_pads(begins, ends))
        padding = [0] * rank
    return _CONV[rank](x, w, b, tuple(strides), tuple(padding), tuple(dilations), group)


@ir_op("linear", "ConvTranspose")
def conv_transpose(x, w, b=None, *, strides, pads, dilations, group, output_padding):
    """ONNX ConvTranspose with explicit ``pads`` (negative pads grow the output with zeros).

    The full transposed convolution is cropped by ``pads`` and extended by ``output_padding``
    before the bias is added, so asymmetric pads and any output_padding are exact.
    """
    rank = _spatial_rank(x, "conv_transpose")
    full = _CONV_T[rank](x, w, None, tuple(strides), 0, 0, group, tuple(dilations))
    begins, ends = _spatial_pads(pads)
    ends = [e - extra for e, extra in zip(ends, output_padding)]
    y = F.pad(full, [-p for p in _torch_pads(begins, ends)])
    if b is not None:
        y = y + b.reshape((1, -1) + (1,) * rank)
    return y


@ir_op("linear", "Gemm")
def gemm(a, b, c=None, *, transA=0, transB=0):
    """ONNX Gemm with alpha = beta = 1 (the importer folds them into constants)."""
    y = (a.t() if transA else a) @ (b.t() if transB else b)
    return y if c is None else y + c


@ir_op("linear", "MatMul")
def matmul(a, b):
    """ONNX MatMul (numpy matmul semantics)."""
    return torch.matmul(a, b)


# --------------------------------------------------------------------------------------------------
# arith: exact in float64 on exact inputs


@ir_op("arith", "Add")
def add(a, b):
    """Broadcast ``a + b``."""
    return a + b


@ir_op("arith", "Sub")
def sub(a, b):
    """Broadcast ``a - b``."""
    return a - b


@ir_op("arith", "Mul")
def mul(a, b):
    """Broadcast ``a * b``."""
    return a * b


@ir_op("arith", "Sum")
def nary_sum(*inputs):
    """ONNX Sum: the broadcast sum of all inputs, added left to right."""
    return functools.reduce(torch.add, inputs)


@ir_op("arith", "Neg")
def neg(x):
    """``-x``."""
    return -x


@ir_op("arith", "Relu")
def relu(x):
    """``max(x, 0)``."""
    return torch.relu(x)


@ir_op("arith", "LeakyRelu")
def leaky_relu(x, alpha):
    """``where(x < 0, x * alpha, x)`` with ``alpha`` a constant tensor."""
    return torch.where(x < 0, x * alpha, x)


@ir_op("arith", "PRelu")
def prelu(x, slope):
    """``where(x < 0, x * slope, x)``; ``slope`` broadcasts to ``x`` (a learned weight)."""
    return torch.where(x < 0, x * slope, x)


@ir_op("arith", "Clip")
def clip(x, min=None, max=None):  # noqa: A002 - ONNX input names
    """ONNX Clip; a missing bound (None) is no bound."""
    if min is not None:
        x = torch.maximum(x, min)
    if max is not None:
        x = torch.minimum(x, max)
    return x


@ir_op("arith", "HardSigmoid")
def hard_sigmoid(x, alpha, beta):
    """``clip(x * alpha + beta, 0, 1)`` with ``alpha``, ``beta`` constant tensors."""
    return torch.clamp(x * alpha + beta, 0, 1)


@ir_op("arith", "HardSwish")
def hard_swish(x, alpha, beta):
    """``x * hard_sigmoid(x, alpha, beta)``; ONNX fixes alpha = 1/6, beta = 0.5."""
    return x * hard_sigmoid(x, alpha, beta)


@ir_op("arith", "MaxPool")
def max_pool(x, *, kernel_shape, strides, pads, dilations, ceil_mode=0):
    """ONNX MaxPool (single output): padding is -inf, ``ceil_mode`` keeps partial windows."""
    rank = _spatial_rank(x, "max_pool")
    begins, ends = pool_padding(x.shape[2:], kernel_shape, strides, pads, dilations, ceil_mode)
    x = F.pad(x, _torch_pads(begins, ends), value=-math.inf)
    return _MAX_POOL[rank](x, tuple(kernel_shape), tuple(strides), 0, tuple(dilations))


@ir_op("arith", "GlobalMaxPool")
def global_max_pool(x):
    """The max over every spatial dim, kept as size-1 dims."""
    return torch.amax(x, dim=tuple(range(2, x.dim())), keepdim=True)


@ir_op("arith", None)
def sum_pool(x, *, kernel_shape, strides, pads, dilations, ceil_mode=0):
    """Window sums with zero padding (AveragePool before its reciprocal); exact in float64.
    Same keywords and window geometry as ``max_pool``."""
    rank = _spatial_rank(x, "sum_pool")
    begins, ends = pool_padding(x.shape[2:], kernel_shape, strides, pads, dilations, ceil_mode)
    x = F.pad(x, _torch_pads(begins, ends))
    channels = x.shape[1]
    ones = x.new_ones((channels, 1, *kernel_shape))
    return _CONV[rank](x, ones, None, tuple(strides), 0, tuple(dilations), channels)


@ir_op("arith", "ReduceSum")
def reduce_sum(x, *, axes, keepdims=1):
    """ONNX ReduceSum over ``axes`` (a non-empty list; the importer resolves "all axes")."""
    return torch.sum(x, dim=tuple(axes), keepdim=bool(keepdims))


# --------------------------------------------------------------------------------------------------
# move: value-preserving data movement


@ir_op("move", "Identity")
def identity(x):
    """``x`` itself (ONNX Identity, inference Dropout)."""
    return x


@ir_op("move", "Reshape")
def reshape(x, shape, *, allowzero=0):
    """ONNX Reshape; ``shape`` is a tuple of ints or a runtime int64 tensor (0 copies a dim unless allowzero)."""
    dims = shape.tolist() if isinstance(shape, torch.Tensor) else list(shape)
    if not allowzero:
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


@ir_op("move", "Flatten")
def flatten(x, *, axis=1):
    """ONNX Flatten: a 2-D view splitting the dims at ``axis`` (non-negative)."""
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


@ir_op("move", "Transpose")
def transpose(x, *, perm):
    """ONNX Transpose by the full permutation ``perm``."""
    return x.permute(tuple(perm))


@ir_op("move", "Squeeze")
def squeeze(x, *, axes=None):
    """ONNX Squeeze; ``axes`` None drops every dim of size 1."""
    if axes is None:
        return x.squeeze()
    return x.squeeze(tuple(axes)) if axes else x


@ir_op("move", "Unsqueeze")
def unsqueeze(x, *, axes):
    """ONNX Unsqueeze; ``axes`` index the output (negative ones count from its end)."""
    out_rank = x.dim() + len(axes)
    for axis in sorted(a + out_rank if a < 0 else a for a in axes):
        x = x.unsqueeze(axis)
    return x


@ir_op("move", "Concat")
def concat(inputs, *, axis):
    """ONNX Concat of the list ``inputs`` along ``axis``."""
    return torch.cat(list(inputs), dim=axis)


@ir_op("move", "Split")
def split(x, *, axis, split=None, num_outputs=None):  # noqa: A002 - ONNX attribute name
    """ONNX Split into a tuple: by the sizes ``split``, else into ``num_outputs`` pieces of
    ``ceil(n / num_outputs)`` (the last one smaller). The importer reads the parts with getitem."""
    if split is None:
        split = -(-x.shape[axis] // num_outputs)
    return tuple(torch.split(x, split, dim=axis))


@ir_op("move", "Slice")
def slice_axes(x, *, starts, ends, axes, steps):
    """ONNX Slice with its clamping rules (out-of-range starts/ends, negative steps)."""
    for start, end, axis, step in zip(starts, ends, axes, steps):
        n = x.shape[axis]
        if step > 0:
            begin, stop = _clamp_index(start, n, 0, n), _clamp_index(end, n, 0, n)
        else:
            begin, stop = _clamp_index(start, n, 0, n - 1), _clamp_index(end, n, -1, n - 1)
        index = torch.arange(begin, stop, step, device=x.device)
        x = torch.index_select(x, axis, index)
    return x


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}


@ir_op("move", "Pad")
def pad(x, *, pads, mode="constant"):
    """ONNX Pad with zero padding (constant), reflect, edge or wrap; negative pads crop.

    ``pads`` covers every axis (begins, then ends). Non-constant modes pad at most the last three
    axes and never the first (the importer checks).
    """
    begins, ends = _spatial_pads(pads)
    torch_pads = _torch_pads(begins, ends)
    while torch_pads and torch_pads[-1] == 0 and torch_pads[-2] == 0:
        torch_pads = torch_pads[:-2]
    if not torch_pads:
        return x
    return F.pad(x, torch_pads, mode=_PAD_MODES[mode])


@ir_op("move", "Gather")
def gather(data, indices, *, axis=0):
    """ONNX Gather: ``indices`` (any shape, negative allowed) select along ``axis``."""
    n = data.shape[axis]
    flat = indices.reshape(-1).long()
    flat = torch.where(flat < 0, flat + n, flat)
    picked = torch.index_select(data, axis, flat)
    return picked.reshape(data.shape[:axis] + indices.shape + data.shape[axis + 1:])


@ir_op("move", "Cast")
def cast(x, *, to):
    """ONNX Cast to the ONNX element type ``to``. A float-to-float cast keeps the working float
    precision, so a float64 run of the graph stays float64."""
    dtype = torch_dtype(to)
    if x.is_floating_point() and dtype.is_floating_point:
        return x
    return x.to(dtype)


@ir_op("move", None)
def fixed_cast(x, *, types, axis=None):
    """The ``ap_fixed`` cast an imported quantizer fixes (QONNX ``Quant``, a QDQ pair): ``types``
    is a type's text, or a tuple of per-channel types along ``axis``.

    Only imported float graphs hold it: inserting the quantizers turns it into ``identity``
    followed by a cast module of the same type (``qfx_onnx.quant.quantize.insert_quantizers``),
    so no back end sees it."""
    if axis is None:
        return _fixed_point_cast(x, types)
    parts = [_fixed_point_cast(x.select(axis, c), t) for c, t in enumerate(types)]
    return torch.stack(parts, dim=axis)


@functools.lru_cache(maxsize=512)
def nearest_indices(in_len: int, out_len: int, scale: float, coordinate_transformation_mode: str, nearest_mode: str) -> tuple[int, ...]:
    """Source index of each output position of a nearest resize, computed in float32 as onnxruntime does."""
    i = np.arange(out_len, dtype=np.float32)
    s = np.float32(scale)
    half = np.float32(0.5)
    if coordinate_transformation_mode == "asymmetric":
        pos = i / s
    elif coordinate_transformation_mode == "half_pixel":
        pos = (i + half) / s - half
    elif coordinate_transformation_mode == "pytorch_half_pixel":
        pos = (i + half) / s - half if out_len > 1 else np.zeros_like(i)
    elif coordinate_transformation_mode == "half_pixel_symmetric":
        center = np.float32(in_len) / np.float32(2)
        offset = center * (np.float32(1) - np.float32(out_len) / (s * np.float32(in_len)))
        pos = offset + (i + half) / s - half
    elif coordinate_transformation_mode == "align_corners":
        pos = i * np.float32(in_len - 1) / np.float32(out_len - 1) if out_len > 1 else np.zeros_like(i)
    else:
        raise ValueError(f"unsupported coordinate_transformation_mode {coordinate_transformation_mode!r}")
    low = np.floor(pos)
    frac = pos - low
    rounded = {
        "floor": low,
        "ceil": np.ceil(pos),
        "round_prefer_floor": np.where(frac > half, low + 1, low),
        "round_prefer_ceil": np.where(frac >= half, low + 1, low),
    }[nearest_mode]
    return tuple(int(v) for v in np.clip(rounded, 0, in_len - 1))


def resize_output_length(in_len: int, scale: float) -> int:
    """Output length for a scale, ``int(in_len * scale)`` in float32 as onnxruntime computes it."""
    return int(np.float32(in_len) * np.float32(scale))


@ir_op("move", "Resize")
def resize(x, *, mode="nearest", scales=None, sizes=None, coordinate_transformation_mode, nearest_mode):
    """ONNX Resize, nearest mode only, given for every axis: output length ``sizes[i]`` when
    ``sizes`` is given and ``sizes[i]`` is not None (the scale is then ``sizes[i] / in_len``),
    else ``int(in_len * scales[i])``; an axis with neither keeps its length."""
    if mode != "nearest":
        raise ValueError(f"resize mode {mode!r} is not supported")
    for axis in range(x.dim()):
        in_len = x.shape[axis]
        if sizes is not None and sizes[axis] is not None:
            out_len = sizes[axis]
            scale = float(np.float32(out_len) / np.float32(in_len))
        else:
            scale = 1.0 if scales is None else scales[axis]
            out_len = resize_output_length(in_len, scale)
        if out_len == in_len and scale == 1.0:
            continue
        index = nearest_indices(in_len, out_len, scale, coordinate_transformation_mode, nearest_mode)
        x = torch.index_select(x, axis, torch.tensor(index, dtype=torch.long, device=x.device))
    return x


# --------------------------------------------------------------------------------------------------
# nonlinear: evaluated through lookup tables in the fixed-point graph


@ir_op("nonlinear", "Sigmoid")
def sigmoid(x):
    """Logistic sigmoid."""
    return torch.sigmoid(x)


@ir_op("nonlinear", "Tanh")
def tanh(x):
    """Hyperbolic tangent."""
    return torch.tanh(x)


@ir_op("nonlinear", "Softmax")
def softmax(x, *, axis=-1):
    """Softmax along one axis (opset-13 semantics; the importer rewrites older coerced-2-D forms)."""
    return torch.softmax(x, dim=axis)


@ir_op("nonlinear", "LogSoftmax")
def log_softmax(x, *, axis=-1):
    """Log of softmax along one axis (opset-13 semantics)."""
    return torch.log_softmax(x, dim=axis)


@ir_op("nonlinear", "Div")
def div(a, b):
    """Division by a runtime tensor (division by a constant is imported as mul by its reciprocal)."""
    return a / b


@ir_op("nonlinear", "LRN")
def lrn(x, *, size, alpha=1e-4, beta=0.75, bias=1.0):
    """ONNX LRN across channels: ``x / (bias + alpha / size * window_sum(x^2)) ** beta``."""
    square = x * x
    front, back = (size - 1) // 2, size - 1 - (size - 1) // 2
    padded = F.pad(square, [0, 0] * (x.dim() - 2) + [front, back])
    channels = x.shape[1]
    window = sum(padded[:, k:k + channels] for k in range(size))
    return x / (bias + alpha / size * window) ** beta


# --------------------------------------------------------------------------------------------------
# shape: int64 shape arithmetic kept at runtime (a dynamic batch), never quantized


@ir_op("shape", "Shape")
def shape_of(x, *, start=0, end=None):
    """ONNX Shape: the dims ``start:end`` of ``x`` as an int64 tensor."""
    return torch.tensor(x.shape[start:end], dtype=torch.int64)


def _shape_twin(fn: Callable) -> Callable:
    """Register the "shape"-kind twin of IR op ``fn``: the same function, on int64 shape tensors."""

    def twin(*args, **kwargs):
        return fn(*args, **kwargs)

    twin.__name__ = twin.__qualname__ = f"shape_{fn.__name__}"
    twin.__doc__ = f"``{fn.__name__}`` on integer shape tensors (kind 'shape')."
    twin.__signature__ = inspect.signature(fn)  # same arguments and keywords as fn
    return ir_op("shape", op_of(fn).onnx_op)(twin)


# Module-level names, so that fx code and pickles can refer to each twin.
shape_gather = _shape_twin(gather)
shape_unsqueeze = _shape_twin(unsqueeze)
shape_squeeze = _shape_twin(squeeze)
shape_concat = _shape_twin(concat)
shape_slice_axes = _shape_twin(slice_axes)
shape_reshape = _shape_twin(reshape)
shape_cast = _shape_twin(cast)
shape_identity = _shape_twin(identity)
shape_add = _shape_twin(add)
shape_sub = _shape_twin(sub)
shape_mul = _shape_twin(mul)


@ir_op("shape", "Div")
def shape_div(a, b):
    """Integer division truncating toward zero, as ONNX Div on integers."""
    return torch.div(a, b, rounding_mode="trunc")


SHAPE_TWINS: dict[Callable, Callable] = {
    gather: shape_gather,
    unsqueeze: shape_unsqueeze,
    squeeze: shape_squeeze,
    concat: shape_concat,
    slice_axes: shape_slice_axes,
    reshape: shape_reshape,
    cast: shape_cast,
    identity: shape_identity,
    add: shape_add,
    sub: shape_sub,
    mul: shape_mul,
    div: shape_div,
}
"""The ``"shape"``-kind op that replaces an op when its output is an integer tensor."""


def torch_dtype(onnx_elem_type: int) -> torch.dtype:
    """The torch dtype of an ONNX tensor element type."""
    np_dtype = onnx.helper.tensor_dtype_to_np_dtype(onnx_elem_type)
    return torch.from_numpy(np.zeros(0, dtype=np_dtype)).dtype
