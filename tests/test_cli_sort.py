"""`zsclip sort`, end to end with the built-in model on the bundled example images: copy, move,
link, dry run, unsure images, unreadable ones, undo, usage errors, and a `--move` killed (SIGKILL
through the fault-injection checkpoint) then rerun and undone."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
from pathlib import Path

import pytest
from cli_helpers import run_cli, run_zsclip

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
LABELS = str(EXAMPLES / "labels.txt")


@pytest.fixture()
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for path in EXAMPLES.glob("*.png"):
        shutil.copy(path, folder / path.name)
    return folder


def originals(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in folder.glob("*.png")}


def sort(*args: str):
    return run_cli(["sort", "-q", "-f", "jsonl", *args])


def rows(result) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines()]


def everywhere(root: Path) -> dict[bytes, list[str]]:
    """bytes -> paths of every regular file below root (manifests aside)."""
    found: dict[bytes, list[str]] = {}
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d != ".zsclip-sort"]
        for name in names:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                found.setdefault(Path(path).read_bytes(), []).append(path)
    return found


def test_copy_is_the_default_and_every_image_lands_in_its_label_folder(
    photos: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "sorted"
    before = originals(photos)
    result = sort(str(photos), "--to", str(dest), "-L", LABELS)
    assert result.code == 0, result.stderr
    placed = rows(result)
    assert len(placed) == 8 and {row["action"] for row in placed} == {"copied"}
    for row in placed:
        assert set(row) == {"path", "label", "score", "to", "action"}
        name = Path(row["path"]).name
        assert row["to"] == str(dest / row["label"] / name)
        assert Path(row["to"]).read_bytes() == before[name]
    assert originals(photos) == before
    [manifest] = list((dest / ".zsclip-sort").glob("*.jsonl"))
    assert manifest.name.endswith("Z.jsonl")


def test_move_with_min_score_sends_the_unsure_to_unsure(photos: Path, tmp_path: Path) -> None:
    dest = tmp_path / "sorted"
    before = originals(photos)
    result = sort(str(photos), "--to", str(dest), "-L", LABELS, "--move", "--min-score", "0.85")
    placed = rows(result)
    assert not list(photos.glob("*.png"))
    for row in placed:
        folder = Path(row["to"]).parent.name
        if row["label"] is None:
            assert folder == "unsure"
        else:
            assert folder == row["label"] and row["score"] >= 0.85
        assert Path(row["to"]).read_bytes() == before[Path(row["path"]).name]
    assert 0 < sum(row["label"] is None for row in placed) < 8


def test_the_same_move_run_again_reports_the_files_it_moved(photos: Path, tmp_path: Path) -> None:
    """A crash can fall after the manifest's end record and before the exit: the same command
    again must not fail on the INPUTs it already moved; it reports where they went."""
    dest = tmp_path / "sorted"
    files = sorted(str(path) for path in photos.glob("*.png"))
    first = sort(*files, "--to", str(dest), "-L", LABELS, "--move")
    again = sort(*files, "--to", str(dest), "-L", LABELS, "--move")
    assert (first.code, again.code) == (0, 0), again.stderr
    moved = {row["path"]: row["to"] for row in rows(first)}
    assert {row["path"]: row["to"] for row in rows(again)} == moved
    assert {row["action"] for row in rows(again)} == {"already"}
    assert len(list((dest / ".zsclip-sort").glob("*.jsonl"))) == 1  # nothing to journal


def test_link_makes_symlinks_to_the_images(photos: Path, tmp_path: Path) -> None:
    dest = tmp_path / "sorted"
    placed = rows(sort(str(photos), "--to", str(dest), "-L", LABELS, "--link"))
    for row in placed:
        assert os.readlink(row["to"]) == os.path.abspath(row["path"])


def test_dry_run_prints_the_plan_and_touches_nothing(photos: Path, tmp_path: Path) -> None:
    dest = tmp_path / "sorted"
    plan = rows(sort(str(photos), "--to", str(dest), "-L", LABELS, "--move", "--dry-run"))
    assert not dest.exists() and len(originals(photos)) == 8
    done = rows(sort(str(photos), "--to", str(dest), "-L", LABELS, "--move"))
    assert [(r["path"], r["to"]) for r in plan] == [(r["path"], r["to"]) for r in done]
    assert {r["action"] for r in plan} == {"planned"}


def test_taken_names_get_numbers_and_nothing_is_overwritten(photos: Path, tmp_path: Path) -> None:
    dest = tmp_path / "sorted"
    (dest / "red heart").mkdir(parents=True)
    (dest / "red heart" / "red-heart.png").write_bytes(b"someone else's")
    placed = rows(sort(str(photos), "--to", str(dest), "-L", LABELS, "--move"))
    heart = next(row for row in placed if row["label"] == "red heart")
    assert heart["to"] == str(dest / "red heart" / "red-heart-2.png")
    assert (dest / "red heart" / "red-heart.png").read_bytes() == b"someone else's"


def test_unreadable_images_stay_where_they_are(photos: Path, tmp_path: Path) -> None:
    broken = photos / "broken.png"
    broken.write_bytes(b"not a png at all")
    result = sort(str(photos), "--to", str(tmp_path / "sorted"), "-L", LABELS, "--move")
    assert result.code == 1
    [error] = [row for row in rows(result) if "error" in row]
    assert error["path"] == str(broken) and broken.read_bytes() == b"not a png at all"
    assert sorted(p.name for p in photos.iterdir()) == ["broken.png"]


def test_undo_puts_the_moves_back_and_is_safe_to_repeat(photos: Path, tmp_path: Path) -> None:
    dest = tmp_path / "sorted"
    before = originals(photos)
    sort(str(photos), "--to", str(dest), "-L", LABELS, "--move")
    [manifest] = list((dest / ".zsclip-sort").glob("*.jsonl"))
    undone = sort("--undo", str(manifest))
    assert undone.code == 0, undone.stderr
    assert {row["result"] for row in rows(undone)} == {"moved back"}
    assert originals(photos) == before
    assert sorted(p.name for p in dest.iterdir()) == [".zsclip-sort"]
    again = sort("--undo", str(manifest))
    assert again.code == 0 and rows(again) == rows(undone) and originals(photos) == before


def test_a_damaged_manifest_is_one_line_and_changes_nothing(photos: Path, tmp_path: Path) -> None:
    dest = tmp_path / "sorted"
    sort(str(photos), "--to", str(dest), "-L", LABELS, "--move")
    [manifest] = list((dest / ".zsclip-sort").glob("*.jsonl"))
    lines = manifest.read_text().splitlines()
    plan = next(i for i, line in enumerate(lines) if '"plan"' in line)
    record = json.loads(lines[plan])
    record["src"] = "/etc/cron.d/zsclip"
    lines[plan] = json.dumps(record)
    manifest.write_text("\n".join(lines) + "\n")
    before = everywhere(tmp_path)
    result = sort("--undo", str(manifest))
    assert result.code == 2 and result.stderr.count("\n") == 1
    assert "outside the folders" in result.stderr and f"line {plan + 1}" in result.stderr
    assert everywhere(tmp_path) == before


@pytest.mark.parametrize(
    "args, message",
    [
        (["x.png", "-L", LABELS], "--to"),
        (["--to", "d", "-L", LABELS], "no INPUT"),
        (["x.png", "--to", "d", "-L", LABELS, "--move", "--link"], "one of --copy"),
        (["x.png", "--to", "d", "-l", "cat/dog,cat_dog"], "share the folder"),
        (["x.png", "--to", "d", "-l", "unsure,dog"], "unsure"),
        (["x.png", "--undo", "m.jsonl"], "takes no INPUT"),
    ],
)
def test_usage_errors_are_one_line(args: list[str], message: str, tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(b"")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        result = sort(*args)
    finally:
        os.chdir(cwd)
    assert result.code == 2 and message in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "d").exists()


def whole(root: Path, before: dict[str, bytes], context: object) -> dict[bytes, list[str]]:
    """Every image's bytes exist somewhere below root, and no file under a real (not hidden
    temporary) name holds anything else: nothing lost, nothing half written."""
    found = everywhere(root)
    for data in before.values():
        assert data in found, f"a file was lost ({context})"
    for data, paths in found.items():
        shown = [path for path in paths if not Path(path).name.startswith(".")]
        assert not shown or data in before.values(), f"{shown} half written ({context})"
    return found


def killed_runs(command: list[str], steps: list[int], root: Path, before: dict) -> list[int]:
    """Run `command` killed (SIGKILL) at each checkpoint number in turn, checking after each that
    nothing was lost; stops early when a run has fewer steps and finishes. The steps it died at."""
    died = []
    for step in steps:
        result = run_zsclip(command, env={"ZSCLIP_FAULT_KILL_AT_STEP": str(step)})
        assert result.returncode in (0, -signal.SIGKILL), (steps, result.stderr)
        whole(root, before, f"steps {steps}")
        if result.returncode == 0:
            break
        died.append(step)
    return died


def test_a_killed_move_is_finished_by_the_same_command_and_undone(
    photos: Path, tmp_path: Path
) -> None:
    """kill -9 at random steps in the middle of `sort --move`, several times in a row (each rerun
    killed again), then the same command once more; then `--undo`, killed the same way and run
    again: each image exactly once with its bytes, every time."""
    dest = tmp_path / "sorted"
    before = originals(photos)
    files = sorted(str(path) for path in photos.glob("*.png"))  # named one by one: some vanish
    command = ["sort", *files, "--to", str(dest), "-L", LABELS, "--move", "-q", "-f", "jsonl"]
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    # a move of 8 files has about 70 checkpoints: the first kill always falls inside the run
    steps = [rng.randint(1, 40)] + [rng.randint(1, 25) for _ in range(2)]
    died = killed_runs(command, steps, tmp_path, before)
    assert died and died[0] == steps[0], (seed, steps, died)
    rerun = run_zsclip(command)
    assert rerun.returncode == 0, (seed, steps, rerun.stderr)
    assert len(rerun.stdout.splitlines()) == 8
    found = whole(tmp_path, before, steps)
    for data in before.values():
        [where] = found[data]
        assert Path(where).parent.parent == dest
    [manifest] = list((dest / ".zsclip-sort").glob("*.jsonl"))  # the reruns carried on in it
    undo_steps = [rng.randint(1, 30) for _ in range(2)]
    undo = ["sort", "--undo", str(manifest), "-q", "-f", "jsonl"]
    killed_runs(undo, undo_steps, tmp_path, before)
    undone = run_zsclip(undo)
    assert undone.returncode == 0, (seed, steps, undo_steps, undone.stderr)
    assert originals(photos) == before
    assert all(len(paths) == 1 for paths in everywhere(tmp_path).values())
    # the label folders the sort made are gone; only the manifest's folder is left
    assert [path.name for path in dest.iterdir()] == [".zsclip-sort"]
