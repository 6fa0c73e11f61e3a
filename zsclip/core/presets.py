"""Model configurations and the named architectures: one registry of presets.

A CLIPConfig is all a model needs to be built (zsclip.core.model.build_model) and is stored whole in
zsclip's checkpoints. PRESETS holds the nine published OpenAI architectures and small ones sized for
tests and CPU training; names match without regard to case, and `/` or `@` may be written as `-`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class VisionConfig:
    kind: str = "vit"  # "vit" (patch transformer) or "resnet" (the paper's modified ResNet)
    image_size: int = 224  # input side in pixels; images are square after preprocessing
    width: int = 768  # ViT: token width. ResNet: channels of the first stage (64 for RN50)
    # ViT: transformer blocks. ResNet: bottleneck blocks per stage (4 stages)
    layers: int | tuple[int, ...] = 12
    heads: int = 12  # ViT: attention heads. ResNet: heads of the attention-pooling layer
    patch_size: int = 32  # ViT only: side of a square patch
    mlp_ratio: float = 4.0  # ViT only: hidden width of each MLP / token width
    # ViT only: "patch" (one strided conv, as published) or "conv" (see ConvStem)
    stem: str = "patch"

    def __post_init__(self) -> None:
        if isinstance(self.layers, list):
            self.layers = tuple(self.layers)
        if self.kind not in ("vit", "resnet"):
            raise ValueError(f"vision kind must be 'vit' or 'resnet', not {self.kind!r}")
        if self.kind == "resnet" and not (isinstance(self.layers, tuple) and len(self.layers) == 4):
            raise ValueError(
                "a ResNet vision tower needs four stage depths, e.g. layers=(3, 4, 6, 3)"
            )
        if self.stem not in ("patch", "conv"):
            raise ValueError(f"vision stem must be 'patch' or 'conv', not {self.stem!r}")


@dataclass
class TextConfig:
    context_length: int = 77  # tokens per text, start and end tokens included
    vocab_size: int = 49408  # the standard BPE vocabulary; smaller for a trained tokenizer
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0


@dataclass
class CLIPConfig:
    embed_dim: int = 512  # size of the joint image-text embedding space
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    # OpenAI's weights were trained with QuickGELU; running them with GELU loses accuracy
    quick_gelu: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CLIPConfig":
        return cls(
            embed_dim=data["embed_dim"],
            vision=VisionConfig(**data["vision"]),
            text=TextConfig(**data["text"]),
            quick_gelu=data.get("quick_gelu", True),
        )


def _vit(embed, image, patch, width, layers, text_width, text_layers=12) -> CLIPConfig:
    return CLIPConfig(
        embed_dim=embed,
        vision=VisionConfig("vit", image, width, layers, width // 64, patch),
        text=TextConfig(width=text_width, heads=text_width // 64, layers=text_layers),
    )


def _resnet(embed, image, width, layers, text_width) -> CLIPConfig:
    return CLIPConfig(
        embed_dim=embed,
        vision=VisionConfig("resnet", image, width, layers, width * 32 // 64),
        text=TextConfig(width=text_width, heads=text_width // 64, layers=12),
    )


# The nine published OpenAI architectures, and small ones sized for CPU training and tests.
PRESETS: dict[str, CLIPConfig] = {
    "RN50": _resnet(1024, 224, 64, (3, 4, 6, 3), 512),
    "RN101": _resnet(512, 224, 64, (3, 4, 23, 3), 512),
    "RN50x4": _resnet(640, 288, 80, (4, 6, 10, 6), 640),
    "RN50x16": _resnet(768, 384, 96, (6, 8, 18, 8), 768),
    "RN50x64": _resnet(1024, 448, 128, (3, 15, 36, 10), 1024),
    "ViT-B/32": _vit(512, 224, 32, 768, 12, 512),
    "ViT-B/16": _vit(512, 224, 16, 768, 12, 512),
    "ViT-L/14": _vit(768, 224, 14, 1024, 24, 768),
    "ViT-L/14@336px": _vit(768, 336, 14, 1024, 24, 768),
    # Tests: builds in milliseconds, still exercises every code path of the ViT tower.
    "tiny": CLIPConfig(
        embed_dim=32,
        vision=VisionConfig("vit", image_size=32, width=64, layers=2, heads=2, patch_size=8),
        text=TextConfig(context_length=77, width=64, heads=2, layers=2),
    ),
    # Tests of the ResNet tower at a size CI can afford.
    "tiny-resnet": CLIPConfig(
        embed_dim=32,
        vision=VisionConfig("resnet", image_size=64, width=16, layers=(1, 1, 1, 1), heads=4),
        text=TextConfig(context_length=77, width=64, heads=2, layers=2),
    ),
    # About 1.5 M parameters at 64 px with a learned ~1k-token vocabulary: trains on 2 CPU cores in
    # minutes.
    "small": CLIPConfig(
        embed_dim=128,
        vision=VisionConfig(
            "vit", image_size=64, width=128, layers=4, heads=4, patch_size=8, stem="conv"
        ),
        text=TextConfig(context_length=32, vocab_size=1024, width=128, heads=4, layers=4),
        quick_gelu=False,
    ),
    # The built-in model's architecture (weights/README.md): the paper's modified ResNet at 64 px,
    # one bottleneck per stage, and the small text tower. On the shapes world it learns shape about
    # 3x faster per image than the ViT above, for ~30% more compute per image. About 2.3 M
    # parameters with a ~700-token vocabulary.
    "small-resnet": CLIPConfig(
        embed_dim=128,
        vision=VisionConfig("resnet", image_size=64, width=16, layers=(1, 1, 1, 1), heads=8),
        text=TextConfig(context_length=32, vocab_size=1024, width=128, heads=4, layers=4),
        quick_gelu=False,
    ),
}


def canonical_preset_name(name: str) -> str | None:
    """The registry key for `name`, accepting `ViT-B-32` for `ViT-B/32` and any letter case; None if
    unknown."""

    def squash(text: str) -> str:
        return text.lower().replace("/", "-")

    wanted = squash(name)
    return next((key for key in PRESETS if squash(key) == wanted), None)


def get_preset(name: str) -> CLIPConfig:
    key = canonical_preset_name(name)
    if key is None:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return CLIPConfig.from_dict(PRESETS[key].to_dict())  # a fresh copy the caller may change
