"""Embedding files: what `zsclip embed --output` writes and `classify --embeddings` reads back.

.npy (+ a row-key sidecar), .safetensors or .jsonl. The .npy writer needs no numpy: it writes the
NPY 1.0 header by hand, then little-endian float32 rows. Row order lives beside the data: in a
sidecar `<file>.paths.txt` / `<file>.texts.txt` for .npy (one key per line; a key holding a newline,
starting with `"` or holding bytes that are not UTF-8 is written as a JSON string), in the metadata
for .safetensors, and in each record for .jsonl. JSON is written by zsclip.escapes.json_text.

The .npy and its sidecar are two files, so they are written as a pair: both go to temporaries and
are synced, then a marker `.<file>.zsclip-pair` records the digests of both, the two are renamed
into place, and the marker is removed. A crash between the two renames leaves the marker and one
file of each run; the reader finds exactly one of them matching the marker and refuses the pair
instead of matching new rows with old keys.
"""

from __future__ import annotations

import ast
import ctypes
import hashlib
import json
import struct
import sys
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from zsclip.atomic import OutputFile, atomic_write_text
from zsclip.errors import UserError
from zsclip.escapes import json_text

if TYPE_CHECKING:
    import torch

    from zsclip.jobs.embed import Embedding

EMBEDDING_FILE_SUFFIXES = (".npy", ".safetensors", ".jsonl")


# ------------------------------------------------------------------------------------ embeddings:
# writing


def _vector_text(vector: "torch.Tensor") -> str:
    # 9 significant digits round-trip float32 exactly.
    return "[" + ",".join(f"{value:.9g}" for value in vector.tolist()) + "]"


def embedding_line(item: "Embedding") -> str:
    """One jsonl record: {"path"|"text": key, "embedding": [...]}, or {"path": key, "error": reason}."""
    key = json_text(item.key)
    if item.error is not None:
        return f'{{"{item.kind}": {key}, "error": {json_text(item.error)}}}\n'
    return f'{{"{item.kind}": {key}, "embedding": {_vector_text(item.vector)}}}\n'


def _npy_header(rows: int, dim: int) -> bytes:
    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {dim}), }}"
    # Magic (6) + version (2) + length (2) + header, padded with spaces to a multiple of 64, ending
    # in \n.
    padding = -(10 + len(header) + 1) % 64
    header = header + " " * padding + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode("latin1")


def _sidecar_key(key: str) -> str:
    needs_json = "\n" in key or "\r" in key or key.startswith('"') or not _is_utf8(key)
    return json_text(key) if needs_json else key


def _is_utf8(text: str) -> bool:
    """False for a str carrying undecodable bytes of a file name (lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def sidecar_path(path: Path, kind: str) -> Path:
    return path.with_name(f"{path.name}.{kind}s.txt")


def pair_marker(path: Path) -> Path:
    """The marker that is present only while (or because) the .npy pair at `path` was being renamed."""
    return path.with_name(f".{path.name}.zsclip-pair")


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_npy_pair(path: Path, data: bytes, sidecar: Path, rows: bytes) -> None:
    """Write the .npy bytes and its row list so that a reader never pairs one run's rows with
    another's keys (see the module docstring)."""
    rows_file = OutputFile(sidecar, "wb")
    try:
        data_file = OutputFile(path, "wb")
    except BaseException:
        rows_file.discard()
        raise
    try:
        rows_file.handle.write(rows)
        data_file.handle.write(data)
        rows_file.sync()
        data_file.sync()
        marker = pair_marker(path) if data_file.atomic and rows_file.atomic else None
        if marker is not None:
            atomic_write_text(marker, json.dumps({"npy": _digest(data), "rows": _digest(rows)}))
    except BaseException:
        rows_file.discard()
        data_file.discard()
        raise
    try:
        rows_file.commit()
    except BaseException:
        data_file.discard()  # neither file has changed: the marker may go
        if marker is not None:
            marker.unlink(missing_ok=True)
        raise
    data_file.commit()  # a crash before this line leaves the marker, which the reader checks
    if marker is not None:
        marker.unlink(missing_ok=True)


def check_npy_pair(path: Path, data: bytes, sidecar: Path, rows: bytes) -> None:
    """Refuse a .npy and row list that an interrupted write left from two different runs."""
    marker = pair_marker(path)
    try:
        expected = json.loads(marker.read_text(encoding="utf-8"))
        new = (expected["npy"] == _digest(data), expected["rows"] == _digest(rows))
    except FileNotFoundError:
        return
    except (OSError, ValueError, KeyError, TypeError):
        new = (True, False)  # an unreadable marker: its write was cut short, so trust nothing
    if new[0] != new[1]:
        raise UserError(
            f"{str(path)!r} and its row list {sidecar.name} are from two different runs "
            "(an earlier `zsclip embed -o` was interrupted between them); run the embed again"
        )


@dataclass
class EmbeddingFile:
    """Collects embeddings and writes them atomically on close: .npy (+ sidecar), .safetensors or
    .jsonl."""

    path: Path
    model_name: str = ""
    keys: list[str] = field(default_factory=list)
    vectors: list["torch.Tensor"] = field(default_factory=list)
    kind: str = "path"
    _jsonl: Any = None

    def __post_init__(self) -> None:
        self.suffix = self.path.suffix.lower()
        if self.suffix not in EMBEDDING_FILE_SUFFIXES:
            raise UserError(
                f"--output {str(self.path)!r}: name the file .npy, .safetensors or .jsonl"
            )
        if self.path.is_dir():
            raise UserError(f"--output {str(self.path)!r} is a folder; give a file name")

    def _jsonl_handle(self) -> IO[str]:
        # Opened on first use, so a run that fails before writing leaves no temporary file behind.
        if self._jsonl is None:
            self._jsonl = OutputFile(self.path, "w", encoding="utf-8")
        return self._jsonl.handle

    def write(self, item: "Embedding") -> None:
        self.kind = item.kind
        if self.suffix == ".jsonl":
            self._jsonl_handle().write(
                embedding_line(item)
            )  # streamed: jsonl needs no row count up front
        elif item.error is None:  # binary files hold only the rows that were embedded
            self.keys.append(item.key)
            self.vectors.append(item.vector)

    def close(self, ok: bool = True) -> None:
        """Put the file in place (ok) or leave the old one untouched (not ok)."""
        if self.suffix == ".jsonl":
            if ok:
                self._jsonl_handle()
                self._jsonl.commit()
            elif self._jsonl is not None:  # removes the temporary file; the old file stays
                self._jsonl.discard()
        elif ok and self.suffix == ".npy":
            self._write_npy()
        elif ok:
            self._write_safetensors()

    def _matrix(self) -> "torch.Tensor":
        import torch

        if not self.vectors:
            return torch.zeros(0, 0, dtype=torch.float32)
        return torch.stack(self.vectors).to(torch.float32).contiguous()  # [N, D]

    def _write_npy(self) -> None:
        matrix = self._matrix()
        rows = "".join(_sidecar_key(k) + "\n" for k in self.keys).encode("utf-8")
        data = _npy_header(*matrix.shape) + _le_bytes(matrix)
        write_npy_pair(self.path, data, sidecar_path(self.path, self.kind), rows)

    def _write_safetensors(self) -> None:
        from zsclip.core.safetensors_io import write_safetensors

        metadata = {
            "format": "pt",
            "zsclip.kind": self.kind,
            "zsclip.core.model": self.model_name,
            "zsclip.rows": json_text(self.keys),
        }
        write_safetensors(self.path, {"embeddings": self._matrix()}, metadata)


def _le_bytes(matrix: "torch.Tensor") -> bytes:
    """The raw little-endian bytes of a contiguous CPU tensor, without numpy."""
    matrix = matrix.contiguous().cpu()
    raw = (
        ctypes.string_at(matrix.data_ptr(), matrix.numel() * matrix.element_size())
        if matrix.numel()
        else b""
    )
    if sys.byteorder == "big":
        values = array("f", raw)
        values.byteswap()
        raw = values.tobytes()
    return raw


# ------------------------------------------------------------------------------------ embeddings:
# reading


@dataclass
class EmbeddingTable:
    """Embeddings read back from a file: `vectors[i]` belongs to `keys[i]`.

    `errors` are (position, key, reason): inputs embed could not read, which came before
    `keys[position]`.
    """

    kind: str  # "path" or "text"
    keys: list[str]
    vectors: "torch.Tensor"  # [N, D] float32
    errors: list[tuple[int, str, str]] = field(default_factory=list)
    model_name: str = ""


def read_embeddings(path: Path) -> EmbeddingTable:
    """Read what `zsclip embed --output` wrote (.npy + sidecar, .safetensors or .jsonl)."""
    if not path.is_file():
        raise UserError(
            f"embeddings file {str(path)!r} does not exist; make one with `zsclip embed IMAGES -o FILE`"
        )
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return _read_npy(path)
        if suffix == ".safetensors":
            return _read_safetensors(path)
        if suffix in (".jsonl", ".ndjson"):
            return _read_jsonl(path)
    except (ValueError, KeyError, SyntaxError, struct.error, UnicodeDecodeError) as err:
        raise UserError(
            f"embeddings file {str(path)!r} is damaged or not from `zsclip embed`: {err}"
        ) from None
    raise UserError(f"embeddings file {str(path)!r}: expected .npy, .safetensors or .jsonl")


def _matrix_from_bytes(data: bytes, dtype_name: str, shape: tuple[int, int]) -> "torch.Tensor":
    import torch

    dtype = {"<f4": torch.float32, "<f8": torch.float64, "<f2": torch.float16}[dtype_name]
    if shape[0] * shape[1] == 0:
        return torch.zeros(shape, dtype=torch.float32)
    count = shape[0] * shape[1]
    matrix = torch.frombuffer(bytearray(data), dtype=dtype, count=count).reshape(shape)  # [N, D]
    return matrix.to(torch.float32)


def _read_npy(path: Path) -> EmbeddingTable:
    raw = path.read_bytes()
    if raw[:6] != b"\x93NUMPY":
        raise ValueError("not an .npy file")
    major = raw[6]
    length, start = (
        (struct.unpack("<H", raw[8:10])[0], 10)
        if major == 1
        else (struct.unpack("<I", raw[8:12])[0], 12)
    )
    header = ast.literal_eval(raw[start : start + length].decode("latin1"))
    shape = tuple(header["shape"])
    if header["fortran_order"] or len(shape) != 2 or header["descr"] not in ("<f4", "<f8", "<f2"):
        raise ValueError(f"expected a 2-D little-endian float array, found {header}")
    vectors = _matrix_from_bytes(raw[start + length :], header["descr"], shape)
    for kind in ("path", "text"):
        sidecar = sidecar_path(path, kind)
        if sidecar.is_file():
            rows = sidecar.read_bytes()
            check_npy_pair(path, raw, sidecar, rows)
            keys = [
                json.loads(line) if line.startswith('"') else line
                for line in rows.decode("utf-8").split("\n")[:-1]
            ]
            if len(keys) != shape[0]:
                raise ValueError(
                    f"{sidecar.name} lists {len(keys)} rows but the array has {shape[0]}"
                )
            return EmbeddingTable(kind, keys, vectors)
    raise UserError(
        f"{str(path)!r} has no row list beside it ({sidecar_path(path, 'path').name}); "
        "keep the sidecar file that `zsclip embed` wrote next to it"
    )


def _read_safetensors(path: Path) -> EmbeddingTable:
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
        entry = header["embeddings"]
        begin, end = entry["data_offsets"]
        handle.seek(8 + length + begin)
        data = handle.read(end - begin)
    dtype = {"F32": "<f4", "F64": "<f8", "F16": "<f2"}[entry["dtype"]]
    meta = header.get("__metadata__") or {}
    keys = json.loads(meta["zsclip.rows"])
    vectors = _matrix_from_bytes(data, dtype, tuple(entry["shape"]))
    if len(keys) != vectors.shape[0]:
        raise ValueError(f"metadata lists {len(keys)} rows but the tensor has {vectors.shape[0]}")
    return EmbeddingTable(
        meta.get("zsclip.kind", "path"), keys, vectors, model_name=meta.get("zsclip.core.model", "")
    )


def _read_jsonl(path: Path) -> EmbeddingTable:
    import torch

    keys, rows, errors, kind = [], [], [], "path"
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            kind = "text" if "text" in record else "path"
            if kind not in record:
                raise ValueError(f"line {number} has neither 'path' nor 'text'")
            if "error" in record:
                errors.append((len(keys), record[kind], record["error"]))
                continue
            keys.append(record[kind])
            rows.append(record["embedding"])
    if len({len(row) for row in rows}) > 1:
        raise ValueError("rows have different lengths")
    vectors = torch.tensor(rows, dtype=torch.float32) if rows else torch.zeros(0, 0)
    return EmbeddingTable(kind, keys, vectors, errors)
