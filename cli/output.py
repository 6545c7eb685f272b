"""Where a command's output goes: lines and tables for people, one JSON object for programs.

Both consoles print every string literally: rich markup (``[red]``, ``[/]``) and emoji codes
(``:boom:``) are off, because paths, node and tensor names, hook names and config keys reach the
terminal inside f-strings and table cells. Styled text is built explicitly with ``rich.text.Text``.
(``console.status`` parses its text as markup whatever the console says: keep it constant.) A
message is one line however long (soft wrap: the terminal folds it, rich does not break it), so
paths stay whole and logs stay greppable. On a terminal tables fit its width; anywhere else (a
pipe, a file, a CI log) they print at their natural width whatever ``COLUMNS`` says, so a type
string or a header is never broken or cut.
"""

from __future__ import annotations

import json
import math
import sys
from contextlib import nullcontext
from typing import Any

from rich.console import Console, ConsoleDimensions
from rich.text import Text

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
        """A spinner while a stage runs (on a terminal, not with --quiet); ``text`` must be constant."""
        if self.quiet:
            return nullcontext()
        return self.people.status(text)

    @property
    def progress(self) -> bool:
        """Whether a live progress display belongs on the people's console."""
        return not self.quiet and self.people.is_terminal

    def result(self, payload: dict) -> None:
        """With --json: ``payload`` as one JSON object on stdout (see :func:`jsonable`)."""
        if self.json_mode:
            sys.stdout.write(json.dumps(jsonable(payload), indent=2, allow_nan=False) + "\n")
            sys.stdout.flush()
