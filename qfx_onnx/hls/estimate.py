"""A first-order resource and latency model of a generated project (no synthesis involved).

The model follows the pragmas the generator writes. Each layer's outer loop (dense: rows; matmul_act:
rows of every batch; conv and pool: output pixels; reduce, remap, map: output elements) is pipelined with ``II = R`` (the reuse
factor), and everything inside one iteration is unrolled (pooling: output pixels, channels
unrolled, as conv), so:

* **multipliers** per layer = ``ceil(products per iteration / R)`` for each operand-width pair;
* **DSP48E2** per multiplier: the DSP multiplies 27 x 18 bits signed, so a product of signed
  widths ``a`` x ``b`` (unsigned operands count one more bit) is tiled:
  ``tiles(a, 27) * tiles(b, 18)`` (operands swapped if that is cheaper), with
  ``tiles(w, p) = 1`` for ``w <= p`` else ``1 + ceil((w - p) / (p - 1))`` (each further tile adds
  ``p - 1`` unsigned bits). A product with an operand of at most 4 bits goes to LUTs instead
  (about ``a * b`` LUTs), and so does a product by a **K-hot** constant: its shift-adds cost one
  adder of the accumulator width per nonzero digit (about that many LUTs) and **0 DSPs**; a
  product of two activations (``matmul_act``: attention scores and context) has two variable
  operands, so it is always a multiplier (never K-hot);
* **weight memory**: bits = elements x width for every constant array a layer reads (K-hot
  weights live in the logic and count 0). An array is split into ``ceil(n / R)`` banks of depth
  ``R`` (cyclic partitioning); a bank of more than 1,024 bits goes to BRAM18K, counted with the
  best aspect ratio (16K x 1 ... 512 x 36); smaller banks are LUTRAM or registers; a nonlinear
  kernel's lookup tables (``layer.params.tables``: softmax's exponent and reciprocal), a
  one-input op's compact table (a ``table`` step, ``LookupTable.bits`` = entries x width) and its
  all-codes table (a ``lut`` step) are read at a data-dependent index, so each counts as one ROM
  (BRAM18K above 1,024 bits), not as banks of depth ``R``;
* **latency** of a layer = ``iterations * R + depth`` cycles, depth = ``ceil(log2(terms)) + 2``
  for sums of products and 2 otherwise. ``--io parallel`` runs the layers one after another
  (latency = the sum, interval = the latency); ``--io stream`` overlaps them under DATAFLOW
  (latency = the sum, interval = the slowest layer).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from qfx_onnx.fixed.types import FixedType
from qfx_onnx.hls.kinds import LAYER_KINDS
from qfx_onnx.hls.model import Constant, HlsModel, Layer

DSP_PORTS = (27, 18)
LUT_MULT_MAX_BITS = 4
BRAM_BITS_THRESHOLD = 1024
BRAM18_SHAPES = ((16384, 1), (8192, 2), (4096, 4), (2048, 9), (1024, 18), (512, 36))


def _tiles(width: int, port: int) -> int:
    return 1 if width <= port else 1 + math.ceil((width - port) / (port - 1))


def dsp_per_product(a: FixedType, b: FixedType) -> int:
    """DSP48E2 slices for one ``a x b`` multiplier; 0 when it maps to LUTs."""
    if min(a.width, b.width) <= LUT_MULT_MAX_BITS:
        return 0
    wa, wb = a.width + (not a.signed), b.width + (not b.signed)
    return min(_tiles(wa, DSP_PORTS[0]) * _tiles(wb, DSP_PORTS[1]), _tiles(wa, DSP_PORTS[1]) * _tiles(wb, DSP_PORTS[0]))


def bram18(depth: int, width: int) -> int:
    """BRAM18K blocks for one memory of ``depth`` x ``width`` bits (best aspect ratio)."""
    return min(math.ceil(depth / d) * math.ceil(width / w) for d, w in BRAM18_SHAPES)


@dataclass
class LayerEstimate:
    layer: str
    kind: str
    op: str
    onnx_node: str  # the ONNX node behind the layer's head (raw text, JSON-escaped in report.json)
    # "a x b" (operand widths, or "a x K-hot") -> products per inference, multipliers, DSPs, LUTs
    multiplies: dict = field(default_factory=dict)
    multipliers: int = 0
    dsp: int = 0
    lut: int = 0
    shift_add_terms: int = 0
    weight_bits: int = 0
    bram18: int = 0
    iterations: int = 0
    latency: int = 0


def _constants(layer: Layer) -> list[Constant]:
    out = [c for c in (layer.weight, layer.bias) if c is not None]
    out += [x for x in layer.inputs if isinstance(x, Constant)]
    steps = list(layer.steps) + ([layer.head] if layer.head is not None else [])
    for s in steps:
        out += [o.const for o in s.operands if o.const is not None]
        if s.table is not None:
            out.append(s.table)
    seen, unique = set(), []
    for c in out:
        if c.ident not in seen:
            seen.add(c.ident)
            unique.append(c)
    return unique


def estimate_layer(layer: Layer, reuse: int) -> LayerEstimate:
    est = LayerEstimate(layer.ident, layer.kind, layer.op, layer.source)
    iters = LAYER_KINDS[layer.kind].iterations(layer)
    est.iterations = iters
    depth = 2
    for prod in layer.products:
        per_iter = max(1, math.ceil(prod.count / max(1, iters)))
        instances = math.ceil(per_iter / reuse)
        if prod.khot_terms:
            key, dsp, lut = f"{prod.a.width} x K-hot", 0, math.ceil(prod.khot_terms / max(1, iters) / reuse) * prod.acc_width
            est.shift_add_terms += prod.khot_terms
            instances = 0
        else:
            key, dsp = f"{prod.a.width} x {prod.b.width}", dsp_per_product(prod.a, prod.b) * instances
            lut = 0 if dsp else instances * prod.a.width * prod.b.width
        entry = est.multiplies.setdefault(key, dict(count=0, multipliers=0, dsp=0, lut=0))
        for k, v in (("count", prod.count), ("multipliers", instances), ("dsp", dsp), ("lut", lut)):
            entry[k] += v
        est.multipliers += instances
        est.dsp += dsp
        est.lut += lut
        if layer.kind in ("dense", "conv", "matmul_act") and prod is layer.products[0]:
            terms = prod.count // max(1, layer.output.size)
            depth = max(depth, math.ceil(math.log2(max(terms, 1))) + 2)
    luts = {s.table.ident for s in layer.steps if s.kind == "lut"}
    for c in _constants(layer):
        if c.khot:
            continue
        bits = c.size * c.ctype.type.width
        est.weight_bits += bits
        if c.ident in luts:  # read at a data-dependent index: one ROM, never partitioned by R
            est.bram18 += bram18(c.size, c.ctype.type.width) if bits > BRAM_BITS_THRESHOLD else 0
            continue
        banks = max(1, math.ceil(c.size / reuse))
        bank_depth = math.ceil(c.size / banks)
        if bank_depth * c.ctype.type.width > BRAM_BITS_THRESHOLD:
            est.bram18 += banks * bram18(bank_depth, c.ctype.type.width)
    tables = list(getattr(layer.params, "tables", ())) + [s.lookup for s in layer.steps if s.kind == "table"]
    for table in tables:  # a nonlinear kernel's or op's LookupTables, one ROM each
        est.weight_bits += table.bits
        if table.bits > BRAM_BITS_THRESHOLD:
            est.bram18 += bram18(table.size, table.out_type.width)
    est.latency = iters * reuse + depth
    return est


def estimate(model: HlsModel, *, reuse_factor: int, io: str, part: str, clock_ns: float) -> dict:
    """The report: per-layer estimates and totals (``report.json``'s content)."""
    layers = [estimate_layer(layer, reuse_factor) for layer in model.layers]
    latency = sum(e.latency for e in layers)
    interval = max((e.latency for e in layers), default=0) if io == "stream" else latency
    totals = dict(dsp=sum(e.dsp for e in layers), lut=sum(e.lut for e in layers),
                  multipliers=sum(e.multipliers for e in layers),
                  shift_add_terms=sum(e.shift_add_terms for e in layers),
                  weight_bits=sum(e.weight_bits for e in layers), bram18=sum(e.bram18 for e in layers),
                  latency_cycles=latency, interval_cycles=interval,
                  latency_ns=round(latency * clock_ns, 3))
    return dict(top=model.top, part=part, clock_ns=clock_ns, io=io, reuse_factor=reuse_factor,
                model=__doc__.strip().splitlines()[0], layers=[asdict(e) for e in layers], totals=totals)
