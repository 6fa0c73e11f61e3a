"""Phone and camera formats: HEIC (pillow-heif), AVIF (Pillow), camera RAW through the embedded
preview (rawpy, the `zsclip[raw]` extra). Files are made by the libraries at test time; EXIF
orientation and the decompression-bomb limit must hold for each format as for JPEG."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
from cli_helpers import build_tiny_checkpoint, run_cli
from photo_files import exif_with_orientation, make_dng, two_tone
from PIL import Image

from zsclip.core.transform import load_image, load_image_bytes
from zsclip.errors import InputError
from zsclip.jobs.inputs import expand_inputs

# Lossy codecs at their default quality move flat colours by a few levels; a wrong decode (swapped
# halves, wrong colour space, a missing rotation) moves them by ~200.
COLOUR_TOLERANCE = 16


def _save(image: Image.Image, path: Path, fmt: str, orientation: int | None = None) -> Path:
    if fmt == "HEIF":
        import pillow_heif

        pillow_heif.register_heif_opener()
    extra = {"exif": exif_with_orientation(orientation)} if orientation else {}
    image.save(path, format=fmt, **extra)
    return path


def _region_colour(image: Image.Image, box: tuple[int, int, int, int]) -> tuple[float, ...]:
    from PIL import ImageStat

    return tuple(ImageStat.Stat(image.crop(box)).mean)


def _assert_close(colour: tuple[float, ...], wanted: tuple[int, int, int]) -> None:
    assert max(abs(a - b) for a, b in zip(colour, wanted)) < COLOUR_TOLERANCE, (colour, wanted)


@pytest.mark.parametrize("fmt, suffix", [("HEIF", ".heic"), ("AVIF", ".avif")])
def test_heic_and_avif_decode_to_the_picture(tmp_path: Path, fmt: str, suffix: str) -> None:
    path = _save(two_tone(), tmp_path / f"photo{suffix}", fmt)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (96, 64)
    _assert_close(_region_colour(image, (8, 8, 40, 56)), (220, 20, 20))  # left half red
    _assert_close(_region_colour(image, (56, 8, 88, 56)), (20, 20, 220))  # right half blue


@pytest.mark.parametrize("fmt, suffix", [("JPEG", ".jpg"), ("HEIF", ".heic"), ("AVIF", ".avif")])
def test_exif_orientation_is_honoured_in_every_format(
    tmp_path: Path, fmt: str, suffix: str
) -> None:
    # orientation 6: the camera was turned a quarter clockwise; shown upright, the left edge is on top
    path = _save(two_tone(), tmp_path / f"turned{suffix}", fmt, orientation=6)
    image = load_image(path)
    assert image.size == (64, 96)
    _assert_close(_region_colour(image, (8, 8, 56, 40)), (220, 20, 20))
    _assert_close(_region_colour(image, (8, 56, 56, 88)), (20, 20, 220))


@pytest.mark.parametrize("fmt, suffix", [("HEIF", ".heic"), ("AVIF", ".avif")])
def test_the_pixel_limit_applies_to_heic_and_avif(tmp_path: Path, fmt: str, suffix: str) -> None:
    path = _save(two_tone((300, 200)), tmp_path / f"big{suffix}", fmt)
    with pytest.raises(InputError, match="image too large: 300x200"):
        load_image(path, max_pixels=50_000)
    with pytest.raises(InputError, match="image too large"):
        load_image_bytes(path.read_bytes(), max_pixels=50_000)
    assert load_image(path, max_pixels=60_000).size == (300, 200)


@pytest.mark.parametrize("fmt, suffix", [("HEIF", ".heic"), ("AVIF", ".avif")])
def test_truncated_heic_and_avif_are_one_line(tmp_path: Path, fmt: str, suffix: str) -> None:
    whole = _save(two_tone((300, 200)), tmp_path / f"whole{suffix}", fmt).read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InputError) as caught:
        load_image(cut)
    assert "\n" not in str(caught.value)


def test_folders_collect_heic_avif_and_raw_files(tmp_path: Path) -> None:
    names = ["a.HEIC", "b.heif", "c.avif", "d.CR2", "e.nef", "f.dng", "g.arw", "h.cr3"]
    names += ["i.orf", "j.rw2", "k.raf", "notes.txt"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    found = [Path(item.path).name for item in expand_inputs([str(tmp_path)])]
    assert found == names[:-1]


# ------------------------------------------------------------------------------------- camera RAW


def _rawpy_or_skip():
    return pytest.importorskip("rawpy", reason="needs the zsclip[raw] extra (rawpy)")


def test_dng_is_read_through_its_embedded_preview_and_turned_upright(tmp_path: Path) -> None:
    _rawpy_or_skip()
    path = tmp_path / "IMG_0001.dng"
    path.write_bytes(make_dng(two_tone(), orientation=6))
    image = load_image(path)
    assert image.size == (64, 96)  # the preview, turned as the RAW container says
    _assert_close(_region_colour(image, (8, 8, 56, 40)), (220, 20, 20))
    _assert_close(_region_colour(image, (8, 56, 56, 88)), (20, 20, 220))


def test_the_pixel_limit_applies_to_raw_previews(tmp_path: Path) -> None:
    _rawpy_or_skip()
    path = tmp_path / "IMG_0002.dng"
    path.write_bytes(make_dng(two_tone((300, 200))))
    with pytest.raises(InputError, match="image too large"):
        load_image(path, max_pixels=50_000)


def test_a_broken_raw_file_is_one_line(tmp_path: Path) -> None:
    _rawpy_or_skip()
    path = tmp_path / "IMG_0003.nef"
    path.write_bytes(b"II*\0" + bytes(200))
    with pytest.raises(InputError, match="RAW file") as caught:
        load_image(path)
    assert "\n" not in str(caught.value)


def test_without_rawpy_a_raw_file_names_the_extra(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "rawpy", None)  # import rawpy now raises ImportError
    path = tmp_path / "IMG_0004.dng"
    path.write_bytes(make_dng(two_tone()))
    with pytest.raises(InputError, match=r"pip install 'zsclip\[raw\]'"):
        load_image(path)


# ------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(build_tiny_checkpoint(tmp_path_factory.mktemp("photo-model")))


def _classify(model: str, folder: Path):
    args = ["classify", "--model", model, "-t", "simple", "--labels", "red,blue", "-f", "jsonl"]
    result = run_cli([*args, str(folder)])
    return result, [json.loads(line) for line in result.stdout.splitlines()]


def _phone_folder(folder: Path) -> list[str]:
    folder.mkdir()
    _save(two_tone(), folder / "a.heic", "HEIF", orientation=6)
    _save(two_tone(), folder / "b.avif", "AVIF")
    _save(two_tone(), folder / "c.png", "PNG")
    _save(two_tone(), folder / "d.jpg", "JPEG", orientation=3)
    return ["a.heic", "b.avif", "c.png", "d.jpg"]


def test_a_phone_folder_is_classified_without_errors(tmp_path: Path, model: str) -> None:
    names = _phone_folder(tmp_path / "phone")
    if _has_rawpy():
        (tmp_path / "phone" / "e.dng").write_bytes(make_dng(two_tone(), orientation=8))
        names.append("e.dng")
    result, rows = _classify(model, tmp_path / "phone")
    assert result.code == 0, result.stderr
    assert [Path(row["path"]).name for row in rows] == names
    assert all("error" not in row and row["label"] in ("red", "blue") for row in rows)


def test_without_the_extra_each_raw_file_is_one_error_line_and_exit_1(
    tmp_path: Path, model: str, monkeypatch
) -> None:
    monkeypatch.setitem(sys.modules, "rawpy", None)
    folder = tmp_path / "camera"
    names = _phone_folder(folder)
    (folder / "e.dng").write_bytes(make_dng(two_tone()))
    (folder / "f.nef").write_bytes(b"II*\0" + bytes(100))  # not even read: the extra is missing
    result, rows = _classify(model, folder)
    assert result.code == 1
    assert [Path(row["path"]).name for row in rows] == [*names, "e.dng", "f.nef"]
    assert all("error" not in row for row in rows[:4])
    errors = [line for line in result.stderr.splitlines() if line.startswith("zsclip: error:")]
    assert len(errors) == 2
    for line, name in zip(errors, ["e.dng", "f.nef"]):
        assert name in line and "pip install 'zsclip[raw]'" in line


def _has_rawpy() -> bool:
    try:
        import rawpy  # noqa: F401
    except ImportError:
        return False
    return True


def test_a_heic_upload_decodes_from_memory(tmp_path: Path) -> None:
    data = io.BytesIO()
    import pillow_heif

    pillow_heif.register_heif_opener()
    two_tone().save(data, format="HEIF")
    assert load_image_bytes(data.getvalue()).size == (96, 64)


@pytest.mark.parametrize("fmt, suffix", [("HEIF", ".heic"), ("AVIF", ".avif"), ("DNG", ".dng")])
def test_the_decode_memory_budget_is_asked_before_decoding(
    tmp_path: Path, fmt: str, suffix: str
) -> None:
    path = tmp_path / f"budget{suffix}"
    if fmt == "DNG":
        _rawpy_or_skip()
        path.write_bytes(make_dng(two_tone((300, 200))))
    else:
        _save(two_tone((300, 200)), path, fmt)
    asked: list[int] = []
    image = load_image(path, reserve=asked.append)
    assert image.size == (300, 200)
    assert len(asked) == 1 and asked[0] >= 300 * 200 * 4  # at least the RGB result


def test_a_refusing_budget_stops_a_heic_before_it_is_decoded(tmp_path: Path) -> None:
    path = _save(two_tone((300, 200)), tmp_path / "refused.heic", "HEIF")

    def refuse(cost: int) -> None:
        raise InputError(f"needs {cost} bytes, over the budget")

    with pytest.raises(InputError, match="over the budget"):
        load_image(path, reserve=refuse)


def test_a_raw_upload_is_read_through_its_preview_when_named_like_one(tmp_path: Path) -> None:
    _rawpy_or_skip()
    data = make_dng(two_tone(), orientation=6)
    assert load_image_bytes(data, name="IMG_0005.DNG").size == (64, 96)
