"""A folder holding every awkward input the issue names: each unreadable one gets an error record and one stderr
line, every readable one gets its prediction, and nothing else is lost."""

from __future__ import annotations

import io
import json
import os
import struct
import time
import zlib
from pathlib import Path

import pytest
from cli_helpers import build_tiny_checkpoint, make_image, run_cli, run_zsclip

LABELS = "red,green,blue"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_png_bomb(path: Path, side: int = 40000) -> None:
    """A valid 1-bit side x side PNG (a few hundred KB of zlib over 200 MB of zero rows), built row by row so the
    test never holds the image in memory."""
    compressor = zlib.compressobj(9)
    row = b"\x00" + bytes((side + 7) // 8)  # filter byte + packed bits
    chunks = [compressor.compress(row * 1000) for _ in range(side // 1000)]
    chunks.append(compressor.flush())
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", b"".join(chunks))
        + _png_chunk(b"IEND", b"")
    )


def build_bad_folder(root: Path) -> tuple[set[str], set[str]]:
    """Returns (names that must be readable, names that must be errors)."""
    from PIL import Image

    root.mkdir()
    good, bad = set(), set()

    def ok(name: str, image: "Image.Image", **save) -> None:
        image.save(root / name, **save)
        good.add(name)

    # Unreadable
    (root / "empty.jpg").write_bytes(b"")
    (root / "text-not-image.png").write_text("hello, I am not a PNG\n")
    jpeg = io.BytesIO()
    Image.new("RGB", (256, 256), (10, 200, 30)).save(jpeg, "JPEG", quality=90)
    (root / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    write_png_bomb(root / "bomb.png")
    os.symlink(root / "gone.jpg", root / "dangling.jpg")
    os.symlink(root / "loop-b.jpg", root / "loop-a.jpg")
    os.symlink(root / "loop-a.jpg", root / "loop-b.jpg")
    os.mkfifo(root / "fifo.jpg")  # a name like an image, but not a regular file: must not hang
    bad |= {
        "empty.jpg",
        "text-not-image.png",
        "truncated.jpg",
        "bomb.png",
        "dangling.jpg",
        "loop-a.jpg",
        "loop-b.jpg",
        "fifo.jpg",
    }
    # (files and folders without permission: test_no_permission_gives_error_rows_even_as_root)
    os.symlink(root, root / "folder-cycle")  # followed at most once: adds nothing, loops never

    # Readable, each in its own awkward way
    ok("cmyk.jpg", Image.new("CMYK", (40, 30), (0, 200, 200, 0)))
    ok("sixteen-bit.png", Image.new("I;16", (40, 30), 40000))
    ok("one-bit.png", Image.new("1", (40, 30), 1))
    ok(
        "palette.png",
        Image.new("RGB", (40, 30), (0, 0, 255)).convert("P", palette=Image.Palette.ADAPTIVE),
    )
    ok("transparent.png", Image.new("RGBA", (40, 30), (255, 0, 0, 0)))
    frames = [Image.new("RGB", (40, 30), color) for color in ((255, 0, 0), (0, 255, 0))]
    ok("animated.gif", frames[0], save_all=True, append_images=frames[1:], duration=100, loop=0)
    ok("tiny-1x1.png", Image.new("RGB", (1, 1), (0, 255, 0)))
    ok("strip-5000x20.png", Image.new("RGB", (5000, 20), (0, 0, 255)))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    ok("exif-rotated.jpg", Image.new("RGB", (60, 30), (255, 0, 0)), exif=exif.tobytes())
    ok("café 日本.png", Image.new("RGB", (40, 30), (255, 0, 0)))
    ok("a, b, and c.png", Image.new("RGB", (40, 30), (0, 255, 0)))
    return good, bad


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(build_tiny_checkpoint(tmp_path_factory.mktemp("model")))


def test_every_bad_case_in_one_folder(model: str, tmp_path: Path) -> None:
    good, bad = build_bad_folder(tmp_path / "mixed")
    started = time.monotonic()
    result = run_cli(
        [
            "classify",
            str(tmp_path / "mixed"),
            "--model",
            model,
            "--labels",
            LABELS,
            "-t",
            "simple",
            "--workers",
            "2",
        ]
    )
    elapsed = time.monotonic() - started
    assert result.code == 1  # some inputs unreadable; all the others written
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    names = [os.path.basename(row["path"]) for row in rows]
    assert names == sorted(
        good | bad
    )  # one row per input, in sorted order, nothing lost or repeated
    for row in rows:
        name = os.path.basename(row["path"])
        if name in bad:
            assert list(row) == ["path", "error"] and row["error"] and "\n" not in row["error"], row
        else:
            assert row["label"] in LABELS.split(",") and len(row["top"]) == 3, row
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("zsclip: error:")]
    assert len(error_lines) == len(bad)
    assert all(any(name in line for line in error_lines) for name in bad)
    assert elapsed < 20, (
        f"took {elapsed:.1f} s: the 40000 x 40000 PNG must be refused from its header"
    )


def test_exif_rotation_is_applied_before_the_model(model: str, tmp_path: Path) -> None:
    """The same picture stored upright, and stored sideways with an EXIF 'rotate' tag, embed the same."""
    from PIL import Image

    upright = Image.new("RGB", (64, 32), (220, 20, 20))
    upright.paste(
        (20, 20, 220), (32, 0, 64, 32)
    )  # left red, right blue: rotation changes the picture
    upright.save(tmp_path / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored image rotated 90 degrees clockwise
    sideways = upright.transpose(Image.Transpose.ROTATE_90)  # what a camera held sideways stores
    sideways.save(tmp_path / "tagged.png", exif=exif.tobytes())
    sideways.save(tmp_path / "untagged.png")
    result = run_cli(
        [
            "embed",
            "--model",
            model,
            *(str(tmp_path / f"{n}.png") for n in ("upright", "tagged", "untagged")),
        ]
    )
    assert result.code == 0, result.stderr
    up, tagged, untagged = (json.loads(line)["embedding"] for line in result.stdout.splitlines())
    cosine = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731 (unit vectors)
    assert cosine(up, tagged) > 0.9999
    assert cosine(up, untagged) < cosine(up, tagged)


def test_no_permission_gives_error_rows_even_as_root(model: str, tmp_path: Path) -> None:
    """A file that cannot be read, a folder that cannot be listed, and a cache folder that cannot be
    written: each unreadable input is an error row and
    one stderr line, the readable one is classified, the cache says once that it is off, exit 1.
    Run in a child process that permissions apply to even under root (CI runs as root)."""
    photos = tmp_path / "photos"
    make_image(photos / "readable.png")
    make_image(photos / "no-read.png").chmod(0)
    make_image(photos / "locked" / "inside.png")
    (photos / "locked").chmod(0)  # cannot be listed
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o555)
    try:
        done = run_zsclip(
            [
                "classify",
                str(photos),
                "--model",
                model,
                "-t",
                "simple",
                "--labels",
                LABELS,
                "-f",
                "jsonl",
            ],
            env={"ZSCLIP_CACHE": str(cache)},
            unprivileged=True,
        )
    finally:
        (photos / "locked").chmod(0o755)  # so that pytest can clean up
    assert done.returncode == 1, done.stderr
    rows = {row["path"]: row for row in map(json.loads, done.stdout.splitlines())}
    assert list(rows) == [
        str(photos / "locked"),
        str(photos / "no-read.png"),
        str(photos / "readable.png"),
    ]
    assert rows[str(photos / "readable.png")]["label"] in LABELS.split(",")
    for path in (photos / "locked", photos / "no-read.png"):
        assert "permission denied" in rows[str(path)]["error"].lower(), rows[str(path)]
    lines = done.stderr.splitlines()
    errors = [line for line in lines if line.startswith("zsclip: error: ")]
    assert len(errors) == 2 and all("ermission denied" in line for line in errors)
    warnings = [line for line in lines if line.startswith("zsclip: warning: ")]
    assert len(warnings) == 2  # the image cache and the classifier cache, once each
    assert "Traceback" not in done.stderr and not any(cache.iterdir())


def test_a_file_in_a_folder_that_cannot_be_entered_is_not_called_missing(
    model: str, tmp_path: Path
) -> None:
    make_image(tmp_path / "shut" / "inside.png")
    (tmp_path / "shut").chmod(0o600)  # can be listed by its owner, not entered
    try:
        done = run_zsclip(
            ["classify", str(tmp_path / "shut" / "inside.png"), "--model", model, "-l", LABELS],
            env={"ZSCLIP_CACHE": str(tmp_path / "cache")},
            unprivileged=True,
        )
    finally:
        (tmp_path / "shut").chmod(0o755)
    assert "no such file" not in done.stderr and "ermission denied" in done.stderr, done.stderr
    assert done.returncode == 1  # an error row, as for any unreadable input; not a usage error
    (row,) = map(json.loads, done.stdout.splitlines())
    assert "ermission denied" in row["error"]
