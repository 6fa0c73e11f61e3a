"""What a new user meets first: the built-in model says what it knows, its multi-label default, the
lone-label warning, `zsclip models` descriptions, `--version`, and help placeholders that read as
words."""

from __future__ import annotations

import hashlib
import json
import random
import re
import subprocess
import sys
from pathlib import Path

from cli_helpers import build_tiny_checkpoint, make_image, run_cli

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
BUILTIN = REPO / "weights" / "zsclip-shapes.safetensors"
UNKNOWN_WARNING = (
    "zsclip: warning: the built-in model zsclip-shapes (demo: coloured shapes only) never learnt the "
    "word(s) 'corgi', 'jazz', 'album': its scores for them mean nothing\n"
    "zsclip: warning: for a real CLIP use --model ViT-B/32 (338 MiB, downloaded once); "
    "`zsclip config set model ViT-B/32` makes it the default\n"
)
BUILTIN_NOTE = (
    "zsclip: using the built-in model zsclip-shapes (demo: coloured shapes only); for a real CLIP use "
    "--model ViT-B/32 (338 MiB, downloaded once), or make it the default: zsclip config set model "
    "ViT-B/32\n"
)
ONE_LABEL_WARNING = (
    "zsclip: warning: with one label every image scores 1.0 (a softmax over one label); add labels "
    "to choose among, or use --multi-label to ask whether each image shows it\n"
)


def _builtin(*args: str):
    return run_cli(["classify", "--no-cache", *args])


# ------------------------------------------------------------------ the built-in model's vocabulary


def test_labels_with_words_it_never_learnt_are_named_before_the_results() -> None:
    result = _builtin(str(EXAMPLES / "red-heart.png"), "--labels", "corgi,jazz album,red heart")
    assert result.code == 0, result.stderr
    assert result.stderr == UNKNOWN_WARNING  # replaces the usual note: said once, not twice
    assert json.loads(result.stdout)["label"] == "red heart"


def test_the_warning_comes_before_the_first_result_and_survives_quiet() -> None:
    command = [sys.executable, "-m", "zsclip", "classify", "--no-cache", "--quiet", "--format"]
    command += ["jsonl", str(EXAMPLES), "--labels", "corgi,jazz album,red heart"]
    merged = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert merged.returncode == 0, merged.stdout
    lines = merged.stdout.splitlines(keepends=True)
    assert "".join(lines[:2]) == UNKNOWN_WARNING
    assert all(line.startswith('{"path": ') for line in lines[2:]) and len(lines) == 2 + 8


def test_shape_labels_get_the_note_and_no_warning() -> None:
    labels = "red circle,Blue Star,two small green crosses on a dotted background"
    result = _builtin(str(EXAMPLES / "blue-circle.png"), "--labels", labels)
    assert result.code == 0 and result.stderr == BUILTIN_NOTE
    assert _builtin(str(EXAMPLES / "blue-circle.png"), "--labels", labels, "-q").stderr == ""


def test_many_unknown_words_are_counted_after_the_first_eight() -> None:
    labels = ",".join(f"thing{n} red circle" for n in range(12))
    result = _builtin(str(EXAMPLES / "blue-circle.png"), "--labels", labels)
    first = result.stderr.splitlines()[0]
    assert "'thing0', 'thing1'" in first and "'thing7' and 4 more:" in first
    assert "'thing8'" not in first and "'red'" not in first


def test_unknown_words_compare_as_the_tokenizer_reads_them() -> None:
    from zsclip.jobs.labels import unknown_words, words_of

    assert words_of("Two RED-stars, on the left!") == ["two", "red", "stars", "on", "the", "left"]
    known = "red star stars two"
    assert unknown_words(["RED Star", "two  stars", "red star!"], known) == []
    assert unknown_words(["red corgi", "Corgi", "3 stars", "café"], known) == ["corgi", "3", "café"]
    assert unknown_words(["anything at all"], "") == []  # a model that lists no words is not judged


def test_every_caption_word_is_listed_and_nothing_else() -> None:
    """caption_words() is the caption grammar's vocabulary: thousands of sampled captions use every
    listed word and no other."""
    from zsclip.jobs.labels import words_of
    from zsclip.train import shapes

    rng, seen = random.Random(7), set()
    for _ in range(5000):
        colour, shape = rng.choice(shapes.seen_combinations())
        seen.update(words_of(shapes.caption(shapes.sample_scene(rng, colour, shape), rng)))
    assert seen == set(shapes.caption_words())
    labels = [shapes.label(colour, shape) for colour, shape in shapes.all_combinations()]
    assert {word for label in labels for word in words_of(label)} <= seen


def test_the_shipped_model_describes_itself_and_matches_its_card() -> None:
    from zsclip.core.checkpoints import load_model
    from zsclip.train.shapes import caption_words

    loaded = load_model(None)
    assert loaded.builtin and loaded.path == BUILTIN
    assert loaded.metadata["caption_words"] == " ".join(caption_words())
    assert loaded.metadata["description"] == "demo: coloured shapes only"
    assert 0.5 < float(loaded.metadata["multi_label_threshold"]) < 0.9
    card = (REPO / "weights" / "README.md").read_text(encoding="utf-8")
    digest = hashlib.sha256(BUILTIN.read_bytes()).hexdigest()
    assert f"| sha256 | `{digest}` |" in card
    assert f"{BUILTIN.stat().st_size:,} bytes" in card


def test_converting_the_built_in_model_keeps_what_it_says_about_itself(tmp_path: Path) -> None:
    from zsclip.core.checkpoints import load_model

    copy = tmp_path / "copy.safetensors"
    assert run_cli(["convert", "zsclip-shapes", str(copy)]).code == 0
    kept, shipped = load_model(copy).metadata, load_model(BUILTIN).metadata
    for key in ("description", "caption_words", "multi_label_threshold", "templates"):
        assert kept[key] == shipped[key]


# ------------------------------------------------------------------------ multi-label default


def _multi_label_rows(*args: str) -> list[dict]:
    result = _builtin(str(EXAMPLES), "-L", str(EXAMPLES / "labels.txt"), "--multi-label", *args)
    assert result.code == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_the_built_in_multi_label_default_lists_few_labels_and_the_right_ones() -> None:
    rows = _multi_label_rows("-k", "100")
    truth = {row["path"]: Path(row["path"]).stem.replace("-", " ") for row in rows}
    assert all(len(row["top"]) <= 2 for row in rows)
    assert sum(row["label"] == truth[row["path"]] for row in rows) >= 6
    generic = _multi_label_rows("-k", "100", "--threshold", "0.25")  # the default of other models
    assert sum(len(row["top"]) for row in generic) > 5 * sum(len(row["top"]) for row in rows)


def test_the_threshold_comes_from_the_checkpoint_metadata(tmp_path: Path) -> None:
    model = build_tiny_checkpoint(tmp_path, metadata={"multi_label_threshold": "-0.5"})
    image = tmp_path / "x.png"
    make_image(image)
    base = ["classify", str(image), "--model", str(model), "-t", "simple", "--multi-label"]

    def top(*args: str) -> list[dict]:
        result = run_cli([*base, "-l", "red circle,corgi", "-k", "2", *args])
        assert result.code == 0, result.stderr
        return json.loads(result.stdout)["top"]

    scores = top()  # a random model's cosines are near 0: both labels pass at -0.5 ...
    assert len(scores) == 2 and scores == top("--threshold=-0.5")
    assert top("--threshold", "0.25") == []  # ... and neither at the generic default


# ----------------------------------------------------------------------------- one label


def test_one_label_under_softmax_is_warned_about_not_refused(tmp_path: Path) -> None:
    model = build_tiny_checkpoint(tmp_path)
    image = tmp_path / "x.png"
    make_image(image)
    base = ["classify", str(image), "--no-cache", "--model", str(model), "-t", "simple"]
    base += ["-l", "red circle"]
    result = run_cli(base)
    assert result.code == 0 and result.stderr == ONE_LABEL_WARNING
    assert json.loads(result.stdout)["score"] == 1.0
    assert run_cli([*base, "--multi-label"]).stderr == ""
    assert run_cli([*base[:-1], "red circle,corgi"]).stderr == ""


# ---------------------------------------------------------------------- models, version, help


def test_models_describe_each_model_in_a_few_words() -> None:
    result = run_cli(["models", "--format", "json"])
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["zsclip-shapes"]["description"] == "demo: coloured shapes only"
    assert rows["ViT-B/32"]["description"] == "real CLIP: the usual start on a CPU"
    assert all(row["description"] for row in rows.values())
    table = run_cli(["models"]).stdout.splitlines()
    assert table[0].split() == ["NAME", "KIND", "SIZE", "TOP1", "PARAMS", "FOUND", "ABOUT", "PATH"]
    assert re.match(
        r"zsclip-shapes +builtin +8\.7 MiB +- +- +built-in +demo: coloured shapes only +/", table[1]
    )


def test_version() -> None:
    from zsclip import __version__

    result = run_cli(["--version"])
    assert result.code == 0 and result.stdout == f"zsclip {__version__}\n" and result.stderr == ""
    command = [sys.executable, "-m", "zsclip", "--version"]
    assert (
        subprocess.run(command, capture_output=True, text=True).stdout == f"zsclip {__version__}\n"
    )


def _command_paths() -> list[list[str]]:
    import typer

    from zsclip.cli.app import app

    paths: list[list[str]] = []

    def walk(command, path: list[str]) -> None:
        paths.append(path)
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return paths


WORD = r"[A-Z][A-Z0-9_]*(\.\.\.)?"


def _entries(help_text: str) -> list[str]:
    """The first column of every row under `Arguments:` and `Options:`."""
    entries, inside = [], False
    for line in help_text.splitlines():
        if line in ("Arguments:", "Options:"):
            inside = True
        elif not line.strip():
            inside = False
        elif inside and re.match(r"  \S", line):
            entries.append(re.split(r"\s{2,}", line.strip())[0])
    return entries


def test_every_help_placeholder_is_a_word() -> None:
    paths = _command_paths()
    assert ["config", "set"] in paths and ["classify"] in paths and len(paths) >= 13
    for path in paths:
        result = run_cli([*path, "--help"])
        assert result.code == 0, (path, result.stderr)
        usage = result.stdout.splitlines()[0]
        pieces = usage.split("[OPTIONS]")[1].split()
        for piece in pieces:
            assert re.fullmatch(rf"\[?{WORD}\]?|COMMAND|\[ARGS\]\.\.\.", piece), (path, usage)
        for entry in _entries(result.stdout):
            words = [w for w in re.split(r"[ ,/]+", entry) if w and not w.startswith("-")]
            assert all(re.fullmatch(WORD, word) for word in words), (path, entry)
    classify = run_cli(["classify", "--help"]).stdout
    assert "[INPUT...]" in classify and "-k, --top-k N" in classify
    assert "--output FILE" in classify and "--threshold X" in classify
    convert = run_cli(["convert", "--help"]).stdout
    assert "zsclip convert [OPTIONS] SRC DST\n" in convert.splitlines(keepends=True)[0]
    assert "zsclip shapes [OPTIONS] OUT\n" in run_cli(["shapes", "--help"]).stdout


def test_classify_help_says_what_the_built_in_model_is() -> None:
    text = " ".join(run_cli(["classify", "--help"]).stdout.split())
    assert 'the built-in demo model knows only coloured shapes ("red circle")' in text
    assert "--model ViT-B/32 (338 MiB, downloaded once" in text


def test_readme_opening_names_the_demo_model_and_the_real_clip() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    opening = " ".join(readme.split("\n\n")[1].split())
    assert "coloured shapes" in opening and "--model ViT-B/32" in opening
