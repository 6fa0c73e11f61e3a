"""Streaming training data from webdataset-style tar shards: `--data 'shards/{00000..00099}.tar'`.

A shard is a plain tar file of samples that share a key, the layout img2dataset writes:

    000000001.jpg  000000001.txt  000000001.json  000000002.jpg  000000002.txt ...

The image is the first of .jpg/.jpeg/.png/.webp, the caption the .txt (UTF-8); other members are
ignored. Tar parsing and key grouping are the `webdataset` package's (pip install 'zsclip[shards]');
decoding and the split of the work are zsclip's, so they are deterministic and testable:

epoch e: the shard list is shuffled with a seed made of (seed, e), the same on every rank;
rank r of W takes shards r::W of that list, and DataLoader worker w of N takes every N-th of those,
so within an epoch every shard, hence every sample, is read by exactly one worker of exactly one
rank.
Within a worker, samples pass through a small shuffle buffer seeded by (seed, e, r, w).

A bad sample (an image that does not decode, a missing or empty caption, a damaged or missing shard)
is counted in a counter shared with the loader's workers and skipped; it never stops the run.
"""

from __future__ import annotations

import io
import multiprocessing
import random
import tarfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from zsclip.errors import InputError, UserError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# the same ceiling as zsclip.core.transform: refuse decompression bombs before decoding
MAX_PIXELS = 120_000_000


def looks_like_shards(data: str) -> bool:
    """Whether --data names tar shards (a pattern or list) rather than a pairs file."""
    return any(
        part.strip().endswith(SHARD_SUFFIXES) for part in str(data).replace("}", "").split("::")
    )


def _webdataset() -> Any:
    try:
        import webdataset
    except ImportError:
        raise UserError(
            "reading tar shards needs the webdataset package: pip install 'zsclip[shards]'"
        ) from None
    return webdataset


def expand_shards(pattern: str) -> list[str]:
    """'shards/{00000..00009}.tar' (braces, '::' between lists) -> the shard paths, each of which must
    exist."""
    wds = _webdataset()
    urls = [url for url in wds.shardlists.expand_urls(str(pattern)) if url]
    if not urls:
        raise UserError(f"--data {pattern!r} names no shards")
    missing = [url for url in urls if not Path(url).expanduser().is_file()]
    if missing:
        raise UserError(
            f"{len(missing)} of {len(urls)} shards not found (first: {missing[0]}); "
            "check the --data pattern (brace ranges like {00000..00099} are inclusive)"
        )
    return [str(Path(url).expanduser()) for url in urls]


def epoch_shards(urls: list[str], seed: int, epoch: int) -> list[str]:
    """The shard order of epoch `epoch`: a pure function of (seed, epoch), identical on every rank."""
    order = list(urls)
    random.Random(f"zsclip-shards/{seed}/{epoch}").shuffle(order)
    return order


def split(items: list[str], index: int, count: int) -> list[str]:
    """Member `index` of `count`'s share: items index, index + count, ... (disjoint, together
    complete)."""
    return items[index::count]


def count_samples(url: str) -> int:
    """Samples in one shard (keys with an image and a caption), from the tar headers alone."""
    kinds: dict[str, set[str]] = {}
    try:
        with tarfile.open(url, mode="r:*") as archive:
            for member in archive:
                directory, _, base = member.name.rpartition("/")
                if not member.isfile() or "." not in base:
                    continue
                stem, extension = base.split(
                    ".", 1
                )  # the key ends at the first dot, as webdataset groups them
                kinds.setdefault(f"{directory}/{stem}", set()).add(extension.lower())
    except (tarfile.TarError, OSError):
        # a damaged shard: count what could be read; its bad part is skipped (and counted) at read
        # time
        pass
    return sum(1 for found in kinds.values() if "txt" in found and found & set(IMAGE_EXTENSIONS))


def read_captions(url: str) -> list[str]:
    """The .txt captions of one shard (for learning a vocabulary), without decoding any image."""
    captions = []
    try:
        with tarfile.open(url, mode="r:*") as archive:
            for member in archive:
                if member.isfile() and member.name.lower().endswith(".txt"):
                    handle = archive.extractfile(member)
                    text = handle.read().decode("utf-8", errors="replace").strip() if handle else ""
                    if text:
                        captions.append(text)
    except (tarfile.TarError, OSError):
        pass  # a damaged shard: the captions read so far
    return captions


class SkipCounter:
    """A count of skipped samples, shared between the training process and its loader workers."""

    def __init__(self) -> None:
        self._value = multiprocessing.get_context().Value("q", 0)

    def add(self, n: int = 1) -> None:
        with self._value.get_lock():
            self._value.value += n

    @property
    def value(self) -> int:
        return int(self._value.value)


def decode_sample(sample: dict[str, Any], preprocess: Any) -> tuple[torch.Tensor, str]:
    """One grouped tar sample -> (pixels uint8 [3, S, S], caption); InputError with a reason if
    unusable.

    Like zsclip.train.data.PairDataset, it leaves normalisation to zsclip.train.data.Collate (a
    quarter of the bytes between loader workers and the training process).
    """
    from zsclip.core.transform import to_pixels

    image_key = next((key for key in IMAGE_EXTENSIONS if key in sample), None)
    if image_key is None or "txt" not in sample:
        raise InputError(
            f"{sample.get('__key__')}: needs an image (.jpg/.png/.webp) and a caption (.txt)"
        )
    try:
        caption = sample["txt"].decode("utf-8").strip()
    except UnicodeDecodeError:
        raise InputError(f"{sample.get('__key__')}: caption is not UTF-8") from None
    if not caption:
        raise InputError(f"{sample.get('__key__')}: empty caption")
    return to_pixels(_open_image(sample[image_key], preprocess.background), preprocess), caption


def _open_image(data: bytes, background: tuple[int, int, int]) -> Any:
    from PIL import Image, ImageOps

    from zsclip.core.transform import to_rgb

    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_PIXELS:
                raise InputError(f"image too large ({image.width}x{image.height})")
            image.load()
            return to_rgb(ImageOps.exif_transpose(image), background)
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - PIL raises many types for bad bytes; one bad sample never stops a run
        raise InputError(f"image does not decode ({type(err).__name__})") from None


class ShardDataset(torch.utils.data.IterableDataset):
    """(pixels uint8 [3, S, S], caption) from this rank's shards of the current epoch, split across
    loader workers."""

    def __init__(
        self,
        urls: list[str],
        preprocess: Any,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 256,
        skipped: SkipCounter | None = None,
    ) -> None:
        self.urls, self.preprocess = list(urls), preprocess
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle_buffer = shuffle_buffer
        self.skipped = skipped if skipped is not None else SkipCounter()
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Like DistributedSampler.set_epoch: call before iterating; takes effect in workers started
        after."""
        self.epoch = epoch

    def worker_shards(self, worker: int = 0, workers: int = 1) -> list[str]:
        mine = split(epoch_shards(self.urls, self.seed, self.epoch), self.rank, self.world_size)
        return split(mine, worker, workers)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, str]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shards = self.worker_shards(worker, workers)
        rng = random.Random(f"zsclip-samples/{self.seed}/{self.epoch}/{self.rank}/{worker}")
        return _buffer_shuffle(self._decoded(shards), self.shuffle_buffer, rng)

    def _decoded(self, shards: list[str]) -> Iterator[tuple[torch.Tensor, str]]:
        wds = _webdataset()
        samples = wds.tariterators.tarfile_samples(
            [{"url": url} for url in shards], handler=self._on_error
        )
        for sample in samples:
            try:
                yield decode_sample(sample, self.preprocess)
            except InputError:
                self.skipped.add()

    def _on_error(self, error: Exception) -> bool:
        """webdataset's handler for tar-level errors (a missing or damaged shard): count it, go on."""
        self.skipped.add()
        return True


def _buffer_shuffle(items: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Shuffle a stream with a buffer of `size` items (0 or 1: in order)."""
    if size <= 1:
        yield from items
        return
    buffer: list[Any] = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= size:
            yield buffer.pop(rng.randrange(len(buffer)))
    rng.shuffle(buffer)
    yield from buffer


def rebatch(
    chunks: Iterable[tuple[torch.Tensor, torch.Tensor]], size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of exactly `size` from worker batches of any size ([n, ...] tensors); the remainder is
    dropped.

    Workers each batch their own stream, so their last batches come short; joining them here keeps
    every sample of the epoch instead of dropping a partial batch per worker.
    """
    images: list[torch.Tensor] = []
    tokens: list[torch.Tensor] = []
    held = 0
    for chunk_images, chunk_tokens in chunks:
        images.append(chunk_images)
        tokens.append(chunk_tokens)
        held += chunk_images.shape[0]
        while held >= size:
            all_images, all_tokens = torch.cat(images), torch.cat(tokens)
            yield all_images[:size], all_tokens[:size]
            images, tokens = [all_images[size:]], [all_tokens[size:]]
            held -= size


def loader(
    dataset: ShardDataset,
    epoch: int,
    chunk: int,
    workers: int,
    collate: Callable[[list], tuple[torch.Tensor, torch.Tensor]],
) -> torch.utils.data.DataLoader:
    """A DataLoader over this rank's shards of `epoch`: each worker yields batches of up to `chunk`."""
    dataset.set_epoch(epoch)
    return torch.utils.data.DataLoader(
        dataset, batch_size=chunk, num_workers=workers, collate_fn=collate, persistent_workers=False
    )


def epoch_stream(
    dataset: ShardDataset,
    epoch: int,
    batch: int,
    needed: int,
    skip: int,
    workers: int,
    collate: Callable[[list], tuple[torch.Tensor, torch.Tensor]],
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`needed` batches of `batch` for this rank in `epoch`, after skipping `skip` samples (a resumed
    run).

    Every rank must take the same number of steps, but shards need not hold equal numbers of
    samples: a rank whose shards run out (fewer or more bad samples than the others) starts its
    share of the epoch again, so a few of its samples repeat. With equal shards and a shard count
    divisible by the number of ranks, nothing repeats.
    """
    produced, passes = 0, 0
    while produced < needed:
        fresh = 0
        for images, tokens in rebatch(
            _skipping(loader(dataset, epoch, batch, workers, collate), skip), batch
        ):
            fresh += 1
            produced += 1
            yield images, tokens
            if produced >= needed:
                return
        skip, passes = 0, passes + 1
        if fresh == 0 and passes > 1:
            raise UserError(
                f"rank {dataset.rank} found fewer usable samples than one batch in its shards of epoch "
                f"{epoch} ({dataset.skipped.value} bad samples skipped); check the shards"
            )


def _skipping(
    chunks: Iterable[tuple[torch.Tensor, torch.Tensor]], skip: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for images, tokens in chunks:
        if skip >= images.shape[0]:
            skip -= images.shape[0]
            continue
        yield images[skip:], tokens[skip:]
        skip = 0
