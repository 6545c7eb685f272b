"""Typed exceptions. Each carries a one-line, user-facing message; the CLI prints it and exits."""


class QfxError(Exception):
    """Base class for every error qfx-onnx reports to a user. ``exit_code`` is the CLI exit status."""

    exit_code = 1


class FixedTypeError(QfxError, ValueError):
    """An invalid fixed-point type: bad text, width or mode."""


class OnnxModelError(QfxError):
    """The ONNX file cannot be read, is invalid, or uses something outside what is supported."""


class UnsupportedOpError(OnnxModelError):
    """The model uses ONNX ops (or op versions) that have no converter. Exit code 2."""

    exit_code = 2


class UnsupportedAttributeError(OnnxModelError):
    """A node carries an attribute value its converter does not implement."""


class DataError(QfxError):
    """A dataset file or hook cannot be loaded or does not fit the model."""


class ConfigError(QfxError):
    """A precision config is invalid, or an override matches nothing."""


class OutputError(QfxError):
    """An output file or folder cannot be written (missing folder, no permission, full disk)."""


class ExportError(QfxError):
    """An export target (annotated ONNX, HLS project) cannot represent the model."""
