"""How images are scored against a classifier, shared by every job that scores (classify, few-shot
heads, the server): the options, the paper's softmax and the multi-label sigmoid, the model's own
defaults. See zsclip.jobs.classify's docstring for what the scores mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from zsclip.core.model import CLIP

DEFAULT_TOP_K = 5
DEFAULT_THRESHOLD = 0.25  # cosine; see zsclip.jobs.classify's docstring


@dataclass(frozen=True)
class ClassifyOptions:
    top_k: int = DEFAULT_TOP_K  # labels kept per input (at most the number of labels)
    multi_label: bool = False
    # multi-label only: the cosine at which a label's score is 0.5
    threshold: float = DEFAULT_THRESHOLD
    min_score: float | None = None  # a best score below this: label None ("none of these")
    others: tuple[str, ...] = ()  # background labels: scored, may win, reported as None


def model_threshold(metadata: dict[str, str]) -> float:
    """The multi-label threshold a checkpoint names (`multi_label_threshold`), else the default."""
    try:
        return float(metadata["multi_label_threshold"])
    except (KeyError, ValueError):
        return DEFAULT_THRESHOLD


def logit_scale_of(model: "CLIP") -> float:
    """exp(logit_scale), capped at 100 as in training."""
    return float(model.logit_scale.detach().exp().clamp(max=100.0))


def score_features(
    features: "torch.Tensor", classifier: "torch.Tensor", scale: float, options: ClassifyOptions
) -> "torch.Tensor":
    """[N, D] unit image features x [D, C] classifier -> [N, C] scores (see zsclip.jobs.classify's docstring)."""
    import torch

    cosine = features.float() @ classifier.float()  # [N, C]
    if options.multi_label:
        return torch.sigmoid(scale * (cosine - options.threshold))
    return torch.softmax(scale * cosine, dim=-1)


def rounded_score(value: float) -> float:
    """A score as written out: six decimals (0.055, not 0.054999999701976776)."""
    return round(float(value), 6)
