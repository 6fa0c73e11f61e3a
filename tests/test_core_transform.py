"""zsclip.core.transform: loading every kind of image file, refusing bad ones, and CLIP preprocessing parity.

Every image is generated here with PIL in tmp_path; nothing binary is committed.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import struct
import time
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw, ImageFile

from zsclip.core import transform
from zsclip.core.transform import (
    Preprocess,
    PreprocessConfig,
    load_image,
    normalize,
    to_pixels,
    to_rgb,
    to_tensor,
)
from zsclip.errors import InputError

WHITE = (255, 255, 255)


def pixel(image: Image.Image, xy: tuple[int, int] = (0, 0)) -> tuple[int, ...]:
    return tuple(image.getpixel(xy))


def close(a: tuple[int, ...], b: tuple[int, ...], tol: int = 1) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    gen = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (height * width * 3,), generator=gen, dtype=torch.uint8)
    return Image.frombytes("RGB", (width, height), data.numpy().tobytes())


def refused(path: Path, **kwargs) -> str:
    with pytest.raises(InputError) as info:
        load_image(path, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message and len(message) < 200, message
    return message


# --- PreprocessConfig --------------------------------------------------------------------------------------


def test_config_round_trips_through_json() -> None:
    config = PreprocessConfig(image_size=336, interpolation="bilinear", background=(0, 0, 0))
    data = json.loads(json.dumps(config.to_dict()))
    assert PreprocessConfig.from_dict(data) == config
    assert PreprocessConfig.from_json(config.to_json()) == config
    assert PreprocessConfig.from_dict({**data, "added_in_a_later_version": 1}) == config
    defaults = PreprocessConfig()
    assert (
        defaults.image_size == 224
        and defaults.interpolation == "bicubic"
        and defaults.background == WHITE
    )
    assert defaults.mean == (0.48145466, 0.4578275, 0.40821073)
    assert defaults.std == (0.26862954, 0.26130258, 0.27577711)


@pytest.mark.parametrize(
    "bad",
    [
        {"image_size": 0},
        {"interpolation": "cubic"},
        {"std": (1, 0, 1)},
        {"background": (256, 0, 0)},
        {"resize_mode": "longest"},
        {"mean": (0.5, 0.5)},
    ],
)
def test_config_rejects_bad_values(bad: dict) -> None:
    with pytest.raises(ValueError):
        PreprocessConfig.from_dict(bad)


# --- modes -> RGB ------------------------------------------------------------------------------------------


def _palette_png(path: Path) -> None:
    image = Image.new("P", (3, 1), 0)
    image.putpalette([10, 20, 30, 40, 50, 60, 200, 0, 0])
    image.putpixel((1, 0), 1)
    image.putpixel((2, 0), 2)
    image.save(path, transparency=bytes([0, 128, 255]))  # index 0 transparent, 1 half, 2 opaque


def _mode_cases(tmp: Path) -> dict[str, tuple[Path, list[tuple[int, int, int]]]]:
    """name -> (file, expected RGB of pixels (0,0), (1,0), ...) with a white background."""
    cases: dict[str, tuple[Path, list]] = {}

    def add(name: str, image: Image.Image, expected: list, suffix: str = ".png", **save) -> None:
        path = tmp / f"{name}{suffix}"
        image.save(path, **save)
        cases[name] = (path, expected)

    _palette_png(tmp / "palette.png")
    cases["palette_transparency"] = (tmp / "palette.png", [WHITE, (148, 153, 158), (200, 0, 0)])
    gif = Image.new("P", (2, 1), 0)
    gif.putpalette([10, 20, 30, 200, 0, 0])
    gif.putpixel((1, 0), 1)
    add("gif_transparency", gif, [WHITE, (200, 0, 0)], ".gif", transparency=0)
    add("L", Image.new("L", (1, 1), 77), [(77, 77, 77)])
    gray = Image.new("L", (2, 1), 10)
    gray.putpixel((1, 0), 200)
    add("L_trns", gray, [WHITE, (200, 200, 200)], transparency=10)
    rgb_t = Image.new("RGB", (2, 1), (1, 2, 3))
    rgb_t.putpixel((1, 0), (9, 8, 7))
    add("RGB_trns", rgb_t, [WHITE, (9, 8, 7)], transparency=(1, 2, 3))
    la = Image.new("LA", (2, 1), (100, 0))
    la.putpixel((1, 0), (100, 255))
    add("LA", la, [WHITE, (100, 100, 100)])
    rgba = Image.new("RGBA", (3, 1), (255, 0, 0, 0))
    rgba.putpixel((1, 0), (255, 0, 0, 255))
    rgba.putpixel((2, 0), (0, 0, 255, 128))
    add("RGBA", rgba, [WHITE, (255, 0, 0), (127, 127, 255)])
    add("CMYK_tiff", Image.new("CMYK", (1, 1), (0, 255, 255, 0)), [(255, 0, 0)], ".tiff")
    add(
        "CMYK_jpeg", Image.new("CMYK", (8, 8), (0, 255, 255, 0)), [(255, 0, 0)], ".jpg", quality=100
    )
    deep = Image.new("I;16", (3, 1))
    for x, value in enumerate((0, 32768, 65535)):
        deep.putpixel((x, 0), value)
    add("I16_png", deep, [(0, 0, 0), (128, 128, 128), (255, 255, 255)])
    add("I32_tiff", deep.convert("I"), [(0, 0, 0), (128, 128, 128), (255, 255, 255)], ".tiff")
    floats = Image.new("F", (3, 1))
    for x, value in enumerate((0.0, 0.5, 1.0)):
        floats.putpixel((x, 0), value)
    add("F_tiff", floats, [(0, 0, 0), (128, 128, 128), (255, 255, 255)], ".tiff")
    bits = Image.new("1", (2, 1), 0)
    bits.putpixel((1, 0), 1)
    add("1bit", bits, [(0, 0, 0), WHITE])
    add(
        "YCbCr_tiff",
        Image.new("RGB", (1, 1), (200, 30, 90)).convert("YCbCr"),
        [(200, 30, 90)],
        ".tiff",
    )
    return cases


MODE_NAMES = [
    "palette_transparency",
    "gif_transparency",
    "L",
    "L_trns",
    "RGB_trns",
    "LA",
    "RGBA",
    "CMYK_tiff",
    "CMYK_jpeg",
    "I16_png",
    "I32_tiff",
    "F_tiff",
    "1bit",
    "YCbCr_tiff",
]


@pytest.mark.parametrize("name", MODE_NAMES)
def test_every_mode_becomes_rgb_with_right_colours(tmp_path: Path, name: str) -> None:
    path, expected = _mode_cases(tmp_path)[name]
    image = load_image(path)
    assert image.mode == "RGB"
    tol = 3 if name in ("CMYK_jpeg", "YCbCr_tiff") else 1
    for x, colour in enumerate(expected):
        assert close(pixel(image, (x, 0)), colour, tol), (name, x, pixel(image, (x, 0)), colour)


def test_transparency_uses_the_configured_background(tmp_path: Path) -> None:
    _palette_png(tmp_path / "p.png")
    assert pixel(load_image(tmp_path / "p.png", background=(0, 0, 0))) == (0, 0, 0)
    config = PreprocessConfig(image_size=4, background=(0, 255, 0))
    transparent = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    transparent.save(tmp_path / "clear.png")
    for image in (transparent, tmp_path / "clear.png"):
        out = Preprocess(config)(image)  # accepts a PIL image in any mode, or a path
        green = (torch.tensor([0.0, 1.0, 0.0]) - torch.tensor(config.mean)) / torch.tensor(
            config.std
        )
        assert torch.allclose(out[:, 0, 0], green, atol=1e-5)
    # in-memory modes that are never saved as files
    for mode in ("RGBa", "PA", "RGBX", "HSV"):
        assert to_rgb(Image.new(mode, (2, 2))).mode == "RGB"


# --- EXIF orientation ----------------------------------------------------------------------------------------

BLOCK = 16
UPRIGHT_COLOURS = [
    [(255, 0, 0), (0, 255, 0), (0, 0, 255)],
    [(255, 255, 0), (255, 0, 255), (0, 255, 255)],
]


def _stored_pixel_to_displayed(k: int, x: int, y: int, w: int, h: int) -> tuple[int, int]:
    """Where stored pixel (x, y) appears when shown, per the EXIF 2.3 definition of orientation k."""
    return {
        1: (x, y),
        2: (w - 1 - x, y),
        3: (w - 1 - x, h - 1 - y),
        4: (x, h - 1 - y),
        5: (y, x),
        6: (h - 1 - y, x),
        7: (h - 1 - y, w - 1 - x),
        8: (y, w - 1 - x),
    }[k]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_comes_out_upright(tmp_path: Path, orientation: int) -> None:
    up_w, up_h = 3 * BLOCK, 2 * BLOCK  # upright: 3 x 2 blocks of distinct colours
    w, h = (up_w, up_h) if orientation <= 4 else (up_h, up_w)
    stored = Image.new("RGB", (w, h))
    for y in range(h):
        for x in range(w):
            dx, dy = _stored_pixel_to_displayed(orientation, x, y, w, h)
            stored.putpixel((x, y), UPRIGHT_COLOURS[dy // BLOCK][dx // BLOCK])
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(tmp_path / "o.jpg", exif=exif.tobytes(), quality=95, subsampling=0)
    image = load_image(tmp_path / "o.jpg")
    assert image.size == (up_w, up_h)
    for row, colours in enumerate(UPRIGHT_COLOURS):
        for col, colour in enumerate(colours):
            centre = (col * BLOCK + BLOCK // 2, row * BLOCK + BLOCK // 2)
            assert close(pixel(image, centre), colour, 12), (
                orientation,
                row,
                col,
                pixel(image, centre),
            )


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
@pytest.mark.parametrize(
    "exif",
    [
        b"Exif\x00\x00MM\x00*garbage",
        b"Exif\x00\x00" + random.Random(254).randbytes(64),
        "bad_value",
    ],
    ids=["truncated-tiff", "seeded-random-bytes", "bad-orientation"],
)
def test_broken_exif_is_ignored(tmp_path: Path, exif) -> None:
    if exif == "bad_value":
        tags = Image.Exif()
        tags[0x0112] = 9  # not an orientation
        exif = tags.tobytes()
    Image.new("RGB", (6, 4), (0, 128, 0)).save(tmp_path / "e.jpg", exif=exif)
    image = load_image(tmp_path / "e.jpg")
    assert image.size == (6, 4) and close(pixel(image), (0, 128, 0), 3)


# --- bad files -------------------------------------------------------------------------------------------------


def _bomb_png(path: Path, side: int = 40_000) -> None:
    """A valid, all-black 1-bit side x side PNG (40000: 1.6 gigapixels in about 0.2 MB), built in milliseconds."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    raw_length = side * (1 + side // 8)  # every row: filter byte 0 + packed bits, all zeros
    block = 1 << 20
    packer = zlib.compressobj(9)
    first = packer.compress(bytes(block)) + packer.flush(zlib.Z_FULL_FLUSH)
    # After a full flush the compressor forgets its history, so one block's bytes can be repeated as is.
    repeat = packer.compress(bytes(block)) + packer.flush(zlib.Z_FULL_FLUSH)
    count, rest = divmod(raw_length, block)
    assert count >= 1, "side too small for this construction"
    tail = packer.compress(bytes(rest)) + packer.flush()
    adler = ((raw_length % 65521) << 16) | 1  # Adler-32 of raw_length zero bytes
    idat = first + repeat * (count - 1) + tail[:-4] + struct.pack(">I", adler)
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def test_decompression_bomb_refused_fast_from_the_header(tmp_path: Path) -> None:
    _bomb_png(tmp_path / "bomb.png")
    start = time.perf_counter()
    message = refused(tmp_path / "bomb.png")
    assert time.perf_counter() - start < 0.5
    assert "too large" in message and "1600 MP" in message


def test_pixel_limit_is_per_call_and_leaves_pil_global_alone(tmp_path: Path, monkeypatch) -> None:
    Image.new("RGB", (20, 10)).save(tmp_path / "small.png")
    before = Image.MAX_IMAGE_PIXELS
    assert "20x10" in refused(tmp_path / "small.png", max_pixels=199)
    assert load_image(tmp_path / "small.png", max_pixels=200).size == (20, 10)
    assert Image.MAX_IMAGE_PIXELS == before
    # our limit holds even where the user turned PIL's own guard off
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    _bomb_png(tmp_path / "bomb.png", side=16_000)
    assert "too large" in refused(tmp_path / "bomb.png")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_files_refused(tmp_path: Path, fmt: str) -> None:
    buffer = io.BytesIO()
    random_image(64, 48).save(buffer, fmt)
    data = buffer.getvalue()
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    assert "truncated" in refused(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_bad_files_refused_with_one_line_reasons(tmp_path: Path) -> None:
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("this is not a picture\n")
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    (tmp_path / "folder.jpg").mkdir()
    (tmp_path / "loop_a.jpg").symlink_to(tmp_path / "loop_b.jpg")
    (tmp_path / "loop_b.jpg").symlink_to(tmp_path / "loop_a.jpg")
    os.mkfifo(tmp_path / "pipe.jpg")
    # EPS is identified by PIL but would be rendered by Ghostscript: never opened
    (tmp_path / "page.jpg").write_text(
        "%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    )
    expected = {
        "empty.jpg": "empty",
        "notes.jpg": "not an image",
        "dangling.jpg": "dangling symlink",
        "folder.jpg": "directory",
        "loop_a.jpg": "symlink loop",
        "pipe.jpg": "not a regular file",
        "page.jpg": "not an image",
        "missing.jpg": "no such file",
    }
    for name, phrase in expected.items():
        assert phrase in refused(tmp_path / name), name


def test_unreadable_file_refused(tmp_path: Path) -> None:
    """A file without read permission: one line, "permission denied". Checked in a child process that
    file permissions apply to even when the tests run as root (cli_helpers.obey_file_permissions)."""
    import subprocess
    import sys

    from cli_helpers import obey_file_permissions

    path = tmp_path / "secret.png"
    Image.new("RGB", (2, 2)).save(path)
    path.chmod(0)
    probe = (
        "import sys\n"
        "from zsclip.core.transform import load_image\n"
        "from zsclip.errors import InputError\n"
        "try:\n"
        "    load_image(sys.argv[1])\n"
        "except InputError as err:\n"
        "    print(err)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=obey_file_permissions,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "permission denied\n"


# --- frames and sizes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["GIF", "PNG"])
def test_animation_gives_its_first_frame(tmp_path: Path, fmt: str) -> None:
    frames = [
        Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))
    ]
    path = tmp_path / f"anim.{fmt.lower()}"
    frames[0].save(path, fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(path) as check:
        assert check.n_frames == 3
    assert close(pixel(load_image(path), (4, 4)), (255, 0, 0), 2)


@pytest.mark.parametrize("size", [(1, 1), (5000, 20)])
def test_tiny_and_thin_images_are_resized_up(tmp_path: Path, size: tuple[int, int]) -> None:
    Image.new("RGB", size, (30, 60, 90)).save(tmp_path / "t.png")
    out = Preprocess()(tmp_path / "t.png")
    assert out.shape == (3, 224, 224)
    expected = (
        torch.tensor([30, 60, 90]) / 255 - torch.tensor(transform.CLIP_MEAN)
    ) / torch.tensor(transform.CLIP_STD)
    assert torch.allclose(out, expected.view(3, 1, 1).expand(3, 224, 224), atol=1e-5)


def test_extreme_aspect_ratio_resamples_only_the_crop() -> None:
    image = Image.new("RGB", (200_000, 1), (200, 100, 0))  # resizing whole would make 45 G pixels
    start = time.perf_counter()
    out = to_tensor(image, PreprocessConfig())
    assert time.perf_counter() - start < 1.0 and out.shape == (3, 224, 224)
    assert torch.allclose(out[:, 0, 0], out[:, 223, 223]) and torch.isfinite(out).all()


def test_pixels_then_normalize_equals_to_tensor() -> None:
    config = PreprocessConfig(image_size=48)
    images = [random_image(100, 70, seed=1), random_image(40, 90, seed=2)]
    pixels = torch.stack([to_pixels(image, config) for image in images])  # [2, 3, 48, 48] uint8
    assert pixels.dtype == torch.uint8 and pixels.shape == (2, 3, 48, 48)
    assert torch.equal(
        normalize(pixels, config), torch.stack([to_tensor(image, config) for image in images])
    )


def test_squash_mode_and_other_sizes() -> None:
    image = random_image(90, 30)
    assert to_tensor(image, PreprocessConfig(image_size=64)).shape == (3, 64, 64)
    squashed = to_tensor(image, PreprocessConfig(image_size=32, resize_mode="squash"))
    reference = to_tensor(
        image.resize((32, 32), Image.Resampling.BICUBIC), PreprocessConfig(image_size=32)
    )
    assert torch.equal(squashed, reference)


# --- parity with Hugging Face transformers' CLIPImageProcessor (PIL backend) -------------------------------


@pytest.fixture(scope="module")
def hf_processor():
    """The PIL-based ("slow") processor: CLIPImageProcessorPil in transformers 5, CLIPImageProcessor in 4."""
    try:
        from transformers.models.clip.image_processing_pil_clip import (
            CLIPImageProcessorPil as processor,
        )
    except ImportError:
        processor = pytest.importorskip("transformers").CLIPImageProcessor
    return processor()


@pytest.mark.parametrize(
    "size", [(640, 480), (480, 640), (300, 1000), (5000, 20), (1, 1), (225, 301), (224, 224)]
)
def test_matches_hf_clip_image_processor(hf_processor, size: tuple[int, int]) -> None:
    image = random_image(*size, seed=size[0] * 7 + size[1])
    expected = hf_processor(image, return_tensors="pt")["pixel_values"][0]  # [3, 224, 224]
    torch.testing.assert_close(to_tensor(image, PreprocessConfig()), expected, atol=1e-5, rtol=0)


def test_matches_hf_on_transparent_images(hf_processor) -> None:
    rgba = Image.merge(
        "RGBA",
        (*random_image(320, 200, seed=1).split(), random_image(320, 200, seed=2).getchannel(0)),
    )
    expected = hf_processor(rgba, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(Preprocess()(rgba), expected, atol=1e-5, rtol=0)


def test_preprocess_of_a_path_equals_load_then_to_tensor(tmp_path: Path) -> None:
    random_image(300, 200).save(tmp_path / "r.png")
    config = PreprocessConfig()
    assert torch.equal(
        Preprocess(config)(tmp_path / "r.png"), to_tensor(load_image(tmp_path / "r.png"), config)
    )
    assert torch.equal(
        Preprocess(config)(str(tmp_path / "r.png")),
        Preprocess(config, draft=True)(tmp_path / "r.png"),
    )


# --- JPEG draft decoding -----------------------------------------------------------------------------------------


def _photo_like(width: int, height: int) -> Image.Image:
    """Gradients, filled shapes and lines with hard edges, plus fine noise: detail the draft scale can lose."""
    rng = random.Random(3)
    gradients = (
        Image.linear_gradient("L"),
        Image.radial_gradient("L"),
        Image.linear_gradient("L").rotate(90),
    )
    scene = Image.merge(
        "RGB", [g.resize((width, height), Image.Resampling.BILINEAR) for g in gradients]
    )
    draw = ImageDraw.Draw(scene)
    for _ in range(80):
        x, y, s = (
            rng.randrange(width),
            rng.randrange(height),
            rng.randrange(width // 40, width // 6),
        )
        colour = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x, y, x + s, y + s), fill=colour)
        draw.line(
            (x, y, rng.randrange(width), rng.randrange(height)),
            fill=colour,
            width=rng.randrange(2, 16),
        )
    noise = Image.frombytes(
        "RGB", (width // 4, height // 4), rng.randbytes(width * height * 3 // 16)
    )
    return Image.blend(scene, noise.resize((width, height), Image.Resampling.NEAREST), 0.08)


def test_draft_decodes_a_12mp_jpeg_small_and_close_to_exact(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    _photo_like(4000, 3000).save(path, quality=90)
    drafted = load_image(path, draft_size=224)
    assert drafted.size == (
        500,
        375,
    )  # 1/8 scale: the short side 375 >= 224, and 1/16 does not exist
    exact = load_image(path)
    assert exact.size == (4000, 3000)
    config = PreprocessConfig()
    fast, slow = to_tensor(drafted, config), to_tensor(exact, config)
    cosine = torch.nn.functional.cosine_similarity(
        fast.double().flatten(), slow.double().flatten(), dim=0
    ).item()
    max_abs = (fast - slow).abs().max().item()
    print(f"draft vs exact: max abs {max_abs:.4f} (normalised units), cosine {cosine:.6f}")
    assert cosine > 0.999 and max_abs < 0.5


@pytest.mark.parametrize(
    ("size", "orientation"),
    [
        ((1792, 1792), 1),
        ((1791, 3000), 1),
        ((3000, 1791), 6),
        ((900, 449), 8),
        ((448, 900), 1),
        ((300, 200), 1),
        ((1799, 1000), 5),
    ],
)
def test_draft_never_goes_below_the_target_on_the_short_side(
    tmp_path: Path, size, orientation: int
) -> None:
    target = 224
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.new("RGB", size, (90, 90, 90)).save(tmp_path / "d.jpg", exif=exif.tobytes(), quality=50)
    image = load_image(tmp_path / "d.jpg", draft_size=target)
    # the largest DCT scale that keeps both stored sides >= target, or full size when none does,
    # then the largest whole box-average factor that still does
    scale = max(s for s in (1, 2, 4, 8) if s == 1 or min(size) // target >= s)
    stored = (math.ceil(size[0] / scale), math.ceil(size[1] / scale))
    factor = max(1, min(stored) // target)
    stored = (math.ceil(stored[0] / factor), math.ceil(stored[1] / factor))
    expected = stored if orientation <= 4 else stored[::-1]
    assert image.size == expected and min(image.size) >= min(target, min(size))


# --- memory: banded conversion, draft box-averaging, the decode cost -------------------------------------


def _noise_rgba(width: int, height: int, seed: int = 3) -> Image.Image:
    rng = random.Random(seed)
    return Image.frombytes("RGBA", (width, height), rng.randbytes(width * height * 4))


def test_banded_conversion_equals_converting_the_whole_image() -> None:
    """to_rgb converts a few rows at a time to keep memory small; the pixels must not notice."""
    image = _noise_rgba(3001, 1003)  # several bands of rows, the last one partial
    background = (10, 200, 30)
    whole = Image.alpha_composite(Image.new("RGBA", image.size, (*background, 255)), image)
    expected = whole.convert("RGB")
    assert transform._band_bytes(3001) * 2 < 3001 * 1003 * 4  # really more than one band
    assert to_rgb(image, background).tobytes() == expected.tobytes()
    # draft path: box-averaged band by band equals box-averaging the whole composite
    reduced = transform._convert(image, background, 3)
    assert reduced.size == (1001, 335) and reduced.tobytes() == expected.reduce(3).tobytes()


def test_banded_high_depth_image_uses_the_whole_images_range() -> None:
    """A 32-bit image whose bands have different value ranges: scaled by the whole image's range."""
    width, height = 2000, 1200
    rows = [bytes(struct.pack("<i", -5000 + 9 * y) * width) for y in range(height)]
    image = Image.frombytes("I", (width, height), b"".join(rows))
    low, high = -5000.0, -5000.0 + 9 * (height - 1)
    scale = 255.0 / (high - low)
    expected = image.point(lambda v: v * scale + (0.5 - low * scale)).convert("L").convert("RGB")
    assert to_rgb(image).tobytes() == expected.tobytes()


def test_draft_box_averages_a_large_png_and_stays_close_to_exact(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    scene = Image.linear_gradient("L").resize((2400, 1800)).convert("RGB")
    ImageDraw.Draw(scene).ellipse((300, 200, 1900, 1500), fill=(200, 40, 90))
    scene.save(path, compress_level=1)
    drafted = load_image(path, draft_size=336)
    assert drafted.size == (
        480,
        360,
    )  # 1800 // 336 = 5: the largest factor keeping both sides >= 336
    exact = load_image(path)
    assert exact.size == (2400, 1800)
    config = PreprocessConfig()
    cosine = torch.nn.functional.cosine_similarity(
        to_tensor(drafted, config).double().flatten(),
        to_tensor(exact, config).double().flatten(),
        0,
    )
    assert cosine.item() > 0.999
    assert load_image(path, draft_size=1000).size == (2400, 1800)  # factor 1: nothing to gain


@pytest.mark.parametrize("draft", [None, 336])
def test_decode_cost_is_reserved_before_any_pixel_is_decoded(
    tmp_path: Path, monkeypatch, draft
) -> None:
    path = tmp_path / "a.png"
    _noise_rgba(1500, 1000).save(path, compress_level=1)
    events: list = []
    loader = transform._load_pixels
    monkeypatch.setattr(
        transform,
        "_load_pixels",
        lambda image, limit: (events.append("decode"), loader(image, limit)),
    )
    load_image(path, draft_size=draft, reserve=lambda nbytes: events.append(nbytes))
    expected = transform.decode_cost((1500, 1000), "RGBA", draft)
    assert events == [expected, "decode"]
    decoded, result = 1500 * 1000 * 4, (1500 * 1000 * 4 if draft is None else 750 * 500 * 4)
    assert decoded + result <= expected <= decoded + 2 * result + (64 << 20)


def test_a_refused_reservation_decodes_nothing(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "a.png"
    Image.new("RGB", (40, 30)).save(path)
    monkeypatch.setattr(transform, "_load_pixels", lambda *args: pytest.fail("decoded anyway"))

    def refuse(nbytes: int) -> None:
        raise MemoryError("no room")

    with pytest.raises(MemoryError):
        load_image(path, reserve=refuse)


def test_decode_cost_counts_pil_storage() -> None:
    # On the draft path the result is small and the decoded pixels dominate: PIL keeps L and P in 1
    # byte a pixel, 16-bit grey in 2, RGB and RGBA in 4.
    pixels, draft = 4000 * 3000, 336
    costs = {
        mode: transform.decode_cost((4000, 3000), mode, draft) for mode in ("L", "I;16", "RGBA")
    }
    assert costs["I;16"] - costs["L"] == pixels and costs["RGBA"] - costs["I;16"] == 2 * pixels
    # exact path: the decoded pixels plus a full-size RGB result
    assert transform.decode_cost((4000, 3000), "RGBA") >= 8 * pixels
    assert transform.decode_cost((8, 8), "RGB") < 4096  # a tiny image costs little
