"""Window, padding and index arithmetic shared by the IR ops and the back ends (not IR ops)."""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import onnx
import torch
import torch.nn.functional as F

def torch_pads(begins: Sequence[int], ends: Sequence[int]) -> list[int]:
    """ONNX-ordered begin/end pads of the trailing dims as ``F.pad``'s list (last dim first)."""
    out: list[int] = []
    for begin, end in zip(reversed(begins), reversed(ends)):
        out += [begin, end]
    return out


def spatial_pads(pads: Sequence[int]) -> tuple[list[int], list[int]]:
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
    begins, ends = spatial_pads(pads)
    grown = []
    for size, k, s, b, e, d in zip(sizes, kernel_shape, strides, begins, ends, dilations):
        out = pool_output_size(size, k, s, b, e, d, ceil_mode)
        needed = (out - 1) * s + (k - 1) * d + 1
        grown.append(max(e, needed - size - b))
    return begins, grown


CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


def spatial_rank(x: torch.Tensor, what: str) -> int:
    rank = x.dim() - 2
    if rank not in CONV:
        raise ValueError(f"{what} supports 1-D to 3-D spatial inputs, got rank {x.dim()}")
    return rank


def clamp_index(i: int, n: int, low: int, high: int) -> int:
    return min(max(i + n if i < 0 else i, low), high)


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


def torch_dtype(onnx_elem_type: int) -> torch.dtype:
    """The torch dtype of an ONNX tensor element type."""
    np_dtype = onnx.helper.tensor_dtype_to_np_dtype(onnx_elem_type)
    return torch.from_numpy(np.zeros(0, dtype=np_dtype)).dtype
