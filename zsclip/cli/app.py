"""The Typer app: every command registers itself from its own module in zsclip/cli/.

User mistakes raise zsclip.errors.UserError; `main` prints its message as one line on stderr and
exits with its code (2 for usage errors, 3 when an output could not be written). ZSCLIP_DEBUG=1
shows the traceback instead. Click's own usage errors (an unknown option, a value out of range)
become one line the same way. SIGINT (Ctrl-C), SIGTERM and SIGHUP unwind the command like an
exception, so every writer removes its temporary file, then `zsclip: interrupted` and exit status
128 + the signal's number (130, 143, 129). A signal the caller ignores (nohup) stays ignored.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Annotated, Iterator

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
from zsclip.errors import UserError

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


class Interrupted(BaseException):
    """A stop signal, raised in the main thread. Not a KeyboardInterrupt, which click would turn into a
    silent exit status 130."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """While the command runs, SIGINT, SIGTERM and SIGHUP raise Interrupted (once: a second signal
    during the unwinding is not allowed to cut the clean-up short)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    raised = []

    def handler(signum: int, frame: object) -> None:
        if not raised:
            raised.append(signum)
            raise Interrupted(signum)

    previous = {}
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        number = getattr(signal, name, None)
        if number is not None and signal.getsignal(number) is not signal.SIG_IGN:
            previous[number] = signal.signal(number, handler)
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


@contextlib.contextmanager
def _guarded_stdout() -> Iterator[None]:
    """While a command runs, a failing stdout (`> /dev/full`, a disk filling up) is one line and exit
    status 3, and a reader that went away (`| head`) a quiet exit, whichever command wrote."""
    original = sys.stdout
    if original is None:  # closed: the commands that need it say so
        yield
        return
    from zsclip.cli._runtime import guarded

    sys.stdout = guarded(original, "stdout")
    try:
        yield
    finally:
        sys.stdout = original


def _error(message: str) -> None:
    from zsclip.escapes import for_display

    print(f"zsclip: error: {for_display(message)}", file=sys.stderr)


def main() -> None:
    """Console-script entry point."""
    if sys.stderr is None:  # stderr closed (`2>&-`): print(file=None) would write to stdout
        sys.stderr = open(os.devnull, "w")
    debug = os.environ.get("ZSCLIP_DEBUG", "") not in ("", "0")
    if not debug:
        import warnings

        # PIL's decompression-bomb and corrupt-EXIF warnings: zsclip already reports such inputs in
        # one line.
        warnings.filterwarnings("ignore", module=r"PIL(\.|$)")
        # torch warns at import when numpy is absent; zsclip does not use numpy at run time.
        warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    try:
        # Without standalone mode click returns (rather than raises) the code of `typer.Exit(n)`.
        with _signals_interrupt(), _guarded_stdout():
            code = app(standalone_mode=False)
            sys.stdout.flush()
    except UserError as err:
        if debug:
            raise
        _error(str(err))
        sys.exit(err.exit_code)
    except Interrupted as err:
        if debug:
            raise
        print("zsclip: interrupted", file=sys.stderr)
        sys.exit(128 + err.signum)
    except KeyboardInterrupt:
        if debug:
            raise
        print("zsclip: interrupted", file=sys.stderr)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as err:  # click usage errors arrive here in non-standalone mode
        # Typer 0.29 raises the exceptions of its vendored click (typer._click), older ones click's
        # own: match on the shape both share rather than on either class.
        if type(err).__name__ == "Abort":
            print("zsclip: aborted", file=sys.stderr)
            sys.exit(130)
        if hasattr(err, "show") and isinstance(getattr(err, "exit_code", None), int):
            if debug:
                raise
            if type(err).__name__ == "NoArgsIsHelpError":  # bare `zsclip`: the help text
                err.show()
            else:
                print(_usage_line(err), file=sys.stderr)
            sys.exit(err.exit_code)
        raise
    sys.exit(code if isinstance(code, int) else 0)


def _usage_line(err: Exception) -> str:
    """A click usage error (unknown option, bad value, missing argument) as one line, like every
    other zsclip error, naming the help that lists the options."""
    message = " ".join(str(err.format_message()).split())  # type: ignore[attr-defined]
    context = getattr(err, "ctx", None)
    hint = f" (see '{context.command_path} --help')" if context is not None else ""
    return f"zsclip: error: {message}{hint}"


def run() -> None:
    """The `zsclip` program (console script and `python -m zsclip`): `main`, then a quick exit.

    Once torch is loaded, the interpreter's normal shutdown spends a large part of a second tearing down
    torch's thousands of module objects one by one, which is most of what a cached rerun would
    otherwise wait for. When the command is over, its files written and closed, and nothing else
    runs (no other thread, child process or distributed process group), the exit handlers run and
    the streams are flushed as usual, then the process ends without that teardown. Tests and library
    users call `main`, which returns normally.
    """
    try:
        main()
        code: object = 0
    except SystemExit as exit_:
        code = exit_.code
    if "torch" not in sys.modules or not _quiet_process():
        sys.exit(code)
    import atexit

    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that went away, or a stream already closed
            pass
    os._exit(code or 0)


def _quiet_process() -> bool:
    """Only the main thread left, no child process still running, no distributed process group still
    open."""
    import threading

    if threading.active_count() > 1:
        return False
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        return False
    multiprocessing = sys.modules.get("multiprocessing")
    return multiprocessing is None or not multiprocessing.active_children()
