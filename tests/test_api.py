"""The Python API in the shape users of OpenAI's clip package know: load, tokenize, available_models."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

import zsclip

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_load_tokenize_and_score_with_the_builtin_model():
    model, preprocess = zsclip.load(device="cpu")
    image = preprocess(Image.open(EXAMPLES / "red-heart.png")).unsqueeze(0)  # [1, 3, S, S]
    assert image.shape == (1, 3, model.config.vision.image_size, model.config.vision.image_size)
    texts = zsclip.tokenize(["a red heart.", "a blue circle.", "a green star."], model)
    assert texts.shape == (3, model.config.text.context_length)
    with torch.no_grad():
        logits_per_image, logits_per_text = model(image, texts)
    assert logits_per_image.argmax().item() == 0
    assert torch.equal(logits_per_text, logits_per_image.t())


def test_available_models_lists_builtin_then_downloadable_names():
    names = zsclip.available_models()
    assert names[0] == "zsclip-shapes"
    assert {"ViT-B/32", "RN50", "ViT-L/14@336px"} <= set(names)
