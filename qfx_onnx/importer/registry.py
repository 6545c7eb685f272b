"""Converters, one per ONNX op and since-version, and the whole-model support check.

A converter is registered with ``@converter("Squeeze", since=13)``. For a model of opset ``N`` the
converter used is the one with the newest ``since`` at or below ``N``; later ONNX versions that only
widen types reuse it, and any attribute or input a newer version adds is caught by
:meth:`NodeContext.check_done`. An op that ONNX marks deprecated at ``N`` (Upsample from opset 10)
is unsupported there whatever converters exist.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import onnx
from onnx import defs

from qfx_onnx.errors import UnsupportedOpError
from qfx_onnx.importer.context import NodeContext

Converter = Callable[[NodeContext], None]

MIN_OPSET = 7
MAX_OPSET = defs.onnx_opset_version()
DEFAULT_DOMAINS = ("", "ai.onnx")

_CONVERTERS: dict[str, dict[int, Converter]] = {}


def converter(op_type: str, since: int) -> Callable[[Converter], Converter]:
    """Register ``fn`` as the converter of ``op_type`` from ONNX version ``since`` on."""

    def register(fn: Converter) -> Converter:
        versions = _CONVERTERS.setdefault(op_type, {})
        if since in versions:
            raise ValueError(f"converter {op_type}-{since} registered twice")
        versions[since] = fn
        return fn

    return register


def find_converter(op_type: str, opset: int, domain: str = "") -> Converter | None:
    """The converter for ``op_type`` in a model of ``opset``, or None when there is none."""
    if domain not in DEFAULT_DOMAINS:
        return None
    try:
        schema = defs.get_schema(op_type, opset)
    except defs.SchemaError:
        return None
    if schema.deprecated:
        return None
    versions = [v for v in _CONVERTERS.get(op_type, {}) if v <= opset]
    return _CONVERTERS[op_type][max(versions)] if versions else None


def supported_ops() -> dict[str, list[int]]:
    """Every op type with a converter, and the since-versions registered for it."""
    return {op: sorted(versions) for op, versions in sorted(_CONVERTERS.items())}


@dataclass(frozen=True)
class Unsupported:
    """One unsupported op (type and domain) and the nodes using it."""

    domain: str
    op_type: str
    nodes: tuple[str, ...]

    def describe(self) -> str:
        """``Op (nodes a, b)`` for the error message."""
        op = self.op_type if self.domain in DEFAULT_DOMAINS else f"{self.domain}:{self.op_type}"
        shown = ", ".join(self.nodes[:5]) + (f" and {len(self.nodes) - 5} more" if len(self.nodes) > 5 else "")
        return f"{op} (node{'s' if len(self.nodes) > 1 else ''} {shown})"


def find_unsupported(nodes: Iterable[tuple[str, onnx.NodeProto]], opset: int) -> list[Unsupported]:
    """The ops among ``(name, node)`` pairs with no converter at ``opset``, grouped by op type."""
    grouped: dict[tuple[str, str], list[str]] = {}
    for name, node in nodes:
        if find_converter(node.op_type, opset, node.domain) is None:
            grouped.setdefault((node.domain, node.op_type), []).append(name)
    return [Unsupported(domain, op, tuple(names)) for (domain, op), names in grouped.items()]


def unsupported_error(unsupported: list[Unsupported], opset: int, source: str) -> UnsupportedOpError:
    """One UnsupportedOpError listing every unsupported op of the model."""
    listed = "; ".join(u.describe() for u in unsupported)
    return UnsupportedOpError(f"{source}: unsupported ONNX ops at opset {opset}: {listed}")


def check_opset(opset: int | None, source: str) -> int:
    """The model's default-domain opset, checked to be one the importer knows."""
    if opset is None:
        raise UnsupportedOpError(f"{source}: the model imports no default-domain (ai.onnx) opset")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UnsupportedOpError(f"{source}: opset {opset} is outside the supported range {MIN_OPSET}..{MAX_OPSET}")
    return opset
