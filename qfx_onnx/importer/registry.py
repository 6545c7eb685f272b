"""Converters, one per ONNX op and since-version, and the whole-model support check.

A converter is registered with ``@converter("Squeeze", since=13)``. For a model of opset ``N`` the
converter used is the one with the newest ``since`` at or below ``N``; later ONNX versions that only
widen types reuse it, and any attribute or input a newer version adds is caught by
:meth:`NodeContext.check_done`. An op that ONNX marks deprecated at ``N`` (Upsample from opset 10)
is unsupported there whatever converters exist.

Ops of a custom domain (QONNX's ``Quant``, ``BipolarQuant``, ``Trunc``) register with
``domain=``; the version that selects their converter is the model's import of that domain
(``opset_import``), 1 when the model does not declare it. QONNX's domain is known under its
current name and the two older ones, which name the same ops (``qonnx.custom_op.registry``).
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

QONNX_DOMAIN = "qonnx.custom_op.general"
# older names of the QONNX domain (FINN before the split, Brevitas' own export)
DOMAIN_ALIASES = {"finn.custom_op.general": QONNX_DOMAIN, "onnx.brevitas": QONNX_DOMAIN}

_CONVERTERS: dict[str, dict[int, Converter]] = {}
_CUSTOM_CONVERTERS: dict[tuple[str, str], dict[int, Converter]] = {}


def converter(op_type: str, since: int, domain: str = "") -> Callable[[Converter], Converter]:
    """Register ``fn`` as the converter of ``op_type`` from version ``since`` of ``domain`` on."""

    def register(fn: Converter) -> Converter:
        table = _CONVERTERS.setdefault(op_type, {}) if domain in DEFAULT_DOMAINS else \
            _CUSTOM_CONVERTERS.setdefault((domain, op_type), {})
        if since in table:
            raise ValueError(f"converter {domain or 'ai.onnx'}:{op_type}-{since} registered twice")
        table[since] = fn
        return fn

    return register


def canonical_domain(domain: str) -> str:
    """``domain`` under its current name (an older QONNX domain name becomes ``QONNX_DOMAIN``)."""
    return DOMAIN_ALIASES.get(domain, domain)


def find_converter(op_type: str, opset: int, domain: str = "", domain_opsets: dict[str, int] | None = None) -> Converter | None:
    """The converter for ``op_type`` in a model of ``opset``, or None when there is none.

    A custom-domain op is looked up at the model's version of that domain (``domain_opsets``,
    keyed by the domain as the model spells it; 1 when absent)."""
    if domain not in DEFAULT_DOMAINS:
        table = _CUSTOM_CONVERTERS.get((canonical_domain(domain), op_type), {})
        version = (domain_opsets or {}).get(domain, 1)
        versions = [v for v in table if v <= version]
        return table[max(versions)] if versions else None
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
    out = {op: sorted(versions) for op, versions in sorted(_CONVERTERS.items())}
    out.update({f"{domain}:{op}": sorted(versions) for (domain, op), versions in sorted(_CUSTOM_CONVERTERS.items())})
    return out


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


def find_unsupported(nodes: Iterable[tuple[str, onnx.NodeProto]], opset: int,
                     domain_opsets: dict[str, int] | None = None) -> list[Unsupported]:
    """The ops among ``(name, node)`` pairs with no converter at ``opset``, grouped by op type."""
    grouped: dict[tuple[str, str], list[str]] = {}
    for name, node in nodes:
        if find_converter(node.op_type, opset, node.domain, domain_opsets) is None:
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
