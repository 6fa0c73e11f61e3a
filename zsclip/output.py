"""The output sink: stdout carries data only; progress, notes, warnings and errors go to stderr.

Machine formats (jsonl, csv, tsv) are written with plain writes, never through rich markup.
"""

from __future__ import annotations

import os
import sys
from functools import lru_cache

from rich.console import Console


@lru_cache(maxsize=1)
def stderr_console() -> Console:
    """The rich console for people. Honours NO_COLOR (rich reads it) and is plain when stderr is not a terminal."""
    return Console(stderr=True, highlight=False, soft_wrap=True)


def note(message: str, *, quiet: bool = False) -> None:
    """A line for the person at the terminal (stderr)."""
    if not quiet:
        stderr_console().print(message, markup=False)


def warn(message: str) -> None:
    """A warning on stderr; shown even with --quiet."""
    print(f"zsclip: warning: {message}", file=sys.stderr, flush=True)


def error_line(message: str) -> None:
    """A one-line error on stderr for an input that failed while the others go on."""
    print(f"zsclip: error: {message}", file=sys.stderr, flush=True)


def stderr_is_terminal() -> bool:
    return sys.stderr.isatty() and os.environ.get("TERM") != "dumb"


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()
