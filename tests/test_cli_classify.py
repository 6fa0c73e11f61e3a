"""`zsclip classify` end to end with a tiny random model: formats x input kinds, exit codes, options."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import pytest
from cli_helpers import build_tiny_checkpoint, make_image, make_photo_folder, run_cli

LABELS = "red circle,blue square,corgi"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("classify")
    return {
        "model": str(build_tiny_checkpoint(root)),
        "root": root,
        "expected": make_photo_folder(root / "photos"),
    }


def classify(world: dict, *args: str, input: str | None = None, env: dict | None = None):
    return run_cli(
        ["classify", "--model", world["model"], "-t", "simple", *args], input=input, env=env
    )


def parse(fmt: str, text: str) -> list[dict]:
    """stdout in any machine format -> [{path, label, score, ...}]."""
    if fmt == "jsonl":
        return [json.loads(line) for line in text.splitlines()]
    rows = list(csv.DictReader(io.StringIO(text), delimiter="," if fmt == "csv" else "\t"))
    return [{**row, "score": float(row["score"]) if row["score"] else None} for row in rows]


def table_rows(text: str) -> list[list[str]]:
    """The body of a rich table as cells: [[path, label, score, next], ...]."""
    lines = [line for line in text.splitlines() if "\u2502" in line]  # the column separator
    return [[cell.strip() for cell in line.split("\u2502")] for line in lines]


@pytest.mark.parametrize("kind", ["arguments", "folder", "stdin"])
@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv", "table"])
def test_formats_and_input_kinds(world: dict, fmt: str, kind: str) -> None:
    expected = world["expected"]
    if kind == "arguments":
        args, stdin = expected, None
    elif kind == "folder":
        args, stdin = [str(world["root"] / "photos")], None
    else:
        args, stdin = ["-"], "\n".join(expected) + "\n"
    wide = {"COLUMNS": "400"}  # so that no cell of the table wraps
    result = classify(
        world, *args, "--labels", LABELS, "--format", fmt, "-k", "2", input=stdin, env=wide
    )
    assert result.code == 0, result.stderr
    assert result.stderr == ""  # nothing to say: no errors, no progress bar off a terminal
    if fmt == "table":
        jsonl = classify(world, *expected, "--labels", LABELS, "-f", "jsonl", "-k", "2").stdout
        assert table_rows(result.stdout) == [
            [
                row["path"],
                row["label"],
                f"{row['score']:.3f}",
                f"{row['top'][1]['label']} {row['top'][1]['score']:.2f}",
            ]
            for row in parse("jsonl", jsonl)
        ]
        return
    rows = parse(fmt, result.stdout)
    assert [row["path"] for row in rows] == expected
    for row in rows:
        assert row["label"] in LABELS.split(",") and 0 < row["score"] <= 1
    if fmt == "jsonl":
        assert all(list(row) == ["path", "label", "score", "top"] for row in rows)
        assert all(
            len(row["top"]) == 2 and list(row["top"][0]) == ["label", "score"] for row in rows
        )
        assert all(row["top"][0] == {"label": row["label"], "score": row["score"]} for row in rows)
    else:
        header = result.stdout.splitlines()[0].split("," if fmt == "csv" else "\t")
        assert header == ["path", "label", "score", "label_2", "score_2", "error"]


def test_default_format_is_jsonl_off_a_terminal_and_softmax_sums_to_one(world: dict) -> None:
    result = run_cli(
        ["classify", "--model", world["model"], world["expected"][0], "--labels", LABELS]
    )
    assert result.code == 0, result.stderr  # default template set (photo)
    [row] = parse("jsonl", result.stdout)
    assert [t["score"] for t in row["top"]] == sorted(
        (t["score"] for t in row["top"]), reverse=True
    )
    assert abs(sum(t["score"] for t in row["top"]) - 1) < 1e-4


def test_quoting_of_awkward_paths(world: dict, tmp_path: Path) -> None:
    names = ["comma, here.png", "tab\there.png", 'quote"here.png', "café 日本.png"]
    paths = [str(make_image(tmp_path / name)) for name in names]
    for fmt in ("csv", "tsv", "jsonl"):
        result = classify(world, *paths, "--labels", LABELS, "-f", fmt)
        assert result.code == 0, result.stderr
        assert [row["path"] for row in parse(fmt, result.stdout)] == paths


def test_unreadable_inputs_exit_1_and_the_rest_are_written(world: dict, tmp_path: Path) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    missing = str(tmp_path / "missing.png")
    os.symlink(tmp_path / "gone.png", missing)  # it exists, but cannot be read: an error row
    good = world["expected"][0]
    result = classify(world, good, str(bad), missing, "--labels", LABELS)
    assert result.code == 1
    rows = parse("jsonl", result.stdout)
    assert [row["path"] for row in rows] == [good, str(bad), missing]
    assert "label" in rows[0]
    assert list(rows[1]) == ["path", "error"] and list(rows[2]) == ["path", "error"]
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("zsclip: error:")]
    assert len(error_lines) == 2 and str(bad) in error_lines[0] and missing in error_lines[1]
    csv_result = classify(world, good, str(bad), "--labels", LABELS, "-f", "csv")
    rows = parse("csv", csv_result.stdout)
    assert rows[1]["label"] == "" and rows[1]["error"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--labels", "a,,b"], "empty"),
        (["--labels", "cat,dog,Cat"], "duplicate"),
        ([], "no labels"),
        (["--labels", "a,b", "--templates", "no-such-set"], "template set"),
        (["--labels", "a,b", "--precision", "fp16", "--device", "cpu"], "fp16"),
        (["--labels", "a,b", "--format", "xml"], "--format"),
        (["--labels", "a,b", "--threshold", "0.3"], "--multi-label"),
        (["--labels", "a,b", "--model", "no-such-model-anywhere"], "no-such-model-anywhere"),
    ],
)
def test_usage_errors_exit_2_with_one_line(world: dict, args: list[str], message: str) -> None:
    argv = ["classify", world["expected"][0], *args]
    if "--model" not in args:
        argv += ["--model", world["model"]]
    result = run_cli(argv)
    assert result.code == 2, result.stderr
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
    assert "Traceback" not in result.stderr


def test_top_k_and_multi_label(world: dict) -> None:
    one = world["expected"][0]
    [row] = parse("jsonl", classify(world, one, "--labels", LABELS, "-k", "1").stdout)
    assert len(row["top"]) == 1
    [row] = parse("jsonl", classify(world, one, "--labels", LABELS, "-k", "50").stdout)
    assert len(row["top"]) == 3  # capped at the number of labels
    # threshold -1: every cosine passes, every score is above 0.5, independently (no sum-to-one)
    [row] = parse(
        "jsonl",
        classify(world, one, "--labels", LABELS, "--multi-label", "--threshold", "-1").stdout,
    )
    assert len(row["top"]) == 3 and all(0.5 < t["score"] <= 1 for t in row["top"])
    assert sum(t["score"] for t in row["top"]) > 1.5
    [row] = parse(
        "jsonl",
        classify(world, one, "--labels", LABELS, "--multi-label", "--threshold", "1").stdout,
    )
    assert row == {"path": one, "label": None, "score": None, "top": []}


def test_output_file_is_written_atomically(world: dict, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "results.csv"
    result = classify(
        world, str(world["root"] / "photos"), "--labels", LABELS, "--output", str(out)
    )
    assert result.code == 0 and result.stdout == ""
    assert [row["path"] for row in parse("csv", out.read_text())] == world[
        "expected"
    ]  # format from suffix

    import zsclip.jobs.classify

    def explode(*args, **kwargs):
        yield zsclip.jobs.classify.Prediction("first.jpg", [("corgi", 1.0)])
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(zsclip.jobs.classify, "classify_images", explode)
    with pytest.raises(RuntimeError):
        classify(world, str(world["root"] / "photos"), "--labels", LABELS, "--output", str(out))
    assert [row["path"] for row in parse("csv", out.read_text())] == world[
        "expected"
    ]  # old file intact
    assert sorted(os.listdir(tmp_path)) == ["results.csv"]  # no temporary left behind


def test_classify_from_saved_embeddings_matches_images(world: dict, tmp_path: Path) -> None:
    direct = parse(
        "jsonl", classify(world, str(world["root"] / "photos"), "--labels", LABELS).stdout
    )
    for suffix in (".npy", ".safetensors", ".jsonl"):
        saved = tmp_path / f"photos{suffix}"
        made = run_cli(
            ["embed", "--model", world["model"], str(world["root"] / "photos"), "-o", str(saved)]
        )
        assert made.code == 0, made.stderr
        result = classify(world, "--embeddings", str(saved), "--labels", LABELS)
        assert result.code == 0, result.stderr
        rows = parse("jsonl", result.stdout)
        assert [row["path"] for row in rows] == [row["path"] for row in direct]
        for got, want in zip(rows, direct):
            assert got["label"] == want["label"] and abs(got["score"] - want["score"]) < 1e-4


def test_embeddings_of_another_size_are_refused(world: dict, tmp_path: Path) -> None:
    saved = tmp_path / "wrong.jsonl"
    saved.write_text(json.dumps({"path": "x.jpg", "embedding": [1.0, 0.0, 0.0]}) + "\n")
    result = classify(world, "--embeddings", str(saved), "--labels", LABELS)
    assert result.code == 2 and "3-dimensional" in result.stderr
    texts = tmp_path / "texts.jsonl"
    texts.write_text(json.dumps({"text": "hi", "embedding": [1.0] * 32}) + "\n")
    assert (
        "text embeddings" in classify(world, "--embeddings", str(texts), "--labels", LABELS).stderr
    )


def test_builtin_model_is_announced_once(world: dict, tmp_path: Path, monkeypatch) -> None:
    import zsclip.core.checkpoints
    import zsclip.paths

    weights = tmp_path / "weights"
    weights.mkdir()
    os.link(world["model"], weights / "demo.safetensors")
    monkeypatch.setattr(zsclip.paths, "weights_dir", lambda: weights)
    monkeypatch.setattr(zsclip.core.checkpoints, "weights_dir", lambda: weights)
    monkeypatch.delenv("ZSCLIP_MODEL", raising=False)
    result = run_cli(["classify", world["expected"][0], "--labels", LABELS])
    assert result.code == 0, result.stderr
    assert result.stderr.count("built-in demo model") == 1 and "--model" in result.stderr
    quiet = run_cli(["classify", world["expected"][0], "--labels", LABELS, "--quiet"])
    assert quiet.stderr == ""


def test_help_shows_real_examples() -> None:
    top = run_cli(["--help"])
    assert top.code == 0 and "zsclip classify photos/" in top.stdout
    for command in ("classify", "embed"):
        result = run_cli([command, "--help"])
        assert result.code == 0 and f"zsclip {command} photos/" in result.stdout


def test_progress_bar_only_on_a_terminal_and_not_quiet(monkeypatch) -> None:
    from zsclip.cli import _output as output

    monkeypatch.setattr(output, "stderr_is_terminal", lambda: False)
    assert isinstance(output.progress(10, "x"), output._NoProgress)
    monkeypatch.setattr(output, "stderr_is_terminal", lambda: True)
    assert isinstance(output.progress(10, "x", quiet=True), output._NoProgress)
    assert isinstance(output.progress(10, "x"), output._BarProgress)


def test_table_respects_no_color(world: dict) -> None:
    args = [world["expected"][0], "--labels", LABELS, "-f", "table"]
    coloured = classify(world, *args, env={"FORCE_COLOR": "1", "NO_COLOR": None, "COLUMNS": "120"})
    plain = classify(world, *args, env={"FORCE_COLOR": "1", "NO_COLOR": "1", "COLUMNS": "120"})
    assert "\x1b[" in coloured.stdout  # styles are on when forced ...
    assert "\x1b[3" not in plain.stdout.replace(
        "\x1b[3m", ""
    )  # ... but no colour codes under NO_COLOR


def test_progress_bar_keeps_stdout_clean(world: dict, monkeypatch, tmp_path: Path) -> None:
    from zsclip.cli import _output as output

    monkeypatch.setattr(output, "stderr_is_terminal", lambda: True)
    output.stderr_console.cache_clear()  # the console reads FORCE_COLOR when it is made: make it afresh
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"")
    result = classify(
        world, *world["expected"], str(bad), "--labels", LABELS, env={"FORCE_COLOR": "1"}
    )
    assert result.code == 1
    assert [row["path"] for row in parse("jsonl", result.stdout)] == [*world["expected"], str(bad)]
    assert "classifying" in result.stderr and f"zsclip: error: {bad}: " in result.stderr
    assert (
        "classifying"
        not in classify(
            world, *world["expected"], "-l", LABELS, "-q", env={"FORCE_COLOR": "1"}
        ).stderr
    )
    output.stderr_console.cache_clear()


def test_empty_folder_warns_and_exits_0(world: dict, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    result = classify(world, str(tmp_path / "empty"), "--labels", LABELS)
    assert result.code == 0 and result.stdout == "" and "no images found" in result.stderr


def test_the_program_writes_everything_before_its_quick_exit(world: dict, tmp_path: Path) -> None:
    """`python -m zsclip` (like the console script) ends without the interpreter's teardown: every row must be
    on stdout, --output complete, the cache note said, and the exit status kept, with a bad input among them."""
    import subprocess
    import sys

    folder = tmp_path / "photos"
    folder.mkdir()
    for path in world["expected"]:
        (folder / os.path.basename(path)).write_bytes(Path(path).read_bytes())
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    env = {**os.environ, "ZSCLIP_CACHE": str(tmp_path / "cache")}
    command = [
        sys.executable,
        "-m",
        "zsclip",
        "classify",
        str(folder),
        "--model",
        world["model"],
        "-t",
        "simple",
        "--labels",
        LABELS,
        "-f",
        "jsonl",
    ]
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert first.returncode == 1, first.stderr
    rows = [json.loads(line) for line in first.stdout.splitlines()]
    assert len(rows) == len(world["expected"]) + 1 and "broken.jpg" in first.stderr
    again = subprocess.run(
        [*command, "--output", str(tmp_path / "out.jsonl")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert again.returncode == 1 and again.stdout == ""
    assert f"{len(world['expected'])} image embedding(s) reused from the cache" in again.stderr
    assert (tmp_path / "out.jsonl").read_text().splitlines() == first.stdout.splitlines()


def test_a_missing_input_is_a_usage_error_before_the_model_loads(world: dict, tmp_path) -> None:
    no_model = str(tmp_path / "no-such-model.safetensors")  # loading it would fail: it must not
    typo = str(tmp_path / "phtos")
    result = run_cli(["classify", world["expected"][0], typo, "--model", no_model, "-l", LABELS])
    assert result.code == 2 and result.stdout == ""
    [line] = result.stderr.splitlines()
    assert typo in line and "no such file or folder" in line and "model" not in line
    # a path listed on stdin that is gone is an input like any other unreadable one: an error row
    listed = classify(world, "-", "-l", LABELS, input=f"{world['expected'][0]}\n{typo}\n")
    assert listed.code == 1
    assert [row.get("error") for row in parse("jsonl", listed.stdout)] == [
        None,
        "no such file or folder",
    ]


def test_paths_typed_at_a_terminal_are_announced(world: dict, monkeypatch, capsys) -> None:
    import io

    from zsclip.cli._runtime import gather_inputs

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stdin", Terminal(world["expected"][0] + "\n"))
    items = gather_inputs(["-"], quiet=False)
    assert [item.path for item in items] == world["expected"][:1]
    assert "reading image paths from stdin" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO(world["expected"][0] + "\n"))  # a pipe: no note
    gather_inputs(["-"], quiet=False)
    assert capsys.readouterr().err == ""
