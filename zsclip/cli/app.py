"""The Typer app: every command registers itself from its own module in zsclip/cli/.

`main` runs it as a process (zsclip.cli._process: one-line errors, exit statuses, signals). Click's
own usage errors (an unknown option, a value out of range) become one line the same way as a
UserError, naming the --help to read.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from zsclip.cli import (
    classify,
    config,
    convert,
    duplicates,
    embed,
    evaluate,
    fit,
    models,
    search,
    serve,
    shapes,
    sort,
    tags,
    train,
)
from zsclip.cli._help import WordedGroup

app = typer.Typer(
    name="zsclip",
    cls=WordedGroup,  # placeholders in --help read as words (--top-k N), not Python types
    help=(
        "Zero-shot image classification with CLIP.\n\n"
        'Example: zsclip classify photos/ --labels "corgi,jazz album"'
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Order here is the order in `zsclip --help`; `evaluate` is the `eval` command, `models` also holds
# `download`.
for _command in (
    classify,
    sort,
    tags,
    search,
    duplicates,
    embed,
    train,
    evaluate,
    fit,
    shapes,
    models,
    convert,
    config,
    serve,
):
    _command.register(app)


def _print_version(value: bool) -> None:
    if value:
        from zsclip.version import __version__

        print(f"zsclip {__version__}")
        raise typer.Exit()


@app.callback()
def _before_any_command(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            is_eager=True,
            callback=_print_version,
            help="Print zsclip's version and exit.",
        ),
    ] = False,
) -> None:
    # Click runs this before every command but never for `zsclip --help`, so what it imports
    # (zsclip.core.catalogue: urllib, http.client, ssl, ~50 ms) stays off the help path.
    from zsclip.cli.models import install_download_progress

    install_download_progress()


def main() -> None:
    """The Typer app as the whole process (zsclip.cli._process.run_command): exits."""
    from zsclip.cli._process import run_command

    # Without standalone mode click returns (rather than raises) the code of `typer.Exit(n)`.
    run_command(lambda: app(standalone_mode=False), other_error=_click_error)


def _click_error(err: Exception) -> int | None:
    """Click's usage errors (arriving as exceptions in non-standalone mode) as one line; the exit
    status, or None for anything else."""
    from zsclip.cli._process import debugging

    # Typer 0.29 raises the exceptions of its vendored click (typer._click), older ones click's
    # own: match on the shape both share rather than on either class.
    if type(err).__name__ == "Abort":
        print("zsclip: aborted", file=sys.stderr)
        return 130
    if hasattr(err, "show") and isinstance(getattr(err, "exit_code", None), int):
        if debugging():
            return None
        if type(err).__name__ == "NoArgsIsHelpError":  # bare `zsclip`: the help text
            err.show()
        else:
            print(_usage_line(err), file=sys.stderr)
        return err.exit_code
    return None


def _usage_line(err: Exception) -> str:
    """A click usage error (unknown option, bad value, missing argument) as one line, like every
    other zsclip error, naming the help that lists the options."""
    message = " ".join(str(err.format_message()).split())  # type: ignore[attr-defined]
    context = getattr(err, "ctx", None)
    hint = f" (see '{context.command_path} --help')" if context is not None else ""
    return f"zsclip: error: {message}{hint}"
