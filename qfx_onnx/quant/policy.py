"""Precision policy: which width and modes each quantized tensor gets.

Defaults come from flags (``--weight-bits`` ...); a TOML or JSON config adds per-layer overrides in
the spirit of hls4ml's per-layer precision config::

    [defaults]
    weight_bits = 6
    rounding = "AP_RND_CONV"

    [[override]]
    node = "conv1*"         # glob on the ONNX node name   } at least one of
    op = "Conv"             # ONNX op type                   } node / op / tensor;
    tensor = "*.weight"     # glob on the ONNX tensor name   } all given must match
    role = "weight"         # optional: input, weight, bias, constant, act, elementwise
    bits = 4                # and any of: bits, type, rounding, overflow, sat_bits, unsigned

``type = "ap_fixed<6,2,AP_RND,AP_SAT>"`` fixes a tensor's type completely (no calibration).
An override that matches no tensor is an error, never a silent no-op.
"""

from __future__ import annotations

import fnmatch
import json
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from qfx_onnx.errors import ConfigError, QfxError
from qfx_onnx.fixed.types import FixedType, OverflowMode, QuantMode

ROLES = ("input", "weight", "bias", "constant", "act", "elementwise")


@dataclass(frozen=True)
class TensorSpec:
    """What the policy decides for one tensor; the binary point is calibrated unless ``fixed``."""

    bits: int
    q: QuantMode
    o: OverflowMode
    n: int = 0
    signed: bool | None = None  # None: unsigned when calibration sees no negative value
    fixed: FixedType | None = None


@dataclass(frozen=True)
class Override:
    node: str | None = None
    op: str | None = None
    tensor: str | None = None
    role: str | None = None
    bits: int | None = None
    type: FixedType | None = None
    rounding: QuantMode | None = None
    overflow: OverflowMode | None = None
    sat_bits: int | None = None
    unsigned: bool | None = None
    where: str = ""  # where it was written, for messages

    def matches(self, node: str, op: str, tensor: str, role: str) -> bool:
        node, op, tensor = node or "", op or "", tensor or ""
        return ((self.node is None or fnmatch.fnmatchcase(node, self.node))
                and (self.op is None or self.op == op)
                and (self.tensor is None or fnmatch.fnmatchcase(tensor, self.tensor))
                and (self.role is None or self.role == role))


@dataclass
class Policy:
    """Precision policy for the common case plus ordered per-layer overrides (later ones win)."""

    weight_bits: int = 8
    bias_bits: int = 16
    act_bits: int = 8
    elementwise_bits: int = 8
    input_bits: int | None = None  # defaults to act_bits
    rounding: QuantMode = QuantMode.RND
    overflow: OverflowMode = OverflowMode.SAT
    sat_bits: int = 0
    weight_overflow: OverflowMode | None = None  # None: same as overflow
    overrides: list[Override] = field(default_factory=list)
    _used: set[int] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        self.rounding = QuantMode(self.rounding)
        self.overflow = OverflowMode(self.overflow)
        for name in ("weight_bits", "bias_bits", "act_bits", "elementwise_bits"):
            bits = getattr(self, name)
            if not 1 <= bits <= 24:
                raise ConfigError(f"{name}={bits}: widths from 1 to 24 bits are supported (float32 exactness)")

    def spec(self, *, node: str, op: str, tensor: str, role: str) -> TensorSpec:
        """The spec for one tensor. Records which overrides matched (see :meth:`check_all_used`)."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}")
        bits = {"input": self.input_bits or self.act_bits, "weight": self.weight_bits, "bias": self.bias_bits,
                "constant": self.elementwise_bits, "act": self.act_bits, "elementwise": self.elementwise_bits}[role]
        o = self.weight_overflow if (role == "weight" and self.weight_overflow) else self.overflow
        spec = TensorSpec(bits=bits, q=self.rounding, o=o, n=self.sat_bits,
                          signed=True if role in ("weight", "bias") else None)
        for index, ov in enumerate(self.overrides):
            if not ov.matches(node, op, tensor, role):
                continue
            self._used.add(index)
            spec = replace(
                spec,
                bits=ov.bits if ov.bits is not None else spec.bits,
                q=ov.rounding or spec.q,
                o=ov.overflow or spec.o,
                n=ov.sat_bits if ov.sat_bits is not None else spec.n,
                signed=(not ov.unsigned) if ov.unsigned is not None else spec.signed,
                fixed=ov.type or spec.fixed,
            )
        if spec.fixed is not None:
            return spec
        if spec.n > spec.bits:
            raise ConfigError(f"tensor {tensor!r}: saturation bits N={spec.n} exceed the width {spec.bits}")
        return spec

    def check_all_used(self) -> None:
        """Raise ConfigError naming every override that matched no tensor."""
        unused = [ov.where for i, ov in enumerate(self.overrides) if i not in self._used]
        if unused:
            raise ConfigError("override matches no tensor: " + "; ".join(unused))


_DEFAULT_KEYS = {f.name for f in fields(Policy)} - {"overrides", "_used"}
_OVERRIDE_KEYS = {f.name for f in fields(Override)} - {"where"}


def load_policy(path: str | Path | None = None, **flags) -> Policy:
    """A Policy from flags (``None`` values ignored) and an optional TOML/JSON config file.

    Precedence: built-in defaults < config ``[defaults]`` < flags given on the command line;
    config overrides then apply per tensor. Any unknown key or bad value is a ConfigError naming
    the file and the entry.
    """
    defaults: dict = {}
    overrides: list[Override] = []
    if path is not None:
        raw = _read_config(Path(path))
        unknown = set(raw) - {"defaults", "override"}
        if unknown:
            raise ConfigError(f"{path}: unknown section(s) {sorted(unknown)}; expected [defaults] and [[override]]")
        defaults = dict(raw.get("defaults", {}))
        bad = set(defaults) - _DEFAULT_KEYS
        if bad:
            raise ConfigError(f"{path}: unknown key(s) in [defaults]: {sorted(bad)}")
        entries = raw.get("override", [])
        if not isinstance(entries, list):
            raise ConfigError(f"{path}: 'override' must be a list of tables ([[override]])")
        overrides = [_parse_override(entry, f"{path} override #{i + 1}") for i, entry in enumerate(entries)]
    defaults.update({k: v for k, v in flags.items() if v is not None})
    try:
        return Policy(**defaults, overrides=overrides)
    except QfxError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path or 'flags'}: {exc}") from None


def _read_config(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        elif path.suffix.lower() == ".toml":
            data = tomllib.loads(text)
        else:
            raise ConfigError(f"{path}: config must be .toml or .json")
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: invalid {path.suffix[1:].upper()}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a table/object")
    return data


def _parse_override(entry: object, where: str) -> Override:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: must be a table/object")
    bad = set(entry) - _OVERRIDE_KEYS
    if bad:
        raise ConfigError(f"{where}: unknown key(s) {sorted(bad)}")
    if not any(entry.get(k) for k in ("node", "op", "tensor")):
        raise ConfigError(f"{where}: give at least one of node, op, tensor to match")
    if entry.get("role") is not None and entry["role"] not in ROLES:
        raise ConfigError(f"{where}: role {entry['role']!r} is not one of {', '.join(ROLES)}")
    try:
        values = dict(entry)
        if values.get("type") is not None:
            values["type"] = FixedType.parse(values["type"])
        if values.get("rounding") is not None:
            values["rounding"] = QuantMode(_mode_name(values["rounding"]))
        if values.get("overflow") is not None:
            values["overflow"] = OverflowMode(_mode_name(values["overflow"]))
        if values.get("bits") is not None and not (isinstance(values["bits"], int) and 1 <= values["bits"] <= 24):
            raise ConfigError(f"{where}: bits must be an integer from 1 to 24")
    except QfxError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return Override(**values, where=where)


def _mode_name(text: str) -> str:
    text = str(text).upper()
    return text if text.startswith("AP_") else "AP_" + text


def parse_mode(enum, text: str | None):
    """``AP_RND`` / ``rnd`` -> the enum member, or None; ConfigError for an unknown name."""
    if text is None:
        return None
    try:
        return enum(_mode_name(text))
    except ValueError:
        raise ConfigError(f"unknown {enum.__name__} {text!r}: choose from {', '.join(m.value for m in enum)}") from None
