"""The options that decide how images are classified, shared by every command that classifies
(`classify`, `sort`): one definition each, so a flag means the same everywhere, and a new way of
classifying (a new option here, a field in `Choices`) reaches all of those commands at once.

A command lists the options as parameters, packs them into `Choices`, calls `check()` before any
work and `options()` once the model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

if TYPE_CHECKING:
    from zsclip.core.checkpoints import LoadedModel
    from zsclip.jobs.classify import ClassifyOptions

LabelsOpt = Annotated[
    Optional[str],
    typer.Option("--labels", "-l", help='Comma-separated labels, e.g. "corgi,jazz album".'),
]
LabelsFileOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--labels-file",
        "-L",
        help="One label per line (commas allowed); # starts a comment line.",
    ),
]
TemplatesOpt = Annotated[
    Optional[str],
    typer.Option(
        "--templates",
        "-t",
        help="Prompt template set: a name in prompts/ (photo, simple, plain, art, ...) or "
        "a file with one template per line, {} for the label. Default: the model's own set, else photo.",
    ),
]
MultiLabelOpt = Annotated[
    bool,
    typer.Option(
        "--multi-label",
        help="Score each label on its own (does the image show X?) instead of a softmax "
        "over labels; lists every label that passes --threshold.",
    ),
]
ThresholdOpt = Annotated[
    Optional[float],
    typer.Option(
        "--threshold",
        min=-1.0,
        max=1.0,
        help="With --multi-label: the cosine similarity at which a label's "
        "score is 0.5 (default: the model's, else 0.25).",
    ),
]
MinScoreOpt = Annotated[
    Optional[float],
    typer.Option(
        "--min-score",
        min=0.0,
        max=1.0,
        help='An image whose best score is below this gets "label": null (unsure); its top '
        "labels are still listed.",
    ),
]
OtherOpt = Annotated[
    Optional[str],
    typer.Option(
        "--other",
        help='Comma-separated background labels, e.g. "a photo of something else": scored with '
        'the others, and when one wins the image gets "label": null. Never listed in top.',
    ),
]
OtherFileOpt = Annotated[
    Optional[Path],
    typer.Option("--other-file", help="Background labels (see --other), one per line."),
]


@dataclass(frozen=True)
class Choices:
    """What the classifying options asked for, as given on the command line."""

    labels: Optional[str] = None
    labels_file: Optional[Path] = None
    templates: Optional[str] = None
    multi_label: bool = False
    threshold: Optional[float] = None
    min_score: Optional[float] = None
    other: Optional[str] = None
    other_file: Optional[Path] = None

    def check(self) -> tuple[list[str], tuple[str, ...]]:
        """Before any work: the labels and the background labels, or a UserError."""
        from zsclip.errors import UserError
        from zsclip.jobs.labels import resolve_labels, resolve_others

        labels = resolve_labels(self.labels, self.labels_file)
        if self.threshold is not None and not self.multi_label:
            raise UserError("--threshold only applies with --multi-label")
        return labels, resolve_others(self.other, self.other_file, labels)

    def options(self, loaded: "LoadedModel", top_k: int) -> "ClassifyOptions":
        """The job's options; the multi-label threshold defaults to the model's own."""
        from zsclip.jobs.classify import DEFAULT_THRESHOLD, ClassifyOptions

        _, others = self.check()
        threshold = self.threshold
        if threshold is None:
            threshold = _metadata_float(loaded.metadata, "multi_label_threshold", DEFAULT_THRESHOLD)
        return ClassifyOptions(
            top_k=top_k,
            multi_label=self.multi_label,
            threshold=threshold,
            min_score=self.min_score,
            others=others,
        )


def _metadata_float(metadata: dict[str, str], key: str, default: float) -> float:
    try:
        return float(metadata[key])
    except (KeyError, ValueError):
        return default
