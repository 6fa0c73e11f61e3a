"""The paper's inference formulas written out step by step, as the tests' independent reference.

Nothing here goes through zsclip's scoring code: each image is normalised by hand from its pixels,
texts go through the text tower padded, in a plain batch (no shared-prefix planning), and prompt
ensembling is spelled out. Only the checkpoint loader and the towers themselves are zsclip's.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

# CLIP's published preprocessing constants, written out, not imported.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


@functools.lru_cache(maxsize=None)
def load(model_path: str):
    """The checkpoint's LoadedModel (model in eval mode on the CPU, tokenizer, preprocessing)."""
    from zsclip.core.checkpoints import load_model

    return load_model(model_path, device="cpu")


def image_features(model_path: str, images: list[str]) -> torch.Tensor:
    """[N, D] unit image features: pixels / 255, normalised by the paper's mean and std, one image
    at a time through the image tower. The images must already be S x S (no resize or crop here)."""
    from PIL import Image

    loaded = load(model_path)
    assert loaded.preprocess.mean == MEAN and loaded.preprocess.std == STD
    size = loaded.preprocess.image_size
    rows = []
    for path in images:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
        assert rgb.size == (size, size), f"{path}: the reference takes {size} x {size} images only"
        data = torch.tensor(list(rgb.tobytes()), dtype=torch.float32)
        pixels = data.view(size, size, 3).permute(2, 0, 1) / 255  # [3, S, S]
        pixels = (pixels - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
        with torch.no_grad():
            rows.append(F.normalize(loaded.model.encode_image(pixels[None]), dim=-1)[0])
    return torch.stack(rows)  # [N, D]


def text_features(model_path: str, texts: list[str]) -> torch.Tensor:
    """[N, D] unit text features: the texts tokenized and padded to the full context, through the
    text tower in one plain batch (no shared-prefix planning)."""
    loaded = load(model_path)
    tokens = loaded.tokenizer(list(texts), context_length=loaded.model.config.text.context_length)
    with torch.no_grad():
        return F.normalize(loaded.model.encode_text(tokens), dim=-1)  # [N, D]


def classifier(model_path: str, labels: list[str], templates: list[str]) -> torch.Tensor:
    """[D, C]: for each label every template filled in, each prompt's unit embedding, their mean,
    normalised again (the paper's prompt ensembling, section 3.1.4)."""
    columns = []
    for label in labels:
        prompts = text_features(model_path, [t.replace("{}", label) for t in templates])  # [T, D]
        columns.append(F.normalize(prompts.mean(dim=0), dim=0))
    return torch.stack(columns, dim=1)  # [D, C]


def scale(model_path: str) -> float:
    """exp(logit_scale), capped at 100 as in the paper."""
    return min(math.exp(load(model_path).model.logit_scale.item()), 100.0)
