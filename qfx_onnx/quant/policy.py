"""Precision policy: which width and modes each quantized tensor gets.

Defaults come from flags (``--weight-bits`` ...); a TOML or JSON config adds per-layer overrides in
the spirit of hls4ml's per-layer precision config::

    [defaults]
    weight_bits = 6
    rounding = "AP_RND_CONV"

    [nonlinear]             # exact fixed-point nonlinear ops (see qfx_onnx.nonlinear.wiring)
    table_bits = 10         # index bits of one-input tables (sigmoid, tanh, exp, erf, gelu, sqrt, reciprocal)
    guard_bits = 8          # result bits beyond the following cast's LSB
    exp_bits = 10           # softmax's exponent table; reciprocal_bits its reciprocal (and div's)
    rsqrt_bits = 10         # layer_norm's 1/sqrt table; exact = false: float evaluation then the cast

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
    nonlinear: dict = field(default_factory=dict)  # the [nonlinear] section (NONLINEAR_SCHEMA)
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


MAX_BITS = 24  # float32's significand: the annotated ONNX runs exactly in onnxruntime up to here


# The config schema: every key, what it accepts, and how its text becomes a value. Each check
# returns the value or raises ValueError with what was expected; the caller names file, section
# and key.
def _integer(low: int, high: int):
    def check(value):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"expected an integer from {low} to {high}")
        return value
    return check


def _text(value):
    if not isinstance(value, str) or not value:
        raise ValueError("expected a non-empty string")
    return value


def _boolean(value):
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


def _one_of(choices):
    def check(value):
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(map(str, choices))}")
        return value
    return check


def _mode(enum):
    def check(value):
        if isinstance(value, enum):
            return value
        try:
            return enum(_mode_name(value)) if isinstance(value, str) else enum(value)
        except ValueError:
            raise ValueError(f"expected one of {', '.join(m.value for m in enum)}") from None
    return check


def _fixed_type(value):
    if not isinstance(value, str):
        raise ValueError('expected an HLS type string such as "ap_fixed<8,3,AP_RND,AP_SAT>"')
    try:
        t = FixedType.parse(value)
    except QfxError as exc:
        raise ValueError(str(exc)) from None
    if t.width > MAX_BITS:
        raise ValueError(f"W={t.width} is wider than float32's {MAX_BITS}-bit significand; widths from 1 to {MAX_BITS} are supported")
    return t


_BITS = _integer(1, MAX_BITS)
DEFAULTS_SCHEMA = {
    "weight_bits": _BITS, "bias_bits": _BITS, "act_bits": _BITS, "elementwise_bits": _BITS, "input_bits": _BITS,
    "rounding": _mode(QuantMode), "overflow": _mode(OverflowMode), "weight_overflow": _mode(OverflowMode),
    "sat_bits": _integer(0, MAX_BITS),
}
_TABLE_BITS = _integer(1, 16)
NONLINEAR_SCHEMA = {
    "exact": _boolean, "table_bits": _TABLE_BITS, "guard_bits": _integer(0, 16), "exp_bits": _TABLE_BITS,
    "reciprocal_bits": _TABLE_BITS, "rsqrt_bits": _TABLE_BITS,
}
OVERRIDE_SCHEMA = {
    "node": _text, "op": _text, "tensor": _text, "role": _one_of(ROLES), "bits": _BITS, "type": _fixed_type,
    "rounding": _mode(QuantMode), "overflow": _mode(OverflowMode), "sat_bits": _integer(0, MAX_BITS), "unsigned": _boolean,
}


def _validated(table: object, schema: dict, where: str) -> dict:
    """``table`` checked against ``schema``: a ConfigError names ``where``, the key, the value
    given and what is allowed."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table/object")
    unknown = sorted(set(table) - set(schema))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(schema)}")
    values = {}
    for key, value in table.items():
        try:
            values[key] = schema[key](value)
        except ValueError as exc:
            raise ConfigError(f"{where}: {key} = {value!r}: {exc}") from None
    return values


def load_policy(path: str | Path | None = None, **flags) -> Policy:
    """A Policy from flags (``None`` values ignored) and an optional TOML/JSON config file.

    Precedence: built-in defaults < config ``[defaults]`` < flags given on the command line;
    config overrides then apply per tensor. The config is checked against ``DEFAULTS_SCHEMA`` and
    ``OVERRIDE_SCHEMA``: any unknown section or key, or a value of the wrong type or range, is a
    ConfigError naming the file, the section, the key and what is allowed.
    """
    defaults: dict = {}
    nonlinear: dict = {}
    overrides: list[Override] = []
    if path is not None:
        raw = _read_config(Path(path))
        unknown = sorted(set(raw) - {"defaults", "override", "nonlinear"})
        if unknown:
            raise ConfigError(f"{path}: unknown section(s) {', '.join(map(repr, unknown))}; "
                              "expected defaults, nonlinear and override")
        nonlinear = _validated(raw.get("nonlinear", {}), NONLINEAR_SCHEMA, f"{path} section 'nonlinear'")
        defaults = _validated(raw.get("defaults", {}), DEFAULTS_SCHEMA, f"{path} section 'defaults'")
        entries = raw.get("override", [])
        if not isinstance(entries, list):
            raise ConfigError(f"{path}: 'override' must be a list of tables ([[override]])")
        overrides = [_parse_override(entry, f"{path} override #{i + 1}") for i, entry in enumerate(entries)]
    for key, value in flags.items():
        if value is None:
            continue
        if key not in DEFAULTS_SCHEMA:
            raise ConfigError(f"unknown precision option {key!r}; allowed: {', '.join(DEFAULTS_SCHEMA)}")
        try:
            defaults[key] = DEFAULTS_SCHEMA[key](value)
        except ValueError as exc:
            raise ConfigError(f"--{key.replace('_', '-')} {value}: {exc}") from None
    try:
        return Policy(**defaults, overrides=overrides, nonlinear=nonlinear)
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
    values = _validated(entry, OVERRIDE_SCHEMA, where)
    if not any(values.get(k) for k in ("node", "op", "tensor")):
        raise ConfigError(f"{where}: give at least one of node, op, tensor to match")
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
