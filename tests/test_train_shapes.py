"""The synthetic shapes world: held-out design, captions, layout, and same seed -> same bytes."""

from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path

import pytest

from zsclip.train import shapes


def test_heldout_design_holds_out_each_colour_and_shape_twice():
    assert len(shapes.COLOURS) >= 8 and len(shapes.SHAPES) >= 8
    held = shapes.heldout_combinations()
    assert len(held) == 20
    assert Counter(c for c, _ in held) == Counter({c: 2 for c in shapes.COLOURS})
    assert Counter(s for _, s in held) == Counter({s: 2 for s in shapes.SHAPES})
    assert len(shapes.seen_combinations()) + len(held) == len(shapes.all_combinations())


def _combo_in(caption: str) -> tuple[str, str]:
    words = re.findall(r"[a-z]+", caption)
    colour = next(w for w in words if w in shapes.COLOURS)
    nouns = {shapes.PLURALS[s]: s for s in shapes.SHAPES} | {s: s for s in shapes.SHAPES}
    shape = next(nouns[w] for w in words if w in nouns)
    return colour, shape


def test_captions_describe_the_scene_in_several_phrasings():
    rng = random.Random(0)
    captions = [shapes.draw_example(rng, "red", "star", 32)[1] for _ in range(200)]
    assert all(_combo_in(c) == ("red", "star") for c in captions)
    assert any(c.startswith("a drawing of") for c in captions) and any(
        c.startswith("there") for c in captions
    )
    assert any("stars" in c for c in captions) and any("background" in c for c in captions)
    assert any(w in " ".join(captions) for w in ("small", "large")) and any(
        "top" in c for c in captions
    )
    assert len(set(captions)) > 100
    assert shapes.PLURALS["cross"] == "crosses"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    shapes.generate(out, 40, seed=11, image_size=32, val_count=10, eval_per_class=1)
    return out


def test_layout_and_no_heldout_combination_in_training(world):
    labels = (world / "labels.txt").read_text().splitlines()
    assert len(labels) == 100 and "red circle" in labels
    assert sorted(p.name for p in (world / "heldout").iterdir()) == sorted(
        shapes.label(c, s) for c, s in shapes.heldout_combinations()
    )
    assert len(list((world / "seen").iterdir())) == 80
    for split, n in (("train", 40), ("val", 10)):
        rows = (world / f"{split}.tsv").read_text().splitlines()
        assert rows[0] == "image\tcaption" and len(rows) == n + 1
        for row in rows[1:]:
            image, caption = row.split("\t")
            assert (world / image).is_file()
            assert _combo_in(caption) not in shapes.HELDOUT


def test_every_colour_and_shape_is_seen_in_training():
    rng = random.Random(1)
    seen = shapes.seen_combinations()
    assert {c for c, _ in seen} == set(shapes.COLOURS) and {s for _, s in seen} == set(
        shapes.SHAPES
    )
    image, _ = shapes.draw_example(rng, *seen[0], size=48)
    assert image.size == (48, 48) and image.mode == "RGB"


def test_same_seed_same_bytes(world, tmp_path):
    again = tmp_path / "again"
    shapes.generate(again, 40, seed=11, image_size=32, val_count=10, eval_per_class=1)
    files = sorted(p.relative_to(world) for p in world.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((world / f).read_bytes() == (again / f).read_bytes() for f in files)
    other = tmp_path / "other"
    shapes.generate(other, 5, seed=12, image_size=32, val_count=1, eval_per_class=1)
    assert (other / "train/000000.png").read_bytes() != (world / "train/000000.png").read_bytes()


def test_shapes_command(tmp_path):
    from typer.testing import CliRunner

    from zsclip.cli.app import app

    result = CliRunner().invoke(
        app,
        [
            "shapes",
            str(tmp_path / "w"),
            "--count",
            "3",
            "--seed",
            "1",
            "--per-class",
            "1",
            "--image-size",
            "24",
            "--val-count",
            "2",
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "w" / "train.tsv").read_text().splitlines()) == 4
    assert len(list((tmp_path / "w" / "heldout").rglob("*.png"))) == 20


def _small(out: Path, count: int, **kwargs) -> dict:
    return shapes.generate(
        out, count, seed=3, image_size=16, val_count=2, eval_per_class=1, **kwargs
    )


def test_shapes_refuses_a_file_and_a_folder_of_other_things(tmp_path):
    from cli_helpers import run_cli

    (tmp_path / "afile").write_text("mine")
    result = run_cli(["shapes", str(tmp_path / "afile"), "-n", "3", "-q"])
    assert result.code == 2 and result.stderr.count("\n") == 1 and "is a file" in result.stderr
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "notes.txt").write_text("mine")
    result = run_cli(["shapes", str(tmp_path / "work"), "-n", "3", "-q"])
    assert result.code == 2 and "not a shapes set" in result.stderr and "notes.txt" in result.stderr
    assert (tmp_path / "afile").read_text() == "mine"
    assert [p.name for p in (tmp_path / "work").iterdir()] == ["notes.txt"]


def test_shapes_replaces_a_previous_set_whole(tmp_path):
    out = tmp_path / "set"
    _small(out, 12)
    (out / "train" / "000011.png").touch()  # still there unless the old set is removed whole
    _small(out, 4)
    assert sorted(p.name for p in (out / "train").iterdir()) == [f"{i:06d}.png" for i in range(4)]
    assert len((out / "train.tsv").read_text().splitlines()) == 5
    assert [p.name for p in tmp_path.iterdir()] == ["set"]  # no temporary folders left beside it
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask() -> int:
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_an_interrupted_shapes_run_leaves_the_previous_set(tmp_path):
    out = tmp_path / "set"
    _small(out, 4)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def interrupt(done: int, total: int) -> None:
        raise KeyboardInterrupt  # Ctrl-C halfway through drawing the new set

    with pytest.raises(KeyboardInterrupt):
        _small(out, 300, progress=interrupt)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before and [p.name for p in tmp_path.iterdir()] == ["set"]
