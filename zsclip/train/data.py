"""Image-caption pairs for training: reading and checking pairs files, the dataset, and the epoch
order.

A pairs file is `image<TAB>caption` per line (.tsv or .txt), a .csv with the same two columns, or
.jsonl with {"image": ..., "caption": ...} objects; a header row is optional. Relative image paths
are resolved against the pairs file's folder. Every problem is reported with its line number before
training starts.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from zsclip.errors import UserError

IMAGE_KEYS = ("image", "path", "filepath", "file", "filename", "img", "image_path", "url")
CAPTION_KEYS = ("caption", "text", "title", "captions", "label")


@dataclass(frozen=True)
class Pair:
    line: int  # 1-based line of the pairs file (for messages)
    image: Path
    caption: str


class DataError(UserError):
    """The pairs file has problems; `problems` lists them, one line each, with line numbers."""

    def __init__(self, source: Path, problems: list[str]) -> None:
        super().__init__(
            f"{len(problems)} problem(s) in {source} (listed above); fix them or pass --skip-missing "
            "to train without those rows"
        )
        self.problems = problems


def _is_header(fields: list[str]) -> bool:
    return (
        len(fields) >= 2
        and fields[0].strip().lower() in IMAGE_KEYS
        and fields[1].strip().lower() in CAPTION_KEYS
    )


def _rows_delimited(
    path: Path, delimiter: str
) -> Iterator[tuple[int, list[str] | None, str | None]]:
    with path.open("r", encoding="utf-8", newline="") as handle:
        if delimiter == ",":
            reader = csv.reader(handle)
            for fields in reader:
                yield reader.line_num, fields, None
            return
        for number, text in enumerate(handle, start=1):
            text = text.rstrip("\r\n")
            yield number, (text.split("\t", 1) if text.strip() else []), None


def _rows_jsonl(path: Path) -> Iterator[tuple[int, list[str] | None, str | None]]:
    with path.open("r", encoding="utf-8") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                yield number, [], None
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as err:
                yield number, None, f"not valid JSON ({err.msg})"
                continue
            if not isinstance(obj, dict):
                yield number, None, "expected a JSON object with image and caption"
                continue
            image = next((obj[k] for k in IMAGE_KEYS if isinstance(obj.get(k), str)), None)
            text_value = next((obj[k] for k in CAPTION_KEYS if isinstance(obj.get(k), str)), None)
            if image is None or text_value is None:
                yield number, None, "needs string fields 'image' and 'caption'"
                continue
            yield number, [image, text_value], None


def read_pairs(path: Path) -> tuple[list[Pair], list[str]]:
    """Parse a pairs file without touching the images. Returns (pairs, problems as 'file:line:
    reason')."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"pairs file not found: {path}; give --data a .tsv, .csv or .jsonl of image and caption"
        )
    suffix = path.suffix.lower()
    rows = (
        _rows_jsonl(path)
        if suffix == ".jsonl"
        else _rows_delimited(path, "," if suffix == ".csv" else "\t")
    )
    pairs: list[Pair] = []
    problems: list[str] = []
    first, number = True, 0
    try:
        for number, fields, problem in rows:
            if problem is None and fields == []:
                continue  # blank line
            if problem is None and first and _is_header(fields or []):
                first = False
                continue
            first = False
            if problem is None:
                problem = _check_fields(fields or [])
            if problem is not None:
                problems.append(f"{path.name}:{number}: {problem}")
                continue
            image, caption = fields[0].strip(), fields[1].strip()  # type: ignore[index]
            resolved = Path(image).expanduser()
            pairs.append(
                Pair(
                    number, resolved if resolved.is_absolute() else path.parent / resolved, caption
                )
            )
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; save the pairs file as UTF-8") from None
    except csv.Error as err:  # e.g. a field longer than the csv module's limit (128 KiB)
        raise UserError(f"{path} is not valid CSV after line {number}: {err}") from None
    return pairs, problems


def _check_fields(fields: list[str]) -> str | None:
    if len(fields) < 2:
        return "expected image<TAB>caption (two fields)"
    if len(fields) > 2:
        return f"expected two fields, found {len(fields)}"
    if not fields[0].strip():
        return "empty image path"
    if not fields[1].strip():
        return "empty caption"
    return None


def check_images(pairs: list[Pair], source: Path) -> tuple[list[Pair], list[str]]:
    """Keep the pairs whose image exists and opens as an image (header only: cheap); report the others."""
    from PIL import Image, UnidentifiedImageError

    good: list[Pair] = []
    problems: list[str] = []
    for pair in pairs:
        reason = None
        if not pair.image.is_file():
            reason = f"image not found: {pair.image}"
        else:
            try:
                with Image.open(pair.image) as image:
                    if image.width < 1 or image.height < 1:
                        reason = f"empty image: {pair.image}"
            except (UnidentifiedImageError, OSError) as err:
                reason = f"unreadable image {pair.image} ({type(err).__name__})"
        if reason:
            problems.append(f"{source.name}:{pair.line}: {reason}")
        else:
            good.append(pair)
    return good, problems


def load_pairs(
    path: Path, *, skip_missing: bool = False, warn: Callable[[str], None] | None = None
) -> list[Pair]:
    """Read and check a pairs file. Problems stop the run (DataError) unless skip_missing, which drops
    them."""
    path = Path(path)
    pairs, problems = read_pairs(path)
    pairs, image_problems = check_images(pairs, path)
    problems += image_problems
    if problems and not skip_missing:
        raise DataError(path, problems)
    if problems and warn:
        warn(f"skipping {len(problems)} bad row(s) of {path} (--skip-missing)")
    if not pairs:
        raise UserError(f"{path} has no usable image-caption pairs")
    return pairs


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of epoch `epoch`: a pure function of (seed, epoch), so a resumed run sees the
    same."""
    order = list(range(n))
    random.Random(f"zsclip-epoch/{seed}/{epoch}").shuffle(order)
    return order


def epoch_batches(
    n: int, batch_size: int, seed: int, epoch: int, start: int = 0
) -> list[list[int]]:
    """Full batches of epoch `epoch` from batch number `start` on (the last partial batch is dropped)."""
    order = epoch_order(n, seed, epoch)
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(start, n // batch_size)]


class PairDataset(torch.utils.data.Dataset):
    """(pixels uint8 [3, S, S], caption) per pair, resized and cropped as zsclip.core.transform does;
    Collate normalises a whole batch at once.

    Decoded pixels are kept in memory when `cache` is set (about 3*S*S bytes per image), so epochs
    after the first skip decoding; the kept pixels are exactly what `transform.to_tensor` would give
    again.
    """

    def __init__(self, pairs: list[Pair], preprocess: Any, cache: bool = False) -> None:
        self.pairs = pairs
        self.preprocess = preprocess  # transform.PreprocessConfig
        self.cache: dict[int, torch.Tensor] | None = {} if cache else None
        self._mean = torch.tensor(preprocess.mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(preprocess.std, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        if self.cache is not None and index in self.cache:
            return self.cache[index], self.pairs[index].caption
        from zsclip.core.transform import load_image, to_tensor
        from zsclip.errors import InputError

        pair = self.pairs[index]
        try:
            image = load_image(pair.image, background=self.preprocess.background)
        except InputError as err:  # passed the header check before training, but does not decode
            raise UserError(
                f"line {pair.line}: image {pair.image} cannot be decoded ({err}); fix or remove that "
                "row, then continue with --resume"
            ) from None
        normalised = to_tensor(image, self.preprocess)
        # Undo the normalisation: to_tensor's pixels were whole numbers / 255, so rounding recovers
        # them exactly.
        pixels = (
            ((normalised * self._std + self._mean) * 255).round_().clamp_(0, 255).to(torch.uint8)
        )
        if self.cache is not None:
            self.cache[index] = pixels
        return pixels, pair.caption


def normalise(pixels: torch.Tensor, preprocess: Any) -> torch.Tensor:
    """uint8 [B, 3, S, S] -> float [B, 3, S, S], the same arithmetic as transform.to_tensor."""
    mean = torch.tensor(preprocess.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.std, dtype=torch.float32).view(1, 3, 1, 1)
    return (pixels.to(torch.float32) / 255.0 - mean) / std


class Collate:
    """Stack, normalise and tokenize one batch: ([B, 3, S, S] float, [B, L] long)."""

    def __init__(self, tokenizer: Any, context_length: int, preprocess: Any) -> None:
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.preprocess = preprocess

    def __call__(self, items: list[tuple[torch.Tensor, str]]) -> tuple[torch.Tensor, torch.Tensor]:
        images = normalise(
            torch.stack([pixels for pixels, _ in items]), self.preprocess
        )  # [B, 3, S, S]
        tokens = self.tokenizer(
            [caption for _, caption in items], context_length=self.context_length
        )  # [B, L]
        return images, tokens
