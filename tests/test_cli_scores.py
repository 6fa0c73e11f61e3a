"""The numbers themselves: what `classify` and `embed` print, checked against the paper's formulas
computed here, step by step, from a model with fixed weights.

The reference (tests/reference.py) shares nothing with zsclip's scoring code: prompts go
through the text tower padded, in a plain batch (no shared-prefix planning), each image is
normalised by hand from its pixels, the ensembling is spelled out, and the temperature and the
softmax/sigmoid are written out below.

Tolerances. The CLI and the reference run the same float32 operations in another order (batched
images, prompts batched by shared prefix): a feature component moves by about 1e-7 (measured: at
most 1.4e-7 on unit vectors of 32 components), so a cosine by at most sqrt(32) * 1.4e-7 < 1e-6. A
softmax probability moves by at most 0.5 * scale * max|d cosine| (d p_i = p_i (d l_i - sum_j p_j
d l_j)), a sigmoid by 0.25 * scale * |d cosine|, and the jsonl rounds to 6 decimals (+-5e-7). At the
tiny model's scale (1 / 0.07 = 14.3) that is 0.5 * 14.3 * 1e-6 + 5e-7 < 1e-5; at the capped scale
of 100 it is 5e-5 + 5e-7.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import reference
import torch
from cli_helpers import build_tiny_checkpoint, run_cli

COSINE_ERROR = 1e-6  # largest float32 disagreement on one cosine (module docstring)
ROUNDING = 5e-7  # the jsonl's 6 decimals
TEMPLATES = ["a photo of a {}.", "a blurry drawing of the {}", "{}", "art: {}, seen from afar"]
LABELS = ["red circle", "blue square", "corgi", "a jazz album cover"]
HOT_SCALE = 1000.0  # stored exp(logit_scale) of the "hot" model: zsclip must cap it at 100


def softmax_tolerance(scale: float) -> float:
    return 0.5 * scale * COSINE_ERROR + ROUNDING


def sigmoid_tolerance(scale: float) -> float:
    return 0.25 * scale * COSINE_ERROR + ROUNDING


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny model (fixed seed), the same model with its temperature above the cap, three images
    of seeded random pixels at the model's input size (so resizing and cropping do nothing), and a
    template file of four templates."""
    from PIL import Image

    from zsclip.core.checkpoints import load_model, save_checkpoint

    root = tmp_path_factory.mktemp("scores")
    model_path = build_tiny_checkpoint(root)
    loaded = load_model(str(model_path))
    with torch.no_grad():
        loaded.model.logit_scale.fill_(math.log(HOT_SCALE))
    hot_path = root / "hot.safetensors"
    save_checkpoint(
        hot_path, loaded.model, preprocess=loaded.preprocess, tokenizer=loaded.tokenizer
    )
    size = loaded.preprocess.image_size
    generator = torch.Generator().manual_seed(18)
    images = []
    for index in range(3):
        pixels = torch.randint(0, 256, (size, size, 3), generator=generator, dtype=torch.uint8)
        path = root / f"noise{index}.png"
        Image.frombytes("RGB", (size, size), bytes(pixels.flatten().tolist())).save(path)
        images.append(str(path))
    templates = root / "templates.txt"
    templates.write_text("# four ways to say it\n" + "\n".join(TEMPLATES) + "\n")
    return {
        "model": str(model_path),
        "hot": str(hot_path),
        "images": images,
        "templates": str(templates),
        "root": root,
    }


# -------------------------------------------------------------------------------------- helpers


def cli_rows(*args: str) -> list[dict]:
    result = run_cli(["classify", "--format", "jsonl", *args])
    assert result.code == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def assert_scores(row: dict, expected: torch.Tensor, labels: list[str], tolerance: float) -> None:
    """Every (label, score) of the row is the expected one, best first."""
    got = [(entry["label"], entry["score"]) for entry in row["top"]]
    order = sorted(range(len(labels)), key=lambda i: -float(expected[i]))
    want = [(labels[i], float(expected[i])) for i in order]
    assert [label for label, _ in got] == [label for label, _ in want], (got, want)
    for (label, score), (_, value) in zip(got, want):
        assert abs(score - value) <= tolerance, (label, score, value)
    assert (row["label"], row["score"]) == got[0]


# -------------------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("which", ["model", "hot"])
def test_softmax_scores_are_the_papers_formula(world: dict, which: str) -> None:
    """softmax(min(exp(logit_scale), 100) * cosine) over the labels, with the four templates
    ensembled per label: to 1e-5 at the model's own scale, 5e-5 at the cap of 100."""
    model = world[which]
    images = reference.image_features(model, world["images"])
    classifier = reference.classifier(model, LABELS, TEMPLATES)
    scale = reference.scale(model)
    assert scale == (100.0 if which == "hot" else pytest.approx(1 / 0.07, rel=1e-6))
    expected = torch.softmax(scale * images @ classifier, dim=-1)  # [N, C]
    rows = cli_rows(
        *world["images"],
        "--model",
        model,
        "--templates",
        world["templates"],
        "--labels",
        ",".join(LABELS),
        "-k",
        str(len(LABELS)),
    )
    assert [row["path"] for row in rows] == world["images"]
    tolerance = softmax_tolerance(scale)
    assert tolerance <= (1e-5 if which == "model" else 5.1e-5)
    for row, want in zip(rows, expected):
        assert_scores(row, want, LABELS, tolerance)


def test_labels_in_another_order_get_the_same_scores(world: dict) -> None:
    """The score of a label does not depend on where it stands in --labels (nor, with the cache on,
    on what an earlier run with the other order stored)."""
    args = [
        *world["images"],
        "--model",
        world["model"],
        "--templates",
        world["templates"],
        "-k",
        "4",
    ]
    forward = cli_rows(*args, "--labels", ",".join(LABELS))
    backward = cli_rows(*args, "--labels", ",".join(reversed(LABELS)))
    for one, other in zip(forward, backward):
        assert one == other


def test_multi_label_scores_are_sigmoids_around_the_threshold(world: dict) -> None:
    """sigmoid(scale * (cosine - threshold)) per label; only labels at or above 0.5 are listed. The
    threshold is put halfway between two of the first image's cosines, so some labels pass and some
    do not."""
    model = world["model"]
    images = reference.image_features(model, world["images"])
    cosine = images @ reference.classifier(model, LABELS, TEMPLATES)  # [N, C]
    ranked = sorted(cosine[0].tolist(), reverse=True)
    threshold = round((ranked[1] + ranked[2]) / 2, 6)
    assert min(abs(c - threshold) for c in cosine.flatten().tolist()) > 1e-4  # no label on the edge
    scale = reference.scale(model)
    expected = torch.sigmoid(scale * (cosine - threshold))  # [N, C]
    rows = cli_rows(
        *world["images"],
        "--model",
        model,
        "--templates",
        world["templates"],
        "--labels",
        ",".join(LABELS),
        "--multi-label",
        "--threshold",
        str(threshold),
        "-k",
        "4",
    )
    assert [entry["label"] for entry in rows[0]["top"]] == [
        LABELS[i] for i in cosine[0].argsort(descending=True)[:2].tolist()
    ]
    for row, want, cos in zip(rows, expected, cosine):
        passing = [i for i in cos.argsort(descending=True).tolist() if cos[i] >= threshold]
        got = [(entry["label"], entry["score"]) for entry in row["top"]]
        assert [label for label, _ in got] == [LABELS[i] for i in passing]
        for (label, score), i in zip(got, passing):
            assert abs(score - float(want[i])) <= sigmoid_tolerance(scale), (label, score)


def test_embed_writes_the_models_unit_features(world: dict) -> None:
    """`embed` image rows are the image tower's output, normalised; `embed --text` rows the text
    tower's. Written with 9 significant digits (float32 round-trips), so the only difference left
    is the order of the float32 sums: 1e-6 per component."""
    result = run_cli(["embed", "--model", world["model"], *world["images"]])
    assert result.code == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["path"] for row in rows] == world["images"]
    got = torch.tensor([row["embedding"] for row in rows])
    expected = reference.image_features(world["model"], world["images"])
    assert got.shape == expected.shape == (3, 32)
    assert (got - expected).abs().max() < 1e-6

    texts = ["a photo of a corgi.", "A Jazz Album Cover", "dog"]
    result = run_cli(["embed", "--model", world["model"], *sum((["--text", t] for t in texts), [])])
    assert result.code == 0, result.stderr
    got = torch.tensor([json.loads(line)["embedding"] for line in result.stdout.splitlines()])
    want = reference.text_features(world["model"], texts)
    assert (got - want).abs().max() < 1e-6


@pytest.mark.parametrize("suffix", [".npy", ".safetensors", ".jsonl"])
def test_classify_from_saved_embeddings_gives_the_formula(
    world: dict, tmp_path: Path, suffix: str
) -> None:
    """`embed -o FILE` then `classify --embeddings FILE`: the same formula as from the images."""
    saved = tmp_path / f"noise{suffix}"
    made = run_cli(["embed", "--model", world["model"], *world["images"], "-o", str(saved)])
    assert made.code == 0, made.stderr
    model = world["model"]
    scale = reference.scale(model)
    cosine = reference.image_features(model, world["images"]) @ reference.classifier(
        model, LABELS, TEMPLATES
    )
    rows = cli_rows(
        "--embeddings",
        str(saved),
        "--model",
        model,
        "--templates",
        world["templates"],
        "--labels",
        ",".join(LABELS),
        "-k",
        "4",
    )
    assert [row["path"] for row in rows] == world["images"]
    for row, want in zip(rows, torch.softmax(scale * cosine, dim=-1)):
        assert_scores(row, want, LABELS, softmax_tolerance(scale))


# -------------------------------------------------------------------- the built-in model, pinned

# `zsclip classify examples/ -L examples/labels.txt -k 2` with the shipped model (its own template
# set, `shapes`): label and score of the two best labels per image, as measured with torch 2.13.0 on
# an x86-64 CPU. Tolerance: the model's scale is 20.9; float32 convolutions and matrix products
# pick other kernels (another summation order) on other CPUs, moving a cosine by up to ~1e-5, so a
# softmax score by 0.5 * 20.9 * 1e-5 ~ 1e-4; 1e-3 keeps a margin. A change to preprocessing,
# ensembling, templates or the temperature moves these by far more (docs/testing.md).
PINNED = {
    "blue-circle.png": [("blue circle", 0.828585), ("blue square", 0.100329)],
    "brown-arrow.png": [("brown arrow", 0.512198), ("brown star", 0.207039)],
    "cyan-crescent.png": [("cyan crescent", 0.921406), ("cyan ring", 0.043152)],
    "green-star.png": [("green star", 0.782687), ("green cross", 0.185611)],
    "orange-triangle.png": [("orange triangle", 0.954847), ("orange ring", 0.01607)],
    "purple-ring.png": [("purple ring", 0.942761), ("purple crescent", 0.034854)],
    "red-heart.png": [("red heart", 0.894355), ("red diamond", 0.040247)],
    "yellow-square.png": [("yellow square", 0.70611), ("yellow circle", 0.18422)],
}
PINNED_TOLERANCE = 1e-3


def test_builtin_model_on_the_examples_is_pinned(monkeypatch: pytest.MonkeyPatch) -> None:
    from zsclip.paths import builtin_models

    monkeypatch.delenv("ZSCLIP_MODEL", raising=False)
    examples = Path(__file__).resolve().parent.parent / "examples"
    assert builtin_models(), "the built-in model is missing from weights/"
    result = run_cli(
        ["classify", str(examples), "-L", str(examples / "labels.txt"), "-k", "2", "-q"]
    )
    assert result.code == 0, result.stderr
    rows = {Path(row["path"]).name: row for row in map(json.loads, result.stdout.splitlines())}
    assert sorted(rows) == sorted(PINNED)
    for name, want in PINNED.items():
        got = [(entry["label"], entry["score"]) for entry in rows[name]["top"]]
        assert [label for label, _ in got] == [label for label, _ in want], name
        for (_, score), (_, value) in zip(got, want):
            assert abs(score - value) <= PINNED_TOLERANCE, (name, score, value)
