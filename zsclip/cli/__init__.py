"""The terminal layer: the Typer app (app.py), one module per command, and private helpers (_*.py).

`main` first offers the command line to zsclip.cli._quick, which runs `classify --server` without
importing Typer (most of what such a call would otherwise spend); anything it is not sure of goes to
the Typer app (zsclip.cli.app.app). Importing this package imports neither.
"""

from __future__ import annotations

import sys

__all__ = ["main", "run"]


def main() -> None:
    """The `zsclip` command line as the whole process (exits); tests and library users call this."""
    from zsclip.cli._quick import quick_command

    command = quick_command(sys.argv[1:])
    if command is not None:
        from zsclip.cli._process import run_command

        run_command(command)
    from zsclip.cli.app import main as full

    full()


def run() -> None:
    """The `zsclip` program (console script and `python -m zsclip`): `main`, then a quick exit
    (zsclip.cli._process.exit_quickly)."""
    from zsclip.cli._process import exit_quickly

    exit_quickly(main)
