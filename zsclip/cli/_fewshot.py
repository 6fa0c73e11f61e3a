"""Few-shot options shared by `classify`, `eval` and `fit`: --examples DIR and --head FILE, and the notes
that say on stderr which head is in use, how it was fitted and which thresholds it chose.

A command reads the example folder or the head file before loading the model (`FewShot.check`, cheap
checks first), builds the job's HeadSource once the model is loaded (`FewShot.source`), and reports
the head the job used (`report_head`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

if TYPE_CHECKING:
    from zsclip.core.checkpoints import LoadedModel
    from zsclip.jobs.examples import ExampleSet, FittedHead, HeadSource
    from zsclip.jobs.fewshot import FitOptions
    from zsclip.jobs.heads import Head
    from zsclip.jobs.labels import TemplateSet
    from zsclip.jobs.pipeline import DecodeOptions

THRESHOLD_ROWS = 30  # labels listed in a threshold report on stderr; `zsclip fit` lists them all

ExamplesOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--examples",
        metavar="DIR",
        help="Example images: one subfolder per label, named after it, with a few images each. A "
        "classifier is fitted on them and combined with the labels' words (labels without a "
        "subfolder stay zero-shot; without --labels, the subfolders are the labels); fitted once "
        "and cached. With --multi-label, each label's threshold is chosen on the examples.",
    ),
]
HeadOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--head",
        metavar="FILE",
        help="A few-shot head saved by `zsclip fit`: its labels, prompt templates and per-label "
        "thresholds come with it.",
    ),
]


def run_labels(
    labels: Optional[str], labels_file: Optional[Path], examples: Optional[Path]
) -> list[str]:
    """--labels / --labels-file; without either, the names of the example folder's subfolders."""
    from zsclip.errors import UserError
    from zsclip.jobs.inputs import is_hidden
    from zsclip.jobs.labels import check_labels, resolve_labels

    if labels is not None or labels_file is not None or examples is None:
        return resolve_labels(labels, labels_file)
    if not examples.is_dir():
        raise UserError(
            f"{str(examples)!r} is not a folder; give a folder with one subfolder of example "
            "images per label"
        )
    names = sorted(p.name for p in examples.iterdir() if p.is_dir() and not is_hidden(p.name))
    return check_labels(names, f"the subfolders of {str(examples)!r}")


@dataclass
class FewShot:
    """What --examples / --head asked for, read and checked before the model is loaded."""

    examples: "ExampleSet | None" = None
    head: "Head | None" = None
    head_path: Optional[Path] = None

    @classmethod
    def check(
        cls,
        examples: Optional[Path],
        head: Optional[Path],
        labels: Optional[list[str]],
        templates: Optional[str],
    ) -> tuple["FewShot", list[str] | None]:
        """Read the examples or the head; returns it and the run's labels (the head's own when no
        labels were given, else `labels`)."""
        from zsclip.cli._output import warn
        from zsclip.errors import UserError
        from zsclip.jobs.examples import read_example_folder
        from zsclip.jobs.heads import read_head

        if examples is not None and head is not None:
            raise UserError(
                "give --examples DIR (fit now) or --head FILE (fitted before), not both"
            )
        if head is not None:
            if templates is not None:
                raise UserError(
                    "a head carries the prompt templates it was fitted with; drop --templates"
                )
            loaded_head = read_head(head)
            if labels is not None:
                loaded_head = loaded_head.reordered(labels)
            return cls(head=loaded_head, head_path=head), loaded_head.labels
        if examples is not None and labels is not None:
            return cls(examples=read_example_folder(examples, labels, warn)), labels
        return cls(), labels

    @property
    def active(self) -> bool:
        return self.examples is not None or self.head is not None

    def counts(self, labels: list[str]) -> list[int]:
        """Examples per label (zeros without a head)."""
        if self.examples is not None:
            return self.examples.counts()
        if self.head is not None:
            return self.head.examples()
        return [0] * len(labels)

    def templates(
        self, loaded: "LoadedModel", templates: Optional[str]
    ) -> "str | TemplateSet | None":
        """The prompt templates for the run: the head's, else --templates or the model's own set."""
        from zsclip.jobs.labels import TemplateSet, load_templates

        if self.head is not None:
            return TemplateSet(f"the head {self.head_path}", tuple(self.head.templates))
        if self.examples is not None:
            return load_templates(templates, model_default=loaded.metadata.get("templates"))
        return templates

    def source(
        self,
        template_set: "TemplateSet",
        decode: "DecodeOptions",
        *,
        options: "FitOptions | None" = None,
        batch_size: int = 32,
        workers: int = 0,
        use_cache: bool = True,
    ) -> "HeadSource | None":
        """The job's HeadSource for --examples (None otherwise)."""
        from zsclip.jobs.examples import HeadSource
        from zsclip.jobs.fewshot import FitOptions

        if self.examples is None:
            return None
        return HeadSource(
            self.examples,
            template_set,
            options or FitOptions(),
            decode,
            batch_size=batch_size,
            workers=workers,
            use_cache=use_cache,
        )


def describe_fit(head: "Head") -> str:
    """How a head was fitted, in a few words: "prior, lambda 0.0001, 3-fold CV"."""
    fit = head.fit
    parts = [str(fit.get("method", "?"))]
    if fit.get("alpha") is not None:
        parts.append(f"zero-shot share {fit['alpha']:g}")
    if fit.get("lambda") is not None:
        parts.append(f"lambda {fit['lambda']:g}")
    folds = fit.get("folds") or 0
    parts.append(f"{folds}-fold CV" if folds else "no CV (one example per label: defaults)")
    if fit.get("contrast") == "all":
        parts.append("contrasted with every label")
    return ", ".join(parts)


def report_head(
    fitted: "FittedHead | None",
    *,
    source: str,
    multi_label: bool,
    threshold: float | None,
    quiet: bool,
    limit: int | None = THRESHOLD_ROWS,
) -> None:
    """The notes on stderr: which head, how it was had, and (multi-label) the thresholds it uses."""
    from zsclip.cli._output import note

    if fitted is None or quiet:
        return
    head = fitted.head
    counts = head.examples()
    labelled = sum(1 for n in counts if n)
    what = f"{sum(counts)} examples for {labelled} of {len(counts)} labels"
    if fitted.from_cache:
        note(f"zsclip: few-shot head ({what}) read from the cache; --no-cache fits it again")
    elif source.startswith("--head"):
        note(f"zsclip: few-shot head from {source[len('--head ') :]}: {what}, {describe_fit(head)}")
    else:
        done = f"{fitted.embedded} embedded, {fitted.reused} from the image cache"
        note(f"zsclip: few-shot head fitted on {what} ({done}): {describe_fit(head)}")
    if multi_label:
        for line in threshold_table(head, threshold, limit):
            note(line)


def threshold_table(head: "Head", default: float | None, limit: int | None) -> list[str]:
    """Lines of a plain table: label, examples, threshold (cosine), F1 on the examples."""
    counts, f1 = head.examples(), head.fit.get("f1") or [None] * len(head.labels)
    width = min(max(len(label) for label in head.labels), 40)
    lines = [
        "zsclip: per-label thresholds chosen on the examples (cosine to the label's fitted column; "
        "F1 on the examples):",
        f"  {'label':<{width}}  examples  threshold  F1",
    ]
    rows = list(zip(head.labels, counts, head.thresholds.tolist(), f1))
    shown = rows if limit is None else rows[:limit]
    for label, count, value, score in shown:
        if math.isnan(value):
            kept = f"{default:.3f}*" if default is not None else "global*"
            shown_f1 = "-" if score is None else f"{score:.2f}"
            lines.append(f"  {_cut(label, width):<{width}}  {count:>8}  {kept:>9}  {shown_f1}")
        else:
            lines.append(f"  {_cut(label, width):<{width}}  {count:>8}  {value:>9.3f}  {score:.2f}")
    if len(shown) < len(rows):
        lines.append(
            f"  ... and {len(rows) - len(shown)} more labels (`zsclip fit` lists them all)"
        )
    if any(math.isnan(value) for value in head.thresholds.tolist()):
        lines.append(
            "  * the global threshold (--threshold, else the model's): no examples to choose "
            "from, or it did as well on them"
        )
    return lines


def _cut(label: str, width: int) -> str:
    return label if len(label) <= width else label[: width - 1] + "…"
