"""The sort job: classified images -> DEST/<label>/<file name> (copied, moved or linked), the
unsure ones -> DEST/unsure/, with a manifest that makes every step safe to interrupt and undo.

`Sorter` is one run into DEST. Opened, it takes DEST's lock, then finishes what an interrupted
earlier sort left half done (zsclip.jobs.filing steps are idempotent): a run with the same request
carries on in that run's manifest and skips the files it already placed; any other finishes the old
run's unfinished steps and starts its own manifest. `place` files one prediction; `undo` puts a
manifest's files back. docs/acting.md describes the guarantees.

Label names become folder names by `folder_name`: no `/`, no control characters, no leading dot,
at most MAX_FOLDER_BYTES bytes; two labels that would share a folder are a usage error.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import time
import unicodedata
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from zsclip.errors import UserError
from zsclip.jobs import manifest as journal_format
from zsclip.jobs.filing import Filer, FilingError, free_name, numbered, same_content
from zsclip.jobs.manifest import FORMAT, Action, Journal, Manifest, fsync_folder

if TYPE_CHECKING:
    from zsclip.jobs.classify import Prediction
    from zsclip.jobs.inputs import InputItem

UNSURE = "unsure"  # the folder for images no label was accepted for
MAX_FOLDER_BYTES = 100
# path separators, characters Windows and macOS (SMB, exFAT) refuse, controls, bidi overrides
_UNSAFE = re.compile('[/\\\\:*?"<>|\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]')
_DONE = {"copy": "copied", "move": "moved", "link": "linked"}


def folder_name(label: str) -> str:
    """A safe folder name for `label` (see the module docstring); UserError when nothing is left."""
    name = _UNSAFE.sub("_", unicodedata.normalize("NFC", label))
    name = " ".join(name.split()).strip(". ")
    encoded = name.encode("utf-8", "surrogateescape")[:MAX_FOLDER_BYTES]
    name = encoded.decode("utf-8", "ignore").strip(". ")  # never half a character
    if not name or name.startswith("."):
        raise UserError(f"label {label!r} leaves no usable folder name; rename it")
    return name


def label_folders(labels: list[str]) -> dict[str, str]:
    """label -> folder name, refusing two labels in one folder (names compared ignoring case, as
    macOS and Windows file systems do) and a label whose folder would be `unsure/`."""
    folders: dict[str, str] = {}
    seen: dict[str, str] = {UNSURE: "(the folder for unsure images)"}
    for label in labels:
        folder = folder_name(label)
        key = folder.casefold()
        if key in seen:
            raise UserError(
                f"labels {seen[key]!r} and {label!r} would share the folder {folder!r}; rename one"
                if key != UNSURE
                else f"label {label!r} would share the folder {UNSURE!r} kept for unsure images; "
                "rename it"
            )
        seen[key], folders[label] = label, folder
    return folders


@dataclass
class SortRow:
    """One input's outcome: where it went (or would go, with --dry-run) and why."""

    path: str
    label: str | None = None
    score: float | None = None
    to: str | None = None
    status: str = ""  # copied, moved, linked, planned, already (an earlier run placed it)
    error: str | None = None


@dataclass(frozen=True)
class SortSettings:
    dest: str  # absolute
    mode: str  # copy, move or link
    request: dict  # what decides the folders (labels, model, ...): a rerun must match to resume
    dry_run: bool = False


@dataclass
class Sorter:
    """One sort into settings.dest: `with Sorter(...) as sorter:` (see the module docstring)."""

    settings: SortSettings
    folders: dict[str, str]  # label -> folder name
    note: Callable[[str], None] = lambda message: None
    manifest: Manifest | None = None
    handled: dict[str, Action] = field(default_factory=dict)  # source -> its finished step
    # moves finished by earlier runs of the same request that ended (a crash after the end record,
    # or the same command run twice): their sources are gone, and that is no error
    earlier: dict[str, Action] = field(default_factory=dict)
    _journal: Journal | None = None
    _lock: contextlib.ExitStack | None = None
    _taken: set[str] = field(default_factory=set)  # names planned by a dry run
    _made: set[str] = field(default_factory=set)  # folders known to exist
    _roots: list[str] = field(default_factory=list)

    def __enter__(self) -> "Sorter":
        dest = self.settings.dest
        if os.path.lexists(dest) and not os.path.isdir(dest):
            raise UserError(f"--to {dest}: not a folder")
        if self.settings.dry_run:
            for old in journal_format.unfinished(dest):
                self.note(f"an interrupted sort ({old.path}) would be finished first")
                if self._matches(old):
                    self._adopt(old)
            self._remember_earlier()
            return self
        self._lock = contextlib.ExitStack()
        self._lock.enter_context(journal_format.locked(dest))
        try:
            self._recover()
            self._remember_earlier()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, kind: object, error: object, trace: object) -> None:
        if self._journal is not None:
            if kind is None:
                self._journal.append({"op": "end"})
            self._journal.close()
            self._journal = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # -------------------------------------------------------------------------- resuming

    def _matches(self, old: Manifest) -> bool:
        return old.mode == self.settings.mode and old.request == self.settings.request

    def _adopt(self, old: Manifest) -> None:
        self.manifest = old
        self.handled = {a.src: a for a in old.actions.values() if a.done is not None}

    def _recover(self) -> None:
        """Finish every interrupted sort in DEST; carry on in the one that matches this run."""
        for old in journal_format.unfinished(self.settings.dest):
            journal = Journal(old.path)
            settled = finish_steps(old, journal, self.note)
            self.note(f"finished {settled} interrupted step(s) of the sort in {old.path}")
            if self.manifest is None and self._matches(old):
                self._adopt(old)
                self._journal = journal
                self.note(f"carrying on with that sort ({len(self.handled)} file(s) done)")
            else:
                journal.append({"op": "end", "recovered": True})
                journal.close()

    def _remember_earlier(self) -> None:
        for old in journal_format.manifests(self.settings.dest):
            if old.ended and not old.undo_started and self._matches(old) and old.mode == "move":
                self.earlier.update((a.src, a) for a in old.actions.values() if a.done is not None)

    def _open_journal(self) -> Journal:
        if self._journal is None:
            header = {
                "zsclip_sort": FORMAT,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "dest": self.settings.dest,
                "mode": self.settings.mode,
                "request": self.settings.request,
            }
            os.makedirs(self.settings.dest, exist_ok=True)
            self._journal = Journal.create(self.settings.dest, header)
            self.manifest = journal_format.read_manifest(self._journal.path)
        return self._journal

    @property
    def manifest_path(self) -> str | None:
        return None if self.manifest is None else self.manifest.path

    # -------------------------------------------------------------------------- triage

    def triage(self, items: Iterable["InputItem"]) -> tuple[list["InputItem"], list[SortRow]]:
        """The inputs still to sort, and rows for the others: placed by an earlier run, or inside
        DEST (never sorted again), or named twice."""
        dest_real = os.path.realpath(self.settings.dest)
        pending, rows, seen = [], [], set()
        inside = 0
        for item in items:
            source = os.path.abspath(item.path)
            done = self.handled.get(source)
            if done is not None:
                rows.append(SortRow(item.path, done.label, done.score, done.dst, "already"))
                continue
            real = os.path.realpath(item.path)
            if real == dest_real or real.startswith(dest_real.rstrip("/") + "/"):
                inside += 1
                continue
            if real in seen:
                continue
            seen.add(real)
            pending.append(item)
        if inside:
            self.note(f"{inside} image(s) already inside {self.settings.dest} were left alone")
        self._roots = _roots(os.path.abspath(item.path) for item in pending)
        return pending, rows

    def _done_before(self, path: str) -> Action | None:
        source = os.path.abspath(path)
        return self.handled.get(source) or self.earlier.get(source)

    def missing_but_done(self, path: str) -> bool:
        """An INPUT that is gone because an earlier (perhaps interrupted) run of the same sort
        moved it."""
        return not os.path.lexists(path) and self._done_before(path) is not None

    def done_rows(self, paths: Iterable[str]) -> list[SortRow]:
        rows = []
        for path in paths:
            done = self._done_before(path)
            assert done is not None
            rows.append(SortRow(path, done.label, done.score, done.dst, "already"))
        return rows

    # -------------------------------------------------------------------------- placing

    def place(self, prediction: "Prediction") -> SortRow:
        """File one classified image; its row says where it went (or the error: it stays put)."""
        row = SortRow(prediction.path, prediction.label, prediction.score)
        if prediction.error is not None:
            row.error = prediction.error
            return row
        folder = UNSURE if prediction.label is None else self.folders[prediction.label]
        source = os.path.abspath(prediction.path)
        problem = self._source_problem(source)
        if problem is not None:
            row.error = problem
            return row
        try:
            target_folder = self._folder(folder)
            twin = self._twin(source, target_folder)
            if twin is not None:  # a copy or link made by an earlier run: not made twice
                row.to, row.status = twin, "already"
                return row
            if self.settings.dry_run:
                row.to = free_name(
                    os.path.join(target_folder, os.path.basename(source)), self._taken
                )
                self._taken.add(row.to)
                row.status = "planned"
                return row
            action = self._plan(source, target_folder, prediction)
        except (FilingError, OSError) as err:
            row.error = self._reason(err)
            return row
        try:
            row.status = Filer(self._open_journal(), self.settings.mode).forward(action)
            row.to = action.dst
        except (FilingError, OSError) as err:
            row.error = self._reason(err)
            action.failed = row.error  # settled: a rerun does not try it again
            self._open_journal().append({"op": "failed", "n": action.n, "reason": row.error})
        return row

    def _reason(self, err: Exception) -> str:
        if isinstance(err, FilingError):
            return str(err)
        why = getattr(err, "strerror", None) or str(err)
        return f"cannot {self.settings.mode} it: {why}; it stays where it is"

    def _twin(self, source: str, folder: str) -> str | None:
        """With --copy or --link: the file among NAME, NAME-2, ... in `folder` that already is
        a copy of (or a link to) `source`."""
        if self.settings.mode == "move" or not os.path.isdir(folder):
            return None
        for number in range(1, 100):
            candidate = numbered(os.path.join(folder, os.path.basename(source)), number)
            if not os.path.lexists(candidate):
                return None
            if self.settings.mode == "link":
                if os.path.islink(candidate) and os.readlink(candidate) == source:
                    return candidate
            elif not os.path.islink(candidate) and same_content(candidate, source):
                return candidate
        return None

    def _source_problem(self, source: str) -> str | None:
        try:
            info = os.lstat(source)
            if stat.S_ISLNK(info.st_mode):
                if self.settings.mode == "move":
                    return "a symlink: not moved (use --copy or --link, or sort what it points to)"
                info = os.stat(source)
        except OSError as err:
            return err.strerror or str(err)
        if not stat.S_ISREG(info.st_mode):
            return "not a regular file"
        return None

    def _folder(self, folder: str) -> str:
        """DEST/folder, made (and recorded, so undo can remove it again) when missing."""
        path = os.path.join(self.settings.dest, folder)
        if path in self._made:
            return path
        if os.path.lexists(path):
            if not os.path.isdir(path):
                raise FilingError(f"{path} is in the way: a file where the folder should be")
        elif not self.settings.dry_run:
            self._open_journal().append({"op": "mkdir", "path": path})
            os.makedirs(path, exist_ok=True)
            fsync_folder(self.settings.dest)
        self._made.add(path)
        return path

    def _plan(self, source: str, folder: str, prediction: "Prediction") -> Action:
        journal = self._open_journal()
        assert self.manifest is not None
        if self._roots and not set(self._roots) <= set(self.manifest.roots):
            journal.append({"op": "roots", "roots": self._roots})
            self.manifest.roots += self._roots
        number = self.manifest.next_n()
        info = os.stat(source)
        action = Action(
            number,
            source,
            free_name(os.path.join(folder, os.path.basename(source))),
            os.path.join(folder, f".zsclip-sort-{self.manifest.stem}-{number}.tmp"),
            size=info.st_size,
            mtime_ns=info.st_mtime_ns,
            label=prediction.label,
            score=None if prediction.score is None else round(float(prediction.score), 6),
        )
        record = {"op": "plan", "n": number, "src": source, "dst": action.dst, "tmp": action.tmp}
        record.update(size=action.size, mtime_ns=action.mtime_ns)
        record.update(label=action.label, score=action.score)
        journal.append(record)
        self.manifest.actions[number] = action
        return action


def _roots(paths: Iterable[str]) -> list[str]:
    """The fewest folders that hold every one of `paths`' parent folders."""
    parents = sorted({os.path.dirname(path) for path in paths})
    roots: list[str] = []
    for parent in parents:
        if not any(parent == root or parent.startswith(root.rstrip("/") + "/") for root in roots):
            roots.append(parent)
    return roots


def finish_steps(old: Manifest, journal: Journal, note: Callable[[str], None]) -> int:
    """Carry out every planned step of `old` that was not done (after a crash); returns how
    many. A step that cannot be done any more is recorded as failed, with a note."""
    filer = Filer(journal, old.mode)
    count = 0
    for action in sorted(old.actions.values(), key=lambda a: a.n):
        if action.done is not None or action.failed is not None:
            continue
        count += 1
        try:
            filer.forward(action)
        except (FilingError, OSError) as err:
            reason = str(err) if isinstance(err, FilingError) else (err.strerror or str(err))
            journal.append({"op": "failed", "n": action.n, "reason": reason})
            action.failed = reason
            note(f"step {action.n} ({action.src}) could not be finished: {reason}")
    return count


# ------------------------------------------------------------------------------ undo


@dataclass
class UndoRow:
    path: str  # where the sort put the file
    to: str | None  # where it is now (moved back), or None (removed, missing)
    result: str  # moved back, removed, kept: changed since the sort, missing: ..., ...

    @property
    def left(self) -> bool:
        """Something the user should look at: kept or missing."""
        return self.result.startswith(("kept", "missing", "failed"))


def undo(manifest_path: str, note: Callable[[str], None]) -> Iterator[UndoRow]:
    """Put back everything the sort of `manifest_path` did, last step first, then remove the
    label folders it made if they are empty. Safe to interrupt and run again."""
    old = journal_format.read_manifest(manifest_path)
    with journal_format.locked(old.dest):
        old = journal_format.read_manifest(manifest_path)  # read again under the lock
        if old.undo_ended:
            note("this sort was undone already; the rows repeat what was done then")
        journal = Journal(old.path)
        try:
            if not old.ended and not old.undo_started:
                settled = finish_steps(old, journal, note)
                if settled:
                    note(f"finished {settled} interrupted step(s) before undoing them")
            filer = Filer(journal, old.mode)
            for action in sorted(old.actions.values(), key=lambda a: -a.n):
                yield _undo_one(filer, action)
            for folder in reversed(old.folders):
                with contextlib.suppress(OSError):  # not empty (or gone): it stays
                    os.rmdir(folder)
            fsync_folder(old.dest)
            if not old.undo_ended:
                journal.append({"op": "undo-end"})
        finally:
            journal.close()


def _undo_one(filer: Filer, action: Action) -> UndoRow:
    if action.failed is not None:
        return UndoRow(action.src, action.src, f"not sorted ({action.failed})")
    if action.undone is not None:  # undone by an earlier run: the same row again
        if filer.mode == "move":
            to = action.undo_to
        else:
            to = action.dst if action.undone.startswith("kept") else None
        return UndoRow(action.dst, to, action.undone)
    try:
        if action.done is None:  # planned, never finished (finish_steps did not run)
            filer.forward(action)
        result, to = filer.backward(action)
    except (FilingError, OSError) as err:
        reason = str(err) if isinstance(err, FilingError) else (err.strerror or str(err))
        return UndoRow(action.dst, action.dst, f"failed: {reason}")
    return UndoRow(action.dst, to, result)
