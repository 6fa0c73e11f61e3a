"""A few examples per label: `classify --examples`, `eval --examples`, `zsclip fit` and `--head`, with the
built-in model on a label its words cannot describe ("dax", a grey heart: the model never saw grey)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
from pathlib import Path

import pytest
from cli_helpers import build_tiny_checkpoint, run_cli

from zsclip.train import shapes

LABELS = ["black heart", "red heart", "green triangle", "blue square", "dax"]
EXAMPLES, TESTS = 4, 8  # images per label


def draw(rng: random.Random, label: str):
    """One 64 px image of `label`; "dax" is a heart painted grey, drawn with the world's own scenes."""
    if label == "dax":
        scene = shapes.sample_scene(rng, "black", "heart")
        grey = tuple([128 + rng.randint(-12, 12)] * 3)
        return shapes.render(dataclasses.replace(scene, tint=grey), rng)
    colour, shape = label.split()
    return shapes.draw_example(rng, colour, shape)[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from zsclip.paths import builtin_models

    if not builtin_models():
        pytest.skip("no built-in model in weights/")
    root = tmp_path_factory.mktemp("fewshot")
    rng = random.Random("test-fewshot")
    for split, count in (("examples", EXAMPLES), ("test", TESTS)):
        for label in LABELS:
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                draw(rng, label).save(root / split / label / f"{i}.png")
    (root / "labels.txt").write_text("\n".join(LABELS) + "\n")
    return root


def classify(world: Path, *extra: str, inputs: list[Path] | None = None) -> tuple[list[dict], str]:
    args = [str(p) for p in inputs or [world / "test"]]
    run = run_cli(["classify", *args, "-L", str(world / "labels.txt"), "-f", "jsonl", *extra])
    assert run.code == 0, run.stderr
    return [json.loads(line) for line in run.stdout.splitlines()], run.stderr


def truth(row: dict) -> str:
    return Path(row["path"]).parent.name


def accuracy(rows: list[dict], label: str | None = None) -> float:
    kept = [row for row in rows if label is None or truth(row) == label]
    return sum(row["label"] == truth(row) for row in kept) / len(kept)


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts the images that go through the model's image tower."""
    from zsclip.core.model import CLIP

    counts = {"images": 0}
    encode_image = CLIP.encode_image

    def count_images(self, images):
        counts["images"] += images.shape[0]
        return encode_image(self, images)

    monkeypatch.setattr(CLIP, "encode_image", count_images)
    return counts


def test_examples_teach_a_label_words_cannot_describe(world: Path) -> None:
    zero_shot, _ = classify(world)
    few_shot, stderr = classify(world, "--examples", str(world / "examples"))
    # the model has no word for it: zero-shot picks it no better than chance, more or less
    assert accuracy(zero_shot, "dax") <= 0.5
    assert accuracy(few_shot, "dax") >= accuracy(zero_shot, "dax") + 0.4
    assert accuracy(few_shot) > accuracy(zero_shot)
    others = [label for label in LABELS if label != "dax"]
    assert min(accuracy(few_shot, label) for label in others) >= 0.75  # still known
    assert "few-shot head fitted on 20 examples for 5 of 5 labels" in stderr
    assert "'dax'" not in stderr  # no warning about its word: its examples teach it


def test_eval_reports_few_shot_and_zero_shot_scores(world: Path) -> None:
    args = ["eval", str(world / "test"), "-L", str(world / "labels.txt"), "--format", "json"]
    plain = run_cli(args)
    few = run_cli([*args, "--examples", str(world / "examples")])
    assert plain.code == 0 and few.code == 0, few.stderr
    plain_scores, few_scores = json.loads(plain.stdout), json.loads(few.stdout)
    assert few_scores["zeroshot_top1"] == plain_scores["top1"]
    assert few_scores["examples"] == EXAMPLES * len(LABELS)
    assert few_scores["top1"] > plain_scores["top1"]
    on_itself = [args[0], str(world / "examples"), *args[2:]]
    shared = run_cli([*on_itself, "--examples", str(world / "examples")])
    assert "also evaluation images" in shared.stderr  # examples graded on themselves: warned


def test_a_second_run_decodes_no_example_and_fits_nothing(world: Path, counted: dict) -> None:
    dax = [world / "test" / "dax"]
    first, stderr = classify(world, "--examples", str(world / "examples"), inputs=dax)
    assert counted["images"] == EXAMPLES * len(LABELS) + TESTS
    assert "fitted on" in stderr
    again, stderr = classify(world, "--examples", str(world / "examples"), inputs=dax)
    assert counted["images"] == EXAMPLES * len(LABELS) + TESTS  # nothing encoded
    assert "read from the cache" in stderr
    assert [row["top"] for row in again] == [row["top"] for row in first]

    changed = world / "examples" / "dax" / "0.png"  # a new stamp: the head is fitted again
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    counted["images"] = 0
    _, stderr = classify(world, "--examples", str(world / "examples"), inputs=dax)
    assert counted["images"] == 1  # only the changed example; the rest from the image cache
    assert f"fitted on 20 examples for 5 of 5 labels (1 embedded, {EXAMPLES * 5 - 1} from" in stderr


def _threshold_rows(stderr: str) -> dict[str, str]:
    """label -> threshold as the table on stderr shows it ("0.710*": the global one)."""
    rows = {}
    for line in stderr.splitlines():
        parts = line.strip().rsplit(None, 3)
        if line.startswith("  ") and len(parts) == 4 and parts[0] in LABELS:
            rows[parts[0]] = parts[2]
    return rows


def _macro_f1(rows: list[dict]) -> float:
    scores = []
    for label in LABELS:
        tp = sum(truth(r) == label and label in {t["label"] for t in r["top"]} for r in rows)
        fp = sum(truth(r) != label and label in {t["label"] for t in r["top"]} for r in rows)
        fn = sum(truth(r) == label and label not in {t["label"] for t in r["top"]} for r in rows)
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores)


def test_multi_label_thresholds_are_chosen_reported_and_saved(world: Path, tmp_path: Path) -> None:
    from zsclip.jobs.heads import read_head

    plain, _ = classify(world, "--multi-label")
    tuned, stderr = classify(world, "--multi-label", "--examples", str(world / "examples"))
    reported = _threshold_rows(stderr)
    assert sorted(reported) == sorted(LABELS)
    assert _macro_f1(tuned) > _macro_f1(plain)

    head_file = tmp_path / "head.safetensors"
    fit = run_cli(
        ["fit", str(world / "examples"), "-L", str(world / "labels.txt"), "-o", str(head_file)]
    )
    assert fit.code == 0, fit.stderr
    assert fit.stdout == ""  # notes go to stderr
    head = read_head(head_file)
    assert head.labels == LABELS
    chosen = dict(zip(head.labels, head.thresholds.tolist()))
    assert not math.isnan(
        chosen["dax"]
    )  # the words cannot place it: the examples set its threshold
    for label, threshold in chosen.items():
        if math.isnan(threshold):  # the model's threshold did as well on the examples
            assert reported[label].endswith("*")
        else:
            assert float(reported[label]) == pytest.approx(threshold, abs=5e-4)  # 3 decimals
    from_file, _ = classify(world, "--multi-label", "--head", str(head_file))
    assert [r["label"] for r in from_file] == [r["label"] for r in tuned]


def test_fit_and_head_give_the_same_scores_as_examples(world: Path, tmp_path: Path) -> None:
    head_file = tmp_path / "h.safetensors"
    fit = run_cli(
        ["fit", str(world / "examples"), "-L", str(world / "labels.txt"), "-o", str(head_file)]
    )
    assert fit.code == 0, fit.stderr
    direct, _ = classify(world, "--examples", str(world / "examples"))
    saved, stderr = classify(world, "--head", str(head_file))
    assert f"few-shot head from {head_file}" in stderr
    for a, b in zip(direct, saved, strict=True):
        assert a["path"] == b["path"] and a["label"] == b["label"]
        for x, y in zip(a["top"], b["top"], strict=True):
            assert x["label"] == y["label"] and x["score"] == pytest.approx(y["score"], abs=2e-6)
    # the head's own labels are the default; given labels in another order reorder its columns
    alone = run_cli(["classify", str(world / "test"), "--head", str(head_file), "-f", "jsonl"])
    shuffled = run_cli(
        [
            "classify",
            str(world / "test"),
            "--head",
            str(head_file),
            "-f",
            "jsonl",
            "--labels",
            ",".join(reversed(LABELS)),
        ]
    )
    assert alone.code == 0 and shuffled.code == 0, shuffled.stderr
    assert [json.loads(line) for line in alone.stdout.splitlines()] == saved
    assert [json.loads(line)["label"] for line in shuffled.stdout.splitlines()] == [
        r["label"] for r in saved
    ]


def _one_line_error(run) -> str:
    assert run.code == 2 and run.stdout == ""
    assert "Traceback" not in run.stderr
    return run.stderr.strip().splitlines()[-1]


def test_a_head_for_another_model_or_damaged_is_one_line(world: Path, tmp_path: Path) -> None:
    head_file = tmp_path / "h.safetensors"
    assert run_cli(["fit", str(world / "examples"), "-o", str(head_file)]).code == 0
    tiny = build_tiny_checkpoint(tmp_path)
    other = run_cli(
        ["classify", str(world / "test"), "--head", str(head_file), "--model", str(tiny)]
    )
    line = _one_line_error(other)
    assert "fitted for model 'zsclip-shapes'" in line and "zsclip fit" in line

    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(head_file.read_bytes()[:300])
    for command in ("classify", "eval"):
        run = run_cli([command, str(world / "test"), "--head", str(damaged)])
        assert "head file" in _one_line_error(run)
    original = head_file.read_bytes()
    refused = run_cli(
        ["fit", str(world / "examples"), "-o", str(head_file), "--method", "nonsense"]
    )
    assert "--method" in _one_line_error(refused)
    assert head_file.read_bytes() == original  # a refused fit leaves the old head whole


def test_example_folder_mistakes_are_one_line(world: Path, tmp_path: Path) -> None:
    (tmp_path / "ex" / "purple unicorn").mkdir(parents=True)
    run = run_cli(
        [
            "classify",
            str(world / "test"),
            "-L",
            str(world / "labels.txt"),
            "--examples",
            str(tmp_path / "ex"),
        ]
    )
    assert "'purple unicorn'" in _one_line_error(run)
    (tmp_path / "one" / "dax").mkdir(parents=True)
    draw(random.Random(0), "dax").save(tmp_path / "one" / "dax" / "a.png")
    run = run_cli(
        [
            "classify",
            str(world / "test"),
            "-L",
            str(world / "labels.txt"),
            "--examples",
            str(tmp_path / "one"),
        ]
    )
    assert "one label only" in _one_line_error(run)
    both = run_cli(
        [
            "classify",
            str(world / "test"),
            "--examples",
            str(world / "examples"),
            "--head",
            str(tmp_path / "x.safetensors"),
            "-L",
            str(world / "labels.txt"),
        ]
    )
    assert "not both" in _one_line_error(both)
    both = run_cli(
        [
            "eval",
            str(world / "test"),
            "--examples",
            str(world / "examples"),
            "--head",
            str(tmp_path / "x.safetensors"),
        ]
    )
    assert "not both" in _one_line_error(both)


def test_without_labels_the_example_folders_are_the_labels(world: Path) -> None:
    run = run_cli(
        [
            "classify",
            str(world / "test" / "dax"),
            "--examples",
            str(world / "examples"),
            "-f",
            "jsonl",
        ]
    )
    assert run.code == 0, run.stderr
    rows = [json.loads(line) for line in run.stdout.splitlines()]
    assert sorted(t["label"] for t in rows[0]["top"]) == sorted(LABELS)
    assert accuracy(rows) >= 0.75


def test_background_labels_are_scored_zero_shot_beside_a_head(world: Path) -> None:
    rows, _ = classify(world, "--examples", str(world / "examples"), "--other", "purple star")
    assert all("other" in row for row in rows)  # the background label competes in the softmax
    assert {row["label"] for row in rows} <= {*LABELS, None}
    assert all(
        sum(t["score"] for t in row["top"]) + row["other"] == pytest.approx(1, abs=1e-4)
        for row in rows
    )  # one softmax over the head's 5 labels and the background label


def test_sort_files_by_what_the_examples_taught(world: Path, tmp_path: Path) -> None:
    # `sort` takes --examples and --head as classify does: the grey hearts go to dax/, as the
    # few-shot classify run says, and a head fitted before sorts them the same way.
    expected, _ = classify(world, "--examples", str(world / "examples"))
    where = {row["path"]: row["label"] for row in expected}
    head_file = tmp_path / "h.safetensors"
    fit = run_cli(
        ["fit", str(world / "examples"), "-L", str(world / "labels.txt"), "-o", str(head_file)]
    )
    assert fit.code == 0, fit.stderr
    for taught, dest in (
        (["--examples", str(world / "examples")], tmp_path / "by-examples"),
        (["--head", str(head_file)], tmp_path / "by-head"),
    ):
        run = run_cli(
            ["sort", str(world / "test"), "--to", str(dest), "-L", str(world / "labels.txt")]
            + [*taught, "-f", "jsonl"]
        )
        assert run.code == 0, run.stderr
        rows = [json.loads(line) for line in run.stdout.splitlines()]
        assert {row["path"]: row["label"] for row in rows} == where
        taught_dax = [path for path, label in where.items() if label == "dax"]
        assert len(taught_dax) >= TESTS // 2  # a label its words never taught the model
        assert len(list((dest / "dax").iterdir())) == len(taught_dax)
        for row in rows:  # each copy is in its label's folder, with the image's bytes
            assert Path(row["to"]).parent == dest / row["label"]
            assert Path(row["to"]).read_bytes() == Path(row["path"]).read_bytes()
