"""The ``qfx-onnx`` command: a thin typer front end over the ``qfx_onnx`` library.

Every command body runs inside :func:`run_command`, the one place that turns a ``QfxError`` into a
one-line message and a non-zero exit code.

Both consoles print every string literally: rich markup (``[red]``, ``[/]``) and emoji codes
(``:boom:``) are off, because paths, node and tensor names, hook names and config keys reach the
terminal inside f-strings and table cells. Styled text is built explicitly with ``rich.text.Text``.
(``console.status`` parses its text as markup whatever the console says: keep it constant.) A
message is one line however long (soft wrap: the terminal folds it, rich does not break it), so
paths stay whole and logs stay greppable; tables still fit the width.
"""

from __future__ import annotations

import logging
import sys
from typing import Callable, TypeVar

import typer
from rich.console import Console
from rich.text import Text

import qfx_onnx
from qfx_onnx.errors import QfxError

app = typer.Typer(
    name="qfx-onnx",
    help="Float ONNX to FPGA-ready ap_fixed models: quantize, finetune, export to Vitis HLS.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(markup=False, emoji=False, soft_wrap=True)
err_console = Console(stderr=True, markup=False, emoji=False, highlight=False, soft_wrap=True)

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
