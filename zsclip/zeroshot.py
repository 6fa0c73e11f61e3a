"""The zero-shot classifier: class names in words -> a [D, C] matrix of unit-length text embeddings.

Prompt ensembling as in the paper (section 3.1.4): every label is written into every template, each prompt is
embedded and L2-normalised, the prompts of a label are averaged, and the average is normalised again. Image
features (normalised) times this matrix are the cosine similarities between images and labels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch

    from zsclip.labels import TemplateSet
    from zsclip.model import CLIP
    from zsclip.tokenizer import Tokenizer

TEXT_BATCH = 256  # prompts per forward pass of the text tower


def make_prompts(labels: Sequence[str], templates: "TemplateSet") -> list[str]:
    """Label-major list: the T prompts of label 0, then those of label 1, ... ([C * T] strings)."""
    return [prompt for label in labels for prompt in templates.prompts(label)]


def encode_texts(
    model: "CLIP", tokenizer: "Tokenizer", texts: Sequence[str], *, device: "torch.device",
    dtype: "torch.dtype | None" = None, batch_size: int = TEXT_BATCH,
) -> "torch.Tensor":
    """Texts -> L2-normalised fp32 features [N, D], on the CPU. Used for prompts and for `embed --text`.

    Texts are sorted by token count and batched in that order, so each batch is only as long as its own longest
    text (CLIP.encode_text cuts the padding; exact under the causal mask); rows come back in input order.
    """
    import torch
    import torch.nn.functional as F

    from zsclip.devices import autocast

    if not texts:
        return torch.zeros(0, model.config.embed_dim)
    tokens = tokenizer(list(texts), context_length=model.config.text.context_length)  # [N, L]
    order = tokens.argmax(dim=-1).argsort(descending=True)  # longest first: end token = largest id
    features = torch.empty(len(texts), model.config.embed_dim)  # [N, D]
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            rows = order[start:start + batch_size]
            with autocast(device, dtype or torch.float32):
                encoded = model.encode_text(tokens[rows].to(device))  # [B, D]
            features[rows] = F.normalize(encoded.float(), dim=-1).cpu()
    return features  # [N, D]


def build_classifier(
    model: "CLIP", tokenizer: "Tokenizer", labels: Sequence[str], templates: "TemplateSet", *,
    device: "torch.device", dtype: "torch.dtype | None" = None,
) -> "torch.Tensor":
    """[D, C] zero-shot weights, fp32 on the CPU: column c is label c's ensembled, renormalised text embedding."""
    import torch.nn.functional as F

    count = len(templates.templates)
    prompts = make_prompts(labels, templates)  # [C * T]
    features = encode_texts(model, tokenizer, prompts, device=device, dtype=dtype)  # [C * T, D]
    per_label = features.view(len(labels), count, -1).mean(dim=1)  # [C, D]: mean of unit prompt vectors
    return F.normalize(per_label, dim=-1).t().contiguous()  # [D, C]


def truncated_prompts(tokenizer: "Tokenizer", labels: Sequence[str], templates: "TemplateSet",
                      context_length: int) -> int:
    """How many prompts are too long for the text tower (they are cut, keeping the end token)."""
    return tokenizer.count_truncated(make_prompts(labels, templates), context_length)
