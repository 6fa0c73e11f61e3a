"""The options that decide how images are classified, shared by every command that classifies
(`classify`, `sort`): one definition each, so a flag means the same everywhere, and a new way of
classifying (a new option here, a field in zsclip.cli._choices.Choices) reaches all of those
commands at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

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
        metavar="LABELS",
        help='Comma-separated background labels, e.g. "a photo of something else": scored with '
        'the others, and when one wins the image gets "label": null. Never listed in top.',
    ),
]
OtherFileOpt = Annotated[
    Optional[Path],
    typer.Option("--other-file", help="Background labels (see --other), one per line."),
]
