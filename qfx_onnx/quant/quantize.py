"""Whole-model post-training quantization: a fixed-point cast on every tensor edge and parameter.

The pipeline, each step a plain function:

1. :func:`find_cast_sites` picks the tensors that get a cast: graph inputs, float parameters
   (weights, biases, BatchNorm scale/shift and other constants) and the output of every op that
   computes, in the role its definition names (``IrOp.cast_role``: linear, arithmetic and
   nonlinear ops, and concat). Data-movement ops (reshape, transpose, slice ...) inherit their
   input's type; shape arithmetic is never quantized.
   Intermediate steps of a decomposition (the product inside BatchNorm's ``x*a + b``) stay
   lossless, exactly as HLS keeps full-precision ``auto`` results until an assignment, and so
   does a tensor of an imported model annotated ``qfx.role = lossless`` (``node.meta["lossless"]``:
   a QONNX model qfx-onnx exported quantizes back to the model it came from).
2. :func:`observe` runs calibration data through the float graph and records each site's range
   and a sample of its values.
3. :func:`build_quantizers` turns the policy and the observations into one ``FixedQuantizer`` per
   site (binary point from ``max``, ``percentile`` or ``mse``); a tensor whose values are never
   negative becomes ``ap_ufixed`` unless the policy says otherwise. A tensor whose type an
   imported quantized model fixes (``node.meta["pinned_type"]``, set by
   :mod:`qfx_onnx.importer.quant_ops` for QONNX and QDQ quantizers) keeps that type, frozen,
   unless ``recalibrate_imported``: then only its binary point is calibrated (width, sign and
   modes stay). A policy override with a fixed type still wins over both.
4. :func:`insert_quantizers` splices them into the graph (an imported ``fixed_cast`` becomes
   ``identity``: its cast module does the cast); the result is a :class:`FixedPointModel`.
5. :func:`~qfx_onnx.quant.nonlinear_specs.attach_nonlinear` gives each nonlinear op its exact
   fixed-point definition (the policy's ``[nonlinear]`` section) from the types around it.

The emulation runs in float64: every cast is exact there, and sums of products are exact while
the lossless accumulator fits 53 bits (see :mod:`qfx_onnx.quant.typeprop`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
from torch import fx, nn

from qfx_onnx.batching import fixed_batch_of, join_chunks, run_in_chunks
from qfx_onnx.errors import QfxError
from qfx_onnx.fixed.quantizer import FixedQuantizer
from qfx_onnx.fixed.types import FixedType
from qfx_onnx.ir import ops as ir_ops
from qfx_onnx.ir.ops import op_of
from qfx_onnx.quant.policy import Policy

log = logging.getLogger(__name__)

FLOAT_DTYPES = {"float16", "float32", "float64", "bfloat16"}
CAST_MODULE_PREFIX = "qfx_cast_"


@dataclass
class CastSite:
    """One tensor that gets a fixed-point cast: produced by ``node``, named ``tensor`` in ONNX."""

    node: fx.Node
    tensor: str
    onnx_node: str
    op: str
    role: str
    channel_axis: int | None = None  # weights: the output-channel axis, for per-channel types
    imported: bool = False  # the type is an imported quantizer's, kept as given (annotated qfx.imported)


def _is_float(node: fx.Node) -> bool:
    return node.meta.get("onnx_dtype", "float32") in FLOAT_DTYPES


def _weight_channel_axis(param: fx.Node) -> int | None:
    """Output-channel axis of a weight from how its consumer uses it (``IrOp.weight_axis``)."""
    for user in param.users:
        op = op_of(user.target)
        if op is None or user.args[1:2] != (param,) or op.weight_axis is None:
            continue
        return op.weight_axis(user.kwargs)
    return None


def _only_read_by_imported_quantizers(node: fx.Node) -> bool:
    return len(node.users) == 1 and "pinned_type" in next(iter(node.users)).meta


def find_cast_sites(gm: fx.GraphModule) -> list[CastSite]:
    """Every tensor of ``gm`` that gets a cast, in graph order (see the module docstring)."""
    sites: list[CastSite] = []
    for node in gm.graph.nodes:
        name = node.meta.get("onnx_name")
        if name is None or not _is_float(node):
            continue
        onnx_node = node.meta.get("onnx_node", name)
        onnx_op = node.meta.get("onnx_op", "")
        if node.op == "placeholder":
            sites.append(CastSite(node, name, onnx_node, onnx_op or "Input", "input"))
        elif node.op == "get_attr":
            role = node.meta.get("role", "constant")
            if role in ("weight", "bias", "constant") and node.users:
                # a parameter belongs to the node that consumes it: "the Gemm's weight"
                user = next(iter(node.users))
                onnx_node = user.meta.get("onnx_node") or onnx_node
                onnx_op = user.meta.get("onnx_op") or onnx_op
                axis = _weight_channel_axis(node) if role == "weight" else None
                if "pinned_type" in node.meta:
                    axis = node.meta.get("pinned_axis")
                sites.append(CastSite(node, name, onnx_node, onnx_op, role, axis))
        elif node.op == "call_function":
            op = op_of(node.target)
            pinned = "pinned_type" in node.meta  # an imported quantizer's type (QONNX Quant, a QDQ pair)
            if op is None or (op.cast_role is None and not pinned):  # data movement and shape ints inherit or have no type
                continue
            if not pinned and node.meta.get("lossless"):  # annotated so by the qfx-onnx writer (export-qonnx keeps it)
                continue
            if not pinned and op.kind == "nonlinear" and _only_read_by_imported_quantizers(node):
                continue  # the imported quantizer is its output cast: a cast of ours before it would round twice
            sites.append(CastSite(node, name, onnx_node, onnx_op, op.cast_role or "act"))
    return sites


class Observer(nn.Module):
    """Identity that records min, max and a bounded random sample of what flows through it."""

    def __init__(self, max_samples: int = 32_768, seed: int = 0) -> None:
        super().__init__()
        self.max_samples = max_samples
        self.min = float("inf")
        self.max = float("-inf")
        self.count = 0
        self._chunks: list[torch.Tensor] = []
        self._gen = torch.Generator().manual_seed(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.detach().flatten().to(torch.float64).cpu()
        if flat.numel():
            self.min = min(self.min, flat.min().item())
            self.max = max(self.max, flat.max().item())
            self.count += flat.numel()
            if flat.numel() > self.max_samples:
                flat = flat[torch.randint(flat.numel(), (self.max_samples,), generator=self._gen)]
            self._chunks.append(flat)
        return x

    def sample(self) -> torch.Tensor:
        """A sample of the observed values that always contains the extremes."""
        values = torch.cat(self._chunks) if self._chunks else torch.zeros(1, dtype=torch.float64)
        if values.numel() > self.max_samples:
            values = values[torch.randint(values.numel(), (self.max_samples,), generator=self._gen)]
        extremes = torch.tensor([self.min, self.max], dtype=torch.float64)
        return torch.cat([values, extremes]) if self.count else values


def _insert_after(gm: fx.GraphModule, node: fx.Node, module_name: str, module: nn.Module) -> fx.Node:
    """Insert ``call_module(module_name)`` right after ``node`` and route every user through it."""
    gm.add_submodule(module_name, module)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(module_name, (node,))
    node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    return new


def _site_module_name(index: int) -> str:
    return f"{CAST_MODULE_PREFIX}{index}"


def observe(gm: fx.GraphModule, sites: list[CastSite], batches: Iterable[torch.Tensor]) -> dict[str, Observer]:
    """Run ``batches`` through a copy of the float graph; return an Observer per site tensor."""
    probe = fx.GraphModule(gm, _copy_graph(gm))
    by_name = {n.name: n for n in probe.graph.nodes}
    observers: dict[str, Observer] = {}
    for i, site in enumerate(sites):
        obs = Observer(seed=i)
        _insert_after(probe, by_name[site.node.name], _site_module_name(i), obs)
        observers[site.tensor] = obs
    probe.recompile()
    fixed = fixed_batch_of(gm)
    with torch.no_grad():
        for x in batches:
            run_in_chunks(probe, [x.to(_param_dtype(gm))], fixed)
    return observers


def _copy_graph(gm: fx.GraphModule) -> fx.Graph:
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    for old, new in zip(gm.graph.nodes, graph.nodes):
        new.meta = dict(old.meta)
    return graph


def _param_dtype(gm: nn.Module) -> torch.dtype:
    for p in gm.parameters():
        return p.dtype
    return torch.float32


def build_quantizers(sites: list[CastSite], observers: dict[str, Observer], policy: Policy,
                     method: str = "max", per_channel_weights: bool = False,
                     percentile: float = 99.99, recalibrate_imported: bool = False) -> dict[str, FixedQuantizer]:
    """One calibrated FixedQuantizer per site; parameters are calibrated on their own values.
    A site with a pinned type (an imported quantizer) keeps it (see the module docstring)."""
    quantizers: dict[str, FixedQuantizer] = {}
    for site in sites:
        spec = policy.spec(node=site.onnx_node, op=site.op, tensor=site.tensor, role=site.role)
        obs = observers[site.tensor]
        if spec.fixed is not None:
            t = spec.fixed
            quantizers[site.tensor] = FixedQuantizer(
                width=t.width, signed=t.signed, q=t.q, o=t.o, n=t.n, frac=float(t.frac), learn_frac=False)
            continue
        pinned = site.node.meta.get("pinned_type")
        if pinned is not None:
            quantizers[site.tensor] = _pinned_quantizer(site, pinned, obs, method, percentile, recalibrate_imported)
            site.imported = not recalibrate_imported
            continue
        signed = spec.signed if spec.signed is not None else obs.min < 0
        axis = site.channel_axis if (per_channel_weights and site.role == "weight") else None
        values = _param_values(site) if site.node.op == "get_attr" else obs.sample()
        num_channels = values.shape[axis] if axis is not None else None
        quant = FixedQuantizer(width=spec.bits, signed=signed, q=spec.q, o=spec.o, n=spec.n, frac=0.0,
                               per_channel_axis=axis, num_channels=num_channels)
        quant.calibrate(values, method=method, percentile=percentile)
        quantizers[site.tensor] = quant
    policy.check_all_used()
    return quantizers


def _pinned_quantizer(site: CastSite, pinned: FixedType | list[FixedType], obs: "Observer", method: str,
                      percentile: float, recalibrate: bool) -> FixedQuantizer:
    """The imported type as it is (frozen), or with its binary point calibrated on the data."""
    quant = quantizer_for(pinned, site.channel_axis)
    if not recalibrate:
        quant.frac.requires_grad_(False)
        return quant
    values = _param_values(site) if site.node.op == "get_attr" else obs.sample()
    quant.calibrate(values, method=method, percentile=percentile)
    return quant


def _param_values(site: CastSite) -> torch.Tensor:
    gm = site.node.graph.owning_module
    return _fetch_attr(gm, site.node.target).detach().to(torch.float64)


def _fetch_attr(module: nn.Module, target: str) -> torch.Tensor:
    for part in target.split("."):
        module = getattr(module, part)
    return module  # type: ignore[return-value]


class FixedPointModel(nn.Module):
    """The fixed-point model: the imported graph with an ``ap_fixed`` cast on every site.

    ``graph_module`` is a torch.fx GraphModule whose ``call_module`` nodes named
    ``qfx_cast_<i>`` are FixedQuantizers; each carries ``meta["onnx_name"]`` (the quantized
    tensor's ONNX name) and ``meta["qfx_site"]`` (a CastSite). The producer of a cast tensor keeps
    its other metadata and gets ``meta["onnx_name"] = <name> + RAW_SUFFIX``. ``forward`` runs
    the exact emulation in float64 (parameters are float64 too).
    """

    RAW_SUFFIX = "::raw"

    def __init__(self, graph_module: fx.GraphModule, sites: list[CastSite]) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.sites = sites
        self.onnx_info = getattr(graph_module, "onnx_info", None)

    def forward(self, *inputs: torch.Tensor | np.ndarray):
        """The emulation on ``inputs`` (torch tensors or numpy arrays, batch first, any batch: a
        graph fixed to one batch runs in chunks), in the parameters' dtype (float64 unless
        training moved it). Differentiable; for inference without autograd use :meth:`predict`."""
        dtype = _param_dtype(self.graph_module)
        tensors = [torch.from_numpy(np.asarray(x)) if not isinstance(x, torch.Tensor) else x for x in inputs]
        device = next((p.device for p in self.graph_module.parameters()), torch.device("cpu"))
        return run_in_chunks(self.graph_module, [x.to(device, dtype) for x in tensors], fixed_batch_of(self.graph_module))

    def predict(self, *inputs: torch.Tensor | np.ndarray, batch_size: int = 1024):
        """Inference: the exact emulation of ``inputs`` in batches of ``batch_size``, without
        autograd and in eval mode (restored after). Returns what :meth:`forward` does, detached;
        numpy arrays in give numpy arrays out."""
        as_numpy = any(isinstance(x, np.ndarray) for x in inputs)
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():  # not inference_mode: cached quantizer plans must stay usable by autograd
                n = len(inputs[0])
                parts = [self(*(x[i:i + batch_size] for x in inputs)) for i in range(0, n, batch_size)]
        finally:
            self.train(was_training)
        out = join_chunks(parts, n)
        if not as_numpy:
            return out
        return tuple(o.cpu().numpy() for o in out) if isinstance(out, tuple) else out.cpu().numpy()

    def quantizers(self) -> dict[str, FixedQuantizer]:
        """ONNX tensor name -> its quantizer, in graph order."""
        out = {}
        for node in self.graph_module.graph.nodes:
            if node.op == "call_module" and node.target.startswith(CAST_MODULE_PREFIX):
                out[node.meta["onnx_name"]] = self.graph_module.get_submodule(node.target)
        return out

    def fixed_types(self) -> dict[str, FixedType | list[FixedType]]:
        """ONNX tensor name -> its type (a list of per-channel types for per-channel weights)."""
        out: dict[str, FixedType | list[FixedType]] = {}
        for name, quant in self.quantizers().items():
            types = quant.frozen_types()
            out[name] = types if quant.per_channel_axis is not None else types[0]
        return out

    def set_casts_enabled(self, enabled: bool) -> None:
        """Switch every cast on or off (off: the float model, for comparisons). Off also sets
        aside the nonlinear ops' exact definitions (``fixed`` specs, kept in ``meta``) so that
        they evaluate in float; on puts them back."""
        for quant in self.quantizers().values():
            quant.enabled = enabled
        changed = False
        for node in self.graph_module.graph.nodes:
            if not enabled and node.kwargs.get("fixed"):
                node.meta["qfx_fixed"] = node.kwargs["fixed"]
                node.kwargs = {k: v for k, v in node.kwargs.items() if k != "fixed"}
                changed = True
            elif enabled and "qfx_fixed" in node.meta:
                node.kwargs = {**node.kwargs, "fixed": node.meta.pop("qfx_fixed")}
                changed = True
        if changed:
            self.graph_module.recompile()


def insert_quantizers(gm: fx.GraphModule, sites: list[CastSite], quantizers: dict[str, FixedQuantizer],
                      dtype: torch.dtype = torch.float64) -> FixedPointModel:
    """Splice the quantizers into ``gm`` (modified in place) and return the FixedPointModel."""
    for i, site in enumerate(sites):
        if site.node.op == "call_function" and site.node.target is ir_ops.fixed_cast:
            site.node.target, site.node.kwargs = ir_ops.identity, {}  # the cast module below casts
        cast_node = _insert_after(gm, site.node, _site_module_name(i), quantizers[site.tensor])
        cast_node.meta.update(onnx_name=site.tensor, qfx_site=site, onnx_dtype="float32",
                              role=site.role, onnx_node=site.onnx_node, onnx_op=site.op)
        site.node.meta["onnx_name"] = site.tensor + FixedPointModel.RAW_SUFFIX
    gm.graph.lint()
    gm.recompile()
    gm.to(dtype)
    return FixedPointModel(gm, sites)


def _cast_module_of(gm: fx.GraphModule, node) -> FixedQuantizer | None:
    """The cast a value comes from, looking through data-movement ops."""
    while isinstance(node, fx.Node):
        if node.op == "call_module" and node.target.startswith(CAST_MODULE_PREFIX):
            return gm.get_submodule(node.target)
        op = op_of(node.target) if node.op == "call_function" else None
        if op is None or op.kind != "move" or not node.args:
            return None
        node = node.args[0]
    return None


def align_bias_fracs(model: FixedPointModel) -> None:
    """Drop bias bits below the product LSB of their layer (``F_bias <= F_x + F_w``).

    Bits below that LSB only nudge the final rounding, but they widen the accumulator past
    float32's 24 bits, which the annotated ONNX needs for exact execution in onnxruntime. The
    bias keeps its integer bits and gets narrower.
    """
    gm = model.graph_module
    for node in gm.graph.nodes:
        op = op_of(node.target) if node.op == "call_function" else None
        if op is None or op.kind != "linear" or len(node.args) < 3 or not isinstance(node.args[2], fx.Node):
            continue
        bias_node = node.args[2]
        x_q, w_q, b_q = (_cast_module_of(gm, a) for a in node.args[:3])
        if None in (x_q, w_q, b_q) or bias_node.op != "call_module" or b_q.per_channel_axis is not None:
            continue
        site = bias_node.meta.get("qfx_site")
        if "pinned_type" in bias_node.args[0].meta or getattr(site, "imported", False):  # kept as given
            continue
        cap = max(t.frac for t in x_q.frozen_types()) + max(t.frac for t in w_q.frozen_types())
        t = b_q.frozen_types()[0]
        if t.frac > cap and t.width - (t.frac - cap) >= 1:
            narrow = FixedType(t.width - (t.frac - cap), t.integer, t.signed, t.q, t.o, min(t.n, t.width - (t.frac - cap)))
            replacement = quantizer_for(narrow).to(b_q.frac.dtype)
            replacement.frac.requires_grad_(b_q.frac.requires_grad)
            setattr(gm, bias_node.target, replacement)


def quantize_graph(gm: fx.GraphModule, calib_batches: Iterable[torch.Tensor], policy: Policy | None = None,
                   method: str = "max", per_channel_weights: bool = False,
                   recalibrate_imported: bool = False) -> FixedPointModel:
    """PTQ of an imported float graph (modified in place): observe, calibrate, insert casts.
    Types an imported quantized model fixes are kept unless ``recalibrate_imported``."""
    if method not in ("max", "percentile", "mse"):
        raise QfxError(f"unknown calibration method {method!r}: choose max, percentile or mse")
    policy = policy or Policy()
    sites = find_cast_sites(gm)
    observers = observe(gm, sites, calib_batches)
    quantizers = build_quantizers(sites, observers, policy, method, per_channel_weights,
                                  recalibrate_imported=recalibrate_imported)
    model = insert_quantizers(gm, sites, quantizers)
    align_bias_fracs(model)
    from qfx_onnx.quant.nonlinear_specs import NonlinearSettings, attach_nonlinear  # it imports this module
    attach_nonlinear(model, NonlinearSettings(**policy.nonlinear))
    return model


def quantize_with_types(gm: fx.GraphModule, types: dict[str, FixedType | list[FixedType]]) -> FixedPointModel:
    """Insert casts with known types (from an annotated ONNX) on exactly the named tensors."""
    sites = [s for s in find_cast_sites(gm) if s.tensor in types]
    sites += _extra_sites(gm, types, {s.tensor for s in sites})
    quantizers = {}
    for site in sites:
        t = types[site.tensor]
        quantizers[site.tensor] = quantizer_for(t, site.channel_axis)
    return insert_quantizers(gm, sites, quantizers)


def quantizer_for(t: FixedType | list[FixedType], channel_axis: int | None = None) -> FixedQuantizer:
    """A FixedQuantizer holding exactly type ``t`` (or per-channel types along ``channel_axis``)."""
    if isinstance(t, list):
        first = t[0]
        if any((u.width, u.signed, u.q, u.o, u.n) != (first.width, first.signed, first.q, first.o, first.n) for u in t):
            raise QfxError(f"per-channel types must share width, sign and modes: {t[0]} vs others")
        fracs = torch.tensor([float(u.frac) for u in t], dtype=torch.float64)
        return FixedQuantizer(width=first.width, signed=first.signed, q=first.q, o=first.o, n=first.n,
                              frac=fracs, per_channel_axis=channel_axis, num_channels=len(t))
    return FixedQuantizer(width=t.width, signed=t.signed, q=t.q, o=t.o, n=t.n, frac=float(t.frac))


def _extra_sites(gm: fx.GraphModule, types: dict, found: set[str]) -> list[CastSite]:
    """Sites named in ``types`` that the default plan skips (e.g. a cast after a reshape)."""
    extra = []
    for node in gm.graph.nodes:
        name = node.meta.get("onnx_name")
        if name in types and name not in found:
            role = node.meta.get("role", "elementwise")
            role = role if role in ("input", "weight", "bias", "constant") else "elementwise"
            axis = _weight_channel_axis(node) if role == "weight" else None
            extra.append(CastSite(node, name, node.meta.get("onnx_node", name), node.meta.get("onnx_op", ""), role, axis))
    missing = set(types) - found - {s.tensor for s in extra}
    if missing:
        raise QfxError(f"annotated tensors not found in the graph: {', '.join(sorted(missing)[:5])}")
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return sorted(extra, key=lambda s: order[s.node])


def output_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    args = out.args[0]
    return list(args) if isinstance(args, (tuple, list)) else [args]


__all__ = [
    "CastSite", "FixedPointModel", "Observer", "build_quantizers", "find_cast_sites", "insert_quantizers",
    "observe", "output_nodes", "quantize_graph", "quantize_with_types",
]
