"""The output sink: stdout carries data only; progress, notes, warnings and errors go to stderr.

Machine formats (jsonl, csv, tsv) are written with plain writes, never through rich markup. Every
line for people passes through zsclip.escapes.for_display: a file name holding a newline or a
terminal escape sequence shows escaped and cannot start a line of its own.
"""

from __future__ import annotations

import os
import sys
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from zsclip.escapes import for_display

if (
    TYPE_CHECKING
):  # rich is imported when something is shown to a person (~40 ms that a piped run never needs)
    from rich.console import Console


@lru_cache(maxsize=1)
def stderr_console() -> "Console":
    """The rich console for people. Honours NO_COLOR (rich reads it) and is plain when stderr is not a
    terminal."""
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def note(message: str, *, quiet: bool = False) -> None:
    """A line for the person at the terminal (stderr)."""
    if not quiet:
        stderr_console().print(for_display(message), markup=False)


def warn(message: str) -> None:
    """A warning on stderr; shown even with --quiet."""
    print(f"zsclip: warning: {for_display(message)}", file=sys.stderr, flush=True)


def error_line(message: str) -> None:
    """A one-line error on stderr for an input that failed while the others go on."""
    print(f"zsclip: error: {for_display(message)}", file=sys.stderr, flush=True)


def stderr_is_terminal() -> bool:
    return sys.stderr.isatty() and os.environ.get("TERM") != "dumb"


def stdout_is_terminal() -> bool:
    return sys.stdout is not None and sys.stdout.isatty()  # None: stdout was closed (`>&-`)


def stdout_console(stream: Any = None) -> "Console":
    """A rich console on stdout (or `stream`, a wrapper of it), for the `table` format only (people
    at a terminal). Honours NO_COLOR."""
    from rich.console import Console

    return Console(file=stream, highlight=False, soft_wrap=False)


class _NoProgress:
    def advance(self, steps: int = 1) -> None:
        pass

    def __enter__(self) -> "_NoProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class _BarProgress:
    """A rich progress bar on stderr; transient, so the terminal is left clean when the run ends."""

    def __init__(self, total: int | None, description: str) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=stderr_console(),
            transient=True,
            redirect_stdout=False,  # stdout carries data: it must never be routed through the bar
        )
        self._task = self._bar.add_task(description, total=total)

    def advance(self, steps: int = 1) -> None:
        self._bar.advance(self._task, steps)

    def __enter__(self) -> "_BarProgress":
        self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.stop()


def progress(
    total: int | None, description: str, *, quiet: bool = False
) -> "_NoProgress | _BarProgress":
    """`with progress(n, "classifying") as bar: bar.advance()`. A bar only when stderr is a terminal
    and not quiet.

    Error lines printed meanwhile (error_line) go to the same stream; rich redraws the bar below
    them.
    """
    if quiet or not stderr_is_terminal() or total == 0:
        return _NoProgress()
    return _BarProgress(total, description)
