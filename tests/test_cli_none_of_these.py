"""`classify --min-score` and `--other` ("none of these") and `--xmp` / `zsclip tags`, with the
built-in model on the bundled example images (shapes it was trained to tell apart)."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from cli_helpers import run_cli

from zsclip.jobs.classify import Prediction, judged
from zsclip.jobs.scores import ClassifyOptions

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SHOWN = "blue circle,red heart,green star"  # three of the eight example images
BACKGROUND = "cyan crescent,yellow square,purple ring"  # three others, as background labels


def classify(*args: str, folder: Path = EXAMPLES):
    return run_cli(["classify", str(folder), "--format", "jsonl", "-q", *args])


def rows(result) -> list[dict]:
    assert result.code == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.fixture(scope="module")
def plain() -> list[dict]:
    return rows(classify("-L", str(EXAMPLES / "labels.txt")))


def test_min_score_nulls_exactly_the_images_whose_best_score_is_below_it(plain) -> None:
    scores = sorted(row["score"] for row in plain)
    cut = (scores[3] + scores[4]) / 2  # half the images fall below it
    gated = rows(classify("-L", str(EXAMPLES / "labels.txt"), "--min-score", f"{cut:.6f}"))
    assert [row["path"] for row in gated] == [row["path"] for row in plain]
    for before, after in zip(plain, gated):
        assert after["top"] == before["top"]  # the evidence is still there
        if before["score"] < cut:
            assert after["label"] is None and after["score"] is None
        else:
            assert (after["label"], after["score"]) == (before["label"], before["score"])
    assert sum(row["label"] is None for row in gated) == 4


def test_other_labels_win_as_null_and_never_show_in_top() -> None:
    result = rows(classify("-l", SHOWN, "--other", BACKGROUND))
    by_name = {Path(row["path"]).stem: row for row in result}
    for name in ("cyan-crescent", "yellow-square", "purple-ring"):
        row = by_name[name]
        assert row["label"] is None and row["other"] > row["top"][0]["score"]
    for name in ("blue-circle", "red-heart", "green-star"):
        assert by_name[name]["label"] == name.replace("-", " ")
    background = set(BACKGROUND.split(","))
    for row in result:
        assert not background & {entry["label"] for entry in row["top"]}
        # the background labels took their share of the softmax
        assert sum(entry["score"] for entry in row["top"]) + row["other"] <= 1 + 1e-5


def test_other_file_is_read_like_a_labels_file(tmp_path: Path) -> None:
    others = tmp_path / "others.txt"
    others.write_text("# background\n" + BACKGROUND.replace(",", "\n") + "\n")
    assert rows(classify("-l", SHOWN, "--other-file", str(others))) == rows(
        classify("-l", SHOWN, "--other", BACKGROUND)
    )


def test_csv_keeps_the_best_label_of_unsure_rows_and_the_table_says_unsure() -> None:
    result = run_cli(
        [
            "classify",
            str(EXAMPLES),
            "-l",
            SHOWN,
            "--other",
            BACKGROUND,
            "-f",
            "csv",
            "-q",
            "-k",
            "2",
        ]
    )
    table = list(csv.DictReader(io.StringIO(result.stdout)))
    assert list(table[0]) == [
        *("path", "label", "score", "label_2", "score_2", "best", "best_score", "other", "error")
    ]
    crescent = next(row for row in table if "crescent" in row["path"])
    assert crescent["label"] == "" and crescent["score"] == "" and crescent["best"] in SHOWN
    assert float(crescent["other"]) > float(crescent["best_score"])
    shown = run_cli(["classify", str(EXAMPLES), "-l", SHOWN, "--other", BACKGROUND, "-f", "table"])
    unsure = sum(row["label"] == "" for row in table)
    assert unsure == 4 and shown.stdout.count("(unsure)") == unsure and "(other)" in shown.stdout


def test_background_words_the_model_never_learnt_are_warned_about() -> None:
    """One label against background labels is a real question (no one-label warning), but a
    background word the built-in model never saw makes its score meaningless: say so."""
    result = run_cli(["classify", str(EXAMPLES / "red-heart.png"), "-l", "red heart",
                      "--other", "pink elephant", "-f", "jsonl"])  # fmt: skip
    assert result.code == 0 and "'elephant'" in result.stderr and "one label" not in result.stderr
    assert "'pink'" not in result.stderr  # a colour it knows


@pytest.mark.parametrize(
    "args, message",
    [
        (["-l", SHOWN, "--other", "Red Heart"], "both a label and a background label"),
        (["-l", SHOWN, "--other", "a,", "--other-file", "x"], "not both"),
        (["-l", SHOWN, "--other", "a,,b"], "empty"),
        (["-l", SHOWN, "--min-score", "1.5"], "--min-score"),
    ],
)
def test_usage_errors(args: list[str], message: str) -> None:
    result = classify(*args)
    assert result.code == 2 and message in result.stderr and result.stderr.count("\n") == 1


@pytest.mark.parametrize("multi_label", [False, True])
def test_judging_rule_in_both_modes(multi_label: bool) -> None:
    """A label is accepted when it reaches --min-score and beats every background label."""
    labels = ["a", "b", "c"]
    scores = torch.tensor([0.55, 0.8, 0.6, 0.7, 0.1])  # a, b, c, then two background labels
    options = ClassifyOptions(top_k=3, multi_label=multi_label, others=("x", "y"))
    fields = judged(scores, labels, options)
    assert fields["other"] == pytest.approx(0.7)
    prediction = Prediction("p", **fields)
    assert prediction.label == "b" and prediction.accepted == [("b", pytest.approx(0.8))]
    strict = Prediction("p", **judged(scores, labels, ClassifyOptions(top_k=3, min_score=0.85)))
    assert strict.label is None and strict.unsure and len(strict.top) == 3
    lenient = ClassifyOptions(top_k=3, multi_label=multi_label, min_score=0.58)
    kept = Prediction("p", **judged(scores, labels, lenient))
    assert [label for label, _ in kept.accepted] == ["b", "c"]
    assert kept.keywords(multi_label) == (["b", "c"] if multi_label else ["b"])


# ------------------------------------------------------------------------------ --xmp and tags


def test_xmp_tags_the_accepted_labels_and_tags_remove_takes_them_out(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    shutil.copytree(EXAMPLES, photos)
    images = {path.name: path.read_bytes() for path in photos.glob("*.png")}
    # the orange triangle's best shown label is "blue circle" at about 0.7: --min-score leaves it untagged
    result = classify(
        "-l", SHOWN, "--other", BACKGROUND, "--min-score", "0.9", "--xmp", folder=photos
    )
    sidecars = sorted(path.name for path in photos.glob("*.xmp"))
    assert sidecars == ["blue-circle.png.xmp", "green-star.png.xmp", "red-heart.png.xmp"]
    assert {path.name: path.read_bytes() for path in photos.glob("*.png")} == images
    listed = run_cli(["tags", str(photos), "-f", "jsonl"])
    keywords = {
        Path(row["path"]).name: row["keywords"]
        for row in map(json.loads, listed.stdout.splitlines())
    }
    assert keywords == {
        "blue-circle.png": ["blue circle"],
        "green-star.png": ["green star"],
        "red-heart.png": ["red heart"],
    }
    assert len(rows(result)) == 8
    rows(classify("-l", "blue circle,red circle", "--xmp", folder=photos))  # a rerun replaces
    again = run_cli(["tags", str(photos / "blue-circle.png"), "-f", "jsonl"])
    assert json.loads(again.stdout)["keywords"] == ["blue circle"]
    removed = run_cli(["tags", str(photos), "--remove", "-f", "jsonl"])
    assert removed.code == 0 and not list(photos.glob("*.xmp"))


def test_a_hostile_sidecar_is_one_error_line_and_the_rest_are_tagged(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    shutil.copytree(EXAMPLES, photos)
    bomb = photos / "red-heart.png.xmp"
    bomb.write_text('<!DOCTYPE x [<!ENTITY a "aaaa">]><x>&a;</x>')
    result = classify("-l", SHOWN, "--xmp", folder=photos)
    assert result.code == 1
    assert len(result.stdout.splitlines()) == 8  # every image still classified
    errors = [line for line in result.stderr.splitlines() if line.startswith("zsclip: error:")]
    assert len(errors) == 1 and "DOCTYPE" in errors[0] and "red-heart.png.xmp" in errors[0]
    assert bomb.read_text() == '<!DOCTYPE x [<!ENTITY a "aaaa">]><x>&a;</x>'
    assert (photos / "blue-circle.png.xmp").exists()
