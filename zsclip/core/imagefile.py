"""Checks on an image file before it is decoded: is it a non-empty regular file, and why not.

Kept apart from zsclip.core.transform (which imports torch and PIL) so that `classify --server`, which
only reads files and uploads their bytes, gives the same one-line reasons as a local run without
loading either.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from zsclip.errors import InputError

# Camera RAW files. zsclip reads them through the JPEG preview the camera embeds (full size or close
# to it on every current body), with `rawpy` (LibRaw), the optional extra `zsclip[raw]`. Developing
# the sensor data itself would be slower and would not look like the photo the camera showed.
RAW_SUFFIXES = frozenset(".cr2 .cr3 .nef .arw .dng .orf .rw2 .raf".split())
RAW_EXTRA_HINT = "pip install 'zsclip[raw]'"


def is_raw_name(name: str | os.PathLike[str]) -> bool:
    """True for the file names of camera RAW formats (by extension, case ignored)."""
    return os.path.splitext(os.fspath(name))[1].lower() in RAW_SUFFIXES


def check_file(path: str | os.PathLike[str]) -> os.stat_result:
    """Refuse what is not a non-empty regular file, with a reason a person understands."""
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        reason = (
            "dangling symlink (its target does not exist)" if path.is_symlink() else "no such file"
        )
        raise InputError(reason) from None
    except PermissionError:
        raise InputError("permission denied") from None
    except OSError as exc:  # ELOOP, ENAMETOOLONG, EIO, ...
        if exc.errno == errno.ELOOP:
            raise InputError("symlink loop (the links point back at each other)") from None
        raise InputError(f"cannot access file: {exc.strerror or exc}") from None
    if stat.S_ISDIR(info.st_mode):
        raise InputError("is a directory, not an image file")
    if not stat.S_ISREG(info.st_mode):
        raise InputError("not a regular file (device, socket or pipe)")
    if info.st_size == 0:
        raise InputError("empty file (0 bytes)")
    return info


def read_image_bytes(path: str | os.PathLike[str], max_bytes: int) -> bytes:
    """The file's bytes, after the checks of `check_file`; refuses files over `max_bytes` without
    reading them (and stops reading at the limit should the file grow meanwhile)."""
    info = check_file(path)
    if info.st_size > max_bytes:
        raise InputError(_too_big(info.st_size, max_bytes))
    try:
        with open(path, "rb") as handle:
            data = handle.read(max_bytes + 1)
    except PermissionError:
        raise InputError("permission denied") from None
    except OSError as exc:
        raise InputError(f"cannot read file: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise InputError(_too_big(len(data), max_bytes))
    if not data:
        raise InputError("empty file (0 bytes)")
    return data


def _too_big(size: int, limit: int) -> str:
    return (
        f"file too large to upload: {size / 2**20:.1f} MiB, the server takes at most "
        f"{limit / 2**20:.1f} MiB per request (its --max-upload-mb)"
    )
