"""Fuzzing the image loader: random bytes and random mutations of valid files in every format zsclip
opens. Each must load (and preprocess) or fail with one InputError line: never another exception, a
hang or runaway memory."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import pytest
from fuzz_helpers import FUZZ, bounded, files_from
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from zsclip.core.transform import PreprocessConfig, load_image, to_pixels
from zsclip.errors import InputError

CONFIG = PreprocessConfig(image_size=16)
# Mutated headers may claim huge sizes; the 120-MP default is tested elsewhere, a small limit keeps
# every example quick while still exercising the check.
MAX_PIXELS = 4_000_000


def _valid_files() -> dict[str, bytes]:
    """Small valid files: each colour mode the formats store, transparency, EXIF, animation."""
    picture = Image.radial_gradient("L").resize((24, 16)).convert("RGB")
    rgba = picture.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((24, 16)))
    exif = Image.Exif()
    exif[0x0112] = 6
    cases = {
        "png": (picture, "PNG", {}),
        "rgba.png": (rgba, "PNG", {}),
        "p.png": (picture.convert("P"), "PNG", {"transparency": 3}),
        "i16.png": (picture.convert("L").convert("I;16"), "PNG", {}),
        "jpg": (picture, "JPEG", {"exif": exif.tobytes(), "quality": 80}),
        "cmyk.jpg": (picture.convert("CMYK"), "JPEG", {}),
        "gif": (
            picture.convert("P"),
            "GIF",
            {"save_all": True, "append_images": [rgba.convert("P")]},
        ),
        "bmp": (picture, "BMP", {}),
        "tif": (rgba, "TIFF", {"compression": "tiff_deflate"}),
        "webp": (rgba, "WEBP", {}),
        "ico": (rgba, "ICO", {}),
        "tga": (picture, "TGA", {}),
        "ppm": (picture, "PPM", {}),
    }
    files = {}
    for name, (image, fmt, options) in cases.items():
        buffer = io.BytesIO()
        try:
            image.save(buffer, fmt, **options)
        except (OSError, KeyError):  # a codec this PIL build lacks (e.g. WebP)
            continue
        files[name] = buffer.getvalue()
    return files


VALID = _valid_files()


@pytest.fixture(scope="module")
def folder():
    with tempfile.TemporaryDirectory(prefix="zsclip-fuzz-images-") as name:
        yield Path(name)


def test_the_valid_files_load(folder: Path) -> None:
    """The seeds themselves are fine (else the mutations would prove little)."""
    for name, data in VALID.items():
        path = folder / f"seed.{name}"
        path.write_bytes(data)
        assert to_pixels(load_image(path), CONFIG).shape == (3, 16, 16), name
    assert {"png", "jpg", "gif", "tif"} <= set(VALID)


@settings(FUZZ, max_examples=200)  # the widest attack surface: twice the others' examples
@given(case=files_from(VALID), draft=st.sampled_from([None, 16, 40]))
def test_any_bytes_load_or_give_one_input_error(folder: Path, case, draft) -> None:
    name, data = case
    path = folder / f"fuzz.{name}"
    path.write_bytes(data)
    with bounded(seconds=20, memory_mib=512):
        try:
            image = load_image(path, draft_size=draft, max_pixels=MAX_PIXELS)
        except InputError as err:
            message = str(err)
            assert message and "\n" not in message and len(message) < 300
            return
        assert image.mode == "RGB" and min(image.size) >= 1
        assert to_pixels(image, CONFIG).shape == (3, 16, 16)
