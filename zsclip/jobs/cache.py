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
crash mid-write rolls back, so two zsclip processes can share it. Everything read from it is checked:
a row whose vector has the wrong length for the model, is not finite or not unit length is dropped,
computed again and replaced; a file that is not a database (or a damaged one) is reported once with the
command that removes it, and the run goes on without it. A cache that can be read but not written (a
read-only file or folder) is still read; nothing new is stored. Each of these is reported once through
the `warn` callback. Nothing here prints: the terminal layer supplies `warn`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shlex
import sqlite3
import sys
import urllib.parse
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Optional, Sequence

from zsclip.paths import cache_dir

if TYPE_CHECKING:
    import torch

    from zsclip.core.checkpoints import LoadedModel

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
            # 2: the draft path also box-averages large non-JPEG images (transform.reduce_factor)
            "decoder": 2,
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


def _valid_vector(blob: object, dim: Optional[int]) -> Optional[array]:
    """The stored vector, or None when the row is damaged: not bytes, not whole float32 values, the
    wrong length for this model (`dim`), a value that is not finite, or (with `dim`) not unit
    length."""
    if not isinstance(blob, bytes) or not blob or len(blob) % 4:
        return None
    if dim is not None and len(blob) != 4 * dim:
        return None
    values = blob_to_vector(blob)
    norm2 = math.fsum(v * v for v in values)  # nan or inf when any value is
    if not math.isfinite(norm2) or (dim is not None and abs(norm2 - 1.0) > _UNIT_TOLERANCE):
        return None
    return values


# Stored vectors are fp32 unit vectors: |v|^2 is 1 to ~1e-6 (D roundings of 2^-24); a damaged row
# is far from it.
_UNIT_TOLERANCE = 1e-3
# SQLite's result codes for a file that is not a database or a damaged one.
_DAMAGED_CODES = {"SQLITE_NOTADB", "SQLITE_CORRUPT"}
_DAMAGED_WORDS = ("not a database", "malformed", "no such column", "no such table")


def _is_damage(err: BaseException) -> bool:
    """True when the error says the file itself is damaged (not: locked, read-only, disk full)."""
    name = getattr(err, "sqlite_errorname", "") or ""  # Python 3.11+; e.g. SQLITE_CORRUPT_INDEX
    primary = "_".join(name.split("_")[:2])
    return primary in _DAMAGED_CODES or any(word in str(err) for word in _DAMAGED_WORDS)


class ImageCache:
    """Image embeddings for one variant (model + preprocessing + precision), looked up by FileStamp.

    `dim`: the model's embedding size; rows of another length (or not unit length, or not finite) are
    damaged: they are dropped (reported once), computed again and replaced. A cache that can be read
    but not written (a read-only file or folder) is still read; nothing new is stored in it.
    """

    def __init__(
        self,
        variant: str,
        root: Optional[Path] = None,
        *,
        warn: Optional[Warn] = None,
        timeout: float = 60.0,
        dim: Optional[int] = None,
    ) -> None:
        self.variant = variant
        self.path = (root or cache_dir()) / IMAGE_DB
        self.dim = dim
        self.hits = 0
        self.stored = 0
        self.damaged = 0  # rows dropped as damaged (see _valid_vector)
        self.read_only = False  # opened or fallen back to reading only
        self._warn = warn
        self._connection: Optional[sqlite3.Connection] = None
        self._broken = False
        self._timeout = timeout

    def _connect(self) -> Optional[sqlite3.Connection]:
        if self._connection is None and not self._broken:
            try:
                self._connection = self._open_read_write()
            except (OSError, sqlite3.Error, ValueError) as err:  # ValueError: an unencodable path
                if _is_damage(err):
                    self._fail(self._damaged_message(err))
                    return None
                self._connection = self._open_read_only()
                if self._connection is None:
                    self._fail(
                        f"cannot open the image cache {self.path} ({err}); continuing without it"
                    )
                else:
                    self._note_read_only(err)
        return self._connection

    def _open_read_write(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(
            self.path, timeout=self._timeout, isolation_level=None, check_same_thread=False
        )
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            # WAL: durable at checkpoints, never corrupt
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.execute(_SCHEMA)
        except sqlite3.Error:
            connection.close()
            raise
        return connection

    def _open_read_only(self) -> Optional[sqlite3.Connection]:
        """A connection that only reads, for a cache file zsclip may not write: `mode=ro` first; then
        `immutable=1`, which SQLite needs to read a WAL database in a folder it cannot write (no
        shared-memory file can be made there)."""
        if not self.path.is_file():
            return None
        location = "file:" + urllib.parse.quote(os.fsencode(self.path.resolve()))
        for flags in ("mode=ro", "mode=ro&immutable=1"):
            try:
                connection = sqlite3.connect(
                    f"{location}?{flags}",
                    uri=True,
                    timeout=self._timeout,
                    isolation_level=None,
                    check_same_thread=False,
                )
            except sqlite3.Error:
                continue
            try:
                connection.execute("SELECT path, size, mtime_ns, vector FROM images LIMIT 1")
                return connection
            except sqlite3.Error:
                connection.close()
        return None

    def _note_read_only(self, err: BaseException) -> None:
        self.read_only = True
        if self._warn is not None:
            self._warn(
                f"the image cache {self.path} cannot be written ({err}); "
                "reading it, storing nothing new"
            )

    def _damaged_message(self, err: BaseException) -> str:
        files = " ".join(shlex.quote(f"{self.path}{end}") for end in ("", "-wal", "-shm"))
        return (
            f"the image cache {self.path} is damaged ({err}); continuing without it. "
            f"Remove it to start a new one: rm -f {files}"
        )

    def _fail(self, message: str) -> None:
        self._broken = True
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        if self._warn is not None:
            self._warn(message)

    def lookup(self, stamps: Iterable[FileStamp]) -> dict[str, array]:
        """{absolute path: fp32 vector} for the stamps whose file is unchanged since it was stored.
        Damaged rows are left out (so they are computed again) and reported once."""
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
                    path = by_key.get(key)
                    current = wanted.get(path) if path is not None else None
                    if current is None or current.size != size or current.mtime_ns != mtime_ns:
                        continue
                    vector = _valid_vector(blob, self.dim)
                    if vector is None:
                        self._damaged_row(path, blob)
                    else:
                        found[path] = vector
        except sqlite3.Error as err:
            # a file only read (immutable) may be changing under us: not proof of damage
            damaged = _is_damage(err) and not self.read_only
            self._fail(
                self._damaged_message(err)
                if damaged
                else f"cannot read the image cache {self.path} ({err}); continuing without it"
            )
            return {}
        self.hits += len(found)
        return found

    def _damaged_row(self, path: str, blob: object) -> None:
        self.damaged += 1
        if self.damaged == 1 and self._warn is not None:
            size = f"{len(blob)} bytes" if isinstance(blob, bytes) else type(blob).__name__
            expected = f", expected {4 * self.dim}" if self.dim is not None else ""
            self._warn(
                f"the image cache {self.path} holds a damaged embedding for {path!r} "
                f"({size}{expected}, or values that are not a unit vector); damaged entries are "
                "computed again and replaced"
            )

    def store(self, entries: Sequence[tuple[FileStamp, bytes]]) -> None:
        """Insert or replace (a modified file's old entry is overwritten), all in one transaction."""
        connection = self._connect()
        if connection is None or not entries or self.read_only:
            return
        rows = [(self.variant, _path_key(s.path), s.size, s.mtime_ns, blob) for s, blob in entries]
        try:
            # take the write lock now: no deadlock upgrading a read
            connection.execute("BEGIN IMMEDIATE")
            connection.executemany("INSERT OR REPLACE INTO images VALUES (?, ?, ?, ?, ?)", rows)
            connection.execute("COMMIT")
            self.stored += len(rows)
        except sqlite3.Error as err:
            try:
                connection.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            if _is_damage(err):
                self._fail(self._damaged_message(err))
            elif _is_read_only(err):  # a read-only file in a writable folder: keep reading it
                self._note_read_only(err)
            else:
                self._fail(
                    f"cannot write the image cache {self.path} ({err}); continuing without it"
                )

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def _is_read_only(err: BaseException) -> bool:
    name = getattr(err, "sqlite_errorname", "") or ""
    return name.startswith("SQLITE_READONLY") or "readonly" in str(err)


def image_cache_for(
    loaded: "LoadedModel",
    draft_size: int | None,
    dtype: "torch.dtype",
    *,
    enabled: bool = True,
    warn: Warn = lambda message: None,
) -> "ImageCache | None":
    """The image-embedding cache for this model, preprocessing (with the JPEG draft size the decoding
    uses, None for exact decoding) and precision; None when disabled or when the model has no file
    to identify it by."""
    if not enabled:
        return None
    from zsclip.core.devices import precision_name

    model_id = model_identity(loaded.path)
    if model_id is None:
        return None
    variant = image_variant(
        model_id, loaded.preprocess.to_dict(), draft_size, precision_name(dtype)
    )
    return ImageCache(variant, warn=warn, dim=loaded.model.config.embed_dim)
