"""What classify and embed share in the terminal layer: loading the model for inference, the output
stream, and the loop that writes rows, reports unreadable inputs and drives the progress bar. (No
`register`: not a command of its own.)
"""

from __future__ import annotations

import contextlib
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
    from zsclip.jobs.pipeline import DecodeOptions

Row = TypeVar("Row")


def load_for_inference(
    model: str | None,
    *,
    vocab: Path | None,
    device: str,
    precision: str,
    offline: bool,
    quiet: bool,
) -> tuple["LoadedModel", "torch.device", "torch.dtype"]:
    """Resolve --device and --precision (cheap checks first), then load the model in eval mode there."""
    prepare_torch()
    from zsclip.core.checkpoints import load_model
    from zsclip.core.devices import resolve_device, resolve_precision

    torch_device = resolve_device(device)
    dtype = resolve_precision(precision, torch_device)
    loaded = load_model(model, vocab=vocab, device=torch_device, offline=offline)
    if loaded.builtin:
        note(
            f"zsclip: using the built-in demo model ({loaded.name}); pick another with --model NAME or PATH "
            "or the ZSCLIP_MODEL variable (`zsclip models` lists names)",
            quiet=quiet,
        )
    return loaded, torch_device, dtype


def image_cache(
    loaded: "LoadedModel",
    decode: "DecodeOptions",
    dtype: "torch.dtype",
    enabled: bool,
) -> "ImageCache | None":
    """The image-embedding cache for this model, preprocessing and precision; None with --no-cache or
    when the model has no file to identify it by."""
    if not enabled:
        return None
    from zsclip.cli._output import warn
    from zsclip.core.devices import precision_name
    from zsclip.jobs.cache import ImageCache, image_variant, model_identity

    model_id = model_identity(loaded.path)
    if model_id is None:
        return None
    variant = image_variant(
        model_id, loaded.preprocess.to_dict(), decode.draft_size, precision_name(dtype)
    )
    return ImageCache(variant, warn=warn, dim=loaded.model.config.embed_dim)


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
      take the CPU those threads (and any other program) need: on the shared 2-core benchmark
      machine ViT-B/32 ran 1.3x faster on images and 3x on prompts. OpenMP reads it once, when torch
      loads.
    * the garbage collector paused during the import (0.2-0.5 s of its ~2 s here), then torch's
      objects frozen (gc.freeze) and frozen again at exit, so neither later collections nor the
      final one at interpreter exit walk them all again (that final walk took ~0.5 s).
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


@contextlib.contextmanager
def output_stream(path: Path | None) -> Iterator[IO[str]]:
    """--output FILE (written atomically: the file appears only when the run completes) or stdout."""
    if path is None:
        yield sys.stdout
        return
    from zsclip.atomic import atomic_write

    if path.is_dir():
        raise UserError(f"--output {str(path)!r} is a folder; give a file name")
    with atomic_write(path, "w", encoding="utf-8") as handle:
        yield handle


def write_rows(
    rows: Iterable[Row],
    write: Callable[[Row], None],
    *,
    total: int | None,
    description: str,
    quiet: bool,
    error_of: Callable[[Row], tuple[str, str] | None],
) -> int:
    """Write every row; one stderr line per unreadable input. Returns how many inputs failed."""
    failures = 0
    try:
        with progress(total, description, quiet=quiet) as bar:
            for row in rows:
                write(row)
                failed = error_of(row)
                if failed is not None:
                    failures += 1
                    error_line(f"{failed[0]}: {failed[1]}")
                bar.advance()
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, and keep Python from complaining at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise SystemExit(1) from None
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
