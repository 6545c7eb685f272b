"""What an HLS project is made of, independent of how it is rendered: typed buffers, exact
constants, and layers (a head that computes a lossless value plus a chain of element-wise steps).

Every fixed-point value the C++ touches has a :class:`FixedType` here; every name here is already a
sanitized C++ identifier (see :mod:`qfx_onnx.hls.names`); the raw ONNX names survive only in the
``source`` fields, which go to ``report.json`` and never into C++.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from qfx_onnx.fixed.types import FixedType


@dataclass
class CType:
    """A typedef in ``defines.h``: ``typedef <str(type)> <ident>;``."""

    ident: str
    type: FixedType
    role: str  # tensor, accumulator, intermediate, weight, constant, table
    source: str = ""


@dataclass
class Constant:
    """A weight/constant array with exact integer codes (value = code * 2**-type.frac)."""

    ident: str
    ctype: CType
    codes: np.ndarray  # int64, flat, row-major in ``shape``
    shape: tuple[int, ...]
    source: str = ""
    khot: int | None = None  # set when the tensor is emitted as shift-adds (max digits per code)

    @property
    def size(self) -> int:
        return int(self.codes.size)


@dataclass
class Buffer:
    """A data array between layers (flat, row-major, batch 1)."""

    ident: str
    ctype: CType
    shape: tuple[int, ...]
    source: str = ""

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


@dataclass
class Operand:
    """One input of an element-wise computation: the running value, a data buffer, or a constant,
    read at ``index`` (a C++ expression of the flat output index ``i``)."""

    kind: Literal["value", "data", "const"]
    index: str = "i"
    data: int = 0  # which data input of the layer
    const: Constant | None = None


@dataclass
class Step:
    """One element-wise step: an IR arith op on operands, a quantizer cast, a lookup table over every
    input code (``lut``) or a nonlinear op's own compact table (``table``: index cast, lookup, cast)."""

    kind: Literal["op", "cast", "lut", "table"]
    out: CType
    op: str = ""
    operands: list[Operand] = field(default_factory=list)
    table: Constant | None = None  # lut: output codes indexed by the input's raw bits
    lookup: Any = None  # table: the op's LookupTable (qfx_onnx.fixed.tables), C++ struct ``ident``
    ident: str = ""  # table: the name of its struct (qfx_onnx.nonlinear.cpp_emit.table_struct)
    source: str = ""
    temps: dict[str, CType] = field(default_factory=dict)  # op: its temporaries' types (IrOp.hls.temps)


@dataclass
class Products:
    """Multiplications a layer performs per inference, for the resource estimate."""

    count: int  # products per inference
    per_iter: int  # products per pipelined iteration of the layer's outer loop
    iterations: int  # outer iterations per inference
    a: FixedType | None  # data operand
    b: FixedType | None  # constant or second data operand
    khot_terms: int = 0  # > 0: constant K-hot weights, shift-add terms per inference
    acc_width: int = 0


@dataclass
class Layer:
    """A head (``kind``) that produces a lossless value per output element, then ``steps``.

    ``kind`` names a registered :class:`~qfx_onnx.hls.kinds.LayerKind` (built in: ``dense``,
    ``matmul_act`` (batched product of two arrays, not both constant),
    ``conv`` (2-D; 1-D as H = 1), ``pool`` (max or sum windows), ``reduce`` (sum or max over
    axes), ``remap`` (index table: transpose, slice, pad, resize, gather), ``concat`` (one scatter
    per input), ``map`` (element-wise head on 1-3 data inputs), ``fanout``); ``params`` is that
    kind's typed parameter object (``DenseParams`` ...).
    """

    ident: str
    kind: str
    inputs: list[Buffer | Constant]
    output: Buffer
    head_type: CType
    steps: list[Step] = field(default_factory=list)
    params: Any = None
    weight: Constant | None = None
    bias: Constant | None = None
    head: Step | None = None  # map: the op on the data inputs (None: read input 0)
    products: list[Products] = field(default_factory=list)
    source: str = ""
    op: str = ""  # IR op of the head node


@dataclass
class HlsModel:
    """The whole project content. ``inputs``/``outputs`` are the top function's ports."""

    top: str
    ctypes: list[CType]
    constants: list[Constant]
    buffers: list[Buffer]
    layers: list[Layer]
    inputs: list[Buffer]
    outputs: list[Buffer]
    input_nodes: list = field(default_factory=list)  # the fx cast node behind each input port
    aux_names: dict[str, str] = field(default_factory=dict)  # "<port>:buf"/":stream" -> unique identifiers
