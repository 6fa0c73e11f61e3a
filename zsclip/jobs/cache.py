"""On-disk caches that make a second run cheap, kept under zsclip.paths.cache_dir() ($ZSCLIP_CACHE)
beside the downloads:

    classifiers/<key>.safetensors   one [D, C] zero-shot classifier per (model file, tokenizer, labels, templates,
                                    precision); written atomically, so a reader sees a whole file or none
    images.sqlite3                  one fp32 image embedding per (model file, preprocessing, precision, absolute
                                    path), valid while the file's size and mtime_ns are unchanged

A model is identified by its file(s): resolved path, size and mtime_ns (hashing 600 MB on every run
would cost more than it saves). Overwriting a checkpoint in place changes its mtime, so stale
entries are never used.

The image cache is SQLite in WAL mode: readers never block, writers take turns (busy timeout), and a
crash mid-write rolls back, so two zsclip processes can share it. A cache that cannot be opened or
written (read-only disk, damaged file) is reported once through the `warn` callback and the run goes
on without it. Nothing here prints: the terminal layer supplies `warn`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import sys
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Optional, Sequence

from zsclip.paths import cache_dir

if TYPE_CHECKING:
    import torch

    from zsclip.core.checkpoints import LoadedModel
    from zsclip.jobs.pipeline import DecodeOptions

Warn = Callable[[str], None]

IMAGE_DB = "images.sqlite3"
CLASSIFIER_DIR = "classifiers"
_LOOKUP_CHUNK = 500  # paths per SELECT ... IN (...): well under SQLite's variable limit
_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    variant  TEXT    NOT NULL,  -- model file + preprocessing + precision (see image_variant)
    path     TEXT    NOT NULL,  -- absolute path of the image (a BLOB of its bytes when not UTF-8)
    size     INTEGER NOT NULL,  -- st_size when it was encoded
    mtime_ns INTEGER NOT NULL,  -- st_mtime_ns when it was encoded
    vector   BLOB    NOT NULL,  -- float32, native byte order, unit length
    PRIMARY KEY (variant, path)
) WITHOUT ROWID
"""


def _digest(data: object) -> str:
    return hashlib.sha256(
        json.dumps(data, sort_keys=True, ensure_ascii=False).encode()
    ).hexdigest()[:32]


def model_identity(path: Optional[Path]) -> Optional[str]:
    """A short key for a checkpoint file or folder (every file in it): path, size, mtime_ns. None if
    unknown."""
    if path is None:
        return None
    try:
        path = Path(path).resolve()
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    except OSError:
        return None
    return _digest(stats)


def image_variant(
    model_id: str, preprocess: dict, draft_size: Optional[int], precision: str
) -> str:
    """Everything besides the image file that decides its embedding."""
    return _digest(
        {
            "model": model_id,
            "preprocess": preprocess,
            "draft_size": draft_size,
            "precision": precision,
            "byteorder": sys.byteorder,
        }
    )  # vectors are stored as native floats


def classifier_key(
    model_id: str,
    tokenizer_meta: dict[str, str],
    labels: Sequence[str],
    templates: Sequence[str],
    precision: str,
    context_length: int,
) -> str:
    return _digest(
        {
            "model": model_id,
            "tokenizer": _digest(tokenizer_meta),
            "labels": list(labels),
            "templates": list(templates),
            "precision": precision,
            "context": context_length,
        }
    )


# ------------------------------------------------------------------------------------------- label
# classifiers


def classifier_path(key: str, root: Optional[Path] = None) -> Path:
    return (root or cache_dir()) / CLASSIFIER_DIR / f"{key}.safetensors"


def load_classifier(
    key: str, expected_shape: tuple[int, int], root: Optional[Path] = None
) -> "torch.Tensor | None":
    """The cached [D, C] classifier, or None when absent, unreadable or of another shape."""
    path = classifier_path(key, root)
    if not path.is_file():
        return None
    try:
        from safetensors.torch import load_file

        weights = load_file(path)["classifier"]
    except Exception:  # a damaged entry is a miss; it is rewritten below
        return None
    return weights.clone() if tuple(weights.shape) == expected_shape else None


def save_classifier(
    key: str,
    weights: "torch.Tensor",
    labels: Sequence[str],
    root: Optional[Path] = None,
    warn: Optional[Warn] = None,
) -> None:
    """Write atomically (temporary file, then rename): a concurrent reader sees the old entry or the
    new one."""
    from zsclip.core.safetensors_io import write_safetensors

    try:
        write_safetensors(
            classifier_path(key, root),
            {"classifier": weights.float().contiguous()},
            {"labels": json.dumps(list(labels), ensure_ascii=False)},
        )
    except OSError as err:
        if warn is not None:
            warn(
                f"cannot write the classifier cache ({err.strerror or err}); labels will be encoded again next time"
            )


# ------------------------------------------------------------------------------------------- image
# embeddings


@dataclass(frozen=True)
class FileStamp:
    """What identifies one version of an image file: its absolute path, size and modification time."""

    path: str
    size: int
    mtime_ns: int


def stamp(path: str) -> Optional[FileStamp]:
    """The file's stamp, or None when it cannot be stat'ed (the decoder then reports why)."""
    try:
        info = os.stat(path)
    except (OSError, ValueError):
        return None
    return FileStamp(os.path.abspath(path), info.st_size, info.st_mtime_ns)


def _path_key(path: str) -> str | bytes:
    """How a path is stored: as text, or, when its name is not valid UTF-8 (Python carries those bytes
    as surrogates), as its exact bytes. SQLite keeps a BLOB as is even in a TEXT column, and a BLOB
    never equals a text, so the two cannot collide."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(path)
    return path


def vector_to_blob(values: Sequence[float]) -> bytes:
    return array("f", values).tobytes()


def blob_to_vector(blob: bytes) -> array:
    values = array("f")
    values.frombytes(blob)
    return values


class ImageCache:
    """Image embeddings for one variant (model + preprocessing + precision), looked up by FileStamp."""

    def __init__(
        self,
        variant: str,
        root: Optional[Path] = None,
        *,
        warn: Optional[Warn] = None,
        timeout: float = 60.0,
    ) -> None:
        self.variant = variant
        self.path = (root or cache_dir()) / IMAGE_DB
        self.hits = 0
        self.stored = 0
        self._warn = warn
        self._connection: Optional[sqlite3.Connection] = None
        self._broken = False
        self._timeout = timeout

    def _connect(self) -> Optional[sqlite3.Connection]:
        if self._connection is None and not self._broken:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                connection = sqlite3.connect(
                    self.path, timeout=self._timeout, isolation_level=None, check_same_thread=False
                )
                connection.execute("PRAGMA journal_mode=WAL")
                connection.execute(
                    "PRAGMA synchronous=NORMAL"
                )  # WAL: durable at checkpoints, never corrupt
                connection.execute(_SCHEMA)
                self._connection = connection
            except (OSError, sqlite3.Error) as err:
                self._fail(
                    f"cannot open the image cache {self.path} ({err}); continuing without it"
                )
        return self._connection

    def _fail(self, message: str) -> None:
        self._broken = True
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        if self._warn is not None:
            self._warn(message)

    def lookup(self, stamps: Iterable[FileStamp]) -> dict[str, array]:
        """{absolute path: fp32 vector} for the stamps whose file is unchanged since it was stored."""
        wanted = {s.path: s for s in stamps}
        connection = self._connect()
        if connection is None or not wanted:
            return {}
        found: dict[str, array] = {}
        by_key = {_path_key(path): path for path in wanted}
        keys = list(by_key)
        try:
            for start in range(0, len(keys), _LOOKUP_CHUNK):
                chunk = keys[start : start + _LOOKUP_CHUNK]
                rows = connection.execute(
                    f"SELECT path, size, mtime_ns, vector FROM images WHERE variant = ? "
                    f"AND path IN ({','.join('?' * len(chunk))})",
                    [self.variant, *chunk],
                ).fetchall()
                for key, size, mtime_ns, blob in rows:
                    path = by_key[key]
                    current = wanted[path]
                    if current.size == size and current.mtime_ns == mtime_ns:
                        found[path] = blob_to_vector(blob)
        except sqlite3.Error as err:
            self._fail(f"cannot read the image cache {self.path} ({err}); continuing without it")
            return {}
        self.hits += len(found)
        return found

    def store(self, entries: Sequence[tuple[FileStamp, bytes]]) -> None:
        """Insert or replace (a modified file's old entry is overwritten), all in one transaction."""
        connection = self._connect()
        if connection is None or not entries:
            return
        rows = [(self.variant, _path_key(s.path), s.size, s.mtime_ns, blob) for s, blob in entries]
        try:
            connection.execute(
                "BEGIN IMMEDIATE"
            )  # take the write lock now: no deadlock upgrading a read
            connection.executemany("INSERT OR REPLACE INTO images VALUES (?, ?, ?, ?, ?)", rows)
            connection.execute("COMMIT")
            self.stored += len(rows)
        except sqlite3.Error as err:
            try:
                connection.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            self._fail(f"cannot write the image cache {self.path} ({err}); continuing without it")

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def image_cache_for(
    loaded: "LoadedModel",
    decode: "DecodeOptions",
    dtype: "torch.dtype",
    *,
    enabled: bool = True,
    warn: Warn = lambda message: None,
) -> "ImageCache | None":
    """The image-embedding cache for this model, preprocessing and precision; None when disabled or
    when the model has no file to identify it by."""
    if not enabled:
        return None
    from zsclip.core.devices import precision_name

    model_id = model_identity(loaded.path)
    if model_id is None:
        return None
    variant = image_variant(
        model_id, loaded.preprocess.to_dict(), decode.draft_size, precision_name(dtype)
    )
    return ImageCache(variant, warn=warn)
