"""Where `zsclip duplicates` should draw its line: cosines of edited copies vs other shots of a scene.

    python benchmarks/bench_duplicates.py [--model NAME] [--scenes 120] [--photos 30] [--workdir DIR]
    python benchmarks/bench_duplicates.py --write 0.96     # store the choice in the built-in model

Two worlds, each image written to disk and embedded through the same pipeline as the CLI (draft
decoding, the model's preprocessing):

* shapes: the built-in model's world (zsclip.train.shapes), drawn at 192 px (larger than the
  model's 64 px input, as a user's images are);
* photos: photo-like 800x600 JPEGs (benchmarks/photos.py), cut from a 1600x1200 frame so that a
  second shot of the same scene can be taken with the camera moved.

Copies that must group (cosine to the original): JPEG quality 70, half size, half size + q70,
cropped by 2% and 5% on one side, by 10% around the centre; and the mirror image, reported apart.
Pictures that should not group: the same scene shot again (shapes: the same objects redrawn with
their positions moved by up to 4% and the background re-drawn; photos: the camera moved by 15% or
25%, exposure changed) and another picture with the same content (shapes: same colour and shape;
photos: another frame). Printed: percentiles per kind, then the share of pairs at or above each
threshold, which is what the default is chosen from (docs/search.md).

--write T stores `duplicate_threshold` = T in weights/zsclip-shapes.safetensors' header metadata
(every tensor byte kept and checked, written atomically; benchmarks/shapes_threshold.py does it).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image, ImageEnhance, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parent))
from photos import soft_photo  # noqa: E402

from zsclip.core.checkpoints import load_model  # noqa: E402
from zsclip.jobs.inputs import InputItem  # noqa: E402
from zsclip.jobs.pipeline import DecodeOptions, ImageEncoder  # noqa: E402
from zsclip.train import shapes  # noqa: E402

COPIES = ("q70", "half", "half+q70", "crop2", "crop5", "crop10c")
THRESHOLDS = (0.90, 0.92, 0.94, 0.95, 0.96, 0.97, 0.975, 0.98, 0.985, 0.99)


def copies(image: Image.Image) -> dict[str, tuple[Image.Image, dict]]:
    """Edited copies and how to save each (JPEG quality or PNG)."""
    w, h = image.size
    half = image.resize((w // 2, h // 2), Image.Resampling.LANCZOS)

    def cut(f: float) -> Image.Image:
        return image.crop((round(f * w), round(f * h), w, h))

    c = round(0.05 * w), round(0.05 * h)
    return {
        "q70": (image, {"quality": 70}),
        "half": (half, {}),
        "half+q70": (half, {"quality": 70}),
        "crop2": (cut(0.02), {}),
        "crop5": (cut(0.05), {}),
        "crop10c": (image.crop((c[0], c[1], w - c[0], h - c[1])), {}),
        "flip": (ImageOps.mirror(image), {}),
    }


def shapes_scene(rng: random.Random, size: int) -> tuple[Image.Image, dict[str, Image.Image]]:
    """An image of the shapes world and its look-alikes that are other pictures."""
    colour, shape = rng.choice(shapes.all_combinations())
    scene = shapes.sample_scene(rng, colour, shape)
    original = shapes.render(scene, random.Random(rng.random()), size)
    moved = [
        (
            min(1.0, max(0.0, x + rng.uniform(-0.04, 0.04))),
            min(1.0, max(0.0, y + rng.uniform(-0.04, 0.04))),
        )
        for x, y in scene.centres
    ]
    reshot = shapes.render(replace(scene, centres=moved), random.Random(rng.random()), size)
    other, _ = shapes.draw_example(rng, colour, shape, size)
    return original, {"same scene": reshot, "same content": other}


def photo_scene(seed: int) -> tuple[Image.Image, dict[str, Image.Image]]:
    frame = soft_photo(1600, 1200, seed)

    def shot(x: int, y: int) -> Image.Image:
        return frame.crop((x, y, x + 1200, y + 900)).resize((800, 600), Image.Resampling.LANCZOS)

    moved15 = ImageEnhance.Brightness(shot(180, 135)).enhance(1.1)
    moved25 = ImageEnhance.Brightness(shot(300, 225)).enhance(0.9)
    other = soft_photo(800, 600, seed + 50_000)
    return shot(0, 0), {"camera moved 15%": moved15, "camera moved 25%": moved25, "other": other}


def save(image: Image.Image, path: Path, options: dict) -> Path:
    if "quality" in options:
        path = path.with_suffix(".jpg")
        image.convert("RGB").save(path, quality=options["quality"])
    else:
        image.save(path.with_suffix(".png"))
        path = path.with_suffix(".png")
    return path


def measure(world: str, count: int, encoder: ImageEncoder, folder: Path) -> dict[str, list[float]]:
    """Cosine of every copy and look-alike to its original, by kind."""
    rng = random.Random(7)
    found: dict[str, list[float]] = {}
    for n in range(count):
        if world == "shapes":
            original, others = shapes_scene(rng, 192)
        else:
            original, others = photo_scene(1000 + n)
        first = {"quality": 90} if world == "photos" else {}
        paths = {"original": save(original, folder / f"{world}{n}_original", first)}
        for kind, (image, options) in copies(original).items():
            paths[kind] = save(image, folder / f"{world}{n}_{kind}", options)
        for kind, image in others.items():
            name = kind.replace(" ", "_").replace("%", "")
            paths[kind] = save(image, folder / f"{world}{n}_{name}", first)
        features = torch.cat(
            [f for _, f in encoder.batches([InputItem(str(p)) for p in paths.values()])]
        )
        for kind, score in zip(list(paths)[1:], (features[1:] @ features[0]).tolist()):
            found.setdefault(kind, []).append(score)
    return found


def report(world: str, found: dict[str, list[float]]) -> None:
    print(f"\n## {world}: cosine to the original ({len(next(iter(found.values())))} pictures)\n")
    print("| kind | min | 5th pct | median | max |\n|---|---|---|---|---|")
    for kind, values in found.items():
        v = torch.tensor(values)
        q = [v.min(), v.quantile(0.05), v.median(), v.max()]
        print(f"| {kind} | " + " | ".join(f"{x:.4f}" for x in q) + " |")
    print("\nShare of pairs at or above each threshold:\n")
    print("| threshold | " + " | ".join(found) + " |")
    print("|---" * (len(found) + 1) + "|")
    for t in THRESHOLDS:
        shares = [sum(s >= t for s in values) / len(values) for values in found.values()]
        print(f"| {t:g} | " + " | ".join(f"{x:.1%}" for x in shares) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the built-in model")
    parser.add_argument("--scenes", type=int, default=120, help="shapes pictures")
    parser.add_argument("--photos", type=int, default=30, help="photo-like pictures")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument(
        "--write", type=float, default=None, help="store this threshold in the built-in model"
    )
    args = parser.parse_args()
    if args.write is not None:
        from shapes_threshold import write_metadata

        from zsclip.jobs.duplicates import METADATA_KEY

        weights = Path(__file__).resolve().parent.parent / "weights" / "zsclip-shapes.safetensors"
        write_metadata(weights, {METADATA_KEY: f"{args.write:g}"})
        return
    loaded = load_model(args.model)
    encoder = ImageEncoder(
        loaded.model,
        loaded.preprocess,
        torch.device("cpu"),
        torch.float32,
        decode=DecodeOptions.for_model(loaded.preprocess.image_size),
    )
    started, cpu = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        print(f"model {loaded.name}, embedding {loaded.model.config.embed_dim}-d")
        if args.scenes:
            report("shapes", measure("shapes", args.scenes, encoder, Path(tmp)))
        if args.photos:
            report("photos", measure("photos", args.photos, encoder, Path(tmp)))
    print(f"\n{time.perf_counter() - started:.0f} s wall, {time.process_time() - cpu:.0f} s CPU")


if __name__ == "__main__":
    main()
