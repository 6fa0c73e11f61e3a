"""The image half shared by classify and embed: paths -> decoded batches -> normalised image features.

    decoded_batches(items, ...)   an iterator of batches, in input order; each entry holds a [3, S, S] tensor or
                                  the one-line reason its file could not be read
    encode_batches(model, ...)    runs the image tower on each batch's readable entries, yields unit fp32 features

Decoding happens in `workers` threads (PIL releases the GIL while it decodes), a bounded window ahead of the
model, so memory stays flat however many inputs there are. Results always come back in input order.
"""

from __future__ import annotations

import io
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence, TypeVar

from zsclip.errors import InputError
from zsclip.inputs import InputItem

if TYPE_CHECKING:
    import torch

    from zsclip.model import CLIP
    from zsclip.transform import PreprocessConfig

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class Decoded:
    path: str
    pixels: "torch.Tensor | None" = None  # [3, S, S] normalised, or None when the file could not be used
    error: str | None = None
    thumbnail: bytes | None = None  # a small JPEG for the HTML report, when asked for


@dataclass(frozen=True)
class DecodeOptions:
    draft_size: int | None = None  # JPEG DCT-scaled decoding down to this size; None = exact full-size decode
    thumbnail_size: int | None = None  # longest side of report thumbnails; None = no thumbnails


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text[:300]


def make_thumbnail(image, size: int) -> bytes:
    """A JPEG of at most size x size pixels (aspect kept), for embedding in the HTML report."""
    small = image.copy()
    small.thumbnail((size, size))
    buffer = io.BytesIO()
    small.convert("RGB").save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


def decode_one(item: InputItem, config: "PreprocessConfig", options: DecodeOptions) -> Decoded:
    """Read one input. Never raises for a bad file: the reason goes into `error`."""
    if item.error is not None:
        return Decoded(item.path, error=item.error)
    from zsclip.transform import load_image, to_tensor

    try:
        image = load_image(item.path, draft_size=options.draft_size, background=config.background)
        pixels = to_tensor(image, config)  # [3, S, S]
        thumbnail = make_thumbnail(image, options.thumbnail_size) if options.thumbnail_size else None
    except InputError as err:
        return Decoded(item.path, error=_one_line(err))
    except MemoryError:
        return Decoded(item.path, error="image too large to decode in memory")
    except Exception as err:  # a decoder bug must cost one input, not the run
        return Decoded(item.path, error=f"cannot read image: {_one_line(err)}")
    return Decoded(item.path, pixels, thumbnail=thumbnail)


def ordered_map(function: Callable[[T], R], items: Iterable[T], workers: int, window: int) -> Iterator[R]:
    """map() over `workers` threads with at most `window` results in flight, in input order."""
    if workers <= 0:
        yield from map(function, items)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="zsclip-decode") as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def decoded_batches(
    items: Sequence[InputItem], config: "PreprocessConfig", *, batch_size: int, workers: int = 0,
    options: DecodeOptions = DecodeOptions(),
) -> Iterator[list[Decoded]]:
    """Batches of up to `batch_size` decoded inputs (readable or not), in input order."""
    batch: list[Decoded] = []
    decoded = ordered_map(lambda item: decode_one(item, config, options), items, workers,
                          window=max(2 * batch_size, 2 * workers))
    for entry in decoded:
        batch.append(entry)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def encode_batches(
    model: "CLIP", batches: Iterable[list[Decoded]], *, device: "torch.device", dtype: "torch.dtype",
) -> Iterator[tuple[list[Decoded], "torch.Tensor"]]:
    """(batch, features): features [n, D] unit-length fp32 on the CPU, one row per readable entry, in order."""
    import torch
    import torch.nn.functional as F

    from zsclip.devices import autocast

    for batch in batches:
        readable = [entry.pixels for entry in batch if entry.pixels is not None]
        if not readable:
            yield batch, torch.zeros(0, model.config.embed_dim)
            continue
        pixels = torch.stack(readable).to(device, non_blocking=True)  # [n, 3, S, S]
        with torch.inference_mode(), autocast(device, dtype):
            features = model.encode_image(pixels)  # [n, D]
        yield batch, F.normalize(features.float(), dim=-1).cpu()
        for entry in batch:
            entry.pixels = None  # free the decoded pixels as soon as they are used


def default_workers() -> int:
    """Decoding threads: one per core, at most 8 (more only adds contention)."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores))
