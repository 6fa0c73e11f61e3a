"""How a zsclip command runs as a process, with or without the Typer app (no Typer, rich or torch here).

User mistakes raise zsclip.errors.UserError: its message is one line on stderr and the exit status
its code (2 for usage errors, 3 when an output could not be written). ZSCLIP_DEBUG=1 shows the
traceback instead. SIGINT (Ctrl-C), SIGTERM and SIGHUP unwind the command like an exception, so
every writer removes its temporary file, then `zsclip: interrupted` and exit status 128 + the
signal's number (130, 143, 129). A signal the caller ignores (nohup) stays ignored.

zsclip.cli.app runs the Typer app through `run_command`; zsclip.cli._quick runs `classify --server`
through it without importing Typer at all.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Callable, Iterator, NoReturn

from zsclip.errors import UserError


class Interrupted(BaseException):
    """A stop signal, raised in the main thread. Not a KeyboardInterrupt, which click would turn into a
    silent exit status 130."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def debugging() -> bool:
    """ZSCLIP_DEBUG=1: tracebacks instead of one-line errors."""
    return os.environ.get("ZSCLIP_DEBUG", "") not in ("", "0")


def print_error(message: str) -> None:
    from zsclip.escapes import for_display

    print(f"zsclip: error: {for_display(message)}", file=sys.stderr)


def run_command(
    command: Callable[[], object],
    *,
    other_error: Callable[[Exception], int | None] = lambda err: None,
) -> NoReturn:
    """Run `command` as the whole process: exits with its code (an int it returns, else 0), or with
    the status its error calls for. `other_error` turns exceptions of the caller's own (click's usage
    errors) into an exit status, having printed them; None lets them through."""
    if sys.stderr is None:  # stderr closed (`2>&-`): print(file=None) would write to stdout
        sys.stderr = open(os.devnull, "w")
    debug = debugging()
    if not debug:
        import warnings

        # PIL's decompression-bomb and corrupt-EXIF warnings: zsclip already reports such inputs in
        # one line.
        warnings.filterwarnings("ignore", module=r"PIL(\.|$)")
        # torch warns at import when numpy is absent; zsclip does not use numpy at run time.
        warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    try:
        with _signals_interrupt(), _guarded_stdout():
            code = command()
            sys.stdout.flush()
    except UserError as err:
        if debug:
            raise
        print_error(str(err))
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
    except Exception as err:
        status = other_error(err)
        if status is None:
            raise
        sys.exit(status)
    sys.exit(code if isinstance(code, int) else 0)


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


def exit_quickly(main: Callable[[], None]) -> NoReturn:
    """Run `main` (which exits), then end the process without tearing torch down, when that is safe.

    Once torch is loaded, the interpreter's normal shutdown spends a large part of a second tearing
    down torch's thousands of module objects one by one, which is most of what a cached rerun would
    otherwise wait for. When the command is over, its files written and closed, and nothing else
    runs (no other thread, child process or distributed process group), the exit handlers run and
    the streams are flushed as usual, then the process ends without that teardown. Tests and library
    users call `main`, which exits normally.
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
    if threading.active_count() > 1:
        return False
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        return False
    multiprocessing = sys.modules.get("multiprocessing")
    return multiprocessing is None or not multiprocessing.active_children()
