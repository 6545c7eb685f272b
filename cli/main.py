"""The ``qfx-onnx`` command: a thin typer front end over the ``qfx_onnx`` library.

Every command body runs inside :func:`run_command`, the one place that turns a ``QfxError`` into a
one-line message and a non-zero exit code.
"""

from __future__ import annotations

import logging
import sys
from typing import Callable, TypeVar

import typer
from rich.console import Console

import qfx_onnx
from qfx_onnx.errors import QfxError

app = typer.Typer(
    name="qfx-onnx",
    help="Float ONNX to FPGA-ready ap_fixed models: quantize, finetune, export to Vitis HLS.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

T = TypeVar("T")


def run_command(body: Callable[[], T]) -> T:
    """Run a command body; a QfxError becomes ``error: <message>`` on stderr and its exit code."""
    try:
        return body()
    except QfxError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err_console.print("interrupted")
        raise typer.Exit(130) from None


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
