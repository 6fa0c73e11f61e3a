"""Copying, moving and linking people's files so that none is ever lost or overwritten.

Every step of `Filer.forward` (the sort) and `Filer.backward` (its undo) is *idempotent*: it looks
at what is on the disk before acting, so running it again after a crash at any point finishes the
job instead of repeating it. The manifest (zsclip.jobs.manifest) holds each step's intent, written
to the disk before the step. The rules that make a `kill -9` harmless:

* Nothing is overwritten: a new name is made with os.link, os.symlink or renameat2(NOREPLACE),
  which fail when the name is taken; then the file takes the next free name (`-2`, `-3`, ...) and
  the manifest says so (`retarget`) before it is used.
* A copy is written to a temporary name in the target folder, flushed (fsync) and only then given
  its name; a half copy is only ever a temporary, removed by the next run.
* A move within a file system gives the file its new name first (a hard link) and removes the old
  name after; across file systems it is a copy (as above) and the source is removed only once the
  copy is in place and flushed. In between, the file is whole in both places; never in neither.
* Folder entries are flushed (fsync of the folder) after each rename, link and unlink.

Tests kill the process at every step: with ZSCLIP_FAULT_KILL_AT_STEP=N set, the Nth checkpoint
(zsclip.jobs.manifest.checkpoint) of the process sends it SIGKILL (docs/acting.md, "How it is tested").
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from dataclasses import dataclass
from typing import Callable

from zsclip.jobs.manifest import Action, Journal, checkpoint, fsync_folder

_CHUNK = 1 << 20
_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS}


class FilingError(Exception):
    """A step that cannot be done (its source is gone, a name cannot be made); the message is one
    line. Nothing was lost: every file is where it was or where the manifest says."""


# ------------------------------------------------------------------------------ primitives


def numbered(path: str, number: int) -> str:
    """`path` for 1, else NAME-<number>.EXT (the name shortened to fit NAME_MAX)."""
    if number == 1:
        return path
    folder, name = os.path.split(path)
    stem, suffix = os.path.splitext(name)
    if not stem:  # ".jpg": a hidden name without a suffix
        stem, suffix = name, ""
    tag = f"-{number}"
    budget = 250 - len(os.fsencode(suffix + tag))  # NAME_MAX is 255 bytes
    short = os.fsdecode(os.fsencode(stem)[:budget])
    return os.path.join(folder, f"{short}{tag}{suffix}")


def free_name(path: str, taken: set[str] | None = None) -> str:
    """`path` if nothing has that name, else NAME-2.EXT, NAME-3.EXT, ... (the first free one;
    `taken`: names to treat as used too)."""
    number = 1
    while True:
        candidate = numbered(path, number)
        if not os.path.lexists(candidate) and candidate not in (taken or ()):
            return candidate
        number += 1


def _renameat2_noreplace(src: str, dst: str) -> None:
    """rename(2) that fails with EEXIST instead of replacing `dst` (Linux renameat2)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    function = getattr(libc, "renameat2", None)
    if function is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    at_fdcwd, rename_noreplace = -100, 1
    if function(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_noreplace) != 0:
        code = ctypes.get_errno()
        if code == errno.EEXIST:
            raise FileExistsError(code, os.strerror(code), dst)
        raise OSError(code, os.strerror(code), src)


def rename_no_replace(src: str, dst: str) -> None:
    """Give `src` the name `dst` and drop the old name; FileExistsError when `dst` exists, OSError
    EXDEV across file systems. A crash in between leaves both names on the same file."""
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError as err:
        if err.errno not in _NO_LINKS:
            raise
        _renameat2_noreplace(src, dst)  # a file system without hard links (FAT, some FUSE)
        return
    checkpoint()
    os.unlink(src)


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def same_content(first: str, second: str) -> bool:
    """Two regular files with the same bytes."""
    try:
        if os.path.getsize(first) != os.path.getsize(second):
            return False
        with open(first, "rb") as a, open(second, "rb") as b:
            while True:
                chunk = a.read(_CHUNK)
                if chunk != b.read(_CHUNK):
                    return False
                if not chunk:
                    return True
    except OSError:
        return False


def copy_to_temporary(src: str, tmp: str) -> str:
    """Copy the bytes, permissions and times of `src` to the new file `tmp` (O_EXCL), flushed to
    the disk. Returns the sha256 of what was written."""
    import shutil

    digest = hashlib.sha256()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        with open(src, "rb") as source, os.fdopen(fd, "wb", closefd=False) as target:
            while chunk := source.read(_CHUNK):
                digest.update(chunk)
                target.write(chunk)
            target.flush()
            shutil.copystat(src, tmp)
            os.fsync(fd)
    finally:
        os.close(fd)
    return digest.hexdigest()


def _remove_temporary(tmp: str) -> None:
    """A temporary named in the manifest is only ever zsclip's own half copy."""
    try:
        if not stat.S_ISDIR(os.lstat(tmp).st_mode):
            os.unlink(tmp)
            fsync_folder(os.path.dirname(tmp))
    except FileNotFoundError:
        pass


def _same_file(first: str, second: str) -> bool:
    try:
        return os.path.samestat(os.lstat(first), os.lstat(second))
    except OSError:
        return False


# ------------------------------------------------------------------------------ the steps


@dataclass
class Filer:
    """Carries out manifest actions (see the module docstring); `mode` is copy, move or link."""

    journal: Journal
    mode: str

    def forward(self, action: Action) -> str:
        """Do (or finish) the sort's step for `action`; returns what was done."""
        _remove_temporary(action.tmp)
        if self.mode == "copy":
            self._copy(action)
            return "copied"
        if self.mode == "link":
            self._link(action)
            return "linked"
        action.dst = self.relocate(
            action.src, action.dst, action.tmp, lambda: self._retarget(action)
        )
        self._done(action)
        return "moved"

    def _retarget(self, action: Action) -> str:
        action.dst = free_name(action.dst)
        self.journal.append({"op": "retarget", "n": action.n, "dst": action.dst})
        return action.dst

    def _done(self, action: Action, **facts: str) -> None:
        info = os.lstat(action.dst)
        record = {"op": "done", "n": action.n, "size": info.st_size, "mtime_ns": info.st_mtime_ns}
        record.update(facts)
        self.journal.append(record)
        action.done = {"sha256": None, "target": None, **record}

    def _copy(self, action: Action) -> None:
        while True:
            if not os.path.isfile(action.src):
                raise FilingError(f"{action.src}: the file to copy is gone")
            if os.path.lexists(action.dst):
                if not os.path.islink(action.dst) and same_content(action.dst, action.src):
                    break  # the copy was made before a crash
                self._retarget(action)
                continue
            copy_to_temporary(action.src, action.tmp)
            checkpoint()
            try:
                rename_no_replace(action.tmp, action.dst)
            except FileExistsError:
                _remove_temporary(action.tmp)
                continue
            checkpoint()
            fsync_folder(os.path.dirname(action.dst))
            break
        self._done(action, sha256=sha256_of(action.dst))

    def _link(self, action: Action) -> None:
        while True:
            if os.path.lexists(action.dst):
                if os.path.islink(action.dst) and os.readlink(action.dst) == action.src:
                    break  # made before a crash
                self._retarget(action)
                continue
            if not os.path.lexists(action.src):
                raise FilingError(f"{action.src}: the file to link to is gone")
            try:
                os.symlink(action.src, action.dst)
            except FileExistsError:
                continue
            checkpoint()
            fsync_folder(os.path.dirname(action.dst))
            break
        self._done(action, target=action.src)

    def relocate(self, src: str, dst: str, tmp: str, retarget: Callable[[], str]) -> str:
        """Move the file `src` to `dst` (or to the name `retarget()` picks when `dst` is taken);
        returns where it is. Safe to call again after a crash at any point: the source's name is
        only ever removed once the file is whole at the destination."""
        _remove_temporary(tmp)
        while True:
            if not os.path.lexists(src):
                if os.path.lexists(dst):
                    return dst  # done before a crash
                raise FilingError(f"{src}: the file to move is gone and {dst} does not exist")
            if os.path.lexists(dst):
                if _same_file(src, dst) or same_content(src, dst):
                    self._drop_source(src)  # the new name was made before a crash
                    return dst
                dst = retarget()
                continue
            try:
                os.link(src, dst, follow_symlinks=False)  # never replaces an existing dst
            except FileExistsError:
                continue
            except OSError as err:
                if err.errno != errno.EXDEV and err.errno not in _NO_LINKS:
                    raise FilingError(f"cannot move {src} to {dst}: {err.strerror}") from None
                if not self._move_without_link(src, dst, tmp, err.errno):
                    continue
            checkpoint()
            fsync_folder(os.path.dirname(dst))
            self._drop_source(src)
            return dst

    def _move_without_link(self, src: str, dst: str, tmp: str, code: int) -> bool:
        """Across file systems (or without hard links): rename(NOREPLACE) where both names are on
        one file system, else copy to `tmp`, flush and name it `dst`. False when `dst` got taken
        meanwhile."""
        if code != errno.EXDEV:
            try:
                _renameat2_noreplace(src, dst)
                checkpoint()
                return True  # the caller then finds no source left to drop
            except FileExistsError:
                return False
            except OSError:
                pass  # no renameat2 here either: copy
        copy_to_temporary(src, tmp)
        checkpoint()
        try:
            rename_no_replace(tmp, dst)
        except FileExistsError:
            _remove_temporary(tmp)
            return False
        return True

    @staticmethod
    def _drop_source(src: str) -> None:
        try:
            os.unlink(src)
        except FileNotFoundError:
            return
        checkpoint()
        fsync_folder(os.path.dirname(src))

    # -------------------------------------------------------------------------- undo

    def backward(self, action: Action) -> tuple[str, str | None]:
        """Undo `action` (a finished step): (what happened, where the file is now or None)."""
        if self.mode == "move":
            return self._move_back(action)
        if not os.path.lexists(action.dst):
            result = "removed" if action.undo_to is not None else "already gone"
            self._undone(action, result)
            return result, None
        self.journal.append({"op": "undo", "n": action.n})
        action.undo_to = action.dst  # marks "undo begun" for this run
        kept = self._why_keep(action)
        if kept is None:
            os.unlink(action.dst)
            checkpoint()
            fsync_folder(os.path.dirname(action.dst))
            self._undone(action, "removed")
            return "removed", None
        self._undone(action, kept)
        return kept, action.dst

    def _why_keep(self, action: Action) -> str | None:
        """Why the copy or link made by `action` must stay, or None: it may go."""
        if not self._unchanged(action):
            return "kept: changed since the sort"
        if self.mode == "copy" and not same_content(action.src, action.dst):
            # the user deleted (or edited) the original since: this copy may be the only one
            return "kept: the original is gone or changed since, so this copy stays"
        return None

    def _unchanged(self, action: Action) -> bool:
        done = action.done or {}
        if self.mode == "link":
            return os.path.islink(action.dst) and os.readlink(action.dst) == done.get("target")
        try:
            info = os.lstat(action.dst)
        except OSError:
            return False
        return (
            stat.S_ISREG(info.st_mode)
            and info.st_size == done.get("size")
            and info.st_mtime_ns == done.get("mtime_ns")
            and sha256_of(action.dst) == done.get("sha256")
        )

    def _move_back(self, action: Action) -> tuple[str, str | None]:
        begun = action.undo_to is not None
        if not begun and not os.path.lexists(action.dst):
            self._undone(action, "missing: nothing to put back")
            return "missing: nothing to put back", None
        done = action.done or {}
        changed = False
        if os.path.lexists(action.dst):
            info = os.lstat(action.dst)
            changed = (info.st_size, info.st_mtime_ns) != (done.get("size"), done.get("mtime_ns"))
        if not begun:
            self._announce_undo(action, free_name(action.src))

        def retarget() -> str:
            return self._announce_undo(action, free_name(action.undo_to or action.src))

        os.makedirs(os.path.dirname(action.undo_to), exist_ok=True)
        to = self.relocate(action.dst, action.undo_to, action.undo_tmp, retarget)
        result = "moved back (changed since the sort)" if changed else "moved back"
        self._undone(action, result)
        return result, to

    def _announce_undo(self, action: Action, to: str) -> str:
        folder, name = os.path.split(to)
        tmp = os.path.join(folder, f".{name[:200]}.zsclip-undo-{action.n}.tmp")
        self.journal.append({"op": "undo", "n": action.n, "to": to, "tmp": tmp})
        action.undo_to, action.undo_tmp = to, tmp
        return to

    def _undone(self, action: Action, result: str) -> None:
        self.journal.append({"op": "undone", "n": action.n, "result": result})
        action.undone = result
