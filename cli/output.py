"""Where a command's output goes: lines and tables for people, one JSON object for programs.

Both consoles print every string literally: rich markup (``[red]``, ``[/]``) and emoji codes
(``:boom:``) are off, because paths, node and tensor names, hook names and config keys reach the
terminal inside f-strings and table cells. Styled text is built explicitly with ``rich.text.Text``.
Progress (:meth:`Output.status`, :meth:`Output.track`, :meth:`Output.counter`) is a transient
live display on a terminal only: a spinner or bar with the elapsed time that leaves nothing behind,
and nothing at all in a pipe, a log, with ``--quiet`` or with ``--json``. A
message is one line however long (soft wrap: the terminal folds it, rich does not break it), so
paths stay whole and logs stay greppable. On a terminal tables fit its width; anywhere else (a
pipe, a file, a CI log) they print at their natural width whatever ``COLUMNS`` says, so a type
string or a header is never broken or cut.
"""

from __future__ import annotations

import json
import math
import sys
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator, Sequence, TypeVar

from rich.console import Console, ConsoleDimensions
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

T = TypeVar("T")
LOG_WIDTH = 10_000  # wider than any table row; only tables use it (messages soft-wrap)


class LogConsole(Console):
    """A rich console that is as wide as its content when it does not write to a terminal.

    (rich itself takes 80 columns, or ``COLUMNS`` read once when the console is made: pytest-xdist
    and some CI runners set it to 80.)
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._fixed_width = kwargs.get("width") is not None

    @property
    def size(self) -> ConsoleDimensions:
        size = Console.size.fget(self)
        if self.is_terminal or self._fixed_width:
            return size
        return ConsoleDimensions(LOG_WIDTH, size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)


console = LogConsole(markup=False, emoji=False, soft_wrap=True)
err_console = LogConsole(stderr=True, markup=False, emoji=False, highlight=False, soft_wrap=True)


def jsonable(value: Any) -> Any:
    """``value`` with every non-finite float as the string ``"inf"``, ``"-inf"`` or ``"nan"`` (as the
    tables print them; JSON has no such numbers) and paths as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "__fspath__"):
        return str(value)
    return value


class Output:
    """What one command run prints.

    Without ``--json``: lines and tables on stdout. With ``--json``: stdout holds only the result,
    one JSON object (:meth:`result`), and the lines for people go to stderr. ``--quiet`` drops
    tables, progress and details (:meth:`line`, :meth:`table`, :meth:`status`) and keeps warnings
    (:meth:`warn`) and the final line (:meth:`final`).
    """

    def __init__(self, *, json_mode: bool = False, quiet: bool = False) -> None:
        self.json_mode, self.quiet = json_mode, quiet
        self.people = err_console if json_mode else console

    def line(self, text: str | Text) -> None:
        """A detail: what a step did."""
        if not self.quiet:
            self.people.print(text, highlight=False)

    def table(self, table) -> None:
        if not self.quiet:
            self.people.print(table)

    def final(self, text: str | Text) -> None:
        """The one line a quiet run still prints: what was written, or the result."""
        self.people.print(text, highlight=False)

    def warn(self, text: str) -> None:
        """Something the user should act on; printed even with --quiet."""
        self.people.print(Text.assemble(("note:", "yellow"), f" {text}"), highlight=False)

    def status(self, text: str):
        """A spinner with the elapsed time while a stage runs (calibration, verify, a compile).

        Shown only where :attr:`progress` allows; a context manager either way."""
        if not self.progress:
            return nullcontext()
        bar = Progress(SpinnerColumn(), TextColumn("{task.description}", markup=False), TimeElapsedColumn(), console=self.people,
                       transient=True)
        bar.add_task(text, total=None)
        return bar

    def track(self, items: Sequence[T], text: str) -> Iterator[T]:
        """``items`` one by one, with a bar counting them (where :attr:`progress` allows)."""
        if not self.progress:
            yield from items
            return
        with Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=self.people, transient=True) as bar:
            task = bar.add_task(text, total=len(items))
            for item in items:
                yield item
                bar.advance(task)

    @contextmanager
    def counter(self, text: str) -> Iterator[Callable[[int, int], None]]:
        """A bar for a stage that reports ``(done, total)`` itself; yields that callback (a no-op
        where :attr:`progress` does not allow a live display)."""
        if not self.progress:
            yield lambda done, total: None
            return
        with Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=self.people, transient=True) as bar:
            task = bar.add_task(text, total=None)
            yield lambda done, total: bar.update(task, completed=done, total=total)

    @property
    def progress(self) -> bool:
        """Whether a live progress display belongs on the people's console: a terminal, without
        --quiet and without --json (a program reads the output; nothing extra goes with it)."""
        return not self.quiet and not self.json_mode and self.people.is_terminal

    def result(self, payload: dict) -> None:
        """With --json: ``payload`` as one JSON object on stdout (see :func:`jsonable`)."""
        if self.json_mode:
            sys.stdout.write(json.dumps(jsonable(payload), indent=2, allow_nan=False) + "\n")
            sys.stdout.flush()


# The same columns, with the same meaning, as the generated project's README (hls/codegen.py).
MULTIPLY_COLUMNS = ("layer", "kind", "operand bits", "multipliers", "products", "DSP", "LUT", "shift-add", "weight bits",
                    "BRAM18K", "latency")


def estimate_table(report: dict) -> Table:
    """An HLS resource estimate (export-hls's ``report.json``) as a table, one row per layer plus
    the totals; ``export-hls`` and ``inspect`` print it alike."""
    table = Table(title=f"resource estimate ({report['io']} io, reuse factor {report['reuse_factor']}, "
                        f"{report['part']} @ {report['clock_ns']} ns)")
    for col in MULTIPLY_COLUMNS:
        table.add_column(col, justify="left" if col in ("layer", "kind", "operand bits") else "right")
    for e in report["layers"]:
        widths = ", ".join(e["multiplies"]) or "-"
        products = sum(m["count"] for m in e["multiplies"].values())
        table.add_row(e["layer"], e["kind"], widths, str(e["multipliers"]), str(products), str(e["dsp"]), str(e["lut"]),
                      str(e["shift_add_terms"]), str(e["weight_bits"]), str(e["bram18"]), str(e["latency"]))
    t = report["totals"]
    table.add_row("total", "", "", str(t["multipliers"]), str(sum(sum(m["count"] for m in e["multiplies"].values())
                                                                 for e in report["layers"])),
                  str(t["dsp"]), str(t["lut"]), str(t["shift_add_terms"]), str(t["weight_bits"]),
                  str(t["bram18"]), f"{t['latency_cycles']} ({t['latency_ns']} ns)", style="bold")
    table.caption = ("multipliers: multiplier instances in hardware (products per pipelined iteration / reuse factor); "
                     "products: multiplications per inference; latency in clock cycles")
    return table
