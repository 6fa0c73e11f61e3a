"""A few-shot head: the classifier fitted on example images (zsclip.jobs.fewshot), ready to score with,
save and read back.

A head replaces the zero-shot classifier of a run. Single-label scores are softmax(x @ weight + bias)
over its labels; multi-label scores are sigmoid(scale * (cos - t)), where cos is the cosine between the
image and the label's column of `weight` and t the label's own threshold chosen on the examples (NaN:
none was chosen, the run's --threshold applies). Labels without examples keep their zero-shot column,
so for them both scores are exactly the zero-shot ones.

A head file is a .safetensors file that describes itself:

    tensors   weight [D, C], bias [C], thresholds [C], text [D, C] (the zero-shot classifier the head
              was fitted against), all float32
    metadata  format "zsclip-head", format_version "1", labels (JSON list), model (its name),
              embed_dim, templates (JSON list of the prompt templates), fit (JSON: method, lambda,
              alpha, CV loss, contrast, examples and F1 per label, the fit options)

A head file is read as hostile input: every name, dtype, shape and value is checked before use, and
any problem is one line (UserError). A head is refused for a model that does not make its text
embeddings: other-sized embeddings, or label columns that differ from `text` (`check_model`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from zsclip.errors import UserError

if TYPE_CHECKING:
    import torch

    from zsclip.jobs.scores import ClassifyOptions

FORMAT_NAME = "zsclip-head"
FORMAT_VERSION = "1"
TENSORS = ("weight", "bias", "thresholds", "text")
# The same model gives the same label columns to float precision (bf16: cosines above 0.999);
# another model's are unrelated (cosines near 0).
SAME_MODEL_COSINE = 0.95
MAX_LABELS = 1_000_000  # a header claiming more is damaged


@dataclass
class Head:
    labels: list[str]
    weight: "torch.Tensor"  # [D, C] logits = x @ weight + bias
    bias: "torch.Tensor"  # [C]
    thresholds: "torch.Tensor"  # [C] cosine thresholds; NaN: the run's --threshold
    text: "torch.Tensor"  # [D, C] unit columns: the zero-shot classifier it was fitted against
    model: str = ""  # the name of the model it was fitted for
    templates: list[str] = field(default_factory=list)
    fit: dict[str, Any] = field(
        default_factory=dict
    )  # how it was fitted (see the module docstring)

    @property
    def embed_dim(self) -> int:
        return int(self.weight.shape[0])

    def examples(self) -> list[int]:
        """Examples per label (0 for labels that kept their zero-shot column)."""
        return list(self.fit.get("examples") or [0] * len(self.labels))

    def scores(
        self,
        features: "torch.Tensor",
        scale: float,
        options: "ClassifyOptions",
        extra: "torch.Tensor | None" = None,
    ) -> "torch.Tensor":
        """[N, D] unit image features -> [N, C + B] scores (see the module docstring). `extra` [D, B]
        are unit text columns of more labels scored zero-shot beside the head's (background labels):
        in the softmax with logits scale * cosine, in multi-label mode at the run's threshold."""
        import torch
        import torch.nn.functional as F

        features = features.float()
        extra = features.new_zeros(features.shape[1], 0) if extra is None else extra.float()
        weight = torch.cat([self.weight, scale * extra], dim=1)  # [D, C + B]
        if options.multi_label:
            cosine = features @ F.normalize(weight, dim=0)  # [N, C + B]
            none = torch.full((extra.shape[1],), float("nan"))
            chosen = torch.cat([self.thresholds, none])  # [C + B]; NaN: the run's threshold
            threshold = torch.where(chosen.isnan(), torch.tensor(options.threshold), chosen)
            return torch.sigmoid(scale * (cosine - threshold))
        bias = torch.cat([self.bias, self.bias.new_zeros(extra.shape[1])])  # [C + B]
        return torch.softmax(features @ weight + bias, dim=-1)

    def reordered(self, labels: Sequence[str]) -> "Head":
        """The same head with its columns in the order of `labels` (the same labels, any case and
        order), or a UserError naming the difference."""
        from zsclip.jobs.labels import label_key

        position = {label_key(label): i for i, label in enumerate(self.labels)}
        wanted = [position.get(label_key(label)) for label in labels]
        missing = [label for label, i in zip(labels, wanted) if i is None]
        if missing or len(labels) != len(self.labels):
            extra = sorted(set(position) - {label_key(label) for label in labels})
            detail = (
                f"not in the head: {missing[:3]}" if missing else f"only in the head: {extra[:3]}"
            )
            raise UserError(
                f"the head was fitted for other labels ({detail}); drop --labels to use the head's "
                "own, or fit a head for these labels (zsclip fit)"
            )
        if wanted == list(range(len(labels))):
            return self
        order = list(wanted)
        counts, f1 = self.examples(), self.fit.get("f1") or [None] * len(self.labels)
        fit = {**self.fit, "examples": [counts[i] for i in order], "f1": [f1[i] for i in order]}
        return replace(
            self,
            labels=list(labels),
            weight=self.weight[:, order],
            bias=self.bias[order],
            thresholds=self.thresholds[order],
            text=self.text[:, order],
            fit=fit,
        )


def check_model(
    head: Head, source: str, model_name: str, embed_dim: int, text: "torch.Tensor"
) -> None:
    """Refuse a head fitted for another model: `text` [D, C] is the current model's zero-shot
    classifier for the head's labels and templates."""
    import torch.nn.functional as F

    fitted_for = f"model {head.model!r}" if head.model else "another model"
    if embed_dim != head.embed_dim:
        raise UserError(
            f"{source} was fitted for {fitted_for} ({head.embed_dim}-dimensional embeddings); "
            f"model {model_name!r} makes {embed_dim}: use --model {head.model or 'NAME'}, "
            "or fit a head for this model (zsclip fit)"
        )
    agreement = F.cosine_similarity(text.float(), head.text, dim=0)  # [C]
    if float(agreement.min()) < SAME_MODEL_COSINE:
        raise UserError(
            f"{source} was fitted for {fitted_for}, whose label embeddings differ from model "
            f"{model_name!r}'s: use --model {head.model or 'NAME'}, or fit a head for this model "
            "(zsclip fit)"
        )


# ------------------------------------------------------------------------------------- the file


def save_head(path: Path, head: Head) -> None:
    """Write `head` as a head file, atomically (temporary file, then rename)."""
    from zsclip.core.safetensors_io import write_safetensors

    tensors = {name: getattr(head, name).float().contiguous() for name in TENSORS}
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "labels": json.dumps(head.labels, ensure_ascii=False),
        "model": head.model,
        "embed_dim": str(head.embed_dim),
        "templates": json.dumps(head.templates, ensure_ascii=False),
        "fit": json.dumps(head.fit, ensure_ascii=False, allow_nan=False),
    }
    write_safetensors(path, tensors, metadata)


def read_head(path: Path) -> Head:
    """A head file, checked whole; any problem is one UserError line."""
    if not path.is_file():
        raise UserError(
            f"head file {str(path)!r} does not exist; make one with `zsclip fit DIR -o FILE`"
        )
    metadata, tensors = _read_safetensors(path)
    where = f"head file {str(path)!r}"
    if metadata.get("format") != FORMAT_NAME:
        made = "a model checkpoint" if metadata.get("format") == "zsclip" else "not a head"
        raise UserError(f"{where} is {made}; make a head with `zsclip fit DIR -o FILE`")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{where} has format version {metadata.get('format_version')!r}; this zsclip reads "
            f"{FORMAT_VERSION}: upgrade zsclip or fit the head again"
        )
    try:
        head = _head_from(metadata, tensors)
    except (ValueError, TypeError, KeyError, RecursionError) as err:
        raise UserError(f"{where} is damaged ({err}); fit it again with `zsclip fit`") from None
    return head


def _read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, "torch.Tensor"]]:
    """Metadata and the four tensors, each checked for its name and dtype before it is read (the
    safetensors package checks every offset against the file's size)."""
    from safetensors import safe_open

    where = f"head file {str(path)!r}"
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            names = set(handle.keys())
            if metadata.get("format") != FORMAT_NAME:
                return metadata, {}
            if names != set(TENSORS):
                raise UserError(
                    f"{where} is damaged (tensors {sorted(names)}, expected {list(TENSORS)}); "
                    "fit it again with `zsclip fit`"
                )
            tensors = {}
            for name in TENSORS:
                part = handle.get_slice(name)
                if part.get_dtype() != "F32":
                    raise UserError(f"{where} is damaged ({name} is {part.get_dtype()}, not F32)")
                tensors[name] = handle.get_tensor(name)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - safetensors raises its own types for damaged files
        detail = " ".join(str(err).split())[:160] or type(err).__name__
        raise UserError(f"{where} is not a readable .safetensors file ({detail})") from None
    return metadata, tensors


def _head_from(metadata: dict[str, str], tensors: dict[str, "torch.Tensor"]) -> Head:
    """Every field checked against the others (ValueError, TypeError or KeyError when not)."""
    import torch

    from zsclip.jobs.labels import check_labels

    labels = json.loads(metadata["labels"])
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise ValueError("labels is not a list of strings")
    if not 0 < len(labels) <= MAX_LABELS:
        raise ValueError(f"{len(labels)} labels")
    try:
        check_labels(labels, "the head")
    except UserError as err:
        raise ValueError(str(err)) from None
    dim, count = int(metadata["embed_dim"]), len(labels)
    expected = {
        "weight": (dim, count),
        "bias": (count,),
        "thresholds": (count,),
        "text": (dim, count),
    }
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(
                f"{name} has shape {list(tensors[name].shape)}, expected {list(shape)}"
            )
    weight, bias, thresholds, text = (tensors[name].float() for name in TENSORS)
    if not (
        torch.isfinite(weight).all() and torch.isfinite(bias).all() and torch.isfinite(text).all()
    ):
        raise ValueError("a weight is not a finite number")
    if not torch.allclose(text.norm(dim=0), torch.ones(count), atol=1e-3):
        raise ValueError("text columns are not unit vectors")
    chosen = thresholds[~torch.isnan(thresholds)]
    if not (chosen.abs() <= 1).all():
        raise ValueError("a threshold is not a cosine in [-1, 1]")
    templates = json.loads(metadata.get("templates", "[]"))
    if (
        not isinstance(templates, list)
        or not templates
        or not all(isinstance(t, str) and "{}" in t for t in templates)
    ):
        raise ValueError("templates is not a list of templates with {}")
    return Head(
        labels,
        weight,
        bias,
        thresholds,
        text,
        str(metadata.get("model", "")),
        templates,
        _fit_info(json.loads(metadata.get("fit", "{}")), count),
    )


def _fit_info(fit: object, count: int) -> dict[str, Any]:
    """The fit report, kept only in the shape zsclip wrote it (it is shown to people)."""
    if not isinstance(fit, dict):
        raise ValueError("fit is not a JSON object")
    examples = fit.get("examples", [0] * count)
    if not (
        isinstance(examples, list)
        and len(examples) == count
        and all(isinstance(n, int) and 0 <= n for n in examples)
    ):
        raise ValueError("fit.examples is not one count per label")
    f1 = fit.get("f1", [None] * count)
    if not (
        isinstance(f1, list)
        and len(f1) == count
        and all(v is None or (isinstance(v, (int, float)) and 0 <= v <= 1) for v in f1)
    ):
        raise ValueError("fit.f1 is not one F1 per label")
    for key in ("lambda", "alpha", "cv_nll"):
        value = fit.get(key)
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
            raise ValueError(f"fit.{key} is not a number")
    if not isinstance(fit.get("method", ""), str):
        raise ValueError("fit.method is not a name")
    return {**fit, "examples": examples, "f1": f1}
