"""File names are bytes on Linux: names that are not UTF-8, or that hold newlines and terminal escape
sequences, are classified and embedded like any other, come back exactly from jsonl and embedding
files, stay valid UTF-8 in every output, and cannot forge lines or drive the terminal."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import pytest
from cli_helpers import build_tiny_checkpoint, make_image, run_cli

LABELS = "red circle,blue square,corgi"
# what each name holds: bytes that are not UTF-8; a newline and a forged error line; a colour
# escape; a bidirectional override that would show the name reversed
NAMES = [
    b"bad\xff\xfename.png",
    b"new\nzsclip: error: forged.png",
    b"esc\x1b[31mred.png",
    "rtl\u202egnp.png".encode(),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("names")
    folder = root / "photos"
    for index, name in enumerate(NAMES):
        make_image(Path(os.fsdecode(bytes(folder) + b"/" + name)), color=(40 * index, 90, 200))
    broken = bytes(folder) + b"/broken\n\xffname.png"  # unreadable, so it earns an error line
    with open(broken, "wb") as handle:
        handle.write(b"not a png")
    return {
        "model": str(build_tiny_checkpoint(root)),
        "folder": str(folder),
        "paths": sorted(os.fsdecode(bytes(folder) + b"/" + name) for name in NAMES)
        + [os.fsdecode(broken)],
    }


def ordered(world: dict) -> list[str]:
    """The folder's files in zsclip's order (sorted by name, as str)."""
    return sorted(world["paths"])


def classify(world: dict, *args: str, input: bytes | None = None, env: dict | None = None):
    return run_cli(
        ["classify", "--model", world["model"], "-t", "simple", "--labels", LABELS, *args],
        input=input,
        env=env,
    )


def test_jsonl_keeps_every_name_exactly(world: dict) -> None:
    result = classify(world, world["folder"])  # run_cli decodes stdout and stderr strictly
    assert result.code == 1  # the broken file; everything else was classified
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["path"] for row in rows] == ordered(world)
    assert [os.fsencode(row["path"]) for row in rows] == [os.fsencode(p) for p in ordered(world)]
    assert sum("label" in row for row in rows) == len(NAMES)
    assert "\\udcff" in result.stdout  # the documented escape of byte 0xff
    # the same rows again from the image cache, which keys names that are not UTF-8 by their bytes
    again = classify(world, world["folder"])
    assert again.stdout == result.stdout and "reused from the cache" in again.stderr


def test_error_lines_cannot_be_forged_or_drive_the_terminal(world: dict) -> None:
    result = classify(world, world["folder"], "--quiet")
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("zsclip: error: ")
    assert "broken\\n\\xffname.png" in lines[0]
    assert "\x1b" not in result.stderr and "\u202e" not in result.stderr


def test_csv_and_tsv_stay_valid_utf8(world: dict) -> None:
    for fmt, delimiter in (("csv", ","), ("tsv", "\t")):
        result = classify(world, world["folder"], "-f", fmt)
        rows = list(csv.DictReader(io.StringIO(result.stdout), delimiter=delimiter))
        shown = [row["path"] for row in rows]
        assert any(path.endswith("bad\\xff\\xfename.png") for path in shown)
        assert any(path.endswith("new\nzsclip: error: forged.png") for path in shown)  # quoted


def test_table_shows_names_escaped(world: dict) -> None:
    result = classify(world, world["folder"], "-f", "table", env={"COLUMNS": "200"})
    assert "bad\\xff\\xfename.png" in result.stdout and "new\\nzsclip: error: forged.png" in (
        result.stdout
    )
    assert "esc\\x1b[31mred.png" in result.stdout and "rtl\\u202egnp.png" in result.stdout
    assert "\x1b[31m" not in result.stdout and "\u202e" not in result.stdout


def test_paths_on_stdin_are_read_as_bytes(world: dict) -> None:
    stdin = b"".join(os.fsencode(path) + b"\n" for path in ordered(world) if "\n" not in path)
    result = classify(world, "-", input=stdin)
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [os.fsencode(row["path"]) for row in rows] == [
        os.fsencode(path) for path in ordered(world) if "\n" not in path
    ]
    assert all("label" in row for row in rows)


def test_embedding_files_keep_names_exactly(world: dict, tmp_path: Path) -> None:
    from zsclip.jobs.embedding_files import read_embeddings

    readable = [path for path in ordered(world) if "broken" not in path]
    for suffix in (".npy", ".safetensors", ".jsonl"):
        out = tmp_path / f"e{suffix}"
        made = run_cli(["embed", "--model", world["model"], world["folder"], "-o", str(out)])
        assert made.code == 1, made.stderr  # the broken file
        table = read_embeddings(out)
        assert table.keys == readable
        again = classify(world, "--embeddings", str(out))
        shown = [json.loads(line)["path"] for line in again.stdout.splitlines()]
        assert [path for path in shown if "broken" not in path] == readable
    sidecar = (tmp_path / "e.npy.paths.txt").read_bytes().decode("utf-8")  # valid UTF-8
    assert len(sidecar.splitlines()) == len(readable)  # one line a row, newline in a name or not
    assert "bad\\udcff\\udcfename.png" in sidecar


def test_report_shows_names_escaped(world: dict, tmp_path: Path) -> None:
    report = tmp_path / "r.html"
    result = classify(world, world["folder"], "--report", str(report))
    assert result.code == 1
    page = report.read_bytes().decode("utf-8")
    assert "bad\\xff\\xfename.png" in page and "\x1b" not in page


def test_narrow_table_shortens_paths_from_the_left(tmp_path: Path) -> None:
    model = build_tiny_checkpoint(tmp_path)
    folder = tmp_path / "a-rather-long-folder-name" / "photos" / "sub"
    make_image(folder / "alpha_circle.png")
    result = run_cli(
        ["classify", str(tmp_path / "a-rather-long-folder-name"), "--model", str(model)]
        + ["-t", "simple", "--labels", "red,blue", "-f", "table", "-k", "1"],
        env={"COLUMNS": "50"},
    )
    assert result.code == 0, result.stderr
    assert "…/sub/alpha_circle.png" in result.stdout
    assert max(len(line) for line in result.stdout.splitlines()) <= 50


def test_shorten_left_keeps_the_end() -> None:
    from zsclip.cli._writers import shorten_left

    path = "/home/me/photos/2024/sub/alpha_circle.png"
    assert shorten_left(path, 100) == path
    assert shorten_left(path, 27) == "…/2024/sub/alpha_circle.png"
    assert shorten_left(path, 26) == shorten_left(path, 22) == "…/sub/alpha_circle.png"
    assert shorten_left(path, 10) == "…ircle.png"
    assert shorten_left("/x/日本語の写真.png", 8) == "…真.png"  # wide characters count double


def test_a_newline_in_a_utf8_name_cannot_forge_an_error_line(tmp_path: Path) -> None:
    model = build_tiny_checkpoint(tmp_path)
    broken = tmp_path / "photos" / "x.png\nzsclip: error: everything failed.png"
    broken.parent.mkdir()
    broken.write_bytes(b"not a png")
    result = run_cli(
        ["classify", str(broken.parent), "--model", str(model), "-l", "a,b", "-q", "--no-cache"]
    )
    assert result.code == 1
    [line] = result.stderr.splitlines()
    assert line.startswith(f"zsclip: error: {broken.parent}/x.png\\nzsclip: error: everything")
