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
import math
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
    """Read what `zsclip embed --output` wrote (.npy + sidecar, .safetensors or .jsonl).

    Every size a header claims is checked against the file's real length before anything is
    allocated, and every field's type before it is used: a damaged or foreign file is one UserError
    line saying what is wrong, never another exception.
    """
    path = Path(path)
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise UserError(
            f"embeddings file {str(path)!r} {what}; make one with `zsclip embed IMAGES -o FILE`"
        )
    suffix = path.suffix.lower()
    readers = {".npy": _read_npy, ".safetensors": _read_safetensors}
    reader = readers.get(suffix, _read_jsonl if suffix in (".jsonl", ".ndjson") else None)
    if reader is None:
        raise UserError(f"embeddings file {str(path)!r}: expected .npy, .safetensors or .jsonl")
    try:
        return reader(path)
    except OSError as err:
        raise UserError(
            f"cannot read embeddings file {str(path)!r}: {err.strerror or err}"
        ) from None
    except (
        ValueError,  # _Damaged, json, struct sizes, int() of huge literals, UnicodeDecodeError
        KeyError,
        TypeError,
        SyntaxError,
        RecursionError,
        OverflowError,  # a number beyond float32 in jsonl
        struct.error,
    ) as err:
        reason = " ".join(str(err).split())[:300] or type(err).__name__
        raise UserError(
            f"embeddings file {str(path)!r} is damaged or not from `zsclip embed`: {reason}"
        ) from None


class _Damaged(ValueError):
    """What is wrong with an embeddings file, in words (read_embeddings adds the file name)."""


_DTYPES = {"<f4": 4, "<f8": 8, "<f2": 2}  # the .npy descr names read back, with their sizes
_SAFETENSORS_DTYPES = {"F32": "<f4", "F64": "<f8", "F16": "<f2"}
_MAX_NPY_HEADER = 10000  # numpy's own limit for np.load
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the safetensors library's limit


def _shape_2d(value: object) -> tuple[int, int]:
    """A [rows, dim] shape of two non-negative integers, or _Damaged."""
    ok = isinstance(value, (list, tuple)) and len(value) == 2
    if not ok or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in value):
        raise _Damaged(f"expected a 2-D shape [rows, dim], found {str(value)[:80]}")
    return value[0], value[1]


def _check_length(shape: tuple[int, int], itemsize: int, available: int) -> int:
    """The byte size of a [rows, dim] array, which must be exactly what the file holds."""
    needed = shape[0] * shape[1] * itemsize
    if needed != available:
        raise _Damaged(
            f"the header promises {shape[0]} x {shape[1]} values ({needed} bytes) but the file holds "
            f"{available} bytes of data"
        )
    return needed


def _matrix_from_bytes(data: bytes, dtype_name: str, shape: tuple[int, int]) -> "torch.Tensor":
    """[N, D] float32 from little-endian bytes whose length was checked; refuses NaN and infinity."""
    import torch

    dtype = {"<f4": torch.float32, "<f8": torch.float64, "<f2": torch.float16}[dtype_name]
    if shape[0] * shape[1] == 0:
        return torch.zeros(shape, dtype=torch.float32)
    matrix = torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)  # [N, D]
    matrix = matrix.to(torch.float32)
    if not bool(torch.isfinite(matrix).all()):
        raise _Damaged("it holds values that are not finite (NaN or infinity)")
    return matrix


def _read_npy(path: Path) -> EmbeddingTable:
    raw = path.read_bytes()  # the file's real size: nothing here is sized by what it claims
    if raw[:6] != b"\x93NUMPY" or len(raw) < 10:
        raise _Damaged("not an .npy file")
    major = raw[6]
    if major not in (1, 2, 3):
        raise _Damaged(f"unknown .npy format version {major}")
    if major == 1:
        (length,), start = struct.unpack("<H", raw[8:10]), 10
    else:
        (length,), start = struct.unpack("<I", raw[8:12]), 12
    if length > _MAX_NPY_HEADER or start + length > len(raw):
        raise _Damaged(f"its header claims {length} bytes, more than the file or the format allows")
    header = _npy_header_fields(
        raw[start : start + length].decode("utf-8" if major == 3 else "latin1")
    )
    shape = _shape_2d(header["shape"])
    _check_length(shape, _DTYPES[header["descr"]], len(raw) - start - length)
    vectors = _matrix_from_bytes(memoryview(raw)[start + length :], header["descr"], shape)
    for kind in ("path", "text"):
        sidecar = sidecar_path(path, kind)
        if sidecar.is_file():
            rows = sidecar.read_bytes()
            check_npy_pair(path, raw, sidecar, rows)
            keys = _sidecar_keys(rows, sidecar.name)
            if len(keys) != shape[0]:
                raise _Damaged(
                    f"{sidecar.name} lists {len(keys)} rows but the array has {shape[0]}"
                )
            return EmbeddingTable(kind, keys, vectors)
    raise UserError(
        f"{str(path)!r} has no row list beside it ({sidecar_path(path, 'path').name}); "
        "keep the sidecar file that `zsclip embed` wrote next to it"
    )


def _npy_header_fields(text: str) -> dict:
    """The header dict, checked: a little-endian float descr, C order, and a shape (checked later)."""
    header = ast.literal_eval(text)  # literals only: nothing in it can run
    if not isinstance(header, dict) or not {"descr", "fortran_order", "shape"} <= set(header):
        raise _Damaged("its header is not a dict with descr, fortran_order and shape")
    if header["fortran_order"] is not False or header["descr"] not in _DTYPES:
        raise _Damaged(
            f"expected a C-order little-endian float array (<f4, <f8 or <f2), found "
            f"descr={str(header['descr'])[:40]} fortran_order={str(header['fortran_order'])[:10]}"
        )
    return header


def _sidecar_keys(rows: bytes, name: str) -> list[str]:
    keys = []
    for number, line in enumerate(rows.decode("utf-8").split("\n")[:-1], start=1):
        key = json.loads(line) if line.startswith('"') else line
        if not isinstance(key, str):
            raise _Damaged(f"{name} line {number} is not a path or text")
        keys.append(key)
    return keys


def _read_safetensors(path: Path) -> EmbeddingTable:
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise _Damaged("too short for a safetensors file")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(size - 8, _MAX_SAFETENSORS_HEADER):
            raise _Damaged(f"its header claims {length} bytes, more than the file holds")
        header = json.loads(handle.read(length))
        entry, meta = _safetensors_entry(header)
        shape = _shape_2d(entry["shape"])
        dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
        begin, end = _offsets(entry.get("data_offsets"), size - 8 - length)
        _check_length(shape, _DTYPES[dtype], end - begin)
        handle.seek(8 + length + begin)
        vectors = _matrix_from_bytes(handle.read(end - begin), dtype, shape)
    keys = json.loads(meta["zsclip.rows"])
    if not isinstance(keys, list) or not all(isinstance(key, str) for key in keys):
        raise _Damaged("its metadata zsclip.rows is not a list of paths or texts")
    if len(keys) != shape[0]:
        raise _Damaged(f"metadata lists {len(keys)} rows but the tensor has {shape[0]}")
    kind = meta.get("zsclip.kind", "path")
    return EmbeddingTable(
        kind if kind in ("path", "text") else "path",
        keys,
        vectors,
        model_name=str(meta.get("zsclip.core.model", "")),
    )


def _safetensors_entry(header: object) -> tuple[dict, dict]:
    """The `embeddings` tensor entry and the string metadata of a safetensors header, checked."""
    if not isinstance(header, dict):
        raise _Damaged("its header is not a JSON object")
    entry, meta = header.get("embeddings"), header.get("__metadata__") or {}
    if not isinstance(entry, dict):
        raise _Damaged("it holds no tensor named 'embeddings'")
    if entry.get("dtype") not in _SAFETENSORS_DTYPES:
        raise _Damaged(f"expected F32, F64 or F16 embeddings, found {str(entry.get('dtype'))[:20]}")
    if not isinstance(meta, dict) or not isinstance(meta.get("zsclip.rows"), str):
        raise _Damaged("its metadata has no zsclip.rows (the row order)")
    return entry, meta


def _offsets(value: object, available: int) -> tuple[int, int]:
    ok = isinstance(value, list) and len(value) == 2
    if not ok or not all(isinstance(n, int) and not isinstance(n, bool) for n in value):
        raise _Damaged("the tensor's data_offsets are not two integers")
    begin, end = value
    if not 0 <= begin <= end <= available:
        raise _Damaged(f"the tensor's data_offsets [{begin}, {end}] lie outside the file's data")
    return begin, end


def _read_jsonl(path: Path) -> EmbeddingTable:
    import torch

    keys: list[str] = []
    errors: list[tuple[int, str, str]] = []
    flat = array("f")  # all rows, one after another: 4 bytes a value, not a Python float each
    dim, kind = None, "path"
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            kind, key, row, error = _jsonl_record(line, number)
            if error is not None:
                errors.append((len(keys), key, error))
                continue
            if dim is None:
                dim = len(row)
            elif len(row) != dim:
                raise _Damaged(f"line {number} has {len(row)} values, earlier lines {dim}")
            keys.append(key)
            flat.extend(row)
    if not keys:
        return EmbeddingTable(kind, keys, torch.zeros(0, 0), errors)
    vectors = torch.frombuffer(flat, dtype=torch.float32).view(len(keys), dim or 0).clone()
    return EmbeddingTable(kind, keys, vectors, errors)  # [N, D]


def _jsonl_record(line: str, number: int) -> tuple[str, str, array, str | None]:
    """(kind, key, values, error reason or None) of one jsonl line, every field's type checked."""
    record = json.loads(line)
    if not isinstance(record, dict):
        raise _Damaged(f"line {number} is not a JSON object")
    kind = "text" if "text" in record else "path"
    key = record.get(kind)
    if not isinstance(key, str):
        raise _Damaged(f"line {number} has no 'path' or 'text' string")
    if "error" in record:
        return kind, key, array("f"), str(record["error"])
    values = record.get("embedding")
    if not isinstance(values, list) or not values:
        raise _Damaged(f"line {number} has no 'embedding' list")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise _Damaged(f"line {number}: the embedding holds something that is not a number")
    row = array("f", values)  # OverflowError beyond float32 (read_embeddings reports it)
    if not all(math.isfinite(v) for v in row):
        raise _Damaged(f"line {number}: the embedding holds values that are not finite")
    return kind, key, row, None
