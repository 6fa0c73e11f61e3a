"""The sort manifest: a journal, one JSON record a line, of everything `zsclip sort` does to files.

A record is appended and flushed to the disk (fsync) *before* the step it announces, and another
after the step is done, so after a crash at any moment the manifest says what might be half done
and where each file may be (docs/acting.md has the format and the guarantees). Manifests live in
`DEST/.zsclip-sort/`, named by the UTC time their sort began.

Reading one treats it as hostile: each record is checked (known kind, fields of the right types,
paths absolute and normalised; destinations exactly DEST/FOLDER/NAME below the DEST the header
names, which must be the folder the manifest lies in; sources within the roots recorded before
them). A damaged manifest is refused with one line naming the line; nothing is changed. A last
line without its newline is a record whose writing was cut off by the crash: its step never
started, and it is dropped.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from zsclip.errors import UserError

FOLDER = ".zsclip-sort"  # below DEST
FORMAT = 1
MODES = ("copy", "move", "link")
MAX_LINE = 64 * 1024
_SHA256 = re.compile(r"[0-9a-f]{64}")
_STEM = re.compile(r"[0-9]{8}T[0-9]{6}\.[0-9]{6}Z(-[0-9]+)?")


class ManifestError(UserError):
    """A manifest that cannot be used; nothing was changed."""


@dataclass
class Action:
    """One file's journey, as the manifest tells it (later records override earlier ones)."""

    n: int
    src: str
    dst: str
    tmp: str
    size: int
    mtime_ns: int
    label: str | None = None
    score: float | None = None
    done: dict[str, Any] | None = None  # the "done" record: what the file at dst was then
    undo_to: str | None = None  # undo: where the file goes back to (a move's source)
    undo_tmp: str | None = None
    undone: str | None = None  # undo's result
    failed: str | None = None  # why the step could not be done (nothing was changed)


@dataclass
class Manifest:
    path: str
    dest: str
    mode: str
    request: dict[str, Any]
    created: str
    actions: dict[int, Action] = field(default_factory=dict)
    folders: list[str] = field(default_factory=list)  # label folders this sort created
    roots: list[str] = field(default_factory=list)
    ended: bool = False  # the sort finished (or was finished by a later run)
    undo_started: bool = False
    undo_ended: bool = False

    @property
    def stem(self) -> str:
        return os.path.basename(self.path)[: -len(".jsonl")]

    def next_n(self) -> int:
        return max(self.actions, default=0) + 1


# ------------------------------------------------------------------------------ fault injection


def _kill_at() -> int:
    try:
        return int(os.environ.get("ZSCLIP_FAULT_KILL_AT_STEP", "0"))
    except ValueError:
        return 0


_KILL_AT = _kill_at()
_steps = 0


def checkpoint() -> None:
    """A point between two steps that a crash may fall on. For the tests only: with
    ZSCLIP_FAULT_KILL_AT_STEP=N in the environment, the Nth checkpoint of the process kills it
    (SIGKILL), as a power cut or `kill -9` would."""
    global _steps
    if _KILL_AT:
        _steps += 1
        if _steps == _KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)


# ------------------------------------------------------------------------------ writing


def manifest_folder(dest: str) -> str:
    return os.path.join(dest, FOLDER)


def fsync_folder(folder: str) -> None:
    """Make a rename, link or unlink in `folder` durable (some file systems cannot; fine)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class Journal:
    """Appends records to a manifest, each flushed to the disk before `append` returns."""

    def __init__(self, path: str) -> None:
        self.path = path
        _drop_torn_tail(path)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | getattr(os, "O_CLOEXEC", 0))

    @classmethod
    def create(cls, dest: str, header: dict[str, Any]) -> "Journal":
        """A new manifest in DEST/.zsclip-sort/, named by the UTC time (never an existing one)."""
        folder = manifest_folder(dest)
        os.makedirs(folder, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        micro = f"{time.time_ns() // 1000 % 1_000_000:06d}"
        for attempt in range(1, 1000):
            suffix = "" if attempt == 1 else f"-{attempt}"
            path = os.path.join(folder, f"{stamp}.{micro}Z{suffix}.jsonl")
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                continue
            try:
                os.write(
                    fd,
                    (json.dumps(header, ensure_ascii=False) + "\n").encode(
                        "utf-8", "surrogateescape"
                    ),
                )
                os.fsync(fd)
            finally:
                os.close(fd)
            fsync_folder(folder)
            fsync_folder(dest)
            return cls(path)
        raise UserError(f"cannot name a new manifest in {folder}")

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        data = line.encode("utf-8", "surrogateescape")  # paths keep their bytes (os.fsencode)
        parts = [data] if not _KILL_AT else [data[: len(data) // 2], data[len(data) // 2 :]]
        for number, part in enumerate(parts):
            if number:
                checkpoint()  # tests: a record cut short by a crash, which readers drop
            written = 0
            while written < len(part):
                written += os.write(self._fd, part[written:])
        os.fsync(self._fd)
        checkpoint()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


def _drop_torn_tail(path: str) -> None:
    """Cut a last line whose writing a crash interrupted (no newline): its step never began."""
    with open(path, "rb+") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size == 0:
            return
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return
        keep = size
        while keep > 0:
            step = min(4096, keep)
            handle.seek(keep - step)
            chunk = handle.read(step)
            index = chunk.rfind(b"\n")
            if index >= 0:
                keep = keep - step + index + 1
                break
            keep -= step
        handle.truncate(keep)
        os.fsync(handle.fileno())


# ------------------------------------------------------------------------------ reading


def _lines(path: str) -> Iterator[tuple[int, str]]:
    """Complete lines (a torn last one left out), decoded with surrogateescape like file names."""
    with open(path, "rb") as handle:
        number = 0
        while True:
            raw = handle.readline(MAX_LINE + 1)
            if not raw:
                return
            number += 1
            if len(raw) > MAX_LINE:
                raise ManifestError(f"{path}, line {number}: longer than {MAX_LINE} bytes")
            if not raw.endswith(b"\n"):
                return  # torn by a crash: its step never started
            yield number, raw.decode("utf-8", "surrogateescape")


class _Checker:
    """Field checks that name the manifest line on failure."""

    def __init__(self, path: str) -> None:
        self.path, self.line = path, 0

    def fail(self, why: str) -> ManifestError:
        return ManifestError(
            f"manifest {self.path}, line {self.line}: {why}; it looks damaged and nothing was "
            "changed (restore it from a backup, or move files by hand)"
        )

    def get(self, record: dict, key: str, kind: type | tuple, optional: bool = False) -> Any:
        value = record.get(key)
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, kind):
            raise self.fail(f"field {key!r} is missing or of the wrong type")
        return value

    def path_field(self, record: dict, key: str) -> str:
        return self.path_value(self.get(record, key, str), key)

    def path_value(self, value: Any, key: str) -> str:
        if not isinstance(value, str):
            raise self.fail(f"{key} is not a path")
        if "\0" in value or not os.path.isabs(value) or os.path.normpath(value) != value:
            raise self.fail(f"{key} {value!r} is not an absolute, normalised path")
        return value


def _inside(path: str, folder: str) -> bool:
    return path.startswith(folder.rstrip("/") + "/")


def _in_dest(check: _Checker, path: str, dest: str, depth: int) -> str:
    """`path` must be DEST/FOLDER (depth 1) or DEST/FOLDER/NAME (depth 2), none of them hidden
    except a temporary's NAME."""
    if not _inside(path, dest):
        raise check.fail(f"{path!r} lies outside the manifest's destination {dest!r}")
    parts = path[len(dest.rstrip("/")) + 1 :].split("/")
    if len(parts) != depth or parts[0].startswith(".") or any(p in ("", ".", "..") for p in parts):
        raise check.fail(f"{path!r} is not a label folder or a file in one")
    return path


def read_manifest(path: str) -> Manifest:
    """A manifest, checked record by record (see the module docstring)."""
    path = os.path.abspath(path)
    check = _Checker(path)
    try:
        lines = list(_lines(path))
    except FileNotFoundError:
        raise UserError(f"manifest {path} does not exist") from None
    except OSError as err:
        raise UserError(f"cannot read manifest {path}: {err.strerror or err}") from None
    if not lines:
        raise ManifestError(f"manifest {path} is empty; nothing was changed")
    manifest = None
    for number, line in lines:
        check.line = number
        try:
            record = json.loads(line)
        except ValueError:
            raise check.fail("not a JSON record") from None
        if not isinstance(record, dict):
            raise check.fail("not a JSON object")
        if manifest is None:
            manifest = _header(check, record, path)
        else:
            _apply(check, manifest, record)
    return manifest  # type: ignore[return-value]


def _header(check: _Checker, record: dict, path: str) -> Manifest:
    if record.get("zsclip_sort") != FORMAT:
        raise check.fail(f"not a zsclip sort manifest of format {FORMAT}")
    dest = check.path_field(record, "dest")
    mode = check.get(record, "mode", str)
    if mode not in MODES:
        raise check.fail(f"unknown mode {mode!r}")
    where = os.path.realpath(os.path.dirname(os.path.dirname(path)))
    if os.path.basename(os.path.dirname(path)) != FOLDER or where != os.path.realpath(dest):
        raise check.fail(f"it names {dest!r} as its destination but lies in {where!r}")
    if not _STEM.fullmatch(
        os.path.basename(path)[: -len(".jsonl")] if path.endswith(".jsonl") else ""
    ):
        raise check.fail("its file name is not a sort's UTC time (YYYYMMDDTHHMMSS.ffffffZ.jsonl)")
    request = check.get(record, "request", dict)
    created = check.get(record, "created", str)
    return Manifest(path, dest, mode, request, created)


def _apply(check: _Checker, manifest: Manifest, record: dict) -> None:
    """Fold one record into `manifest`, checking it."""
    op = check.get(record, "op", str)
    if manifest.undo_ended:
        raise check.fail("a record after the end of the undo")
    if op == "roots":
        roots = check.get(record, "roots", list)
        manifest.roots += [check.path_value(root, "a root") for root in roots]
        return
    if op == "mkdir":
        manifest.folders.append(_in_dest(check, check.path_field(record, "path"), manifest.dest, 1))
        return
    if op == "end":
        manifest.ended = True
        return
    if op == "undo-end":
        manifest.undo_ended = True
        return
    n = check.get(record, "n", int)
    if op == "plan":
        if manifest.ended or manifest.undo_started:
            raise check.fail("a new step after the sort ended")
        if n in manifest.actions or n < 1:
            raise check.fail(f"step {n} planned twice")
        manifest.actions[n] = _plan(check, manifest, record, n)
        return
    action = manifest.actions.get(n)
    if action is None:
        raise check.fail(f"step {n} was never planned")
    _step(check, manifest, action, op, record)


def _plan(check: _Checker, manifest: Manifest, record: dict, n: int) -> Action:
    src = check.path_field(record, "src")
    if not any(src == root or _inside(src, root) for root in manifest.roots):
        raise check.fail(f"source {src!r} lies outside the folders the sort was given")
    if _inside(src, manifest.dest):
        raise check.fail(f"source {src!r} lies inside the destination")
    dst = _in_dest(check, check.path_field(record, "dst"), manifest.dest, 2)
    tmp = _in_dest(check, check.path_field(record, "tmp"), manifest.dest, 2)
    score = check.get(record, "score", (int, float), optional=True)
    return Action(
        n,
        src,
        dst,
        tmp,
        size=check.get(record, "size", int),
        mtime_ns=check.get(record, "mtime_ns", int),
        label=check.get(record, "label", str, optional=True),
        score=None if score is None else float(score),
    )


def _step(check: _Checker, manifest: Manifest, action: Action, op: str, record: dict) -> None:
    if op == "retarget":
        action.dst = _in_dest(check, check.path_field(record, "dst"), manifest.dest, 2)
    elif op == "done":
        done = {
            "size": check.get(record, "size", int),
            "mtime_ns": check.get(record, "mtime_ns", int),
        }
        sha = check.get(record, "sha256", str, optional=True)
        if sha is not None and not _SHA256.fullmatch(sha):
            raise check.fail("sha256 is not 64 hex digits")
        done["sha256"] = sha
        done["target"] = check.get(record, "target", str, optional=True)
        action.done = done
    elif op == "undo":
        manifest.undo_started = True
        if manifest.mode == "move":
            to = check.path_field(record, "to")
            if not any(to == root or _inside(to, root) for root in manifest.roots):
                raise check.fail(f"undo target {to!r} lies outside the folders the sort was given")
            action.undo_to, action.undo_tmp = to, check.path_field(record, "tmp")
            if os.path.dirname(action.undo_tmp) != os.path.dirname(to):
                raise check.fail("an undo's temporary file must lie beside its target")
        else:
            action.undo_to = action.dst  # begun: the copy or link may already be gone
    elif op == "undone":
        action.undone = check.get(record, "result", str)
    elif op == "failed":
        action.failed = check.get(record, "reason", str)
    else:
        raise check.fail(f"unknown record {op!r}")


def manifests(dest: str) -> list[Manifest]:
    """Every manifest in DEST/.zsclip-sort/, oldest first."""
    folder = manifest_folder(dest)
    try:
        names = sorted(name for name in os.listdir(folder) if name.endswith(".jsonl"))
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as err:
        raise UserError(f"cannot read {folder}: {err.strerror or err}") from None
    return [
        read_manifest(os.path.join(folder, name))
        for name in names
        if _STEM.fullmatch(name[: -len(".jsonl")])
    ]


def unfinished(dest: str) -> list[Manifest]:
    """The manifests in DEST/.zsclip-sort/ whose sort never ended and was not undone, oldest
    first."""
    return [m for m in manifests(dest) if not m.ended and not m.undo_started]


@contextlib.contextmanager
def locked(dest: str) -> Iterator[None]:
    """Only one sort or undo at a time in DEST (an advisory lock; the kernel drops it when the
    process dies, kill -9 included)."""
    import fcntl

    folder = manifest_folder(dest)
    os.makedirs(folder, exist_ok=True)
    fd = os.open(
        os.path.join(folder, "lock"), os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644
    )
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"another zsclip sort (or undo) is working in {dest}; wait for it to finish"
            ) from None
        yield
    finally:
        os.close(fd)
