"""What the classifying options (zsclip.cli._classifying) asked for, checked: shared by every command
that classifies (`classify`, `sort`, and `classify --server` without Typer, zsclip.cli._quick).

A command packs its options into `Choices`, calls `check()` before any work and `options()` once
the model is loaded, and `warn_about_labels` before the first result.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Collection, Optional

if TYPE_CHECKING:
    from zsclip.core.checkpoints import LoadedModel
    from zsclip.jobs.scores import ClassifyOptions


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
    # the labels, when the command found them elsewhere (a few-shot head, example folders)
    given: Optional[tuple[str, ...]] = None

    def check(self) -> tuple[list[str], tuple[str, ...]]:
        """Before any work: the labels and the background labels, or a UserError."""
        from zsclip.errors import UserError
        from zsclip.jobs.labels import resolve_labels, resolve_others

        if self.given is not None:
            labels = list(self.given)
        else:
            labels = resolve_labels(self.labels, self.labels_file)
        if self.threshold is not None and not self.multi_label:
            raise UserError("--threshold only applies with --multi-label")
        return labels, resolve_others(self.other, self.other_file, labels)

    def options(self, loaded: "LoadedModel", top_k: int) -> "ClassifyOptions":
        """The job's options; the multi-label threshold defaults to the model's own."""
        from zsclip.jobs.scores import ClassifyOptions, model_threshold

        _, others = self.check()
        threshold = self.threshold
        if threshold is None:
            threshold = model_threshold(loaded.metadata)
        return ClassifyOptions(
            top_k=top_k,
            multi_label=self.multi_label,
            threshold=threshold,
            min_score=self.min_score,
            others=others,
        )


MAX_WORDS_SHOWN = 8  # unknown label words named in the warning; the rest are counted


def warn_about_labels(
    loaded,
    label_list: list[str],
    multi_label: bool,
    quiet: bool,
    others: tuple[str, ...] = (),
    taught: Collection[str] = (),
) -> None:
    """Before any result: labels (background labels too) the model never learnt a word of (a model
    that lists the words of its training captions, such as the built-in one; labels `taught` by
    example images are learnt from those), and a lone label under softmax with nothing to compete
    with."""
    from zsclip.cli._output import warn
    from zsclip.cli._runtime import REAL_CLIP, announce_builtin, real_clip_hint
    from zsclip.jobs.labels import unknown_words

    worded = [label for label in label_list if label not in taught]
    unknown = unknown_words([*worded, *others], loaded.metadata.get("caption_words", ""))
    if unknown:
        shown = ", ".join(repr(word) for word in unknown[:MAX_WORDS_SHOWN])
        more = (
            f" and {len(unknown) - MAX_WORDS_SHOWN} more" if len(unknown) > MAX_WORDS_SHOWN else ""
        )
        description = loaded.metadata.get("description")
        model = f"the {'built-in ' if loaded.builtin else ''}model {loaded.name}"
        model += f" ({description})" if description else ""
        warn(f"{model} never learnt the word(s) {shown}{more}: its scores for them mean nothing")
        warn(
            f"for a real CLIP use {real_clip_hint()}; "
            f"`zsclip config set model {REAL_CLIP}` makes it the default"
        )
    else:
        announce_builtin(loaded, quiet)
    if len(label_list) == 1 and not multi_label and not others:
        warn(
            "with one label every image scores 1.0 (a softmax over one label); add labels to choose "
            "among, or use --multi-label to ask whether each image shows it"
        )
