"""A captioned synthetic world of coloured shapes, drawn with Pillow: the data of the built-in model.

Each image holds one kind of object (a colour-shape combination), one to three times, in a size, a
position and on a background; its caption says so in one of several phrasings ("a drawing of two
small red stars on a dotted background."). A fixed set of colour-shape combinations is held out: no
training image or caption contains them, yet every colour and every shape is seen with other
partners. Zero-shot accuracy on those held-out combinations is the paper's claim in miniature: a
classifier synthesised from words for classes never seen as labels.

Layout written by `generate(out, ...)`:
    train.tsv, val.tsv          image<TAB>caption, seen combinations only (paths relative to OUT)
    train/, val/                the images behind them
    seen/<colour shape>/*.png   eval folders, one per label (`zsclip eval OUT/seen --labels-file OUT/labels.txt`)
    heldout/<colour shape>/*.png
    labels.txt                  every colour-shape label, one a line

Everything comes from `random.Random` streams seeded with (seed, split), so the same seed gives the
same bytes.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from PIL import Image, ImageDraw

# Saturated colours that stay far apart in RGB; the backgrounds are light neutrals so none of them
# vanishes.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (255, 135, 0),
    "yellow": (235, 215, 0),
    "green": (30, 160, 40),
    "cyan": (0, 195, 215),
    "blue": (35, 55, 215),
    "purple": (130, 40, 185),
    "pink": (255, 110, 190),
    "brown": (125, 75, 30),
    "black": (20, 20, 20),
}
# Shapes chosen to stay tellable apart at 64 px (no hexagon: small ones read as circles).
SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "heart",
    "diamond",
    "crescent",
    "ring",
    "arrow",
)
PLURALS = {shape: shape + ("es" if shape.endswith("s") else "s") for shape in SHAPES}
BACKGROUNDS: tuple[str, ...] = ("plain", "striped", "dotted", "checkered", "gradient")
POSITIONS: dict[str, tuple[int, int]] = {  # words -> (column, row) in a 3x3 grid
    "at the top left": (0, 0),
    "at the top": (1, 0),
    "at the top right": (2, 0),
    "on the left": (0, 1),
    "in the middle": (1, 1),
    "on the right": (2, 1),
    "at the bottom left": (0, 2),
    "at the bottom": (1, 2),
    "at the bottom right": (2, 2),
}
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
PREFIXES = ("", "", "a drawing of ", "a picture of ", "an image of ", "there is ")
SUPERSAMPLE = 4  # draw at 4x and downsample: smooth edges without an anti-aliasing library


def _heldout_combinations() -> frozenset[tuple[str, str]]:
    # Colour i loses shapes 3i and 3i+5 (mod 10): both maps are permutations, so each colour and
    # each shape is held out exactly twice and still seen with eight partners.
    colours = list(COLOURS)
    pairs = set()
    for i, colour in enumerate(colours):
        for offset in (0, 5):
            pairs.add((colour, SHAPES[(3 * i + offset) % len(SHAPES)]))
    return frozenset(pairs)


HELDOUT: frozenset[tuple[str, str]] = _heldout_combinations()


def all_combinations() -> list[tuple[str, str]]:
    return [(colour, shape) for colour in COLOURS for shape in SHAPES]


def seen_combinations() -> list[tuple[str, str]]:
    return [combo for combo in all_combinations() if combo not in HELDOUT]


def heldout_combinations() -> list[tuple[str, str]]:
    return [combo for combo in all_combinations() if combo in HELDOUT]


def label(colour: str, shape: str) -> str:
    return f"{colour} {shape}"


def caption_words() -> list[str]:
    """Every word a caption of this world can hold (see `caption`), sorted: the only words a model
    trained on it has met. The built-in model carries this list as its `caption_words` metadata."""
    phrases = [
        *COLOURS,
        *SHAPES,
        *PLURALS.values(),
        *BACKGROUNDS,
        *POSITIONS,
        *COUNT_WORDS.values(),
        *PREFIXES,
        "there are",
        "one an small large",
        "on a background",
    ]
    return sorted({word for phrase in phrases for word in phrase.split()})


@dataclass
class Scene:
    colour: str
    shape: str
    count: int
    size: str  # "small" | "large"
    position: str | None  # a key of POSITIONS for single objects, None for scattered groups
    background: str
    centres: list[tuple[float, float]]  # in [0, 1] image coordinates
    radius: float  # fraction of the image side
    rotation: float  # degrees
    tint: tuple[int, int, int]


def sample_scene(rng: random.Random, colour: str, shape: str) -> Scene:
    """Draw the free attributes of one image of `colour shape`."""
    count = rng.choices((1, 2, 3), weights=(6, 3, 2))[0]
    size = "large" if count == 1 and rng.random() < 0.5 else "small"
    radius = rng.uniform(0.21, 0.27) if size == "large" else rng.uniform(0.13, 0.17)
    position = None
    if count == 1:
        position = rng.choice(list(POSITIONS))
        column, row = POSITIONS[position]
        # The grid cell centres sit far enough in that the shape stays inside the image.
        lo, hi = radius + 0.03, 1 - radius - 0.03
        centres = [(_cell(lo, hi, column, rng), _cell(lo, hi, row, rng))]
    else:
        centres = _scatter(rng, count, radius)
    jitter = tuple(max(0, min(255, c + rng.randint(-18, 18))) for c in COLOURS[colour])
    return Scene(
        colour,
        shape,
        count,
        size,
        position,
        rng.choice(BACKGROUNDS),
        centres,
        radius,
        rng.uniform(-15, 15),
        jitter,
    )  # type: ignore[arg-type]


def _cell(lo: float, hi: float, index: int, rng: random.Random) -> float:
    return lo + (hi - lo) * index / 2 + rng.uniform(-0.03, 0.03)


def _scatter(rng: random.Random, count: int, radius: float) -> list[tuple[float, float]]:
    # Rejection sampling for non-overlapping centres; the fallback (rarely hit) accepts a small
    # overlap.
    centres: list[tuple[float, float]] = []
    for _ in range(200):
        x, y = rng.uniform(radius, 1 - radius), rng.uniform(radius, 1 - radius)
        if all(math.hypot(x - cx, y - cy) > 2.1 * radius for cx, cy in centres):
            centres.append((x, y))
            if len(centres) == count:
                return centres
    while len(centres) < count:
        centres.append((rng.uniform(radius, 1 - radius), rng.uniform(radius, 1 - radius)))
    return centres


def caption(scene: Scene, rng: random.Random) -> str:
    """One of several phrasings; size, position and background are each said or left out at random."""
    colour, noun = scene.colour, scene.shape if scene.count == 1 else PLURALS[scene.shape]
    words = [f"{scene.size} {colour}" if rng.random() < 0.6 else colour, noun]
    det = COUNT_WORDS[scene.count]
    if scene.count == 1:
        det = "one" if rng.random() < 0.2 else ("an" if words[0][0] in "aeiou" else "a")
    prefix = rng.choice(PREFIXES)
    if prefix == "there is " and scene.count > 1:
        prefix = "there are "
    text = f"{prefix}{det} {words[0]} {words[1]}"
    if scene.position and rng.random() < 0.5:
        text += f" {scene.position}"
    if rng.random() < 0.5:
        text += f" on a {scene.background} background"
    return text + "."


def render(scene: Scene, rng: random.Random, size: int = 64) -> Image.Image:
    """Paint the scene: background, then a mask of the objects filled with the scene's colour."""
    big = size * SUPERSAMPLE
    image = _background(scene.background, rng, big)
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    for cx, cy in scene.centres:
        rotation = scene.rotation + (rng.choice((0, 90, 180, 270)) if scene.shape == "arrow" else 0)
        _draw_shape(draw, scene.shape, cx * big, cy * big, scene.radius * big, rotation)
    image.paste(Image.new("RGB", (big, big), scene.tint), mask=mask)
    return image.resize((size, size), Image.Resampling.BOX)


def _background(kind: str, rng: random.Random, big: int) -> Image.Image:
    base = rng.randint(205, 250)
    tint = [rng.randint(-8, 8) for _ in range(3)]
    light = tuple(max(0, min(255, base + t)) for t in tint)
    shade = tuple(c - rng.randint(25, 45) for c in light)
    image = Image.new("RGB", (big, big), light)  # type: ignore[arg-type]
    draw = ImageDraw.Draw(image)
    step = big // rng.choice((6, 8, 10))
    if kind == "striped":
        vertical = rng.random() < 0.5
        for offset in range(0, big, 2 * step):
            box = (
                (offset, 0, offset + step - 1, big)
                if vertical
                else (0, offset, big, offset + step - 1)
            )
            draw.rectangle(box, fill=shade)  # type: ignore[arg-type]
    elif kind == "dotted":
        dot = step // 6 + 1
        for x in range(step // 2, big, step):
            for y in range(step // 2, big, step):
                draw.ellipse((x - dot, y - dot, x + dot, y + dot), fill=shade)  # type: ignore[arg-type]
    elif kind == "checkered":
        for i, x in enumerate(range(0, big, step)):
            for j, y in enumerate(range(0, big, step)):
                if (i + j) % 2:
                    draw.rectangle((x, y, x + step - 1, y + step - 1), fill=shade)  # type: ignore[arg-type]
    elif kind == "gradient":
        for y in range(big):
            t = y / (big - 1)
            draw.line(
                (0, y, big, y), fill=tuple(round(a + (b - a) * t) for a, b in zip(light, shade))
            )
    return image


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, rotation: float
) -> None:
    def place(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        # unit coordinates (y down) -> rotated, scaled and moved onto the canvas
        a = math.radians(rotation)
        cos, sin = math.cos(a), math.sin(a)
        return [(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos)) for x, y in points]

    def disc(scale: float, dx: float = 0.0, fill: int = 255) -> None:
        ((x0, y0),) = place([(dx, 0.0)])
        draw.ellipse((x0 - r * scale, y0 - r * scale, x0 + r * scale, y0 + r * scale), fill=fill)

    if shape == "circle":
        disc(0.92)
    elif shape == "ring":
        disc(1.0)
        disc(0.55, fill=0)
    elif shape == "crescent":
        disc(1.0)
        disc(0.85, dx=0.45, fill=0)
    else:
        draw.polygon(place(_OUTLINES[shape]), fill=255)


def _star(points: int = 5, inner: float = 0.42) -> list[tuple[float, float]]:
    out = []
    for k in range(2 * points):
        radius = 1.0 if k % 2 == 0 else inner
        angle = math.pi * k / points - math.pi / 2
        out.append((radius * math.cos(angle), radius * math.sin(angle)))
    return out


def _heart(n: int = 48) -> list[tuple[float, float]]:
    # The classic parametric heart, scaled into the unit disc with the point at the bottom.
    pts = []
    for k in range(n):
        t = 2 * math.pi * k / n
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((x / 17, -(y + 3) / 17))
    return pts


_OUTLINES: dict[str, list[tuple[float, float]]] = {
    "square": [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
    "triangle": [(0.0, -1.0), (0.95, 0.75), (-0.95, 0.75)],
    "star": _star(),
    "cross": [
        (-0.3, -1),
        (0.3, -1),
        (0.3, -0.3),
        (1, -0.3),
        (1, 0.3),
        (0.3, 0.3),
        (0.3, 1),
        (-0.3, 1),
        (-0.3, 0.3),
        (-1, 0.3),
        (-1, -0.3),
        (-0.3, -0.3),
    ],
    "heart": _heart(),
    "diamond": [(0.0, -1.0), (0.7, 0.0), (0.0, 1.0), (-0.7, 0.0)],
    "arrow": [(-1, -0.3), (0.1, -0.3), (0.1, -0.75), (1, 0), (0.1, 0.75), (0.1, 0.3), (-1, 0.3)],
}


def draw_example(
    rng: random.Random, colour: str, shape: str, size: int = 64
) -> tuple[Image.Image, str]:
    """One image of `colour shape` and a caption for it."""
    scene = sample_scene(rng, colour, shape)
    return render(scene, rng, size), caption(scene, rng)


Progress = Callable[[int, int], None]  # (done, total)


# What `generate` writes at the top of OUT: a folder holding only these is a previous shapes set.
SET_ENTRIES = frozenset({"train", "val", "seen", "heldout", "train.tsv", "val.tsv", "labels.txt"})


def generate(
    out: Path,
    count: int,
    seed: int = 0,
    *,
    image_size: int = 64,
    val_count: int | None = None,
    eval_per_class: int = 10,
    progress: Progress | None = None,
) -> dict[str, int]:
    """Write the world described in the module docstring into `out`; returns the number of images per
    part.

    OUT may be missing, an empty folder, or a previous shapes set (SET_ENTRIES only), which is
    replaced whole; anything else is refused (UserError) before drawing starts. The set is drawn in a
    hidden sibling folder and renamed into place at the end, so OUT never holds a mixture of two
    sets or an interrupted one.
    """
    import shutil
    import tempfile

    out = Path(out)
    replacing = check_output(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    mask = os.umask(0o022)
    os.umask(mask)
    work.chmod(0o777 & ~mask)  # mkdtemp's folder is private; the set gets a normal folder's mode
    try:
        counts = _draw(work, count, seed, image_size, val_count, eval_per_class, progress)
        if replacing:
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            out.rename(old / "set")  # out's name is free from here to the next rename
            work.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if out.is_dir():
                out.rmdir()  # empty: checked above
            work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return counts


def check_output(out: Path) -> bool:
    """Whether OUT is a previous shapes set to replace; UserError for what must not be touched."""
    from zsclip.errors import UserError

    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; give a folder for the shapes set (it is created)")
    if not out.exists():
        return False
    entries = {path.name for path in out.iterdir()}
    if not entries:
        return False
    if entries <= SET_ENTRIES and "labels.txt" in entries:
        return True
    raise UserError(
        f"{out} is not empty and is not a shapes set (it holds {sorted(entries)[0]!r}); give a new "
        "or empty folder"
    )


def _draw(
    out: Path,
    count: int,
    seed: int,
    image_size: int,
    val_count: int | None,
    eval_per_class: int,
    progress: Progress | None,
) -> dict[str, int]:
    val_count = max(100, count // 20) if val_count is None else val_count
    plan = [("train", count), ("val", val_count)]
    total = count + val_count + eval_per_class * len(all_combinations())
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress and (done % 100 == 0 or done == total):
            progress(done, total)

    seen = seen_combinations()
    for split, n in plan:
        rng = random.Random(f"zsclip-shapes/{seed}/{split}")
        rows = ["image\tcaption"]
        (out / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            colour, shape = rng.choice(seen)
            image, text = draw_example(rng, colour, shape, image_size)
            name = f"{split}/{i:06d}.png"
            image.save(out / name)
            rows.append(f"{name}\t{text}")
            tick()
        (out / f"{split}.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    for part, combos in (("seen", seen), ("heldout", heldout_combinations())):
        for colour, shape in combos:
            rng = random.Random(f"zsclip-shapes/{seed}/{part}/{colour}/{shape}")
            folder = out / part / label(colour, shape)
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(eval_per_class):
                draw_example(rng, colour, shape, image_size)[0].save(folder / f"{i:04d}.png")
                tick()
    labels = [label(c, s) for c, s in all_combinations()]
    (out / "labels.txt").write_text("\n".join(labels) + "\n", encoding="utf-8")
    return {
        "train": count,
        "val": val_count,
        "seen": eval_per_class * len(seen),
        "heldout": eval_per_class * len(HELDOUT),
    }
