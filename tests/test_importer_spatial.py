"""Pad, Resize and Upsample (nearest) against onnxruntime, across the opsets where they changed."""

import numpy as np
import pytest

from onnx_builders import assert_matches_ort, call_targets, node_model

I64, F32 = np.int64, np.float32

PADS = [[0, 0, 1, 2, 0, 0, 2, 1], [0, 0, 0, 1, 0, 0, 1, 0], [0, 0, -1, 1, 0, 0, 1, -1]]


@pytest.mark.parametrize("pads", PADS)
@pytest.mark.parametrize("opset", [2, 11, 13, 18])
def test_pad_constant_zero(pads, opset):
    if opset == 2:
        model = node_model("Pad", [("x", (1, 2, 4, 5))], opset=7, pads=pads, mode="constant")
    else:
        model = node_model("Pad", [("x", (1, 2, 4, 5)), ("pads", np.array(pads, I64))], opset=opset)
    assert call_targets(assert_matches_ort(model)) == ["pad"]


@pytest.mark.parametrize("mode", ["reflect", "edge"])
@pytest.mark.parametrize("opset", [7, 13])
def test_pad_reflect_and_edge(mode, opset):
    pads = [0, 0, 1, 2, 0, 0, 2, 1]
    if opset < 11:
        model = node_model("Pad", [("x", (1, 2, 4, 5))], opset=opset, pads=pads, mode=mode)
    else:
        model = node_model("Pad", [("x", (1, 2, 4, 5)), ("pads", np.array(pads, I64))], opset=opset, mode=mode)
    assert_matches_ort(model)


def test_pad_18_axes_and_explicit_zero_value():
    inputs = [("x", (1, 2, 4, 5)), ("pads", np.array([1, 2, 0, 3], I64)), ("value", np.array(0.0, F32)), ("axes", np.array([-1, 2], I64))]
    assert_matches_ort(node_model("Pad", inputs, opset=18))


def resize_model(opset: int, shape, *, scales=None, sizes=None, **attrs):
    inputs = [("x", shape), ("roi", np.array([], F32) if opset < 13 else None)]
    if scales is not None:
        inputs.append(("scales", np.array(scales, F32)))
    else:
        inputs += [("scales", np.array([], F32) if opset < 13 else None), ("sizes", np.array(sizes, I64))]
    return node_model("Resize", inputs, opset=opset, mode="nearest", **attrs)


MODES = [
    {},
    {"coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"},
    {"coordinate_transformation_mode": "half_pixel", "nearest_mode": "round_prefer_ceil"},
    {"coordinate_transformation_mode": "align_corners", "nearest_mode": "round_prefer_floor"},
    {"coordinate_transformation_mode": "pytorch_half_pixel", "nearest_mode": "ceil"},
    {"coordinate_transformation_mode": "half_pixel_symmetric"},
]


@pytest.mark.parametrize("attrs", MODES)
@pytest.mark.parametrize("scales", [[1, 1, 2, 2], [1, 1, 3, 2], [1, 1, 0.5, 0.5], [1, 1, 1.5, 0.75]])
def test_resize_scales(attrs, scales):
    mode = attrs.get("coordinate_transformation_mode")
    opset = 19 if mode == "half_pixel_symmetric" else 13
    gm = assert_matches_ort(resize_model(opset, (1, 2, 4, 6), scales=scales, **attrs))
    assert call_targets(gm) == ["resize"]


@pytest.mark.parametrize("opset", [11, 13, 19])
@pytest.mark.parametrize("sizes", [[1, 2, 8, 12], [1, 2, 7, 9], [1, 2, 3, 4]])
def test_resize_sizes(opset, sizes):
    assert_matches_ort(resize_model(opset, (1, 2, 4, 6), sizes=sizes))


def test_resize_18_axes():
    inputs = [("x", (2, 3, 4, 4)), ("roi", None), ("scales", np.array([2, 3], F32))]
    model = node_model("Resize", inputs, opset=18, mode="nearest", axes=[2, 3], coordinate_transformation_mode="asymmetric")
    assert_matches_ort(model)


def test_resize_10_and_dynamic_batch():
    model = node_model("Resize", [("x", ("N", 2, 3, 3)), ("scales", np.array([1, 1, 2, 3], F32))], opset=10, mode="nearest")
    assert_matches_ort(model)


@pytest.mark.parametrize("opset", [7, 9])
@pytest.mark.parametrize("scales", [[1, 1, 2, 2], [1, 1, 2, 3]])
def test_upsample(opset, scales):
    if opset < 9:
        model = node_model("Upsample", [("x", (1, 2, 3, 4))], opset=opset, mode="nearest", scales=[float(s) for s in scales])
    else:
        model = node_model("Upsample", [("x", (1, 2, 3, 4)), ("scales", np.array(scales, F32))], opset=opset, mode="nearest")
    assert call_targets(assert_matches_ort(model)) == ["resize"]
