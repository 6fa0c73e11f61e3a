"""Writing .safetensors files without numpy (the safetensors package's writer imports it; zsclip does
not depend on numpy at run time), and reading them through the safetensors package (which needs no
numpy to load and checks every offset in the header against the file before anything is read), with
each failure turned into one line.

Format: 8-byte little-endian header length, a JSON header (tensor dtypes, shapes, byte offsets, and
string metadata under "__metadata__"), padded with spaces to a multiple of 8, then the raw
little-endian tensor bytes.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
import sys
from pathlib import Path

import torch

from zsclip.atomic import atomic_write
from zsclip.errors import UserError

_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    """A zero-copy view of a contiguous CPU tensor's bytes (the tensor must outlive the view)."""
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_ubyte * nbytes).from_address(tensor.data_ptr())).cast("B")


def write_safetensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> None:
    """Write `tensors` with string `metadata` to `path` atomically (a crash leaves the old file or
    none)."""
    if sys.byteorder != "little":
        raise RuntimeError("writing .safetensors on a big-endian machine is not supported")
    prepared: dict[str, torch.Tensor] = {}
    header: dict[str, object] = {"__metadata__": {k: str(v) for k, v in metadata.items()}}
    offset = 0
    for name, tensor in tensors.items():
        if tensor.dtype not in _DTYPES:
            raise ValueError(f"{name}: dtype {tensor.dtype} cannot be stored in .safetensors here")
        tensor = tensor.detach().to("cpu").contiguous()
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": _DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        prepared[name] = tensor
        offset += size
    text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with atomic_write(Path(path), "wb") as handle:
        handle.write(struct.pack("<Q", len(text)))
        handle.write(text)
        for tensor in prepared.values():
            handle.write(_raw_bytes(tensor))


# ------------------------------------------------------------------------------------------ reading


def _unreadable(path: Path | str, err: BaseException) -> UserError:
    detail = " ".join(str(err).split())[:160] or type(err).__name__
    return UserError(f"{path}: not a readable .safetensors file ({detail})")


def read_metadata(path: Path | str) -> dict[str, str]:
    """The header's string metadata (empty when it has none); no tensor is read."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            return handle.metadata() or {}
    except Exception as err:  # noqa: BLE001 - safetensors raises its own types for damaged headers
        raise _unreadable(path, err) from None


def read_shapes(path: Path | str) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, from the header alone."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as err:  # noqa: BLE001 - as above
        raise _unreadable(path, err) from None


def load_tensors(path: Path | str) -> dict[str, torch.Tensor]:
    """All tensors, memory-mapped by the safetensors package."""
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as err:  # noqa: BLE001 - as above
        raise _unreadable(path, err) from None
