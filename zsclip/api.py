"""The Python API, in the shape users of OpenAI's `clip` package know.

model, preprocess = zsclip.load("ViT-B/32")   # a name, a path in any supported format, or None
(built-in) image = preprocess(PIL.Image.open("corgi.jpg")).unsqueeze(0) text = zsclip.tokenize(["a
photo of a corgi.", "a photo of a cat."], model) logits_per_image, logits_per_text = model(image,
text)
"""

from __future__ import annotations

import os
import weakref

import torch

from zsclip.core.checkpoints import LoadedModel, load_model
from zsclip.core.model import CLIP
from zsclip.core.transform import Preprocess
from zsclip.paths import builtin_models

# Tokenizers of models handed out by `load`, so `tokenize(texts, model)` uses the model's own
# vocabulary; weak keys, so a model the caller drops is not kept alive here.
_TOKENIZERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def load(
    name_or_path: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    *,
    vocab: str | os.PathLike | None = None,
    offline: bool = False,
) -> tuple[CLIP, Preprocess]:
    """A model in eval mode and the preprocessing it expects. Device defaults to CUDA when available."""
    loaded = load_full(name_or_path, device=device, vocab=vocab, offline=offline)
    return loaded.model, Preprocess(loaded.preprocess)


def load_full(
    name_or_path: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    *,
    vocab: str | os.PathLike | None = None,
    offline: bool = False,
) -> LoadedModel:
    """Like `load`, but returns everything the checkpoint holds: tokenizer, preprocessing config,
    metadata."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = load_model(name_or_path, vocab=vocab, device=device, offline=offline)
    _TOKENIZERS[loaded.model] = loaded.tokenizer
    return loaded


def tokenize(
    texts: str | list[str], model: CLIP | None = None, context_length: int | None = None
) -> torch.Tensor:
    """Token ids [N, context_length] for `model` (one returned by `load`); without a model, the
    built-in one's."""
    tokenizer = _TOKENIZERS.get(model) if model is not None else None
    if tokenizer is None:
        if model is not None:
            raise ValueError(
                "tokenize() needs a model returned by zsclip.load(), or model=None for the built-in one"
            )
        tokenizer = load_model(None).tokenizer
    if context_length is None and model is not None:
        context_length = model.config.text.context_length
    return tokenizer(texts, context_length=context_length)


def available_models() -> list[str]:
    """Names `load` accepts: the built-in models, then the downloadable ones."""
    names = [p.stem for p in builtin_models()]
    try:
        from zsclip.core import catalogue as hub
    except ImportError:
        return names
    return names + list(hub.known_names())
