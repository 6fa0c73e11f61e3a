"""Reading PyTorch files (`.pt`, `.bin`) without running their code or believing their sizes.

A file is recognised by its first bytes, never by its name: a zip archive (torch.save's format, or a
TorchScript archive), a pickle (torch.save's legacy format), or something else, which is refused
with one line that says what it looks like. Zip archives are checked before any member is read:
member names must stay inside the archive, and compressed members may not expand beyond what weights
ever do (a zip bomb is refused from its directory alone).

TorchScript archives are read here, not by torch: data.pkl is rebuilt from an allow-list (modules
become attribute holders, any other global is refused), each storage's member must hold exactly the
bytes data.pkl declares for it, and stored members are memory-mapped rather than read. Other torch
files go to `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import collections
import io
import mmap
import os
import pickle
import re
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

import torch

from zsclip.errors import UserError

FORMATS = (
    "--model takes a .safetensors file (zsclip, OpenAI or OpenCLIP), a PyTorch .pt/.bin file (a "
    "state dict or a TorchScript archive) or a Hugging Face CLIP folder"
)

# data.pkl describes the module tree, not the weights: the largest published archives hold a few MB.
MAX_PICKLE_BYTES = 64 << 20
# Weights barely compress; a member set that expands more than this (plus a little slack for
# masks and zero biases) is refused as a zip bomb before anything is decompressed.
MAX_EXPANSION = 10
EXPANSION_SLACK = 16 << 20

_MAGIC = (  # what a file that is not a checkpoint most often is
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"GIF8", "a GIF image"),
    (b"BM", "a BMP image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"\x1f\x8b", "a gzip file"),
    (b"%PDF", "a PDF document"),
)


# ----------------------------------------------------------------------------------------- sniffing


def sniff(path: Path) -> str:
    """'zip', 'pickle' or 'safetensors', or a phrase saying what else the file looks like."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4096)
            size = os.fstat(handle.fileno()).st_size
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror or err})") from err
    if not head:
        return "it is empty"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # PROTO opcode, protocol 2-5
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{":
        (header_len,) = struct.unpack("<Q", head[:8])
        if header_len <= size - 8:
            return "safetensors"
    if head[4:12] in (b"ftypavif", b"ftypheic") or (head[:4], head[8:12]) == (b"RIFF", b"WEBP"):
        return "it looks like an image"
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return f"it looks like {what}"
    try:
        head.decode("utf-8")
        text = b"\x00" not in head
    except UnicodeDecodeError as err:  # a multi-byte character cut at 4096 bytes is still text
        text = err.start >= len(head) - 3
    return "it looks like a text file" if text else "its bytes match no format zsclip reads"


def not_a_checkpoint(path: Path, what: str) -> UserError:
    return UserError(f"{path}: not a checkpoint ({what}); {FORMATS}")


# ----------------------------------------------------------------------------------------- archives


def open_archive(path: Path) -> zipfile.ZipFile:
    """The zip archive at `path`, its directory checked: safe member names, no duplicates, no
    encryption, sizes inside the file, and no member set that would expand like a zip bomb."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as err:
        raise UserError(f"{path}: a damaged zip archive ({_one_line(err)})") from None
    try:
        _check_directory(path, archive)
    except BaseException:
        archive.close()
        raise
    return archive


def _unsafe_name(name: str) -> bool:
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or ".." in parts or "\x00" in name or ":" in parts[0]


def _check_directory(path: Path, archive: zipfile.ZipFile) -> None:
    infos = archive.infolist()
    size = os.path.getsize(path)
    names: set[str] = set()
    expanded = compressed = 0
    for info in infos:
        name = info.filename
        if _unsafe_name(name):
            raise UserError(
                f"{path}: refusing a zip archive whose member {name[:80]!r} is named outside it "
                f"(absolute or '..'); a checkpoint never has such names"
            )
        if name in names:
            raise UserError(f"{path}: refusing a zip archive that holds {name[:80]!r} twice")
        names.add(name)
        if info.flag_bits & 0x1:
            raise UserError(f"{path}: {name[:80]!r} is encrypted; checkpoints never are")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise UserError(
                f"{path}: {name[:80]!r} uses zip compression method {info.compress_type}; "
                f"re-save the checkpoint with torch.save"
            )
        if info.header_offset < 0 or info.header_offset + info.compress_size > size:
            raise UserError(f"{path}: a damaged zip archive ({name[:80]!r} ends past the file)")
        if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
            raise UserError(f"{path}: a damaged zip archive ({name[:80]!r} has two sizes)")
        if info.compress_type == zipfile.ZIP_DEFLATED:
            expanded, compressed = expanded + info.file_size, compressed + info.compress_size
    if expanded > MAX_EXPANSION * compressed + EXPANSION_SLACK:
        raise UserError(
            f"{path}: refusing a zip archive whose compressed members claim {expanded:,} bytes "
            f"from {compressed:,} (a zip bomb; weights do not compress like that)"
        )


def _check_pickle_size(path: Path, info: zipfile.ZipInfo) -> None:
    if info.file_size > MAX_PICKLE_BYTES:
        raise UserError(
            f"{path}: {info.filename[:80]!r} claims {info.file_size:,} bytes, more than a "
            f"checkpoint's {MAX_PICKLE_BYTES:,}; refusing it"
        )


def _read_pickle_member(path: Path, archive: zipfile.ZipFile, name: str) -> bytes:
    """data.pkl, read whole once its declared size is known to be sane (the reader never returns
    more than the declared size)."""
    info = archive.getinfo(name)
    _check_pickle_size(path, info)
    try:
        with archive.open(info) as handle:
            return handle.read(MAX_PICKLE_BYTES)
    except (
        zipfile.BadZipFile,
        OSError,
        EOFError,
        ValueError,
        NotImplementedError,
        zlib.error,
    ) as err:
        raise UserError(
            f"{path}: a damaged zip archive ({name[:80]!r}: {_one_line(err)})"
        ) from None


def _data_offset(mapped: mmap.mmap, info: zipfile.ZipInfo) -> int:
    """Where a member's bytes start: after its local header, whose name and extra lengths may differ
    from the central directory's."""
    start = info.header_offset
    header = mapped[start : start + 30]
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        raise ValueError(f"{info.filename!r} has no local header")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return start + 30 + name_len + extra_len


# -------------------------------------------------------------------------------------- TorchScript


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class _Refused(Exception):
    """data.pkl asked for something outside the allow-list (nothing was run)."""


class _ScriptModule:
    """Stands in for a TorchScript module class while its pickled attribute tree is read."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_ignored: Any):
    """torch._utils._rebuild_tensor_v2, checked: the view must lie inside its storage, and may not
    show more elements than the storage holds (a zero stride would let a tiny storage pose as a
    huge tensor)."""
    if not isinstance(storage, torch.Tensor) or not _is_count(offset):
        raise ValueError("a tensor without a storage")
    size, stride = tuple(size), tuple(stride)
    if len(size) != len(stride) or not all(map(_is_count, size + stride)):
        raise ValueError("a tensor with a malformed shape")
    numel = 1
    for dim in size:
        numel *= dim
    if numel:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if numel > storage.numel() or last >= storage.numel():
            raise ValueError(f"a tensor of shape {size} larger than its storage")
    return storage.as_strided(size, stride, offset)


class _TorchScriptUnpickler(pickle._Unpickler):
    """Reads data.pkl of a TorchScript archive: module objects become plain attribute holders,
    tensors are views of the archive's data/ members, and any other global is refused.

    Python's own implementation, not the C one: the C unpickler keeps its memo in an array sized by
    the largest index a PUT opcode names, so five bytes of data.pkl can ask for gigabytes.
    """

    def __init__(self, data: bytes, load_storage) -> None:
        super().__init__(io.BytesIO(data))
        self._load_storage = load_storage  # (key, dtype, numel) -> 1-D tensor
        self._storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("__torch__"):
            return type(name, (_ScriptModule,), {})
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise _Refused(f"{module}.{name}"[:120])

    def persistent_load(self, pid: Any) -> torch.Tensor:
        # ('storage', dtype, key, location, numel): numel is what the member must hold
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise ValueError("a malformed storage reference")
        _, dtype, key, _, numel = pid
        if not (isinstance(dtype, torch.dtype) and isinstance(key, str) and _is_count(numel)):
            raise ValueError("a malformed storage reference")
        if key not in self._storages:
            self._storages[key] = self._load_storage(key, dtype, numel)
        storage = self._storages[key]
        if storage.dtype != dtype or storage.numel() != numel:
            raise ValueError(f"storage {key!r} declared twice with different sizes")
        return storage


def torchscript_prefix(archive: zipfile.ZipFile) -> str | None:
    """The archive's top folder if it is a TorchScript archive (data.pkl beside code/ or
    constants.pkl), else None."""
    names = set(archive.namelist())
    for name in names:
        if name.endswith("/data.pkl") and name.count("/") == 1:
            prefix = name[: -len("data.pkl")]
            if f"{prefix}constants.pkl" in names or any(
                n.startswith(prefix + "code/") for n in names
            ):
                return prefix
    return None


class _StorageReader:
    """Tensors for data/ members: memory-mapped when stored, decompressed into one buffer of the
    declared size when deflated; either way only after the member's size matches the declaration."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str, mapped: mmap.mmap) -> None:
        self.archive, self.prefix, self.mapped = archive, prefix, mapped

    def __call__(self, key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        name = f"{self.prefix}data/{key}"
        try:
            info = self.archive.getinfo(name)
        except KeyError:
            raise ValueError(f"data.pkl refers to {name!r}, which the archive lacks") from None
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if info.file_size != nbytes:
            raise ValueError(
                f"{name!r} holds {info.file_size:,} bytes but data.pkl declares {nbytes:,}"
            )
        if nbytes == 0:
            return torch.empty(0, dtype=dtype)
        if info.compress_type == zipfile.ZIP_STORED:
            start = _data_offset(self.mapped, info)
            if start + nbytes > len(self.mapped):
                raise ValueError(f"{name!r} ends past the file")
            mapped = torch.frombuffer(self.mapped, dtype=dtype, count=numel, offset=start)
            # torch writes members aligned; a re-zipped archive may not be, and some kernels
            # assume aligned data: such a member is copied once instead
            return mapped if start % mapped.element_size() == 0 else mapped.clone()
        buffer = bytearray(nbytes)  # the declared size, already bounded by the expansion check
        view, filled = memoryview(buffer), 0
        with self.archive.open(info) as handle:
            while filled < nbytes and (chunk := handle.read(min(1 << 20, nbytes - filled))):
                view[filled : filled + len(chunk)] = chunk
                filled += len(chunk)
        if filled != nbytes:
            raise ValueError(f"{name!r} is truncated")
        return torch.frombuffer(buffer, dtype=dtype)


def _collect_tensors(root: _ScriptModule) -> dict[str, torch.Tensor]:
    """Every tensor attribute of the module tree, named by its path ('visual.conv1.weight')."""
    out: dict[str, torch.Tensor] = {}
    stack, seen = [("", root)], {id(root)}
    while stack:  # iterative: a hostile tree may nest deeper than Python's recursion limit
        prefix, module = stack.pop()
        for name, value in vars(module).items():
            if not isinstance(name, str):
                continue
            if isinstance(value, torch.Tensor):
                out[prefix + name] = value
            elif isinstance(value, _ScriptModule) and id(value) not in seen:
                seen.add(id(value))
                stack.append((f"{prefix}{name}.", value))
    return out


def read_torchscript(path: Path, archive: zipfile.ZipFile, prefix: str) -> dict[str, torch.Tensor]:
    """The parameters and buffers of a TorchScript archive. Runs none of its code."""
    data = _read_pickle_member(path, archive, prefix + "data.pkl")
    with open(path, "rb") as handle:
        # Copy-on-write: tensors may be changed in place (fine-tuning) without touching the file.
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    try:
        reader = _StorageReader(archive, prefix, mapped)
        root = _TorchScriptUnpickler(data, reader).load()
    except _Refused as err:
        raise UserError(
            f"{path}: refusing to load: its data.pkl asks for {err}, which is not part of a "
            f"model's weights (nothing was run); re-save it as a state dict or .safetensors with "
            f"a trusted tool"
        ) from None
    except Exception as err:  # noqa: BLE001 - only allow-listed callables ran: failures are damage
        raise UserError(f"{path}: a damaged TorchScript archive ({_one_line(err)})") from None
    if not isinstance(root, _ScriptModule):
        raise UserError(f"{path}: a TorchScript archive whose data.pkl holds no module")
    return _collect_tensors(root)


# --------------------------------------------------------------------------------------- torch.load


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return (text or type(err).__name__)[:160]


def _torch_load(path: Path, *, mmap: bool) -> Any:
    import warnings

    try:
        with warnings.catch_warnings():  # pickle-protocol notes the user cannot act on
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        message = str(err)
        found = re.search(r"Unsupported global: GLOBAL (\S+)", message)
        operand = re.search(r"Unsupported operand (\d+)", message)
        if found:
            reason = f"it asks for {found.group(1)}, which is not a tensor"
        elif operand:
            reason = f"it uses pickle opcode {operand.group(1)}, which a weights-only load refuses"
        else:
            raise _damaged(path, err) from None
        raise UserError(
            f"{path}: refusing to load: unpickling it could run code ({reason}); "
            f"re-save it as a plain state dict or .safetensors with a trusted tool"
        ) from None
    except Exception as err:  # noqa: BLE001 - torch's weights-only unpickler runs no foreign code:
        raise _damaged(path, err) from None  # whatever it raises on these bytes means damage


def _damaged(path: Path, err: BaseException) -> UserError:
    return UserError(f"{path}: not a readable PyTorch checkpoint ({_one_line(err)})")


def read_torch_file(path: Path) -> Any:
    """What a PyTorch file holds (TorchScript archives: their tensors by name), read without running
    code. Anything that is not a zip archive or a pickle is refused, saying what it looks like."""
    kind = sniff(path)
    if kind == "pickle":
        return _torch_load(path, mmap=False)
    if kind == "safetensors":  # a .bin or .pt that is really safetensors
        from zsclip.core.safetensors_io import load_tensors

        return load_tensors(path)
    if kind != "zip":
        raise not_a_checkpoint(path, kind)
    with open_archive(path) as archive:
        prefix = torchscript_prefix(archive)
        if prefix is not None:
            return read_torchscript(path, archive, prefix)
        pickles = [i for i in archive.infolist() if i.filename.endswith("data.pkl")]
        if len(pickles) != 1:
            raise UserError(f"{path}: a zip archive that is not a PyTorch checkpoint; {FORMATS}")
        _check_pickle_size(path, pickles[0])
        compressed = any(i.compress_type != zipfile.ZIP_STORED for i in archive.infolist())
    # torch maps stored members straight from the file; it would misread deflated ones that way.
    return _torch_load(path, mmap=not compressed)
