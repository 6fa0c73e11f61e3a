"""Synthetic photographs for the benchmarks: content whose JPEG decoding costs what a real photo's does.

Flat colour compresses to almost nothing and decodes in no time, which would flatter every decoder. These images
have what makes camera files expensive: smooth colour fields, soft-edged shapes (an optical blur), surface
texture and sensor grain, so a 4000x3000 frame at quality 90 is about 3 MB, like a phone photo.
`kind="sharp"` instead draws hard edges, thin lines and blocky noise: the worst case for reduced-scale decoding.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from PIL import Image, ImageChops, ImageDraw


def _shapes(
    draw: ImageDraw.ImageDraw,
    width: int,
    height: int,
    rng: random.Random,
    count: int,
    line_width: int,
) -> None:
    for _ in range(count):
        x, y = rng.randrange(width), rng.randrange(height)
        w, h = (
            rng.randrange(width // 30 + 1, width // 4),
            rng.randrange(height // 30 + 1, height // 4),
        )
        colour = tuple(rng.randrange(256) for _ in range(3))
        kind = rng.choice(("ellipse", "rectangle", "polygon", "line"))
        if kind == "ellipse":
            draw.ellipse((x, y, x + w, y + h), fill=colour)
        elif kind == "rectangle":
            draw.rectangle((x, y, x + w, y + h), fill=colour)
        elif kind == "polygon":
            draw.polygon(
                [(x + rng.randrange(w), y + rng.randrange(h)) for _ in range(5)], fill=colour
            )
        else:
            draw.line((x, y, x + w, y + h), fill=colour, width=line_width)


def soft_photo(width: int, height: int, seed: int) -> Image.Image:
    """Colour field + soft shapes (drawn at 1/4 size, then upscaled) + texture + grain (PIL's own noise)."""
    rng = random.Random(seed)
    small_w, small_h = max(8, width // 4), max(8, height // 4)
    grid = Image.new("RGB", (5, 4))
    grid.putdata([tuple(rng.randrange(256) for _ in range(3)) for _ in range(20)])
    canvas = grid.resize((small_w, small_h), Image.Resampling.BICUBIC)
    _shapes(ImageDraw.Draw(canvas), small_w, small_h, rng, 40, max(1, small_w // 150))
    image = canvas.resize((width, height), Image.Resampling.BICUBIC)
    texture = Image.effect_noise((max(1, width // 4), max(1, height // 4)), 40).resize(
        (width, height), Image.Resampling.BILINEAR
    )
    grain = Image.effect_noise((width, height), 8)
    detail = ImageChops.add(texture, grain, scale=2.0)  # mean 128
    return ImageChops.add(image, Image.merge("RGB", (detail,) * 3), scale=1.0, offset=-128)


def sharp_photo(width: int, height: int, seed: int) -> Image.Image:
    """Hard-edged shapes and lines on gradients, plus blocky noise: detail that reduced-scale decoding loses."""
    rng = random.Random(seed)
    gradients = (
        Image.linear_gradient("L"),
        Image.radial_gradient("L"),
        Image.linear_gradient("L").rotate(90),
    )
    scene = Image.merge(
        "RGB", [g.resize((width, height), Image.Resampling.BILINEAR) for g in gradients]
    )
    _shapes(ImageDraw.Draw(scene), width, height, rng, 80, max(2, width // 300))
    noise = Image.frombytes(
        "RGB", (width // 4, height // 4), rng.randbytes((width // 4) * (height // 4) * 3)
    )
    return Image.blend(scene, noise.resize((width, height), Image.Resampling.NEAREST), 0.08)


def write_photo(
    folder: Path,
    index: int,
    size: tuple[int, int],
    *,
    prefix: str = "photo",
    kind: str = "soft",
    quality: int = 90,
) -> Path:
    """One JPEG (kept if already there, so reruns skip the drawing); written under a temporary name first."""
    path = folder / f"{prefix}_{index:03d}.jpg"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        make = soft_photo if kind == "soft" else sharp_photo
        tmp = folder / f".{path.stem}.{os.getpid()}.tmp"
        make(size[0], size[1], size[0] * 1000 + index).save(tmp, format="JPEG", quality=quality)
        tmp.replace(path)
    return path


def write_photos(
    folder: Path,
    count: int,
    size: tuple[int, int],
    *,
    prefix: str = "photo",
    kind: str = "soft",
    processes: int = 1,
) -> list[Path]:
    """`count` JPEGs of `size` in `folder`, drawn in `processes` worker processes."""
    jobs = [(folder, index, size, prefix, kind) for index in range(count)]
    if processes <= 1:
        return [_write_job(job) for job in jobs]
    from multiprocessing import get_context

    with get_context("spawn").Pool(processes) as pool:
        return pool.map(_write_job, jobs)


def _write_job(job: tuple) -> Path:
    folder, index, size, prefix, kind = job
    return write_photo(folder, index, size, prefix=prefix, kind=kind)
