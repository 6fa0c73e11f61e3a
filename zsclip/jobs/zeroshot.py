"""The zero-shot classifier: class names in words -> a [D, C] matrix of unit-length text embeddings.

Prompt ensembling as in the paper (section 3.1.4): every label is written into every template, each
prompt is embedded and L2-normalised, the prompts of a label are averaged, and the average is
normalised again. Image features (normalised) times this matrix are the cosine similarities between
images and labels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    import torch

    from zsclip.core.checkpoints import LoadedModel
    from zsclip.core.model import CLIP
    from zsclip.core.tokenizer import Tokenizer
    from zsclip.jobs.labels import TemplateSet

TEXT_CHUNK = 4096  # texts planned together: prefixes are shared within a chunk


def make_prompts(labels: Sequence[str], templates: "TemplateSet") -> list[str]:
    """Label-major list: the T prompts of label 0, then those of label 1, ... ([C * T] strings)."""
    return [prompt for label in labels for prompt in templates.prompts(label)]


def encode_texts(
    model: "CLIP",
    tokenizer: "Tokenizer",
    texts: Sequence[str],
    *,
    device: "torch.device",
    dtype: "torch.dtype | None" = None,
    token_budget: int | None = None,
    chunk: int = TEXT_CHUNK,
) -> "torch.Tensor":
    """Texts -> L2-normalised fp32 features [N, D], on the CPU. Used for prompts and for `embed
    --text`.

    Openings that several texts share (a template's "a photo of the") go through the text tower
    once, and the rests go through unpadded, at most `token_budget` tokens per pass
    (zsclip.core.text_prefix; exact under the causal mask). Texts are encoded `chunk` at a time, so
    memory stays flat however many there are.
    """
    import torch
    import torch.nn.functional as F

    from zsclip.core.devices import autocast
    from zsclip.core.text_prefix import TOKEN_BUDGET, encode_with_shared_prefixes

    if not texts:
        return torch.zeros(0, model.config.embed_dim)
    features = torch.empty(len(texts), model.config.embed_dim)  # [N, D]
    for start in range(0, len(texts), chunk):
        part = list(texts[start : start + chunk])
        tokens = tokenizer(part, context_length=model.config.text.context_length)  # [n, L]
        with torch.inference_mode(), autocast(device, dtype or torch.float32):
            encoded = encode_with_shared_prefixes(
                model, tokens, token_budget=token_budget or TOKEN_BUDGET
            )
        features[start : start + len(part)] = F.normalize(encoded.float(), dim=-1).cpu()
    return features  # [N, D]


def build_classifier(
    model: "CLIP",
    tokenizer: "Tokenizer",
    labels: Sequence[str],
    templates: "TemplateSet",
    *,
    device: "torch.device",
    dtype: "torch.dtype | None" = None,
) -> "torch.Tensor":
    """[D, C] zero-shot weights, fp32 on the CPU: column c is label c's ensembled, renormalised text
    embedding."""
    import torch.nn.functional as F

    count = len(templates.templates)
    prompts = make_prompts(labels, templates)  # [C * T]
    features = encode_texts(model, tokenizer, prompts, device=device, dtype=dtype)  # [C * T, D]
    per_label = features.view(len(labels), count, -1).mean(
        dim=1
    )  # [C, D]: mean of unit prompt vectors
    return F.normalize(per_label, dim=-1).t().contiguous()  # [D, C]


def truncated_prompts(
    tokenizer: "Tokenizer", labels: Sequence[str], templates: "TemplateSet", context_length: int
) -> int:
    """How many prompts are too long for the text tower (they are cut, keeping the end token)."""
    return tokenizer.count_truncated(make_prompts(labels, templates), context_length)


def classifier_for(
    loaded: "LoadedModel",
    labels: Sequence[str],
    templates: "str | TemplateSet | None",
    *,
    device: "torch.device",
    dtype: "torch.dtype",
    use_cache: bool = True,
    warn: Callable[[str], None] = lambda message: None,
) -> "torch.Tensor":
    """[D, C] zero-shot weights for `labels` with the template set `templates` (a name or a file, or
    a TemplateSet already read; None: the model's own set, else photo), warning when prompts are too
    long for the model. Read from (and written to) the classifier cache when the model has a file to
    identify it by."""
    from zsclip.core.devices import precision_name
    from zsclip.jobs import cache
    from zsclip.jobs.labels import TemplateSet, load_templates

    if isinstance(templates, TemplateSet):
        template_set = templates
    else:
        template_set = load_templates(templates, model_default=loaded.metadata.get("templates"))
    context = loaded.model.config.text.context_length
    cut = truncated_prompts(loaded.tokenizer, labels, template_set, context)
    if cut:
        warn(
            f"{cut} prompt(s) are longer than the model's {context} tokens and were cut; "
            "use shorter labels"
        )
    model_id = cache.model_identity(loaded.path) if use_cache else None
    key = None
    if model_id is not None:
        key = cache.classifier_key(
            model_id,
            loaded.tokenizer.to_metadata(),
            list(labels),
            template_set.templates,
            precision_name(dtype),
            context,
        )
    shape = (loaded.model.config.embed_dim, len(labels))
    weights = cache.load_classifier(key, shape) if key is not None else None
    if weights is None:
        weights = build_classifier(
            loaded.model, loaded.tokenizer, labels, template_set, device=device, dtype=dtype
        )
        if key is not None:
            cache.save_classifier(key, weights, list(labels), warn=warn)
    return weights
