"""The ``qfx-onnx`` command: a thin typer front end over the ``qfx_onnx`` library.

Every command body runs inside :func:`run_command`, the one place that turns a ``QfxError`` into a
one-line message and a non-zero exit code. Every command is a :class:`QfxCommand`, so its help
reads the same: usage ``qfx-onnx quantize [OPTIONS] MODEL``, flags without a ``<bool>`` value. The
options commands share are declared once in :mod:`qfx_onnx_cli.options`; what a command prints
goes through :class:`qfx_onnx_cli.output.Output` (``--json``, ``--quiet``, wide tables in logs).
"""

from __future__ import annotations

import os

import inspect
import logging
import sys
from typing import Callable, TypeVar

import typer
from rich.text import Text
from typer.core import TyperCommand, TyperGroup

import qfx_onnx
from qfx_onnx.errors import QfxError
from qfx_onnx_cli.output import console, err_console  # noqa: F401  (the commands print through these)


def _plain_flags(params: list) -> list:
    # typer shows a flag's type as "<bool>" unless it has a metavar; a flag takes no value
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


def _unwrap(help: str | None) -> str | None:
    # rich help keeps a docstring's line breaks; a paragraph should flow to the terminal's width
    if help is None:
        return None
    return "\n\n".join(" ".join(paragraph.split()) for paragraph in inspect.cleandoc(help).split("\n\n"))


class QfxCommand(TyperCommand):
    """A command whose help shows ``MODEL`` (not ``{model}``) in its usage, no value for a flag, and
    its docstring's paragraphs flowed to the terminal's width."""

    def __init__(self, *args, help: str | None = None, **kwargs) -> None:
        super().__init__(*args, help=_unwrap(help), **kwargs)

    def get_params(self, ctx):
        return _plain_flags(super().get_params(ctx))

    def collect_usage_pieces(self, ctx) -> list[str]:
        return [piece.strip("{}") for piece in super().collect_usage_pieces(ctx)]


class QfxGroup(TyperGroup):
    def get_params(self, ctx):
        return _plain_flags(super().get_params(ctx))


app = typer.Typer(
    name="qfx-onnx",
    cls=QfxGroup,
    help="Float ONNX to FPGA-ready ap_fixed models: quantize, finetune, export to Vitis HLS.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

T = TypeVar("T")


def run_command(body: Callable[[], T]) -> T:
    """Run a command body; a QfxError becomes ``error: <message>`` on stderr and its exit code."""
    try:
        return body()
    except QfxError as exc:
        err_console.print(Text.assemble(("error:", "bold red"), f" {exc}"))
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err_console.print("interrupted")
        raise typer.Exit(130) from None
    except Exception as exc:  # a bug, not the user's input: still one line, and how to see more
        if os.environ.get("QFX_DEBUG"):
            raise
        text = " ".join(str(exc).split())[:300]
        err_console.print(Text.assemble(("internal error:", "bold red"),
                                        f" {type(exc).__name__}: {text} (a bug in qfx-onnx: please report it; "
                                        "QFX_DEBUG=1 shows the traceback)"))
        raise typer.Exit(3) from None


def _version(value: bool) -> None:
    if value:
        console.print(f"qfx-onnx {qfx_onnx.__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log diagnostics to stderr."),
) -> None:
    """qfx-onnx: every tensor an ap_fixed value, bit-exact from PyTorch to onnxruntime to HLS C++."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")


def _register_commands() -> None:
    # Each command lives in its own module and registers itself on `app` when imported.
    from qfx_onnx_cli import commands  # noqa: F401


_register_commands()
