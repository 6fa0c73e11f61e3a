"""How often `classify --min-score S` and `--other` answer "none of these" (label null), for the
built-in model on its shapes world: on images of the labels (seen and held-out combinations) and on
images that are none of them (empty backgrounds, colours and shapes the world does not have,
noise), and when the labels cover only half of the world.

    python benchmarks/none_of_these.py [--per-class 10] [--seed 7]

Prints Markdown tables (docs/acting.md holds a run). Everything is drawn here, from the seed;
classification goes through zsclip's classify job, as `zsclip classify` does.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import tempfile
from pathlib import Path

THRESHOLDS = (0.0, 0.3, 0.5, 0.7, 0.9)  # 0: no --min-score (only --other can say null)
BACKGROUND_LABELS = (
    "plain background",
    "striped background",
    "dotted background",
    "checkered background",
    "gradient background",
)
OTHER_COLOURS = ("blue", "purple", "pink", "brown", "black")
STRANGE_COLOURS = {"grey": (128, 128, 128), "olive": (120, 120, 20), "teal": (0, 120, 120)}


def draw_sets(folder: Path, per_class: int, seed: int) -> dict[str, list[str]]:
    """PNG files of each set, by name."""
    from PIL import Image, ImageDraw

    from zsclip.train import shapes

    rng = random.Random(seed)
    sets: dict[str, list[str]] = {}

    def save(name: str, image) -> None:
        path = folder / name / f"{len(sets.setdefault(name, [])):05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        sets[name].append(str(path))

    for colour, shape in shapes.all_combinations():
        kind = "heldout" if (colour, shape) in shapes.HELDOUT else "seen"
        for _ in range(per_class):
            save(f"{kind}:{colour} {shape}", shapes.draw_example(rng, colour, shape)[0])
    count = per_class * 10
    for _ in range(count):
        scene = shapes.sample_scene(rng, "red", rng.choice(shapes.SHAPES))
        scene.centres = []  # the background alone
        save("empty background", shapes.render(scene, rng))
        scene = shapes.sample_scene(rng, "red", rng.choice(shapes.SHAPES))
        scene.tint = rng.choice(list(STRANGE_COLOURS.values()))
        save("unknown colour (grey, olive, teal)", shapes.render(scene, rng))
        image = shapes.render(shapes.sample_scene(rng, "red", "circle"), rng)
        _unknown_shape(ImageDraw.Draw(image), rng)
        save("unknown shape (hexagon, bar)", image)
        save("noise", Image.effect_noise((64, 64), rng.uniform(40, 120)).convert("RGB"))
    return sets


def _unknown_shape(draw, rng: random.Random) -> None:
    """Paint over the image: a coloured hexagon or bar on a fresh light background."""
    from zsclip.train import shapes

    draw.rectangle((0, 0, 64, 64), fill=(235, 235, 235))
    colour = shapes.COLOURS[rng.choice(list(shapes.COLOURS))]
    cx, cy, r = rng.uniform(22, 42), rng.uniform(22, 42), rng.uniform(10, 17)
    if rng.random() < 0.5:
        points = [
            (cx + r * math.cos(k * math.pi / 3), cy + r * math.sin(k * math.pi / 3))
            for k in range(6)
        ]
        draw.polygon(points, fill=colour)
    else:
        draw.rectangle((cx - r, cy - r / 4, cx + r, cy + r / 4), fill=colour)


def best_scores(loaded, paths: list[str], labels: list[str], others: tuple[str, ...]):
    """(best label, its score, best background score or None) per image, via the classify job."""
    import torch

    from zsclip.jobs.classify import ClassifyRequest, start
    from zsclip.jobs.inputs import InputItem
    from zsclip.jobs.scores import ClassifyOptions

    request = ClassifyRequest(
        labels=labels,
        items=[InputItem(path) for path in paths],
        options=ClassifyOptions(top_k=1, others=others),
        use_cache=True,  # a private cache (main): each image is encoded once for all variants
    )
    run = start(loaded, request, device=torch.device("cpu"), dtype=torch.float32)
    return [(p.top[0][0], p.top[0][1], p.other) for p in run.predictions]


def table(rows: dict[str, list], truth: dict[str, str | None], title: str) -> str:
    """Markdown: per set, the share of null answers at each S, and top-1 among the answers."""
    head = "| images | n | " + " | ".join(f"null at S={s}" for s in THRESHOLDS)
    head += " | top-1 of answered (S=0.5) |"
    lines = [f"**{title}**", "", head, "|---" * (len(THRESHOLDS) + 3) + "|"]
    for name, results in rows.items():
        cells = []
        for threshold in THRESHOLDS:
            null = sum(
                score < threshold or (other is not None and other >= score)
                for _, score, other in results
            )
            cells.append(f"{100 * null / len(results):.0f}%")
        answered = [
            (label, path_truth)
            for (label, score, other), path_truth in zip(results, truth[name])
            if score >= 0.5 and (other is None or other < score)
        ]
        correct = sum(label == want for label, want in answered if want is not None)
        known = sum(want is not None for _, want in answered)
        accuracy = f"{100 * correct / known:.1f}%" if known else "-"
        lines.append(f"| {name} | {len(results)} | " + " | ".join(cells) + f" | {accuracy} |")
    return "\n".join(lines)


def grouped(sets: dict[str, list[str]]) -> tuple[dict[str, list[str]], dict[str, list]]:
    """seen:* and heldout:* folded into two sets, with each image's true label (None: no label)."""
    groups: dict[str, list[str]] = {}
    truth: dict[str, list] = {}
    for name, paths in sets.items():
        group, _, label = name.partition(":")
        key = {"seen": "seen combinations", "heldout": "held-out combinations"}.get(group, name)
        groups.setdefault(key, []).extend(paths)
        truth.setdefault(key, []).extend([label or None] * len(paths))
    return groups, truth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    import os

    from zsclip.api import load_full
    from zsclip.train import shapes

    loaded = load_full(None, device="cpu")
    with tempfile.TemporaryDirectory() as work:
        os.environ["ZSCLIP_CACHE"] = str(Path(work) / "cache")
        groups, truth = grouped(draw_sets(Path(work), args.per_class, args.seed))
        every = [shapes.label(c, s) for c, s in shapes.all_combinations()]
        print(f"model {loaded.name}; {args.per_class} images per label; seed {args.seed}\n")
        for others, title in (
            ((), "all 100 labels"),
            (BACKGROUND_LABELS, "all 100 labels + --other (5 backgrounds)"),
        ):
            rows = {
                name: best_scores(loaded, paths, every, others) for name, paths in groups.items()
            }
            print(table(rows, truth, title), end="\n\n")
        half = [
            shapes.label(c, s)
            for c, s in shapes.all_combinations()
            if c in ("red", "orange", "yellow", "green", "cyan")
        ]
        named: dict[str, list[str]] = {"images of the 50 labels": [], "images of the other 50": []}
        truths: dict[str, list] = {"images of the 50 labels": [], "images of the other 50": []}
        for name in ("seen combinations", "held-out combinations"):
            for path, label in zip(groups[name], truth[name]):
                key = "images of the 50 labels" if label in half else "images of the other 50"
                named[key].append(path)
                truths[key].append(label if label in half else None)
        variants = (
            ((), "50 labels (5 colours)"),
            (BACKGROUND_LABELS, "50 labels + --other (5 backgrounds)"),
            (OTHER_COLOURS, "50 labels + --other (the 5 other colour words)"),
        )
        for others, title in variants:
            rows = {name: best_scores(loaded, paths, half, others) for name, paths in named.items()}
            print(table(rows, truths, title), end="\n\n")


if __name__ == "__main__":
    sys.exit(main())
