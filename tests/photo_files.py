"""Photo files the way phones and cameras write them, made at test time: HEIC, AVIF, and a minimal
DNG (a TIFF whose first IFD is a JPEG preview and whose SubIFD holds 16-bit Bayer data, the layout
Adobe's DNG specification describes), built here byte by byte because no installed library writes
one."""

from __future__ import annotations

import io
import struct

from PIL import Image

_TYPE_FORMAT = {1: "B", 2: "B", 3: "H", 4: "I"}  # TIFF field types: BYTE, ASCII, SHORT, LONG


def two_tone(size: tuple[int, int] = (96, 64)) -> Image.Image:
    """Red left half, blue right half: which way up an image is shows in where the red lands."""
    image = Image.new("RGB", size, (220, 20, 20))
    image.paste((20, 20, 220), (size[0] // 2, 0, size[0], size[1]))
    return image


def exif_with_orientation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def _ifd(entries: list[tuple], data_at: int) -> tuple[bytes, bytes]:
    """One TIFF IFD (entries sorted by tag) and the out-of-line values it points at, from data_at."""
    out, extra = struct.pack("<H", len(entries)), b""
    for tag, kind, values in sorted(entries):
        if kind == 2:
            data = values + b"\0"
        else:
            data = struct.pack("<" + _TYPE_FORMAT[kind] * len(values), *values)
        count = len(data) if kind == 2 else len(values)
        if len(data) <= 4:
            out += struct.pack("<HHI", tag, kind, count) + data.ljust(4, b"\0")
        else:
            out += struct.pack("<HHII", tag, kind, count, data_at + len(extra))
            extra += data + b"\0" * (len(data) % 2)
    return out + struct.pack("<I", 0), extra


def make_dng(preview: Image.Image, orientation: int = 1) -> bytes:
    """A DNG 1.4 file: IFD0 = the JPEG preview (NewSubfileType 1), SubIFD = 64x64 CFA raw data."""
    buffer = io.BytesIO()
    preview.save(buffer, format="JPEG", quality=92)
    jpeg, raw = buffer.getvalue(), bytes(64 * 64 * 2)
    width, height = preview.size
    sizes = (0, 0)  # lengths of the two out-of-line areas, known after the first pass
    for _ in range(2):
        sub_at = 8 + 2 + 12 * 16 + 4 + sizes[0]
        jpeg_at = sub_at + 2 + 12 * 11 + 4 + sizes[1]
        raw_at = jpeg_at + len(jpeg)
        ifd0, extra0 = _ifd(
            [
                (254, 4, [1]), (256, 4, [width]), (257, 4, [height]), (258, 3, [8, 8, 8]),
                (259, 3, [7]), (262, 3, [6]), (271, 2, b"Canon"), (272, 2, b"EOS Test"),
                (273, 4, [jpeg_at]), (274, 3, [orientation]), (277, 3, [3]), (278, 4, [height]),
                (279, 4, [len(jpeg)]), (330, 4, [sub_at]), (50706, 1, [1, 4, 0, 0]),
                (50708, 2, b"Canon EOS Test"),
            ],
            8 + 2 + 12 * 16 + 4,
        )  # fmt: skip
        sub, extra1 = _ifd(
            [
                (254, 4, [0]), (256, 4, [64]), (257, 4, [64]), (258, 3, [16]), (259, 3, [1]),
                (262, 3, [32803]), (273, 4, [raw_at]), (277, 3, [1]), (278, 4, [64]),
                (279, 4, [len(raw)]), (33421, 3, [2, 2]),
            ],
            sub_at + 2 + 12 * 11 + 4,
        )  # fmt: skip
        sizes = (len(extra0), len(extra1))
    return b"II*\0" + struct.pack("<I", 8) + ifd0 + extra0 + sub + extra1 + jpeg + raw
