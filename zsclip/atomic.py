"""Writing the files that matter, to whatever the user named.

* A regular file (or a new name) is replaced atomically: the data goes to a temporary sibling, is
  fsynced and renamed into place, so a crash at any moment leaves the old file or the new one, never
  half of either, and a failure leaves nothing behind.
* A symlink is followed: its target is replaced that way and the link stays a link.
* A character device (/dev/null, a terminal), a FIFO or a stdout-like path (/dev/stdout,
  /dev/fd/N) is written through, as a shell redirection would; renaming over it would replace the
  device node itself.
* Anything else (a folder, a socket, a block device) is refused with one line.

Temporary files are named `.NAME.zsclip-HOST-PID-RANDOM.tmp` (HOST: a short tag of this machine and
its process namespace). The writer removes its own on any exception, SIGTERM and SIGHUP included
(the CLI turns those into exceptions); after a kill -9 the next write into the same folder removes the
temporaries whose process is gone. Nothing else is ever removed.

`check_output` does the checks that can be done before a long run starts.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

from zsclip.errors import UserError

OUTPUT_FAILED = 3  # exit status when an output could not be written (disk full, stdout gone, ...)


class OutputError(UserError):
    """An output could not be written; whatever was being written has been removed."""

    def __init__(self, target: str, err: OSError) -> None:
        reason = err.strerror or str(err)
        super().__init__(f"cannot write {target}: {reason}", exit_code=OUTPUT_FAILED)


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# mkstemp creates files readable by their owner only; the files zsclip writes should get the usual
# permissions.
_FILE_MODE = 0o666 & ~_current_umask()
_NAME_BYTES = 200  # of the destination's name kept in a temporary's name (NAME_MAX is 255 bytes)
_TEMPORARY = re.compile(r"\..*\.zsclip-(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]{1,10})-\w+\.tmp", re.S)
_OWN_FD = re.compile(r"(?:/dev|/proc/(?P<owner>self|thread-self|[0-9]+))/fd/(?P<fd>[0-9]+)")
_STANDARD = {"/dev/stdin": 0, "/dev/stdout": 1, "/dev/stderr": 2}
_swept: set[str] = set()  # folders already cleaned of stale temporaries by this process


# ------------------------------------------------------------------------------ what a path is


@dataclass(frozen=True)
class Target:
    """Where a write goes. kind: "file" (atomic replace of `path`), "through" (open `path` and write)
    or "fd" (write to a duplicate of this process's file descriptor `fd`)."""

    path: Path
    kind: str
    fd: int | None = None


def _own_fd(name: str) -> int | None:
    if name in _STANDARD:
        return _STANDARD[name]
    match = _OWN_FD.fullmatch(name)
    if match is None or match["owner"] not in (None, "self", "thread-self", str(os.getpid())):
        return None  # not a descriptor path, or another process's: an ordinary (odd) path
    return int(match["fd"])


def _kind_name(mode: int) -> str:
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISBLK(mode):
        return "a block device"
    return "a special file"


def resolve_target(path: str | os.PathLike) -> Target:
    """What writing to `path` means (see the module docstring). Raises UserError for what cannot be
    written: a folder, a socket, a block device, a closed descriptor, a symlink loop."""
    name = os.fspath(path)
    fd = _own_fd(name)
    if fd is not None:
        try:
            os.fstat(fd)
        except OSError:
            raise UserError(f"{name}: file descriptor {fd} is not open") from None
        return Target(Path(name), "fd", fd)
    try:
        info = os.stat(name)  # follows symlinks
    except (FileNotFoundError, NotADirectoryError):
        # a new file, or a dangling link whose target will be created (the folder is checked later)
        return Target(Path(os.path.realpath(name)), "file")
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UserError(f"{name}: symlink loop (following the link leads back to it)") from None
        raise UserError(f"{name}: {err.strerror or err}") from None
    if stat.S_ISREG(info.st_mode):
        return Target(Path(os.path.realpath(name)), "file")
    if stat.S_ISDIR(info.st_mode):
        raise UserError(f"{name} is a folder; give a file name")
    if stat.S_ISCHR(info.st_mode) or stat.S_ISFIFO(info.st_mode):
        return Target(Path(name), "through")
    raise UserError(
        f"{name} is {_kind_name(info.st_mode)}; zsclip writes to regular files, character devices "
        "(such as /dev/null), FIFOs and /dev/stdout"
    )


def is_regular_target(path: str | os.PathLike) -> bool:
    """True when writing to `path` replaces a regular file (not a device, FIFO or stdout)."""
    return resolve_target(path).kind == "file"


def _existing_folder(folder: Path) -> Path:
    """`folder`, or its nearest ancestor that exists; UserError when that ancestor is not a folder."""
    current = folder
    while True:
        try:
            info = os.stat(current)
        except (FileNotFoundError, NotADirectoryError):
            if current.parent == current:
                raise UserError(f"{folder}: no folder of it exists") from None
            current = current.parent
            continue
        except OSError as err:
            raise UserError(f"{current}: {err.strerror or err}") from None
        if not stat.S_ISDIR(info.st_mode):
            raise UserError(f"{current} is a file, not a folder")
        return current


def check_output(path: str | os.PathLike, option: str = "--output") -> None:
    """Everything about an output that can be known before a run: what the path is, that its folder
    exists or can be created, that a file can be made there. UserError (exit 2) naming `option`
    otherwise. Leaves nothing behind."""
    try:
        target = resolve_target(path)
        if target.kind != "file":
            return
        folder = _existing_folder(target.path.parent)
        probe = _make_temporary(folder, target.path.name)
    except UserError as err:
        raise UserError(f"{option} {os.fspath(path)}: {err}") from None
    except OSError as err:
        raise UserError(
            f"{option} {os.fspath(path)}: cannot write in {folder}: {err.strerror or err}"
        ) from None
    os.close(probe[0])
    with contextlib.suppress(OSError):
        os.unlink(probe[1])


# ------------------------------------------------------------------------------ temporaries


@functools.lru_cache(maxsize=1)
def host_tag() -> str:
    """8 hex digits for this machine and PID namespace: a PID means the same process only here."""
    import hashlib
    import socket

    namespace = ""
    with contextlib.suppress(OSError):
        namespace = str(os.stat("/proc/self/ns/pid").st_ino)
    return hashlib.sha256(f"{socket.gethostname()}/{namespace}".encode()).hexdigest()[:8]


def _make_temporary(folder: Path, name: str) -> tuple[int, str]:
    short = os.fsdecode(os.fsencode(name)[:_NAME_BYTES])
    prefix = f".{short}.zsclip-{host_tag()}-{os.getpid()}-"
    fd, tmp_name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=folder)
    return fd, tmp_name


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError, OSError):
        return False  # alive (another user's), or not a PID this system knows how to ask about
    return False


def sweep_stale_temporaries(folder: str | os.PathLike) -> list[str]:
    """Remove zsclip temporaries in `folder` left by processes of this machine that no longer run
    (kill -9, power loss). Returns the names removed."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMPORARY.fullmatch(entry.name)
        if match is None or match["host"] != host_tag():
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or not _process_gone(pid):
            continue
        with contextlib.suppress(OSError):
            if entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed.append(entry.name)
    return removed


def _sweep_once(folder: Path) -> None:
    key = os.fspath(folder)
    if key not in _swept:
        _swept.add(key)
        sweep_stale_temporaries(folder)


def temporary_sibling(path: str | os.PathLike) -> Path:
    """A fresh temporary path beside `path`, for writers that need a filename (e.g. torch.save).

    The caller renames it into place with os.replace and removes it on failure.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_once(path.parent)
    fd, tmp_name = _make_temporary(path.parent, path.name)
    os.fchmod(fd, _FILE_MODE)
    os.close(fd)
    return Path(tmp_name)


# ------------------------------------------------------------------------------ writers


def _fsync_folder(folder: Path) -> None:
    """Make a rename durable; some file systems cannot open or sync a folder, which is fine."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class OutputFile:
    """One output being written: `handle` takes the data, `commit()` puts it in place, `discard()`
    drops it. For a regular file the data lives in a temporary sibling until commit."""

    def __init__(self, path: str | os.PathLike, mode: str = "wb", encoding: str | None = None):
        self.name = os.fspath(path)
        self.target = resolve_target(path)
        self._tmp: str | None = None
        encoding = None if "b" in mode else (encoding or "utf-8")
        if self.target.kind == "fd":
            fd = os.dup(self.target.fd)
        elif self.target.kind == "through":
            fd = os.open(self.target.path, os.O_WRONLY | os.O_NOCTTY)
        else:
            fd = self._temporary()
        try:
            self.handle: IO = os.fdopen(fd, mode, encoding=encoding)
        except BaseException:
            os.close(fd)
            self._remove_temporary()
            raise

    def _temporary(self) -> int:
        final = self.target.path
        final.parent.mkdir(parents=True, exist_ok=True)
        _sweep_once(final.parent)
        fd, self._tmp = _make_temporary(final.parent, final.name)
        try:
            # keep the permissions of the file being replaced (a private file stays private)
            mode = stat.S_IMODE(os.stat(final).st_mode) & 0o777
        except OSError:
            mode = _FILE_MODE
        try:
            os.fchmod(fd, mode)
        except BaseException:
            os.close(fd)
            self._remove_temporary()
            raise
        return fd

    @property
    def atomic(self) -> bool:
        return self.target.kind == "file"

    def sync(self) -> None:
        """Flush the data to the disk (not yet in place); a no-op for devices and FIFOs."""
        self.handle.flush()
        if self.atomic:
            os.fsync(self.handle.fileno())

    def commit(self) -> None:
        """Put the data in place. On failure nothing is left behind and the old file is untouched."""
        try:
            self.sync()
            self.handle.close()
            if self.atomic:
                os.replace(self._tmp, self.target.path)
                self._tmp = None
                _fsync_folder(self.target.path.parent)
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        """Drop what was written (a device or FIFO keeps what it already received)."""
        with contextlib.suppress(OSError, ValueError):
            self.handle.close()
        self._remove_temporary()

    def _remove_temporary(self) -> None:
        if self._tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._tmp)
            self._tmp = None


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike, mode: str = "wb", encoding: str | None = None
) -> Iterator[IO]:
    """`with atomic_write(path, "w") as handle:` -- the data appears at `path` (or goes through to
    the device or FIFO it names) only when the block ends without an exception."""
    output = OutputFile(path, mode, encoding)
    try:
        yield output.handle
    except BaseException:
        output.discard()
        raise
    output.commit()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w", encoding="utf-8") as handle:
        handle.write(text)
