"""Camera RAW files (.cr2 .cr3 .nef .arw .dng .orf .rw2 .raf) -> the preview image the camera embedded.

Every camera writes a JPEG rendering of the photo into its RAW file, the one its own screen shows;
CLIP needs no more than that, and reading it costs a fraction of developing the sensor data. The
file is parsed by LibRaw through `rawpy`, an optional extra (`pip install 'zsclip[raw]'`): without
it a RAW file is one InputError line naming the extra. LibRaw also reports how the camera was held
(its `flip`), which the preview itself often does not carry in EXIF.

    preview, orientation = read_preview(path)   # (JPEG bytes or an RGB PIL image, EXIF orientation)
"""

from __future__ import annotations

import os
from typing import Any, BinaryIO

from zsclip.core.imagefile import RAW_EXTRA_HINT
from zsclip.errors import InputError

# LibRaw's sizes.flip -> the EXIF orientation value with the same meaning (LibRaw derives flip from
# EXIF: 3 is upside down, 5 needs a quarter turn counter-clockwise, 6 a quarter turn clockwise).
_FLIP_TO_ORIENTATION = {0: 1, 3: 3, 5: 8, 6: 6}


def read_preview(path: str | os.PathLike[str] | BinaryIO, max_pixels: int) -> tuple[Any, int]:
    """The embedded preview of a RAW file and the orientation to apply when the preview states none.

    A JPEG preview comes back as its bytes (the caller decodes it with the usual checks: header
    size limit, truncation); a bitmap preview as an RGB PIL image, refused above `max_pixels`.
    """
    try:
        import rawpy
    except ImportError:
        raise InputError(
            f"camera RAW file: reading it needs the RAW extra, {RAW_EXTRA_HINT}"
        ) from None
    try:
        source = path if hasattr(path, "read") else os.fspath(path)  # a file or an upload's bytes
        with rawpy.imread(source) as raw:
            orientation = _FLIP_TO_ORIENTATION.get(int(raw.sizes.flip), 1)
            thumb = raw.extract_thumb()
    except (rawpy.LibRawNoThumbnailError, rawpy.LibRawUnsupportedThumbnailError):
        raise InputError(
            "camera RAW file without a usable embedded preview (zsclip reads RAW files through "
            "the preview the camera stores; export a JPEG for this one)"
        ) from None
    except (rawpy.LibRawError, OSError, ValueError) as exc:
        detail = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise InputError(f"cannot read camera RAW file: {detail}") from None
    if thumb.format == rawpy.ThumbFormat.JPEG:
        return bytes(thumb.data), orientation
    return _bitmap(thumb.data, max_pixels), orientation


def _bitmap(array: Any, max_pixels: int) -> Any:
    """An uncompressed preview (H x W x 3 uint8 from LibRaw) as a PIL image."""
    from PIL import Image

    if getattr(array, "ndim", 0) != 3 or array.shape[2] != 3 or array.dtype.name != "uint8":
        raise InputError("camera RAW file with a preview in an unsupported layout")
    height, width = int(array.shape[0]), int(array.shape[1])
    if height * width > max_pixels:
        raise InputError(
            f"image too large: {width}x{height} preview exceeds the "
            f"{max_pixels / 1e6:.0f} MP limit (possible decompression bomb)"
        )
    return Image.fromarray(array, "RGB")
