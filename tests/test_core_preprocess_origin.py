"""Each checkpoint's own preprocessing, exactly: OpenAI and OpenCLIP weights like OpenAI's and
open_clip's pipeline, Hugging Face folders like their preprocessor_config.json read by transformers'
CLIPImageProcessor, on odd image sizes where the two pipelines' center crops differ by a pixel.

open_clip's transform is built from torchvision, which these tests do not install (open_clip is
installed without dependencies and cannot be imported without it). The OpenAI/OpenCLIP reference
below is therefore written here from torchvision's published semantics, with PIL and torch alone:
  Resize(S) on a PIL image: the short side becomes S, the long side int(S * long / short), resized
    by PIL with the requested filter (torchvision hands PIL images to Image.resize);
  CenterCrop(S): top = int(round((H - S) / 2)), left = int(round((W - S) / 2));
  Resize((S, S)) for open_clip's "squash" mode;
  then convert("RGB"), ToTensor (x / 255 as float32, [3, H, W]) and Normalize ((x - mean) / std).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hub_files import tiny_repos
from PIL import Image

from zsclip.core.checkpoints import load_path
from zsclip.core.transform import CLIP_MEAN, CLIP_STD, PreprocessConfig, to_tensor
from zsclip.jobs.inputs import InputItem
from zsclip.jobs.pipeline import DecodeOptions, decode_one

_PIL_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
# float32 arithmetic on the same uint8 pixels: differences are rounding of (x/255 - mean)/std, ~1e-6
TOLERANCE = 1e-4


def torchvision_reference(
    image: Image.Image,
    size: int,
    mean=CLIP_MEAN,
    std=CLIP_STD,
    interpolation: str = "bicubic",
    resize_mode: str = "shortest",
) -> torch.Tensor:
    """OpenAI's `clip._transform` / open_clip's `image_transform(is_train=False)`, as described in the
    module docstring. -> float32 [3, size, size]"""
    resample = _PIL_FILTERS[interpolation]
    if resize_mode == "squash":
        image = image.resize((size, size), resample)
    else:
        width, height = image.size
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = size, int(size * long / short)
        new_size = (new_short, new_long) if width <= height else (new_long, new_short)
        image = image.resize(new_size, resample)
        top = int(round((image.height - size) / 2.0))
        left = int(round((image.width - size) / 2.0))
        image = image.crop((left, top, left + size, top + size))
    image = image.convert("RGB")
    data = torch.tensor(list(image.tobytes()), dtype=torch.uint8).view(size, size, 3)
    x = data.permute(2, 0, 1).to(torch.float32) / 255.0  # [3, S, S]
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def random_image(width: int, height: int, seed: int) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.frombytes("RGB", (width, height), bytes(pixels.flatten().tolist()))


def _crop_margin_3_mod_4(size: int, short: int, long: int) -> bool:
    return (int(size * long / short) - size) % 4 == 3


# At S=224: 333x517 -> 224x347, margin 123; at S=32: 100x110 -> 32x35 and 100x122 -> 32x39. Rounded
# and floored crops differ on each of these (the margin is 3 mod 4); the rest are odd sizes of other
# shapes, both orientations.
SIZES_224 = [(333, 517), (517, 333), (225, 301), (301, 227), (999, 257), (257, 257)]
SIZES_32 = [(100, 110), (122, 100), (333, 517), (47, 61), (33, 1001)]


def _exact_pipeline(tmp_path: Path, image: Image.Image, config: PreprocessConfig) -> torch.Tensor:
    """What `classify --exact-preprocess` computes for a file: decode_one on the exact path, then
    normalize."""
    from zsclip.core.transform import normalize

    path = tmp_path / "odd.png"
    image.save(path)
    options = DecodeOptions.for_model(config.image_size, exact=True)
    decoded = decode_one(InputItem(str(path)), config, options)
    assert decoded.error is None
    return normalize(decoded.pixels, config)


def test_round_offsets_reproduce_the_openai_pipeline_at_224(tmp_path: Path) -> None:
    assert _crop_margin_3_mod_4(224, 333, 517)
    config = PreprocessConfig(image_size=224, crop_offsets="round")
    floored = PreprocessConfig(image_size=224)
    for width, height in SIZES_224:
        image = random_image(width, height, seed=width * 31 + height)
        expected = torchvision_reference(image, 224)
        torch.testing.assert_close(to_tensor(image, config), expected, atol=TOLERANCE, rtol=0)
        exact = _exact_pipeline(tmp_path, image, config)
        torch.testing.assert_close(exact, expected, atol=TOLERANCE, rtol=0)
        if (width, height) == (333, 517):  # the floored crop sits one pixel off the reference
            assert (to_tensor(image, floored) - expected).abs().max() > 0.1


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("origin")
    out = {}
    plain = tiny_repos(root / "plain")
    squash_cfg = {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear"}
    squash = tiny_repos(root / "squash", {**squash_cfg, "resize_mode": "squash"})
    for name, files in (
        ("openclip", plain["openclip"]),
        ("openclip-squash", squash["openclip"]),
        ("transformers", plain["transformers"]),
    ):
        folder = root / name
        folder.mkdir()
        for file, data in files.items():
            (folder / file).write_bytes(data)
        out[name] = folder
    out["openai"] = root / "openai" / "model.pt"
    out["openai"].parent.mkdir()
    for file in ("vocab.json", "merges.txt"):
        (root / "openai" / file).write_bytes(plain["openclip"][file])
    loaded = load_path(plain["own"])
    torch.save(loaded.model.state_dict(), out["openai"])
    return out


@pytest.mark.parametrize(
    "layout, settings",
    [
        ("openai", {}),
        ("openclip", {}),
        (
            "openclip-squash",
            {
                "mean": (0.5,) * 3,
                "std": (0.5,) * 3,
                "interpolation": "bilinear",
                "resize_mode": "squash",
            },
        ),
    ],
)
def test_openai_and_openclip_checkpoints_match_the_open_clip_reference(
    repos, tmp_path, layout: str, settings: dict
) -> None:
    loaded = load_path(repos[layout])
    assert loaded.preprocess.crop_offsets == "round"
    size = loaded.preprocess.image_size
    floor_is_off = []
    for width, height in SIZES_32:
        image = random_image(width, height, seed=width + 7 * height)
        expected = torchvision_reference(image, size, **settings)
        exact = _exact_pipeline(tmp_path, image, loaded.preprocess)
        torch.testing.assert_close(exact, expected, atol=TOLERANCE, rtol=0)
        floored = to_tensor(image, PreprocessConfig(image_size=size))
        floor_is_off.append(bool((floored - expected).abs().max() > 0.1))
    if not settings:  # 100x110 and 122x100 have a crop margin of 3 mod 4: floor misses there
        assert floor_is_off[:2] == [True, True]


@pytest.fixture(scope="module")
def hf_processor_class():
    """transformers' PIL-based CLIP processor (CLIPImageProcessorPil in 5.x, CLIPImageProcessor in 4.x)."""
    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        return CLIPImageProcessorPil
    except ImportError:
        return pytest.importorskip("transformers").CLIPImageProcessor


@pytest.mark.parametrize("resample", [3, 2])
def test_huggingface_folders_match_their_preprocessor_config(
    repos, tmp_path, hf_processor_class, resample: int
) -> None:
    folder = repos["transformers"]
    size = 32
    config = {
        "do_resize": True,
        "size": {"shortest_edge": size},
        "resample": resample,
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.4, 0.5, 0.6],
        "image_std": [0.2, 0.25, 0.3],
        "do_convert_rgb": True,
        "image_processor_type": "CLIPImageProcessor",
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(config))
    try:
        loaded = load_path(folder)
        processor = hf_processor_class.from_pretrained(folder)
    finally:
        (folder / "preprocessor_config.json").unlink()
    assert loaded.preprocess.crop_offsets == "floor"
    assert loaded.preprocess.interpolation == {3: "bicubic", 2: "bilinear"}[resample]
    for width, height in SIZES_32:
        image = random_image(width, height, seed=width * 3 + height)
        expected = processor(image, return_tensors="pt")["pixel_values"][0]  # [3, S, S]
        exact = _exact_pipeline(tmp_path, image, loaded.preprocess)
        torch.testing.assert_close(exact, expected, atol=TOLERANCE, rtol=0)


def test_a_preprocessor_config_that_resizes_elsewhere_is_refused(repos) -> None:
    from zsclip.errors import UserError

    folder = repos["transformers"]
    config = {"size": {"shortest_edge": 40}, "crop_size": 32, "do_center_crop": True}
    (folder / "preprocessor_config.json").write_text(json.dumps(config))
    try:
        with pytest.raises(UserError, match="resizes to .*not to the model's 32 px input"):
            load_path(folder)
    finally:
        (folder / "preprocessor_config.json").unlink()


def test_an_open_clip_resize_mode_zsclip_cannot_reproduce_is_refused(repos, tmp_path) -> None:
    from zsclip.errors import UserError

    folder = tmp_path / "longest"
    folder.mkdir()
    for file in repos["openclip"].iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    data = json.loads((folder / "open_clip_config.json").read_text())
    data["preprocess_cfg"] = {"resize_mode": "longest"}
    (folder / "open_clip_config.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="resize_mode 'longest' is not supported"):
        load_path(folder)
