"""Image-caption pairs for training: reading and checking pairs files, the dataset, and the epoch
order.

A pairs file is `image<TAB>caption` per line (.tsv or .txt), a .csv with the same two columns, or
.jsonl with {"image": ..., "caption": ...} objects; a header row is optional, and so is a UTF-8
byte-order mark. Relative image paths are resolved against the pairs file's folder. Every problem is
reported with its line number before training starts: each image is decoded once, completely, as
training will decode it, so a truncated file or a pixel flood is found here and not at step 0.
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


# problems listed one per line before the summary; the rest are counted
SHOWN_PROBLEMS = 50


class DataError(UserError):
    """The pairs file has problems; `problems` lists them, one line each, with line numbers."""

    def __init__(self, source: Path, problems: list[str], hint: str) -> None:
        super().__init__(f"{len(problems)} problem(s) in {source} (listed above); {hint}")
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
    # utf-8-sig: a byte-order mark (Excel, Notepad) must not glue itself to the header's first word
    with path.open("r", encoding="utf-8-sig", newline="") as handle:
        if delimiter == ",":
            reader = csv.reader(handle)
            for fields in reader:
                yield reader.line_num, fields, None
            return
        for number, text in enumerate(handle, start=1):
            text = text.rstrip("\r\n")
            yield number, (text.split("\t", 1) if text.strip() else []), None


def _rows_jsonl(path: Path) -> Iterator[tuple[int, list[str] | None, str | None]]:
    with path.open("r", encoding="utf-8-sig") as handle:
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


def read_pairs(path: Path, option: str = "--data") -> tuple[list[Pair], list[str]]:
    """Parse a pairs file without touching the images. Returns (pairs, problems as 'file:line:
    reason'). `option` names the command-line option that gave the file, for the not-found message."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"pairs file not found: {path}; give {option} a .tsv, .csv or .jsonl of image and caption"
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
    """Keep the pairs whose image decodes completely, as training decodes it
    (zsclip.core.transform.load_image: whole file, pixel limit, EXIF, RGB); report the others.

    A header alone passes truncated files and pixel floods, which would then stop training at its
    first step. Decoding runs in a few threads (Pillow releases the GIL while it decodes), a chunk of
    pairs at a time so that no more than a chunk of work is queued.
    """
    from concurrent.futures import ThreadPoolExecutor

    good: list[Pair] = []
    problems: list[str] = []
    with ThreadPoolExecutor(max_workers=_check_threads()) as pool:
        for start in range(0, len(pairs), CHECK_CHUNK):
            chunk = pairs[start : start + CHECK_CHUNK]
            for pair, reason in zip(chunk, pool.map(_image_problem, chunk)):
                if reason:
                    problems.append(f"{source.name}:{pair.line}: {reason}")
                else:
                    good.append(pair)
    return good, problems


CHECK_CHUNK = 1024  # pairs queued at once in the decode check


def _check_threads() -> int:
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(8, cores or 1))


def _image_problem(pair: Pair) -> str | None:
    """None if the pair's image decodes; else a one-line reason naming the file."""
    from zsclip.core.transform import load_image
    from zsclip.errors import InputError

    if not pair.image.is_file() and not pair.image.is_symlink():
        return f"image not found: {pair.image}"
    try:
        # draft_size=1: a JPEG is decoded at its smallest DCT scale. Every byte of the compressed
        # stream is still read and entropy-decoded (a truncated or corrupt file fails as it would at
        # full size); only the final inverse transform is smaller, several times faster for photos.
        load_image(pair.image, draft_size=1).close()
    except InputError as err:
        return f"unreadable image {pair.image} ({err})"
    except Exception as err:  # noqa: BLE001 - a decoder bug must cost one row, not the run
        return f"unreadable image {pair.image} ({type(err).__name__})"
    return None


def load_pairs(
    path: Path,
    *,
    skip_missing: bool = False,
    warn: Callable[[str], None] | None = None,
    option: str = "--data",
    hint: str = "fix them or pass --skip-missing to train without those rows",
) -> list[Pair]:
    """Read and check a pairs file. Problems stop the run (DataError) unless skip_missing, which drops
    those rows and reports each one (with its line number) through `warn`."""
    path = Path(path)
    pairs, problems = read_pairs(path, option)
    pairs, image_problems = check_images(pairs, path)
    problems += image_problems
    problems.sort(key=lambda problem: _line_of(problem, path.name))
    if problems and not skip_missing:
        raise DataError(path, problems, hint)
    if problems and warn:
        for problem in problems[:SHOWN_PROBLEMS]:
            warn(f"{problem} (skipped)")
        if len(problems) > SHOWN_PROBLEMS:
            warn(f"... and {len(problems) - SHOWN_PROBLEMS} more")
        warn(f"skipping {len(problems)} bad row(s) of {path} (--skip-missing)")
    if not pairs:
        raise UserError(f"{path} has no usable image-caption pairs")
    return pairs


def _line_of(problem: str, name: str) -> int:
    """The line number of a 'NAME:LINE: reason' problem (they are listed in file order)."""
    number = problem[len(name) + 1 :].split(":", 1)[0]
    return int(number) if number.isdigit() else 0


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
        except InputError as err:  # decoded in the check before training; changed since
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
