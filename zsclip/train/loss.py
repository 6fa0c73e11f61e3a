"""The paper's contrastive objective, split into small verbs: gather, logits, labels, loss.

Symmetric cross-entropy over the batch's image-text cosine similarities scaled by a learned
temperature: row i of the [N, N] matrix should pick column i (image i's own caption) and column i
should pick row i.

The temperature is stored as its log (`logit_scale`, ln(1/0.07) at init). The paper clamps the scale
at 100 to keep training stable; zsclip does it twice: `scale()` caps exp(logit_scale) at 100 here,
so one oversized optimizer step can never make the loss see a larger scale, and the training loop
clamps the parameter itself to [0, ln 100] after every step (`clamp_logit_scale`), as the published
code does, so it cannot drift above the cap where its gradient would be zero.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MAX_LOGIT_SCALE = 100.0


def scale(logit_scale: torch.Tensor) -> torch.Tensor:
    """exp(logit_scale) capped at 100: the factor the cosine similarities are multiplied by."""
    return logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)


def clamp_logit_scale(logit_scale: torch.nn.Parameter) -> None:
    """Keep the log-scale parameter in [0, ln 100]; call after each optimizer step."""
    with torch.no_grad():
        logit_scale.clamp_(0.0, math.log(MAX_LOGIT_SCALE))


def gather_features(
    image_features: torch.Tensor, text_features: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """All features of the global batch ([N_global, D] each). One process: the local batch as is.

    The training loop does not come through here: under torchrun (and with --accum-steps) it uses
    zsclip.train.distributed.gather_with_grad and local_rows_loss, which score each rank's rows
    against every column.
    """
    return image_features, text_features


def clip_logits(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled cosine similarities. Features [N, D] and [M, D], L2-normalised -> ([N, M] per image, [M,
    N] per text)."""
    logits_per_image = scale(logit_scale) * image_features @ text_features.t()  # [N, M]
    return logits_per_image, logits_per_image.t()


def clip_labels(n: int, device: torch.device | str = "cpu", offset: int = 0) -> torch.Tensor:
    """The right answer of each row: pair i sits at column offset + i (offset = rank * local batch)."""
    return torch.arange(offset, offset + n, device=device)


def clip_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Mean of the image->text and text->image cross-entropies. Features [N, D], not yet normalised."""
    image_features = F.normalize(image_features, dim=-1)
    text_features = F.normalize(text_features, dim=-1)
    all_images, all_texts = gather_features(image_features, text_features)
    logits_per_image, logits_per_text = clip_logits(
        all_images, all_texts, logit_scale
    )  # [N, N] each
    labels = clip_labels(logits_per_image.shape[0], device=logits_per_image.device)
    return (
        F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)
    ) / 2
