"""The image half shared by classify and embed: paths -> decoded batches -> normalised image features.

    decoded_batches(items, ...)   an iterator of batches, in input order; each entry holds uint8 [3, S, S] pixels,
                                  a cached embedding, or the one-line reason its file could not be read
    encode_batches(model, ...)    runs the image tower on each batch's decoded entries, yields unit fp32 features

Speed comes from four places:
  * draft decoding: JPEGs are decoded at a reduced DCT scale when that keeps the short side >= 1.5 x the model's
    input size (`draft_size_for`): a 12-megapixel photo decodes at 1/8 scale, decoded and resized ~4x faster;
  * decoding in `workers` threads, a bounded window ahead of the model, while the model computes (PIL releases
    the GIL while it decodes and resizes); memory stays flat however many inputs there are;
  * pixels travel as uint8 (a quarter of float32) and are normalised a whole batch at a time on the model's
    device; on CUDA the batch goes through pinned memory with a non-blocking copy, and one batch is computed
    while the previous one's features come back;
  * an optional ImageCache (zsclip.jobs.cache): a file whose embedding is stored, unchanged since, is not decoded.
Results always come back in input order.

Memory is bounded by a `MemoryBudget` the decoding threads share: each image's peak cost is estimated from
its header before any pixel is decoded (`transform.decode_cost`), and an image waits until the others in
flight leave room for it; one larger than the whole budget runs alone. The default budget is a quarter of
the memory available when the run starts, between 256 MiB and 2 GiB (docs/performance.md).
"""

from __future__ import annotations

import io
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence, TypeVar

from zsclip.errors import InputError
from zsclip.jobs.inputs import InputItem

if TYPE_CHECKING:
    from array import array

    import torch
    from PIL import Image

    from zsclip.core.checkpoints import LoadedModel
    from zsclip.core.model import CLIP
    from zsclip.core.transform import PreprocessConfig
    from zsclip.jobs.cache import FileStamp, ImageCache

T = TypeVar("T")
R = TypeVar("R")

# Draft decoding stops at the DCT scale that keeps the short side >= DRAFT_FACTOR * S. At 1.0 (the
# smallest scale still >= S) a 640x480 photo decodes at 320x240 and the final resize barely filters
# it: its input moves by a cosine of 0.9985-0.997. At 1.5 every size measured stays >= 0.9996 and
# 12-MP photos still decode at 1/8 (README, "Performance"; benchmarks/bench_draft.py).
DRAFT_FACTOR = 1.5
# a batch holds at most this many x batch_size entries (cached ones do not need the model)
MAX_BATCH_SPAN = 4


def draft_size_for(image_size: int) -> int:
    """The draft size for a model input of image_size x image_size (see DRAFT_FACTOR)."""
    return int(DRAFT_FACTOR * image_size + 0.5)


@dataclass
class Decoded:
    path: str
    pixels: "torch.Tensor | None" = None  # uint8 [3, S, S], waiting for the model
    error: str | None = None
    thumbnail: bytes | None = None  # a small JPEG for the HTML report, when asked for
    cached: "array | None" = None  # the stored fp32 embedding: nothing to decode or encode
    # the file version the pixels (or the cached embedding) came from: the cache and index key
    stamp: "FileStamp | None" = None

    @property
    def readable(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class DecodeOptions:
    # JPEG DCT-scaled decoding down to this size; None = exact full-size decode
    draft_size: int | None = None
    thumbnail_size: int | None = None  # longest side of report thumbnails; None = no thumbnails
    # bytes all decoding threads together may hold; None = default_memory_budget()
    memory_budget: int | None = None

    @classmethod
    def for_model(
        cls, image_size: int, *, exact: bool = False, thumbnail_size: int | None = None
    ) -> DecodeOptions:
        """Draft decoding unless `exact` (the bit-exact reference preprocessing)."""
        return cls(None if exact else draft_size_for(image_size), thumbnail_size)


_MIB = 1 << 20


def default_memory_budget() -> int:
    """A quarter of the memory available now (MemAvailable; else of physical memory), between 256 MiB
    and 2 GiB: room for several full-size decodes of large images, never enough to push a machine into
    swap or the OOM killer when a folder holds many of them."""
    available = None
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError):
        pass
    if available is None:
        try:
            import os

            available = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            available = 4096 * _MIB
    return max(256 * _MIB, min(2048 * _MIB, available // 4))


class MemoryBudget:
    """A byte budget shared by decoding threads, granted first come, first served.

    `acquire(n)` waits until every earlier request has been granted and n more bytes fit; a request
    larger than the whole budget is cut to it, so it waits until nothing else is held and then runs
    alone. Nothing is allocated here: the bytes are estimates that callers keep to.
    """

    def __init__(self, total: int) -> None:
        self.total = max(1, int(total))
        self.used = 0
        self.peak = 0  # the most ever held at once (for tests and benchmarks)
        self._queue: deque[object] = deque()
        self._changed = threading.Condition()

    @property
    def waiting(self) -> int:
        """Requests waiting for room now."""
        with self._changed:
            return len(self._queue)

    def acquire(self, nbytes: int) -> int:
        """Wait for room, take it, and return what was taken (pass that to `release`)."""
        take = max(0, min(int(nbytes), self.total))
        ticket = object()
        with self._changed:
            self._queue.append(ticket)
            while self._queue[0] is not ticket or (self.used and self.used + take > self.total):
                self._changed.wait()
            self._queue.popleft()
            self.used += take
            self.peak = max(self.peak, self.used)
            self._changed.notify_all()  # the next in line may fit too
        return take

    def release(self, taken: int) -> None:
        with self._changed:
            self.used -= taken
            self._changed.notify_all()

    @contextmanager
    def holding(self) -> Iterator[Callable[[int], None]]:
        """A `reserve(nbytes)` for one decode (transform.load_image's `reserve`); whatever it took is
        given back when the block ends, however it ends."""
        taken: list[int] = []

        def reserve(nbytes: int) -> None:
            if taken:
                raise RuntimeError("reserve() is called once per decode")
            taken.append(self.acquire(nbytes))

        try:
            yield reserve
        finally:
            if taken:
                if taken[0] >= _TRIM_AT:
                    _return_free_memory()
                self.release(taken[0])


# Holds at least this large hand freed memory back to the OS before they end (see _return_free_memory).
_TRIM_AT = 64 * _MIB
_LIBC: list = []  # [ctypes handle or None], looked up once


def _return_free_memory() -> None:
    """Ask glibc to give freed memory back to the OS (malloc_trim). Each decoding thread allocates from
    its own malloc arena, which keeps what an image freed; without this, eight threads could keep
    eight large images' worth of pages resident while the budget counts only the ones in use."""
    if not _LIBC:
        import ctypes
        import ctypes.util

        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.append(libc if hasattr(libc, "malloc_trim") else None)
        except OSError:  # not glibc (musl, macOS): their allocators return large blocks themselves
            _LIBC.append(None)
    if _LIBC[0] is not None:
        _LIBC[0].malloc_trim(0)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text[:300]


def make_thumbnail(image, size: int) -> bytes:
    """A JPEG of at most size x size pixels (aspect kept), for embedding in the HTML report."""
    from PIL import Image

    width, height = image.size
    scale = min(1.0, size / max(width, height, 1))
    small = image
    if scale < 1.0:  # resized straight from the image: no full-size copy
        target = (max(1, round(width * scale)), max(1, round(height * scale)))
        small = image.resize(target, Image.Resampling.BICUBIC, reducing_gap=2.0)
    buffer = io.BytesIO()
    (small if small.mode == "RGB" else small.convert("RGB")).save(buffer, "JPEG", quality=80)
    return buffer.getvalue()


def decode_one(
    item: InputItem,
    config: "PreprocessConfig",
    options: DecodeOptions,
    *,
    cached: "array | None" = None,
    stamp: "FileStamp | None" = None,
    budget: MemoryBudget | None = None,
) -> Decoded:
    """Read one input (only its thumbnail when its embedding is `cached`). Never raises for a bad file.
    With a `budget`, the decode waits for its estimated memory and holds it until the pixels are made."""
    if item.error is not None:
        return Decoded(item.path, error=item.error)
    if cached is not None and not options.thumbnail_size:
        return Decoded(item.path, cached=cached, stamp=stamp)
    from zsclip.core.transform import load_image

    def load(draft: int | None, reserve: Callable[[int], None] | None) -> "Image.Image":
        return load_image(
            item.path, draft_size=draft, background=config.background, reserve=reserve
        )

    return _decode_with(item.path, load, config, options, cached=cached, stamp=stamp, budget=budget)


def decode_bytes(
    name: str, data: bytes, config: "PreprocessConfig", options: DecodeOptions, max_pixels: int
) -> Decoded:
    """`decode_one` for an image already in memory (an upload to `zsclip serve`): the same decoding,
    bomb checks and one-line reasons. Never raises for bad bytes."""
    from zsclip.core.transform import load_image_bytes

    def load(draft: int | None, reserve: Callable[[int], None] | None) -> "Image.Image":
        return load_image_bytes(
            data,
            draft_size=draft,
            background=config.background,
            max_pixels=max_pixels,
            reserve=reserve,
            name=name,
        )

    return _decode_with(name, load, config, options)


def _decode_with(
    path: str,
    load: Callable[[int | None, Callable[[int], None] | None], "Image.Image"],
    config: "PreprocessConfig",
    options: DecodeOptions,
    *,
    cached: "array | None" = None,
    stamp: "FileStamp | None" = None,
    budget: MemoryBudget | None = None,
) -> Decoded:
    """Decode with `load(draft_size, reserve)`, then make the model's pixels (unless cached) and the
    thumbnail. With a `budget`, the decode waits for its estimated memory and holds it until the
    pixels are made."""
    from zsclip.core.transform import to_pixels

    try:
        with budget.holding() if budget is not None else _no_budget() as reserve:
            image = load(
                options.thumbnail_size if cached is not None else options.draft_size, reserve
            )
            # the exact path stays pixel-identical to the reference
            fast = options.draft_size is not None
            # [3, S, S] uint8
            pixels = to_pixels(image, config, resample_crop_only=fast) if cached is None else None
            thumbnail = (
                make_thumbnail(image, options.thumbnail_size) if options.thumbnail_size else None
            )
            del image  # the full-size pixels go before the budget is given back
    except InputError as err:
        return Decoded(path, error=_one_line(err))
    except MemoryError:
        return Decoded(path, error="image too large to decode in memory")
    except Exception as err:  # a decoder bug must cost one input, not the run
        return Decoded(path, error=f"cannot read image: {_one_line(err)}")
    return Decoded(path, pixels, thumbnail=thumbnail, cached=cached, stamp=stamp)


@contextmanager
def _no_budget() -> Iterator[None]:
    yield None


class _Ready:
    """A result computed inline, standing in a queue of futures."""

    def __init__(self, value) -> None:
        self.value = value

    def result(self):
        return self.value


def ordered_map(
    function: Callable[[T], R],
    items: Iterable[T],
    workers: int,
    window: int,
    inline: Callable[[T], bool] | None = None,
) -> Iterator[R]:
    """map() over `workers` threads with at most `window` results in flight, in input order. Items for
    which `inline(item)` is true are computed in the calling thread (cheap work is not worth a
    hand-off)."""
    if workers <= 0:
        yield from map(function, items)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="zsclip-decode") as pool:
        pending: deque = deque()
        for item in items:
            cheap = inline is not None and inline(item)
            pending.append(_Ready(function(item)) if cheap else pool.submit(function, item))
            while len(pending) >= window or (pending and isinstance(pending[0], _Ready)):
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _with_cache(
    items: Sequence[InputItem],
    cache: "ImageCache | None",
    chunk: int = 256,
) -> Iterator[tuple[InputItem, "array | None", "FileStamp | None"]]:
    """(item, cached embedding or None, file stamp or None), in input order; one cache query per chunk."""
    if cache is None:
        for item in items:
            yield item, None, None
        return
    from zsclip.jobs.cache import stamp

    for start in range(0, len(items), chunk):
        part = items[start : start + chunk]
        stamps = [stamp(item.path) if item.error is None else None for item in part]
        found = cache.lookup(s for s in stamps if s is not None)
        for item, file_stamp in zip(part, stamps):
            yield item, (found.get(file_stamp.path) if file_stamp is not None else None), file_stamp


def decoded_batches(
    items: Sequence[InputItem],
    config: "PreprocessConfig",
    *,
    batch_size: int,
    workers: int = 0,
    options: DecodeOptions = DecodeOptions(),
    cache: "ImageCache | None" = None,
) -> Iterator[list[Decoded]]:
    """Batches holding up to `batch_size` entries for the model (plus cached and unreadable ones), in
    order."""

    budget = MemoryBudget(
        options.memory_budget if options.memory_budget is not None else default_memory_budget()
    )

    def work(entry) -> Decoded:
        item, cached, file_stamp = entry
        return decode_one(item, config, options, cached=cached, stamp=file_stamp, budget=budget)

    def cheap(entry) -> bool:  # nothing to read from disk
        return entry[0].error is not None or (entry[1] is not None and not options.thumbnail_size)

    decoded = ordered_map(
        work,
        _with_cache(items, cache),
        workers,
        window=max(2 * batch_size, 2 * workers),
        inline=cheap,
    )
    batch: list[Decoded] = []
    for_model = 0
    for entry in decoded:
        batch.append(entry)
        for_model += entry.pixels is not None
        if for_model == batch_size or len(batch) >= MAX_BATCH_SPAN * batch_size:
            yield batch
            batch, for_model = [], 0
    if batch:
        yield batch


def encode_batches(
    model: "CLIP",
    batches: Iterable[list[Decoded]],
    *,
    device: "torch.device",
    dtype: "torch.dtype",
    preprocess: "PreprocessConfig",
    cache: "ImageCache | None" = None,
) -> Iterator[tuple[list[Decoded], "torch.Tensor"]]:
    """(batch, features): features [n, D] unit-length fp32 on the CPU, one row per readable entry, in
    order (cached entries included). New embeddings are stored in `cache`."""
    lagging = device.type == "cuda"  # let the GPU run batch k+1 while batch k's features come back
    dim = model.config.embed_dim
    previous = None
    for batch in batches:
        current = (batch, _launch(model, batch, device, dtype, preprocess))
        if previous is not None:
            yield _finish(*previous, cache, dim)
        if lagging:
            previous = current
        else:
            yield _finish(*current, cache, dim)
    if previous is not None:
        yield _finish(*previous, cache, dim)


def _launch(
    model: "CLIP",
    batch: list[Decoded],
    device: "torch.device",
    dtype: "torch.dtype",
    preprocess: "PreprocessConfig",
):
    """Start the image tower on the batch's decoded entries; returns (features on the CPU, event) or
    None."""
    import torch
    import torch.nn.functional as F

    from zsclip.core.devices import autocast
    from zsclip.core.transform import normalize

    todo = [entry.pixels for entry in batch if entry.pixels is not None]
    if not todo:
        return None
    pixels = torch.stack(todo)  # [n, 3, S, S] uint8
    for entry in batch:
        entry.pixels = None  # the stacked copy is all we need now
    cuda = device.type == "cuda"
    if cuda:
        pixels = pixels.pin_memory()  # page-locked: the copy below runs asynchronously
    with torch.inference_mode(), autocast(device, dtype):
        images = normalize(pixels.to(device, non_blocking=cuda), preprocess)  # [n, 3, S, S] float32
        features = F.normalize(model.encode_image(images).float(), dim=-1)  # [n, D]
        if not cuda:
            return features, None
        host = torch.empty(features.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(features, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
    return host, event


def _finish(
    batch: list[Decoded],
    launched,
    cache: "ImageCache | None",
    dim: int,
) -> tuple[list[Decoded], "torch.Tensor"]:
    """Wait for the batch's features, store new ones in the cache, and merge them with cached rows in
    order."""
    import torch

    fresh = None
    if launched is not None:
        fresh, event = launched
        if event is not None:
            event.synchronize()
    rows, computed, new_entries = [], 0, []
    for entry in batch:
        if not entry.readable:
            continue
        if entry.cached is not None:
            rows.append(torch.tensor(entry.cached, dtype=torch.float32))
        else:
            rows.append(fresh[computed])
            if entry.stamp is not None:
                new_entries.append((entry.stamp, fresh[computed]))
            computed += 1
        entry.cached = None
    if cache is not None and new_entries:
        from zsclip.jobs.cache import vector_to_blob

        cache.store(
            [(file_stamp, vector_to_blob(vector.tolist())) for file_stamp, vector in new_entries]
        )
    features = torch.stack(rows) if rows else torch.zeros(0, dim)
    return batch, features  # [n, D]


def default_workers() -> int:
    """Decoding threads: one per core, at most 8 (more only adds contention)."""
    import os

    cores = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )
    return max(1, min(8, cores))


@dataclass
class ImageEncoder:
    """Image files -> unit image features, the way classify, embed and search all need them: a model
    with its preprocessing, where it runs, how files are decoded, and the optional embedding cache."""

    model: "CLIP"
    preprocess: "PreprocessConfig"
    device: "torch.device"
    dtype: "torch.dtype"
    batch_size: int = 32
    workers: int = 0  # decoding threads; 0 decodes in the calling thread
    decode: DecodeOptions = DecodeOptions()  # exact by default; the CLI drafts
    cache: "ImageCache | None" = None

    def batches(self, items: Sequence[InputItem]) -> Iterator[tuple[list[Decoded], "torch.Tensor"]]:
        """(batch, features [n, D]) in input order; see `encode_batches`."""
        decoded = decoded_batches(
            items,
            self.preprocess,
            batch_size=self.batch_size,
            workers=self.workers,
            options=self.decode,
            cache=self.cache,
        )
        return encode_batches(
            self.model,
            decoded,
            device=self.device,
            dtype=self.dtype,
            preprocess=self.preprocess,
            cache=self.cache,
        )

    @classmethod
    def with_cache(
        cls,
        loaded: "LoadedModel",
        device: "torch.device",
        dtype: "torch.dtype",
        *,
        decode: DecodeOptions,
        batch_size: int = 32,
        workers: int = 0,
        use_cache: bool = True,
        warn: Callable[[str], None] = lambda message: None,
    ) -> "ImageEncoder":
        """The encoder of a loaded model, with the image-embedding cache for its preprocessing and
        precision (none when `use_cache` is off or the model has no file to identify it by)."""
        from zsclip.jobs.cache import image_cache_for

        cache = image_cache_for(loaded, decode.draft_size, dtype, enabled=use_cache, warn=warn)
        return cls(
            loaded.model,
            loaded.preprocess,
            device,
            dtype,
            batch_size=batch_size,
            workers=workers,
            decode=decode,
            cache=cache,
        )
