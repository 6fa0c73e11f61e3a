"""The sort job without a model: folders from labels, copy/move/link, collisions, undo, hostile
manifests, and a kill -9 at every step of a move and of its undo (a forked child killed by the
fault-injection checkpoint, zsclip.jobs.manifest.checkpoint)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
from pathlib import Path

import pytest

from zsclip.errors import UserError
from zsclip.jobs import manifest as manifest_module
from zsclip.jobs.classify import Prediction
from zsclip.jobs.inputs import InputItem
from zsclip.jobs.manifest import ManifestError, read_manifest
from zsclip.jobs.sort import (
    MAX_FOLDER_BYTES,
    Sorter,
    SortSettings,
    folder_name,
    label_folders,
    undo,
)

LABELS = ["cat", "dog"]


def make_world(root: Path, seed: int = 0) -> dict[str, tuple[bytes, str | None]]:
    """Source files (bytes random, two sharing a name) -> (content, label; None: unsure), and a
    user's own file already in DEST/cat/ under a name the sort will want."""
    rng = random.Random(seed)
    files = {
        "src/a/x.jpg": "cat",
        "src/b/x.jpg": "cat",  # same name, same folder: -2
        "src/b/y.png": "dog",
        "src/z.jpg": None,
    }
    world = {}
    for relative, label in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        data = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 3000)))
        path.write_bytes(data)
        world[str(path)] = (data, label)
    users = root / "dest" / "cat" / "x.jpg"
    users.parent.mkdir(parents=True)
    users.write_bytes(b"the user's own file")
    return world


def sort_world(root: Path, world: dict, mode: str = "move", dry_run: bool = False):
    settings = SortSettings(str(root / "dest"), mode, {"labels": LABELS}, dry_run=dry_run)
    with Sorter(settings, label_folders(LABELS)) as sorter:
        pending, rows = sorter.triage(InputItem(path) for path in world)
        for item in pending:
            label = world[item.path][1]
            top = [(label or "cat", 0.9 if label else 0.4)]
            rows.append(sorter.place(Prediction(item.path, top, passing=1 if label else 0)))
    return rows, sorter.manifest_path


def contents(root: Path) -> dict[bytes, list[str]]:
    """Every visible file under root (manifests and zsclip temporaries aside): bytes -> paths."""
    found: dict[bytes, list[str]] = {}
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d != ".zsclip-sort"]
        for name in names:
            if name.startswith(".zsclip-") or ".zsclip-undo-" in name:
                continue
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                found.setdefault(Path(path).read_bytes(), []).append(path)
    return found


def in_child(function, kill_at: int) -> int:
    """Run `function` in a forked child whose kill_at-th checkpoint is a SIGKILL; its wait status."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            manifest_module._KILL_AT, manifest_module._steps = kill_at, 0
            function()
        except BaseException:
            code = 3
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return status


def killed(status: int) -> bool:
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


# ------------------------------------------------------------------------------ folder names


@pytest.mark.parametrize(
    "label, folder",
    [
        ("golden retriever", "golden retriever"),
        ("cats/dogs", "cats_dogs"),
        ("..", None),
        ("../../etc", "_.._etc"),
        (".hidden", "hidden"),
        ("tab\there\nnewline", "tab_here_newline"),
        ("a\u202eb", "a_b"),
        ("what?  <yes>", "what_ _yes_"),
    ],
)
def test_labels_become_safe_folder_names(label: str, folder: str | None) -> None:
    if folder is None:
        with pytest.raises(UserError):
            folder_name(label)
        return
    name = folder_name(label)
    assert name == folder
    assert "/" not in name and not name.startswith(".") and name not in (".", "..")


def test_long_labels_are_cut_on_a_character_boundary() -> None:
    name = folder_name("é" * 300)
    assert len(name.encode()) <= MAX_FOLDER_BYTES and set(name) == {"é"}


@pytest.mark.parametrize("labels", [["cat/dog", "cat_dog"], ["Cat?", "cat*"], ["unsure", "dog"]])
def test_two_labels_in_one_folder_are_a_usage_error(labels: list[str]) -> None:
    with pytest.raises(UserError, match="folder"):
        label_folders(labels)


# ------------------------------------------------------------------------------ sorting


@pytest.mark.parametrize("mode", ["copy", "move", "link"])
def test_each_file_goes_to_its_label_folder_and_nothing_is_overwritten(
    tmp_path: Path, mode: str
) -> None:
    world = make_world(tmp_path)
    rows, manifest = sort_world(tmp_path, world, mode)
    dest = tmp_path / "dest"
    where = {row.path: row.to for row in rows}
    assert {row.status for row in rows} == {
        {"copy": "copied", "move": "moved", "link": "linked"}[mode]
    }
    assert where[str(tmp_path / "src/a/x.jpg")] == str(dest / "cat" / "x-2.jpg")
    assert where[str(tmp_path / "src/b/x.jpg")] == str(dest / "cat" / "x-3.jpg")
    assert where[str(tmp_path / "src/b/y.png")] == str(dest / "dog" / "y.png")
    assert where[str(tmp_path / "src/z.jpg")] == str(dest / "unsure" / "z.jpg")
    assert (dest / "cat" / "x.jpg").read_bytes() == b"the user's own file"
    for source, (data, _) in world.items():
        target = Path(where[source])
        assert target.read_bytes() == data
        assert Path(source).exists() == (mode != "move")
        assert target.is_symlink() == (mode == "link")
    assert manifest is not None and Path(manifest).parent == dest / ".zsclip-sort"
    assert read_manifest(manifest).ended


def test_a_copy_keeps_the_times_and_permissions(tmp_path: Path) -> None:
    world = make_world(tmp_path)
    source = tmp_path / "src/b/y.png"
    os.chmod(source, 0o640)
    os.utime(source, ns=(1_500_000_000_000_000_000, 1_500_000_000_123_456_789))
    rows, _ = sort_world(tmp_path, world, "copy")
    copy = Path(next(row.to for row in rows if row.path == str(source)))
    assert copy.stat().st_mtime_ns == 1_500_000_000_123_456_789
    assert copy.stat().st_mode & 0o777 == 0o640


def test_dry_run_plans_the_same_and_touches_nothing(tmp_path: Path) -> None:
    world = make_world(tmp_path)
    before = contents(tmp_path)
    planned, manifest = sort_world(tmp_path, world, "move", dry_run=True)
    assert manifest is None and not (tmp_path / "dest" / ".zsclip-sort").exists()
    assert contents(tmp_path) == before and not (tmp_path / "dest" / "dog").exists()
    done, _ = sort_world(tmp_path, world, "move")
    assert [(r.path, r.to) for r in planned] == [(r.path, r.to) for r in done]
    assert {r.status for r in planned} == {"planned"}


def test_a_second_copy_run_copies_nothing_twice(tmp_path: Path) -> None:
    world = make_world(tmp_path)
    first, _ = sort_world(tmp_path, world, "copy")
    second, _ = sort_world(tmp_path, world, "copy")
    assert {row.status for row in second} == {"already"}
    assert [row.to for row in first] == [row.to for row in second]
    assert all(
        len(paths) == 2
        for data, paths in contents(tmp_path).items()
        if data != b"the user's own file"
    )


def test_unreadable_and_symlinked_sources_stay_where_they_are(tmp_path: Path) -> None:
    world = make_world(tmp_path)
    link = tmp_path / "src" / "link.jpg"
    link.symlink_to(tmp_path / "src" / "z.jpg")
    world[str(link)] = (b"", "dog")
    settings = SortSettings(str(tmp_path / "dest"), "move", {"labels": LABELS})
    with Sorter(settings, label_folders(LABELS)) as sorter:
        sorter.triage([InputItem(str(link))])
        row = sorter.place(Prediction(str(link), [("dog", 0.9)]))
        broken = sorter.place(Prediction(str(tmp_path / "bad.jpg"), error="not an image"))
    assert "symlink" in row.error and link.is_symlink() and row.to is None
    assert broken.error == "not an image" and broken.to is None


@pytest.mark.parametrize("mode", ["copy", "move", "link"])
def test_undo_puts_everything_back_and_keeps_what_changed(tmp_path: Path, mode: str) -> None:
    world = make_world(tmp_path)
    before = contents(tmp_path)
    rows, manifest = sort_world(tmp_path, world, mode)
    edited = next(row.to for row in rows if row.label == "dog")
    if mode == "copy":  # a copy edited since the sort is kept, and said so
        Path(edited).write_bytes(b"edited")
    results = list(undo(manifest, lambda message: None))
    after = contents(tmp_path)
    if mode == "copy":
        assert [r.result for r in results if r.path == edited] == ["kept: changed since the sort"]
        assert after.pop(b"edited") == [edited]
    else:
        assert all(r.result in ("moved back", "removed") for r in results)
        assert (
            not (tmp_path / "dest" / "dog").exists() and not (tmp_path / "dest" / "unsure").exists()
        )
    assert after == before
    assert list(undo(manifest, lambda message: None)) == results  # again: nothing more to do


def test_undo_keeps_a_copy_whose_original_was_deleted_since(tmp_path: Path) -> None:
    """Copy, then delete the originals (a common way to tidy up): undo must not remove the only
    copy left. An original edited since keeps its copy too."""
    world = make_world(tmp_path)
    rows, manifest = sort_world(tmp_path, world, "copy")
    gone, edited = str(tmp_path / "src" / "z.jpg"), str(tmp_path / "src" / "b" / "y.png")
    os.unlink(gone)
    Path(edited).write_bytes(b"edited original")
    results = {r.path: r for r in undo(manifest, lambda message: None)}
    copies = {row.path: row.to for row in rows}
    for source in (gone, edited):
        kept = results[copies[source]]
        assert kept.result.startswith("kept: the original") and kept.left
        assert Path(copies[source]).read_bytes() == world[source][0]
    others = [r for path, r in results.items() if path not in (copies[gone], copies[edited])]
    assert others and all(r.result == "removed" for r in others)


def test_undo_of_a_move_does_not_overwrite_a_new_file_at_the_old_name(tmp_path: Path) -> None:
    world = make_world(tmp_path)
    _, manifest = sort_world(tmp_path, world, "move")
    (tmp_path / "src" / "z.jpg").write_bytes(b"new file, same name")
    results = {r.path: r for r in undo(manifest, lambda message: None)}
    back = results[str(tmp_path / "dest" / "unsure" / "z.jpg")]
    assert back.to == str(tmp_path / "src" / "z-2.jpg")
    assert (tmp_path / "src" / "z.jpg").read_bytes() == b"new file, same name"
    assert Path(back.to).read_bytes() == world[str(tmp_path / "src" / "z.jpg")][0]


def test_a_move_across_file_systems_copies_then_deletes(tmp_path: Path, monkeypatch) -> None:
    world = make_world(tmp_path)

    link = os.link

    def across(src, dst, **kwargs):  # src/ is "another file system"
        if ("/src/" in src) != ("/src/" in dst):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return link(src, dst, **kwargs)

    monkeypatch.setattr(os, "link", across)
    rows, manifest = sort_world(tmp_path, world, "move")
    for row in rows:
        assert Path(row.to).read_bytes() == world[row.path][0] and not Path(row.path).exists()
    list(undo(manifest, lambda message: None))
    assert all(Path(path).read_bytes() == data for path, (data, _) in world.items())


# ------------------------------------------------------------------------------ crashes


def check_whole(root: Path, world: dict) -> dict[bytes, list[str]]:
    """Every file's bytes exist somewhere, and the user's own file is untouched."""
    found = contents(root)
    for path, (data, _) in world.items():
        assert data in found, f"{path} was lost"
    assert found[b"the user's own file"] == [str(root / "dest" / "cat" / "x.jpg")]
    return found


@pytest.mark.parametrize(
    "mode, stride",
    [("move", 1), ("copy", 3), ("move-across", 3)],  # every step of a move; a third of the others
)
def test_a_kill_at_any_step_loses_nothing_and_a_rerun_and_undo_finish(
    tmp_path: Path, monkeypatch, mode: str, stride: int
) -> None:
    """kill -9 at the checkpoints of a sort, then of its undo: every file whole somewhere at
    each moment; after the rerun each exactly once in its folder; after undo exactly once where
    it was. "move-across": src/ is another file system (os.link fails with EXDEV)."""
    if mode == "move-across":
        link, mode = os.link, "move"

        def across(src, dst, **kwargs):
            if ("/src/" in src) != ("/src/" in dst):
                raise OSError(errno.EXDEV, "Invalid cross-device link")
            return link(src, dst, **kwargs)

        monkeypatch.setattr(os, "link", across)
    step, undo_step, tries = random.Random(stride).randint(1, stride), 0, 0
    while True:
        root = tmp_path / f"run{step}"
        world = make_world(root)
        status = in_child(lambda: sort_world(root, world, mode), step)
        assert status == 0 or killed(status)  # never an exception
        check_whole(root, world)
        sort_world(root, world, mode)  # the rerun finishes the job, in the same manifest
        [manifest] = [str(p) for p in (root / "dest" / ".zsclip-sort").glob("*.jsonl")]
        assert read_manifest(manifest).ended
        found = check_whole(root, world)
        for path, (data, label) in world.items():
            folder = {"cat": "cat", "dog": "dog", None: "unsure"}[label]
            copies = [p for p in found[data] if "/dest/" in p]
            assert len(copies) == 1 and Path(copies[0]).parent.name == folder
            assert (path in found[data]) == (mode == "copy")
        undo_step += stride
        undo_status = in_child(lambda: list(undo(manifest, lambda message: None)), undo_step)
        check_whole(root, world)
        assert undo_status == 0 or killed(undo_status)
        if not killed(undo_status):
            undo_step = 0  # the undo had fewer steps: start again from its first
        list(undo(manifest, lambda message: None))  # rerun the undo
        found = check_whole(root, world)
        for path, (data, _) in world.items():
            assert found[data] == [path]
        tries += 1
        if status == 0:
            break
        step += stride
    assert tries * stride > 20  # the four files gave many crash points


def test_a_rerun_after_a_crash_carries_on_in_the_same_manifest(tmp_path: Path) -> None:
    world = make_world(tmp_path)
    assert killed(in_child(lambda: sort_world(tmp_path, world, "move"), 12))
    [old] = list((tmp_path / "dest" / ".zsclip-sort").glob("*.jsonl"))
    rows, manifest = sort_world(tmp_path, world, "move")
    assert manifest == str(old) and read_manifest(manifest).ended
    assert {row.status for row in rows} <= {"moved", "already"} and "already" in {
        r.status for r in rows
    }


# ------------------------------------------------------------------------------ hostile manifests


def damaged(tmp_path: Path, change) -> str:
    world = make_world(tmp_path)
    _, manifest = sort_world(tmp_path, world, "move")
    records = [json.loads(line) for line in Path(manifest).read_text().splitlines()]
    change(records)
    Path(manifest).write_text("".join(json.dumps(r) + "\n" for r in records))
    return manifest


def first(records: list, op: str) -> dict:
    return next(r for r in records if r.get("op") == op)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda rs: first(rs, "plan").update(dst="/etc/passwd"),
            "outside the manifest's destination",
        ),
        (
            lambda rs: first(rs, "plan").update(dst=first(rs, "plan")["dst"] + "/../../x"),
            "normalised",
        ),
        (lambda rs: first(rs, "plan").update(src="/etc/shadow"), "outside the folders"),
        (lambda rs: first(rs, "plan").update(n="1"), "wrong type"),
        (lambda rs: first(rs, "done").update(n=99), "never planned"),
        (lambda rs: first(rs, "mkdir").update(path="/"), "outside"),
        (lambda rs: rs[0].update(dest="/"), "lies in"),
        (lambda rs: rs.append({"op": "rm -rf"}), "wrong type"),
        (lambda rs: rs.append({"op": "chmod", "n": 1}), "unknown record"),
        (lambda rs: rs.insert(1, ["not", "an", "object"]), "not a JSON object"),
    ],
)
def test_a_damaged_manifest_is_refused_in_one_line_and_nothing_moves(
    tmp_path: Path, change, message: str
) -> None:
    manifest = damaged(tmp_path, change)
    before = contents(tmp_path)
    with pytest.raises(ManifestError, match=message) as caught:
        list(undo(manifest, lambda m: None))
    assert "\n" not in str(caught.value) and "line" in str(caught.value)
    assert contents(tmp_path) == before


def test_a_torn_last_record_is_dropped_not_refused(tmp_path: Path) -> None:
    world = make_world(tmp_path)
    _, manifest = sort_world(tmp_path, world, "move")
    with open(manifest, "ab") as handle:
        handle.write(b'{"op": "undo", "n": 1, "to": "/et')  # cut off by a crash
    list(undo(manifest, lambda m: None))
    assert all(Path(path).read_bytes() == data for path, (data, _) in world.items())
    assert all(json.loads(line) for line in Path(manifest).read_text().splitlines())


def test_garbage_is_not_a_manifest(tmp_path: Path) -> None:
    folder = tmp_path / ".zsclip-sort"
    folder.mkdir()
    path = folder / "20250101T000000.000000Z.jsonl"
    path.write_bytes(hashlib.sha256(b"x").digest() + b"\n")
    with pytest.raises(ManifestError, match="line 1"):
        read_manifest(str(path))
