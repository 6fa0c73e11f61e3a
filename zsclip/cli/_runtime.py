"""What classify and embed share in the terminal layer: loading the model for inference, the checks
of inputs and outputs made before any work, the output stream, and the loop that writes rows,
reports unreadable inputs and drives the progress bar. (No `register`: not a command of its own.)

A failing output costs one line: a usage error (exit 2) when it can be seen before the work, exit 3
when writing fails (disk full, /dev/full, I/O error), with nothing left behind.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path
from typing import IO, TYPE_CHECKING, Callable, Iterable, Iterator, TypeVar

from zsclip.cli._output import error_line, note, progress
from zsclip.errors import UserError

if TYPE_CHECKING:
    import torch

    from zsclip.core.checkpoints import LoadedModel
    from zsclip.jobs.cache import ImageCache
    from zsclip.jobs.inputs import InputItem

Row = TypeVar("Row")


def load_for_inference(
    model: str | None,
    *,
    vocab: Path | None,
    device: str,
    precision: str,
    offline: bool,
    quiet: bool,
    announce: bool = True,
) -> tuple["LoadedModel", "torch.device", "torch.dtype"]:
    """Resolve --device and --precision (cheap checks first), then load the model in eval mode there.
    `announce`: say when the built-in model is in use (announce_builtin)."""
    prepare_torch()
    from zsclip.core.checkpoints import load_model
    from zsclip.core.devices import resolve_device, resolve_precision

    torch_device = resolve_device(device)
    dtype = resolve_precision(precision, torch_device)
    loaded = load_model(model, vocab=vocab, device=torch_device, offline=offline)
    if announce:
        announce_builtin(loaded, quiet)
    return loaded, torch_device, dtype


REAL_CLIP = "ViT-B/32"  # what a user who wants real photos should reach for first


def real_clip_hint() -> str:
    """How to get a real CLIP: `--model ViT-B/32 (338 MiB, downloaded once)`, size from the catalogue."""
    from zsclip.core import catalogue as hub

    entry = hub.lookup(REAL_CLIP)
    if entry is None:
        return "--model NAME (`zsclip models` lists them)"
    if entry.cached():
        return f"--model {entry.name} (already downloaded)"
    size = f"{entry.size / 2**20:.0f} MiB, " if entry.size else ""
    return f"--model {entry.name} ({size}downloaded once)"


def announce_builtin(loaded: "LoadedModel", quiet: bool) -> None:
    """One note when the built-in demo model is in use: what it knows, and how to get a real CLIP."""
    if not loaded.builtin:
        return
    description = loaded.metadata.get("description")
    model = f"model {loaded.name} ({description})" if description else f"demo model {loaded.name}"
    note(
        f"zsclip: using the built-in {model}; for a real CLIP use {real_clip_hint()}, "
        f"or make it the default: zsclip config set model {REAL_CLIP}",
        quiet=quiet,
    )


def cache_summary(cache: "ImageCache | None", quiet: bool) -> None:
    """One stderr line saying how many images came from the cache, when any did."""
    if cache is not None and cache.hits:
        note(
            f"zsclip: {cache.hits} image embedding(s) reused from the cache, {cache.stored} computed "
            "(--no-cache to ignore it)",
            quiet=quiet,
        )
    if cache is not None:
        cache.close()


def prepare_torch() -> None:
    """Import torch the way a short-lived command should, before anything else does:

    * OMP_WAIT_POLICY=PASSIVE (unless the user set it): torch's OpenMP workers sleep rather than
      spin while they wait. zsclip decodes images in threads beside the model, and spinning workers
      take the CPU those threads (and any other program) need (figures: docs/performance.md).
      OpenMP reads it once, when torch loads.
    * the garbage collector paused during the import (a noticeable part of it), then torch's
      objects frozen (gc.freeze) and frozen again at exit, so neither later collections nor the
      final one at interpreter exit walk them all again.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if "torch" in sys.modules:
        return
    import atexit
    import gc

    gc.disable()
    try:
        import torch  # noqa: F401
    finally:
        gc.enable()
    gc.freeze()
    atexit.register(gc.freeze)


# ------------------------------------------------------------------------------ outputs


def check_outputs(outputs: dict[str, Path | None], *, to_stdout: bool) -> None:
    """Before any work: every named output can be written (its folder exists or can be made, no
    file in the way, not a folder), no two of them are the same file, and stdout is open when the
    data goes there. A UserError (exit 2) otherwise."""
    from zsclip.atomic import check_output, resolve_target

    seen: dict[Path, str] = {}
    for option, path in outputs.items():
        if path is None:
            continue
        check_output(path, option)
        target = resolve_target(path)
        if target.kind == "file" and target.path in seen:
            raise UserError(f"{seen[target.path]} and {option} name the same file {str(path)!r}")
        seen[target.path] = option
    if to_stdout:
        check_stdout()


def check_stdout() -> None:
    """stdout must be open to carry the data (`zsclip ... >&-` closes it)."""
    closed = sys.stdout is None
    if not closed:
        try:
            os.fstat(sys.stdout.fileno())
        except (AttributeError, io.UnsupportedOperation):
            pass  # not a real file (a test's capture): nothing to check
        except (OSError, ValueError):  # a descriptor closed since, or a stream closed
            closed = True
    if closed:
        raise UserError("stdout is closed; give --output FILE or run with stdout open")


def _silence_stdout() -> None:
    """After stdout failed: point it at /dev/null so the interpreter's last flush cannot fail too."""
    with contextlib.suppress(OSError, ValueError, AttributeError, io.UnsupportedOperation):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


@contextlib.contextmanager
def writing(name: str) -> Iterator[None]:
    """Around code that only writes the output `name` ("stdout" or a path): a reader that went away
    (`| head`) ends the run quietly with status 1; any other failure (disk full, /dev/full, I/O
    error) is one line and exit status 3 (zsclip.atomic.OUTPUT_FAILED)."""
    from zsclip.atomic import OutputError

    try:
        yield
    except BrokenPipeError:
        if name == "stdout":
            _silence_stdout()
        raise SystemExit(1) from None
    except OSError as err:
        if name == "stdout":
            _silence_stdout()
            raise OutputError("to stdout", err) from None
        raise OutputError(name, err) from None


class _Guarded:
    """A text stream whose write failures become `writing`'s one line."""

    def __init__(self, stream: IO[str], name: str) -> None:
        self._stream, self._name = stream, name

    def write(self, text: str) -> int:
        with writing(self._name):
            return self._stream.write(text)

    def flush(self) -> None:
        with writing(self._name):
            self._stream.flush()

    def __getattr__(self, attribute: str):
        return getattr(self._stream, attribute)


def guarded(stream: IO[str], name: str) -> IO[str]:
    """`stream` with its write failures turned into `writing`'s one line (once: wrapping twice
    changes nothing)."""
    if isinstance(stream, _Guarded):
        return stream
    return _Guarded(stream, name)  # type: ignore[return-value]


@contextlib.contextmanager
def output_stream(path: Path | None) -> Iterator[IO[str]]:
    """--output FILE or stdout, guarded by `writing`. A regular file appears only when the run
    completes (zsclip.atomic); a device, FIFO or /dev/stdout is written through."""
    if path is None:
        yield guarded(sys.stdout, "stdout")
        return
    from zsclip.atomic import OutputFile

    name = str(path)
    with writing(name):
        output = OutputFile(path, "w", encoding="utf-8")
    try:
        yield _Guarded(output.handle, name)  # type: ignore[misc]
    except BaseException:
        output.discard()
        raise
    with writing(name):
        output.commit()


def gather_inputs(inputs: list[str] | None, quiet: bool) -> "list[InputItem]":
    """expand_inputs on the command line's INPUTs; says so when `-` waits for paths typed at a
    terminal."""
    from zsclip.jobs.inputs import expand_inputs

    stdin = sys.stdin
    if inputs and "-" in inputs and stdin is not None and stdin.isatty():
        note(
            "zsclip: reading image paths from stdin, one per line; end with Ctrl-D",
            quiet=quiet,
        )
    return expand_inputs(inputs or [], stdin)


def write_rows(
    rows: Iterable[Row],
    write: Callable[[Row], None],
    *,
    total: int | None,
    description: str,
    quiet: bool,
    error_of: Callable[[Row], tuple[str, str] | None],
    output: str = "stdout",
) -> int:
    """Write every row (failures of the `output` as in `writing`); one stderr line per unreadable
    input. Returns how many inputs failed."""
    failures = 0
    with progress(total, description, quiet=quiet) as bar:
        for row in rows:
            with writing(output):
                write(row)
            failed = error_of(row)
            if failed is not None:
                failures += 1
                error_line(f"{failed[0]}: {failed[1]}")
            bar.advance()
    return failures


def finish(failures: int, total: int, quiet: bool) -> None:
    """Exit status 1 when some inputs could not be read (all others were written), else return (status
    0)."""
    if failures:
        note(
            f"zsclip: {failures} of {total} inputs could not be read (see the errors above)",
            quiet=quiet,
        )
        raise SystemExit(1)
