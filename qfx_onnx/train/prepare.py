"""Passes that reshape a FixedPointModel's quantizers before finetuning, and the ones that freeze
the result afterwards.

Each pass takes the model, changes it in place and states what it guarantees:

* :func:`set_widths` gives the tensors of some roles a new total width, recalibrating their
  binary points (parameters on their own values, activations on calibration batches).
* :func:`to_per_channel` gives every weight one binary point per output channel.
* :func:`to_khot` makes weights (and optionally constant multipliers such as BatchNorm scales)
  K-hot: at most K ones (or signed digits) per code, i.e. at most K shift-adds per product.
* :func:`set_binary_points_learnable` freezes or unfreezes every binary point.
* :func:`bake_parameters` replaces each quantized parameter by its quantized value, so that the
  saved initializers are exact fixed-point values and the cast is the identity on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import fx, nn

from qfx_onnx.errors import QfxError
from qfx_onnx.fixed.khot import KHotQuantizer
from qfx_onnx.fixed.quantizer import BinaryPointQuantizer, FixedQuantizer
from qfx_onnx.ir.ops import op_of
from qfx_onnx.quant.quantize import CAST_MODULE_PREFIX, FixedPointModel

PARAM_ROLES = ("weight", "bias", "constant")
WIDTH_ROLES = ("input", "weight", "bias", "constant", "act", "elementwise")
MULTIPLIER_OPS = ("mul", "prelu", "leaky_relu")


@dataclass
class Cast:
    """One cast of the graph: ``tensor`` (ONNX name) is quantized by module ``target`` in ``role``;
    ``param`` is the parameter's attribute path when the cast reads a parameter (else None)."""

    node: fx.Node
    tensor: str
    target: str
    role: str
    param: str | None
    channel_axis: int | None


def casts(model: FixedPointModel) -> list[Cast]:
    """Every cast of ``model`` in graph order."""
    axes = {s.tensor: s.channel_axis for s in model.sites}
    out = []
    for node in model.graph_module.graph.nodes:
        if node.op != "call_module" or not str(node.target).startswith(CAST_MODULE_PREFIX):
            continue
        producer = node.args[0]
        param = producer.target if isinstance(producer, fx.Node) and producer.op == "get_attr" else None
        tensor = node.meta["onnx_name"]
        out.append(Cast(node, tensor, node.target, node.meta.get("role", "act"), param, axes.get(tensor)))
    return out


def quantizer_of(model: FixedPointModel, cast: Cast) -> BinaryPointQuantizer:
    return model.graph_module.get_submodule(cast.target)


def _param(model: FixedPointModel, path: str) -> torch.Tensor:
    value: object = model.graph_module
    for part in path.split("."):
        value = getattr(value, part)
    return value  # type: ignore[return-value]


def _replace(model: FixedPointModel, cast: Cast, new: BinaryPointQuantizer) -> None:
    old = quantizer_of(model, cast)
    frac = old.frac
    new = new.to(device=frac.device, dtype=frac.dtype)
    new.frac.requires_grad_(old.learn_frac)
    new.enabled = old.enabled
    site = cast.node.meta.get("qfx_site")
    if site is not None and new.frozen_types() != old.frozen_types():
        site.imported = False  # no longer the imported quantizer's type
    setattr(model.graph_module, cast.target, new)


def _is_multiplier(cast: Cast) -> bool:
    for user in cast.node.users:
        op = op_of(user.target) if user.op == "call_function" else None
        if op is not None and op.name in MULTIPLIER_OPS:
            return True
    return False


# ----------------------------------------------------------------------------------- widths
def set_widths(model: FixedPointModel, widths: dict[str, int], calib: Iterable[torch.Tensor] = (),
               method: str = "mse") -> list[str]:
    """Give every cast whose role is a key of ``widths`` that total width (1..24 bits).

    Sign, quantization/overflow modes and per-channel layout are kept (the saturation bits are
    clipped to the new width). Binary points are recalibrated with ``method``: parameters on
    their values, other tensors on ``calib`` (batches of inputs; required when an activation
    changes width). K-hot quantizers keep K. Returns the names of the tensors that changed.
    """
    for role, bits in widths.items():
        if role not in WIDTH_ROLES:
            raise QfxError(f"unknown role {role!r} for a width change (one of {', '.join(WIDTH_ROLES)})")
        if not 1 <= int(bits) <= 24:
            raise QfxError(f"{role} width {bits}: widths from 1 to 24 bits are supported (float32 exactness)")
    changed, observed = [], []
    for cast in casts(model):
        bits = widths.get(cast.role)
        old = quantizer_of(model, cast)
        if bits is None or bits == old.width:
            continue
        new = _like(old, int(bits))
        _replace(model, cast, new)
        new = quantizer_of(model, cast)
        if cast.param is not None:
            new.calibrate(_param(model, cast.param).detach(), method=method)
        else:
            observed.append(new)
        changed.append(cast.tensor)
    if observed:
        _calibrate_activations(model, observed, calib, method)
    return changed


def _like(old: BinaryPointQuantizer, width: int, **changes) -> BinaryPointQuantizer:
    """A quantizer of ``old``'s class and settings with another width (or other ``changes``)."""
    common = dict(per_channel_axis=old.per_channel_axis,
                  num_channels=old.num_channels if old.per_channel_axis is not None else None,
                  frac=0.0, learn_frac=old.learn_frac, enabled=old.enabled)
    common.update(changes)
    if isinstance(old, KHotQuantizer):
        return KHotQuantizer(width, old.signed, old.k, signed_digits=old.signed_digits, **common)
    if isinstance(old, FixedQuantizer):
        return FixedQuantizer(width, old.signed, old.q, old.o, min(old.n, width), **common)
    raise QfxError(f"cannot change the width of a {type(old).__name__}")


def _calibrate_activations(model: FixedPointModel, quantizers: list[BinaryPointQuantizer],
                           calib: Iterable[torch.Tensor], method: str) -> None:
    # The new casts observe with their quantization off: upstream values are what PTQ would see.
    enabled = [q.enabled for q in quantizers]
    for q in quantizers:
        q.reset_observer()
        q.observing, q.enabled = True, False
    seen = False
    try:
        with torch.no_grad():
            for x in calib:
                model(x.to(next(model.parameters()).device))
                seen = True
    finally:
        for q, on in zip(quantizers, enabled):
            q.observing, q.enabled = False, on
    if not seen:
        raise QfxError("changing an activation width needs calibration data (the training set was empty)")
    for q in quantizers:
        q.finalize(method=method)


# ------------------------------------------------------------------------------ per channel
def to_per_channel(model: FixedPointModel, method: str = "mse") -> list[str]:
    """One binary point per output channel for every weight with a known channel axis.

    Each new per-channel quantizer (same class, width, sign and modes) is calibrated on the
    weight's values with ``method``. Weights already per channel are left alone. Returns the
    tensors changed.
    """
    changed = []
    for cast in casts(model):
        old = quantizer_of(model, cast)
        if cast.role != "weight" or cast.param is None or cast.channel_axis is None or old.per_channel_axis is not None:
            continue
        value = _param(model, cast.param).detach()
        axis = cast.channel_axis % value.dim()
        new = _like(old, old.width, per_channel_axis=axis, num_channels=value.shape[axis])
        new.calibrate(value.to(torch.float64), method=method)
        _replace(model, cast, new)
        changed.append(cast.tensor)
    return changed


# ------------------------------------------------------------------------------------ K-hot
def to_khot(model: FixedPointModel, k: int, signed_digits: bool = False, elementwise: bool = False,
            method: str = "mse") -> list[str]:
    """Replace the quantizer of every weight (and, with ``elementwise``, every constant that
    multiplies: BatchNorm scales, PReLU/LeakyReLU slopes) by a KHotQuantizer of the same width,
    sign and layout, calibrated on the parameter's values with ``method``.

    Afterwards every such parameter's quantized codes have at most ``k`` ones (``signed_digits``:
    nonzero signed digits, CSD). Returns the tensors changed.

    The new quantizers round to the nearest K-hot code and saturate: their types carry
    ``AP_RND, AP_SAT`` whatever quantization and overflow modes the old ones had (a K-hot cast is
    a projection onto a table of codes; truncating or wrapping modes have no K-hot meaning).
    :func:`khot_mode_changes` lists the tensors whose modes this changes, for telling the user.
    """
    if k < 1:
        raise QfxError(f"--khot {k}: K must be at least 1")
    changed = []
    for cast in casts(model):
        wanted = cast.role == "weight" or (elementwise and cast.role == "constant" and _is_multiplier(cast))
        if not wanted or cast.param is None:
            continue
        old = quantizer_of(model, cast)
        if isinstance(old, KHotQuantizer) and old.k == k and old.signed_digits == signed_digits:
            continue
        common = dict(per_channel_axis=old.per_channel_axis,
                      num_channels=old.num_channels if old.per_channel_axis is not None else None,
                      learn_frac=old.learn_frac, enabled=old.enabled)
        try:
            new = KHotQuantizer(old.width, old.signed, k, signed_digits=signed_digits, **common)
        except ValueError as exc:
            raise QfxError(f"tensor {cast.tensor!r}: {exc}") from None
        new.calibrate(_param(model, cast.param).detach().to(torch.float64), method=method)
        _replace(model, cast, new)
        changed.append(cast.tensor)
    if not changed and not any(isinstance(quantizer_of(model, c), KHotQuantizer) for c in casts(model)):
        raise QfxError("--khot: the model has no weights to constrain")
    return changed


def khot_mode_changes(before: dict, after: dict) -> dict[str, str]:
    """Tensor -> its old modes (``"AP_TRN, AP_WRAP"``), for every tensor whose quantization or
    overflow mode differs between two ``fixed_types()`` maps (before and after :func:`to_khot`)."""
    def modes(t) -> str:
        t = t[0] if isinstance(t, list) else t
        return f"{t.q.value}, {t.o.value}" + (f", {t.n}" if t.n else "")

    return {name: modes(t) for name, t in before.items() if name in after and modes(t) != modes(after[name])}


# ------------------------------------------------------------------------------- after/before
def set_binary_points_learnable(model: nn.Module, learnable: bool) -> None:
    """Every quantizer's ``frac`` gets ``requires_grad=learnable`` (fixed types from a policy
    are frozen too: they never had a learnable binary point)."""
    for module in model.modules():
        if isinstance(module, BinaryPointQuantizer):
            module.frac.requires_grad_(learnable)


def bake_parameters(model: FixedPointModel) -> int:
    """Replace every quantized parameter by its quantized value (exact, in the parameter's dtype).

    The model computes the same outputs afterwards (casts are idempotent) and the saved
    initializers are the fixed-point values themselves (e.g. exactly K-hot). Returns the number
    of parameters changed.
    """
    n = 0
    with torch.no_grad():
        for cast in casts(model):
            if cast.param is None:
                continue
            p = _param(model, cast.param)
            q = quantizer_of(model, cast)
            if not q.enabled:
                continue
            value = q.quantize_frozen(p.detach().to(torch.float64)).to(p.dtype)
            if not torch.equal(value, p):
                p.copy_(value)
                n += 1
    return n


def weight_decay_params(model: FixedPointModel) -> set[str]:
    """Attribute paths of the parameters that are weights (the ones weight decay applies to)."""
    return {c.param for c in casts(model) if c.role == "weight" and c.param is not None}


def activation_quantizers(model: FixedPointModel) -> list[str]:
    """Module names of the casts whose input has the batch dimension (not a parameter)."""
    return [c.target for c in casts(model) if c.param is None]


def describe(model: FixedPointModel) -> list[tuple[str, str, str]]:
    """(tensor, role, quantizer text) per cast: a structural summary for checkpoint fingerprints."""
    out = []
    for cast in casts(model):
        q = quantizer_of(model, cast)
        kind = type(q).__name__
        extra = f"K={q.k},csd={int(q.signed_digits)}" if isinstance(q, KHotQuantizer) else ""
        out.append((cast.tensor, cast.role, f"{kind}(W={q.width},signed={int(q.signed)},axis={q.per_channel_axis},{extra})"))
    return out
