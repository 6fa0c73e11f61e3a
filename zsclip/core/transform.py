"""CLIP image preprocessing with PIL and torch only: a file becomes an upright RGB image, then a
tensor.

Two steps, kept apart so a loader can decode in worker processes and batch later:

    image = load_image(path, draft_size=224)        # PIL.Image, RGB, upright, first frame; InputError if bad
    pixels = to_tensor(image, PreprocessConfig())   # FloatTensor [3, 224, 224], normalised
                                                    # = normalize(to_pixels(image, config), config)

Which pipeline `to_tensor` matches depends on `PreprocessConfig.crop_offsets`, which a checkpoint's
loader sets from where the weights came from: "round" for OpenAI and OpenCLIP checkpoints, which then
match OpenAI's and open_clip's torchvision pipeline, "floor" for Hugging Face folders and zsclip's
own files, which match the following. With "floor" it is
Hugging Face transformers' PIL-based CLIPImageProcessor (the "slow" one:
`CLIPImageProcessor` in transformers 4.x, `CLIPImageProcessorPil` in 5.x). On RGB images its pixel values
come out identical here (the tests hold them to 1e-5), because it does the same steps:
  * resize: the shortest side becomes S and the long side `int(S * long / short)` (truncated, not rounded),
    done by PIL on the uint8 image with `Image.resize(..., BICUBIC)`;
  * center crop: offsets `(H - S) // 2` and `(W - S) // 2` (floor);
  * then `x / 255`, then `(x - mean) / std` with the CLIP mean and std.
OpenAI's published pipeline (torchvision `Resize(S, BICUBIC)`, `CenterCrop(S)`, `ToTensor`, `Normalize`) computes
the same resized size and also resizes with PIL on PIL images. Two differences: torchvision's CenterCrop rounds
its offsets (`int(round((H - S) / 2))`, halves to even), so when `H - S` is 3 mod 4 its crop sits one pixel
lower (or further right) than the floored one (crop_offsets="round" reproduces it); and OpenAI converts RGBA
to RGB after the resize by dropping alpha (whatever colour hides under transparent pixels shows), where we
composite on a background first. On RGB images, which is what `load_image` returns for every file, the
"round" path equals OpenAI's and open_clip's pipeline.

What this module adds that neither reference does (see `load_image`): EXIF orientation, every PIL
mode to RGB with transparency composited on `PreprocessConfig.background` (white by default, as
transformers does), 16-bit images scaled rather than clipped, refusal of truncated files and
decompression bombs, and draft decoding: a JPEG is decoded at 1/2, 1/4 or 1/8 size (the decoder's DCT
scaling) and any image still twice the target is box-averaged by a whole factor, as long as the
shortest side stays >= the draft size. Pass `draft_size=None` for the exact path. Memory: the
conversion to RGB runs a band of rows at a time, so decoding costs the decoded pixels plus the RGB
result (tiny on the draft path), never a chain of full-size copies; `decode_cost` estimates that
peak from the header, for callers that share a memory budget between decoding threads.

One more departure, for safety only: when the resized intermediate image would exceed
`_MAX_RESIZE_PIXELS` (aspect ratios beyond about 600:1 at S=224, e.g. a 100000x1 image), only the
part that survives the crop is resampled (PIL's `box=`). PIL then runs its two 1-D passes in the
other order, so pixels can differ from the full resize by uint8 rounding of the intermediate (a few
levels on smooth images, up to ~20 on pure noise). `to_pixels(..., resample_crop_only=True)` takes
that route for every image; classify and embed do so on their default (draft) path, where it saves
about a quarter of the resizing of a 4:3 photo (on photos, 1 level in ~1e-4 of the pixels).
"""

from __future__ import annotations

import io
import json
import os
import re
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Union

import torch
from PIL import Image, JpegImagePlugin

from zsclip.core.imagefile import check_file as _check_file
from zsclip.core.imagefile import is_raw_name
from zsclip.errors import InputError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Images with more pixels than this (from the header, before decoding) are refused as likely
# decompression bombs. 120 MP covers every phone and most camera photos (a 100-MP medium-format
# frame is 11648x8736). PIL's own global guard (Image.MAX_IMAGE_PIXELS, which we never change)
# raises above twice its value (~179 MP by default) and warns above it (~89 MP); whichever limit is
# lower wins.
DEFAULT_MAX_PIXELS = 120_000_000

# Above this many pixels in the resized-but-uncropped image, resample only the crop (see module
# docstring).
_MAX_RESIZE_PIXELS = 32 * 1024 * 1024

# Images are converted to RGB a band of rows at a time, each band's RGBA copy about this many bytes,
# so the conversion's temporaries stay small whatever the image size; a band makes about this many
# such temporaries at once (crop, RGBA, background, composite, RGB).
_BAND_BYTES = 4 * 1024 * 1024
_BAND_TEMPORARIES = 5

_RESAMPLING = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
_RESIZE_MODES = ("shortest", "squash")
# How the center crop places its window when the margin is odd: "floor" as transformers'
# CLIPImageProcessor ((H - S) // 2), "round" as torchvision's CenterCrop in OpenAI's and open_clip's
# pipelines (round((H - S) / 2), halves to even). They differ by one pixel when H - S is 3 mod 4.
_CROP_OFFSETS = ("floor", "round")

# Formats PIL may open for us. Left out on purpose: EPS (runs Ghostscript on the file), WMF, and the
# stub or scientific formats (FITS, HDF5, GRIB, ...), which no photo folder holds and which widen
# the attack surface.
_SAFE_FORMATS = (
    "JPEG",
    "PNG",
    "GIF",
    "WEBP",
    "TIFF",
    "BMP",
    "DIB",
    "AVIF",
    "HEIF",
    "JPEG2000",
    "PPM",
    "TGA",
    "ICO",
    "ICNS",
    "PCX",
    "SGI",
    "QOI",
    "PSD",
)

# EXIF orientation -> the transpose that makes the image upright (EXIF 2.3, tag 0x0112).
_ORIENTATION_TAG = 0x0112
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@dataclass(frozen=True)
class PreprocessConfig:
    """How an image becomes the model's input. Stored in checkpoint metadata (to_dict is JSON-able)."""

    image_size: int = 224  # S: the model's input is S x S
    mean: tuple[float, float, float] = CLIP_MEAN  # per-channel, on [0, 1] pixels
    std: tuple[float, float, float] = CLIP_STD
    interpolation: str = "bicubic"  # PIL resampling filter for the resize (one of _RESAMPLING)
    # "shortest": shortest side to S then center crop; "squash": straight to S x S
    resize_mode: str = "shortest"
    background: tuple[int, int, int] = (
        255,
        255,
        255,
    )  # transparent pixels are composited on this colour
    # "floor" (transformers, and zsclip's own checkpoints written before this field existed)
    # or "round" (OpenAI and open_clip checkpoints): see _CROP_OFFSETS
    crop_offsets: str = "floor"

    def __post_init__(self) -> None:
        # Accept lists (from JSON) but store tuples, so configs compare and hash by value.
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        object.__setattr__(self, "background", tuple(int(v) for v in self.background))
        if (
            not isinstance(self.image_size, int)
            or isinstance(self.image_size, bool)
            or self.image_size < 1
        ):
            raise ValueError(f"image_size must be a positive integer, not {self.image_size!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std need three values each, and std must be positive")
        if len(self.background) != 3 or not all(0 <= v <= 255 for v in self.background):
            raise ValueError(
                f"background must be three integers in 0..255, not {self.background!r}"
            )
        if self.interpolation not in _RESAMPLING:
            raise ValueError(
                f"interpolation must be one of {', '.join(_RESAMPLING)}, not {self.interpolation!r}"
            )
        if self.crop_offsets not in _CROP_OFFSETS:
            raise ValueError(
                f"crop_offsets must be one of {', '.join(_CROP_OFFSETS)}, not {self.crop_offsets!r}"
            )
        if self.resize_mode not in _RESIZE_MODES:
            raise ValueError(
                f"resize_mode must be one of {', '.join(_RESIZE_MODES)}, not {self.resize_mode!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only (tuples become lists)."""
        return {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in asdict(self).items()
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessConfig:
        """Inverse of to_dict. Unknown keys are ignored (written by a newer zsclip); bad values raise
        ValueError."""
        known = {key: value for key, value in data.items() if key in cls.__dataclass_fields__}
        return cls(**known)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PreprocessConfig:
        return cls.from_dict(json.loads(text))


# ---------------------------------------------------------------------------------------------------------
# Files -> upright RGB images


def load_image(
    path: str | os.PathLike[str],
    *,
    draft_size: int | None = None,
    background: tuple[int, int, int] = (255, 255, 255),
    max_pixels: int = DEFAULT_MAX_PIXELS,
    reserve: Callable[[int], None] | None = None,
) -> Image.Image:
    """Decode an image file fully into an upright RGB PIL image (the first frame of an animation).

    draft_size: shrink while decoding as far as both sides stay >= draft_size, so the shortest side
    is never below the resize target, whatever the EXIF rotation. JPEGs let the decoder scale down
    by 1/2, 1/4 or 1/8 (DCT scaling); then any image (PNG, or a JPEG still twice the size) is
    box-averaged by the largest whole factor that keeps both sides >= draft_size, band by band as it
    is converted to RGB, so no full-size RGB copy is ever made. None decodes at full size (the
    exact path). Measured on a synthetic photo (shapes, lines, noise) with S=224, cosine of the
    final tensors to the exact path: 4000x3000 -> 1/8 (500x375) 0.99973; 1600x1200 -> 1/4 0.99956;
    640x480 -> 1/2 (320x240) 0.99675. draft_size=2*S keeps more detail (4000x3000 -> 1/4, 0.99997;
    640x480 stays exact) for less speed. background: colour that transparent pixels are composited
    on. max_pixels: refuse images whose header declares more pixels than this, before decoding
    anything. reserve: called once with `decode_cost(...)`, the estimated peak bytes of decoding
    this image (and of `to_pixels` on the result), after the header is read and before any pixel is
    decoded; it may block (a memory budget shared by decoding threads).

    Raises InputError with a one-line reason for anything that is not a readable, complete image.
    """
    path = Path(path)
    _check_file(path)
    if is_raw_name(path.name):
        return _decode_raw(path, draft_size, background, max_pixels, reserve)
    try:
        with open(path, "rb") as fp:
            return _decode(fp, draft_size, background, max_pixels, reserve)
    except PermissionError:
        raise InputError("permission denied") from None
    except IsADirectoryError:
        raise InputError("is a directory, not an image file") from None


def load_image_bytes(
    data: bytes,
    *,
    draft_size: int | None = None,
    background: tuple[int, int, int] = (255, 255, 255),
    max_pixels: int = DEFAULT_MAX_PIXELS,
    reserve: Callable[[int], None] | None = None,
    name: str | None = None,
) -> Image.Image:
    """`load_image` for an image already in memory (an upload): the same decoding, checks and
    one-line reasons. `name`, the file's name where known, marks camera RAW files (read through
    their preview as from disk)."""
    if not data:
        raise InputError("empty file (0 bytes)")
    if name is not None and is_raw_name(name):
        return _decode_raw(io.BytesIO(data), draft_size, background, max_pixels, reserve)
    return _decode(io.BytesIO(data), draft_size, background, max_pixels, reserve)


def _decode_raw(
    path: Path | io.BytesIO,
    draft_size: int | None,
    background: tuple[int, int, int],
    max_pixels: int,
    reserve: Callable[[int], None] | None,
) -> Image.Image:
    """A camera RAW file through its embedded preview (zsclip.core.rawfile), with the same checks:
    a JPEG preview is decoded like any JPEG (header limit, memory budget, truncation)."""
    from zsclip.core.rawfile import read_preview

    try:
        preview, orientation = read_preview(path, max_pixels)
    except PermissionError:
        raise InputError("permission denied") from None
    if isinstance(preview, bytes):
        fp = io.BytesIO(preview)
        return _decode(fp, draft_size, background, max_pixels, reserve, orientation)
    if reserve is not None:  # LibRaw has decoded it already; the transpose is still to come
        reserve(decode_cost(preview.size, preview.mode))
    method = _UPRIGHT.get(orientation)
    return preview.transpose(method) if method is not None else preview


def _decode(
    fp: Any,
    draft_size: int | None,
    background: tuple[int, int, int],
    max_pixels: int,
    reserve: Callable[[int], None] | None,
    fallback_orientation: int = 1,
) -> Image.Image:
    """Open, check and decode one image; `fallback_orientation` applies when the file states none
    (a RAW file's preview, whose orientation LibRaw read from the RAW container)."""
    try:
        image = Image.open(fp, formats=_safe_formats())
    except Image.UnidentifiedImageError:
        raise InputError("not an image (or not a supported image format)") from None
    except Image.DecompressionBombError as exc:
        raise InputError(_too_large(_first_int(str(exc)), max_pixels)) from None
    except Exception as exc:  # noqa: BLE001 - one bad file must never end the run; say why and move on
        raise InputError(f"corrupt image header: {_one_line(exc)}") from None
    try:
        width, height = image.size
        if width * height > max_pixels:
            raise InputError(_too_large(width * height, max_pixels, f"{width}x{height}"))
        if draft_size is not None and isinstance(image, JpegImagePlugin.JpegImageFile):
            # PIL picks the largest scale s in {8,4,2,1} with s <= min(W // d, H // d), so ceil(W/s)
            # >= d and ceil(H/s) >= d: both sides stay >= d. A square request keeps that true after
            # EXIF rotation.
            image.draft("RGB", (draft_size, draft_size))
        if reserve is not None:
            reserve(decode_cost(image.size, image.mode, draft_size))
        _load_pixels(image, max_pixels)
        orientation = _orientation(image)
        if orientation == 1:
            orientation = fallback_orientation
        # always a new image, independent of the file
        rgb = _convert(image, background, reduce_factor(image.size, draft_size))
    finally:
        image.close()  # frees the decoded full-size pixels now, before the transpose copies rgb
    method = _UPRIGHT.get(orientation)
    return rgb.transpose(method) if method is not None else rgb


def reduce_factor(size: tuple[int, int], draft_size: int | None) -> int:
    """The whole factor a decoded image of `size` is box-averaged by: the largest that keeps both
    sides >= draft_size (1 when draft_size is None or the image is small)."""
    if draft_size is None or draft_size < 1:
        return 1
    return max(1, min(size) // draft_size)


def _bytes_per_pixel(mode: str) -> int:
    # PIL keeps 1-byte modes ("1", "L", "P") and 16-bit ones as such; everything else (RGB included)
    # in 4-byte pixels.
    if mode in ("1", "L", "P"):
        return 1
    return 2 if mode.startswith("I;16") else 4


def decode_cost(size: tuple[int, int], mode: str, draft_size: int | None = None) -> int:
    """Estimated peak bytes of `load_image` (and `to_pixels` on its result) for an image whose header
    says `size` (after any JPEG draft) and `mode`: the decoded pixels, the RGB result (reduced by
    `reduce_factor` on the draft path), an EXIF transpose of it, and the band temporaries."""
    width, height = size
    factor = reduce_factor(size, draft_size)
    decoded = width * height * _bytes_per_pixel(mode)
    rgb = -(-width // factor) * -(-height // factor) * 4
    # the decoded image is closed before the transpose: the peak is the larger of the two stages
    band = min(_band_bytes(width), width * height * 4)
    return max(decoded + rgb, 2 * rgb) + _BAND_TEMPORARIES * band


def _load_pixels(image: Image.Image, max_pixels: int) -> None:
    """Decode everything now, so a truncated file raises here (we never set LOAD_TRUNCATED_IMAGES)."""
    try:
        image.load()
    except Image.DecompressionBombError as exc:  # e.g. a GIF frame larger than its header said
        raise InputError(_too_large(_first_int(str(exc)), max_pixels)) from None
    except Exception as exc:  # noqa: BLE001 - decoders raise OSError, SyntaxError, struct.error, ...
        message = _one_line(exc)
        if "truncated" in message.lower():
            raise InputError(f"truncated image file ({message})") from None
        raise InputError(f"cannot decode image: {message}") from None


def _safe_formats() -> tuple[str, ...]:
    # registers every plugin once; Image.open needs a format to be registered to be listed
    Image.init()
    _register_heif()
    return tuple(name for name in _SAFE_FORMATS if name in Image.OPEN)


_heif_lock = threading.Lock()
_heif_done = False


def _register_heif() -> None:
    """Teach PIL to open HEIC/HEIF (iPhone photos) through pillow-heif, once, on first decode: the
    import costs tens of milliseconds that `zsclip --help` should not pay. AVIF is Pillow's own.
    Decoding threads may race here, hence the lock. Without pillow-heif (a broken install) HEIC
    files are refused like any unknown format."""
    global _heif_done
    if _heif_done:
        return
    with _heif_lock:
        if _heif_done:
            return
        try:
            from pillow_heif import register_heif_opener
        except ImportError:
            pass
        else:
            register_heif_opener()
        _heif_done = True


def _orientation(image: Image.Image) -> int:
    """The EXIF (or XMP) orientation, 1 when absent, unreadable or out of range: broken EXIF never
    fails a load."""
    try:
        value = image.getexif().get(_ORIENTATION_TAG, 1)
        return int(value) if int(value) in _UPRIGHT else 1
    except Exception:  # noqa: BLE001 - malformed EXIF comes in endless shapes; it must not cost the image
        return 1


def _too_large(pixels: int | None, limit: int, dims: str = "") -> str:
    size = f"{dims} = " if dims else ""
    megapixels = f"{pixels / 1e6:.0f} MP" if pixels else "too many pixels"
    return f"image too large: {size}{megapixels} exceeds the {limit / 1e6:.0f} MP limit (possible decompression bomb)"


def _first_int(text: str) -> int | None:
    match = re.search(r"\d+", text)
    return int(match.group()) if match else None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any PIL mode -> a new RGB image. Transparency (alpha band or palette/tRNS transparency) is
    composited on `background`; 16-bit and 32-bit integer and float images are scaled to 0..255
    rather than clipped."""
    return _convert(image, background, 1)


def _band_bytes(width: int) -> int:
    # one band's RGBA crop: the size the band height is chosen for, or one row when rows are wider
    return max(_BAND_BYTES, 4 * width)


def _convert(image: Image.Image, background: tuple[int, int, int], factor: int) -> Image.Image:
    """`to_rgb`, then a `factor` x `factor` box average (Image.reduce), done a band of rows at a time.

    Every step is per pixel (or per factor x factor block, and bands start on block edges), so the
    result equals converting the whole image at once; but the temporaries (an RGBA copy, the
    background, the composite, the 8-bit copy of a 16-bit image) are one band each instead of full
    size, and on the draft path the full-size RGB image never exists.
    """
    width, height = image.size
    depth = _depth_range(image)  # from the whole image: a band's own range would differ
    rows = max(1, _band_bytes(width) // (4 * max(1, width)))
    rows = max(factor, rows // factor * factor)
    out = Image.new("RGB", (-(-width // factor), -(-height // factor)))
    for top in range(0, height, rows):
        band = _band_to_rgb(image.crop((0, top, width, min(height, top + rows))), background, depth)
        out.paste(band.reduce(factor) if factor > 1 else band, (0, top // factor))
    return out


def _band_to_rgb(
    image: Image.Image, background: tuple[int, int, int], depth: tuple[float, float] | None
) -> Image.Image:
    """One band (a fresh crop, so it may be returned as is) -> RGB."""
    if depth is not None:
        image = _high_depth_to_l(image, *depth)
    has_alpha = (
        "A" in image.getbands() or "transparency" in image.info or image.mode in ("RGBa", "La")
    )
    try:
        if has_alpha:
            rgba = image if image.mode == "RGBA" else image.convert("RGBA")  # palette/tRNS -> alpha
            under = Image.new("RGBA", image.size, (*background, 255))
            return Image.alpha_composite(under, rgba).convert("RGB")
        return image if image.mode == "RGB" else image.convert("RGB")
    except ValueError as exc:  # a mode PIL cannot convert (e.g. "La")
        raise InputError(f"unsupported colour mode {image.mode}: {_one_line(exc)}") from None


def _depth_range(image: Image.Image) -> tuple[float, float] | None:
    """The value range a 16/32-bit integer or float single-band image is scaled from onto 0..255
    (None for 8-bit modes)."""
    if image.mode.startswith("I;16"):
        return 0.0, 65535.0
    if image.mode not in ("I", "F"):
        return None
    low, high = (float(v) for v in image.getextrema())
    if image.mode == "F" and 0.0 <= low and high <= 1.0:
        return 0.0, 1.0  # float images in [0, 1]
    if 0.0 <= low and high <= 255.0:
        return 0.0, 255.0  # already 8-bit values
    if 0.0 <= low and high <= 65535.0:
        return 0.0, 65535.0  # 16-bit data held in a 32-bit mode (older PIL, TIFF)
    return low, high  # stretch the actual range (signed or unusual data)


def _high_depth_to_l(image: Image.Image, low: float, high: float) -> Image.Image:
    """16/32-bit integer or float single-band image -> "L", mapping low..high onto 0..255."""
    scale = 255.0 / (high - low) if high > low else 0.0
    source = image if image.mode in ("I", "F") else image.convert("I")
    # point() with a linear function maps in place in the "I"/"F" domain; +0.5 rounds on the way to
    # "L".
    return source.point(lambda v: v * scale + (0.5 - low * scale)).convert("L")


# ---------------------------------------------------------------------------------------------------------
# RGB images -> tensors


def to_tensor(image: Image.Image, config: PreprocessConfig) -> torch.Tensor:
    """PIL image -> normalised FloatTensor [3, S, S]. Non-RGB images are converted with `to_rgb` first
    (no EXIF handling here: `load_image` does that for files). See the module docstring for the
    exact recipe."""
    return normalize(to_pixels(image, config), config)


def to_pixels(
    image: Image.Image, config: PreprocessConfig, *, resample_crop_only: bool = False
) -> torch.Tensor:
    """The resize and crop alone: PIL image -> uint8 [3, S, S]. A quarter of the float size, so loaders
    can keep or ship these and call `normalize` on a whole batch (on the model's device) later.

    resample_crop_only: resample only the source region the center crop keeps (PIL's `box=`), at the
    same scale. About 25% less resizing for a 4:3 photo; pixels can differ from the reference by
    uint8 rounding (1 level in ~1e-4 of them on photos), so the draft path uses it and the exact
    path does not."""
    if image.mode != "RGB":
        image = to_rgb(image, config.background)
    size = config.image_size
    resample = _RESAMPLING[config.interpolation]
    if config.resize_mode == "squash":
        image = image.resize((size, size), resample=resample)
    else:
        image = _resize_and_crop(
            image,
            size,
            resample,
            crop_only=resample_crop_only,
            rounded=config.crop_offsets == "round",
        )
    # Planes straight from PIL (R, G, B one after another) rather than a torch permute of [S, S, 3]:
    # the permute copy goes through torch's thread pool, which costs milliseconds when called from
    # decoding threads.
    planes = b"".join(band.tobytes() for band in image.split())
    return torch.frombuffer(bytearray(planes), dtype=torch.uint8).view(3, size, size)  # [3, S, S]


def normalize(pixels: torch.Tensor, config: PreprocessConfig) -> torch.Tensor:
    """uint8 [..., 3, S, S] (one image or a batch, any device) -> float32 (x / 255 - mean) / std."""
    mean = torch.tensor(config.mean, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    std = torch.tensor(config.std, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    return (pixels.to(torch.float32) / 255.0 - mean) / std  # [..., 3, S, S]


def _resize_and_crop(
    image: Image.Image,
    size: int,
    resample: Image.Resampling,
    *,
    crop_only: bool = False,
    rounded: bool = False,
) -> Image.Image:
    """Shortest side -> size (long side truncated, as transformers and torchvision do), then center
    crop with floored offsets, or rounded ones (`rounded`, torchvision's CenterCrop)."""
    width, height = image.size
    if width <= height:
        new_width, new_height = size, int(size * height / width)
    else:
        new_width, new_height = int(size * width / height), size
    if rounded:
        left, top = int(round((new_width - size) / 2.0)), int(round((new_height - size) / 2.0))
    else:
        left, top = (new_width - size) // 2, (new_height - size) // 2
    if not crop_only and new_width * new_height <= _MAX_RESIZE_PIXELS:
        resized = image.resize((new_width, new_height), resample=resample)
        return resized.crop((left, top, left + size, top + size))
    # Resample only the source region that maps onto the crop, at the same scale: asked for, or an
    # extreme aspect ratio whose full resize would be huge.
    sx, sy = width / new_width, height / new_height
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    return image.resize((size, size), resample=resample, box=box)


ImageInput = Union[Image.Image, str, os.PathLike]


class Preprocess:
    """The callable `zsclip.load()` returns: a PIL image (any mode) or a path -> FloatTensor [3, S, S].

    Paths go through `load_image` (EXIF orientation, checks, transparency); with `draft=True` large
    images are decoded at a reduced scale (faster, very close); the default is the exact path.
    """

    def __init__(self, config: PreprocessConfig | None = None, *, draft: bool = False) -> None:
        self.config = config if config is not None else PreprocessConfig()
        self.draft = draft

    def load(self, path: str | os.PathLike[str]) -> Image.Image:
        draft_size = self.config.image_size if self.draft else None
        return load_image(path, draft_size=draft_size, background=self.config.background)

    def __call__(self, image: ImageInput) -> torch.Tensor:
        if not isinstance(image, Image.Image):
            image = self.load(image)
        return to_tensor(image, self.config)

    def __repr__(self) -> str:
        return f"Preprocess({self.config!r}, draft={self.draft})"
