"""Example images per label -> a few-shot head (zsclip.jobs.heads), fitted once and cached.

An example folder holds one subfolder per label, named after it (matched to the run's labels ignoring
case and spacing), with a few images each, found as classify finds images in a folder (recursively,
hidden files skipped). Labels without a subfolder keep their zero-shot column.

The examples are embedded through the classify pipeline with its image-embedding cache, so a second
fit over the same files decodes nothing; the fitted head itself is cached too, under
$ZSCLIP_CACHE/heads/<key>.safetensors, in the head file format (written atomically, checked like any
head file when read back). The key covers everything the head depends on: the model file, tokenizer,
labels, templates, precision and preprocessing, every example's path, size and mtime, and the fit
options. A head fitted while some examples could not be read is not cached, so the reason is shown
again next time.

Nothing here prints: problems a run survives go through `warn`; the caller reports `FittedHead`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from zsclip.errors import UserError
from zsclip.jobs.heads import FORMAT_VERSION, Head, read_head, save_head
from zsclip.jobs.inputs import InputItem

if TYPE_CHECKING:
    import torch

    from zsclip.core.checkpoints import LoadedModel
    from zsclip.jobs.fewshot import FitOptions
    from zsclip.jobs.labels import TemplateSet
    from zsclip.jobs.pipeline import DecodeOptions

Warn = Callable[[str], None]
HEAD_DIR = "heads"
SOLVER = 1  # bump when the fitting changes its results: cached heads are then fitted again


@dataclass
class ExampleSet:
    """Example images, each with the index of its label among `labels` (every label of the run)."""

    root: Path
    labels: list[str]
    items: list[InputItem]
    targets: list[int]

    def counts(self) -> list[int]:
        counts = [0] * len(self.labels)
        for target in self.targets:
            counts[target] += 1
        return counts


def read_example_folder(root: Path, labels: Sequence[str], warn: Warn) -> ExampleSet:
    """The label subfolders of `root` and their images. A subfolder that is not one of `labels` is a
    UserError (a misspelt folder would silently teach nothing); so is a folder without any image."""
    from zsclip.jobs.inputs import expand_inputs, is_hidden, is_image_name
    from zsclip.jobs.labels import label_key

    if not root.is_dir():
        raise UserError(
            f"--examples {str(root)!r} is not a folder; give a folder with one "
            "subfolder of example images per label"
        )
    index = {label_key(label): i for i, label in enumerate(labels)}
    entries = sorted(os.listdir(root))
    folders = [name for name in entries if not is_hidden(name) and (root / name).is_dir()]
    unknown = [name for name in folders if label_key(name) not in index]
    if unknown:
        raise UserError(
            f"example folder(s) {', '.join(repr(n) for n in unknown[:3])} in {str(root)!r} match no "
            "label; rename them after a label, or add the label to --labels"
        )
    loose = [name for name in entries if is_image_name(name) and (root / name).is_file()]
    if loose:
        warn(
            f"{len(loose)} image(s) directly in {str(root)!r} are not in a label folder and are ignored"
        )
    items, targets, owner = [], [], {}
    for name in folders:
        target = index[label_key(name)]
        if target in owner:
            raise UserError(
                f"example folders {owner[target]!r} and {name!r} both name label "
                f"{labels[target]!r}; merge them"
            )
        owner[target] = name
        found = expand_inputs([str(root / name)])
        if not found:
            warn(
                f"example folder {str(root / name)!r} holds no images; {labels[target]!r} stays zero-shot"
            )
        items += found
        targets += [target] * len(found)
    if not items:
        raise UserError(f"no example images in the label folders of {str(root)!r}")
    if len({target for target in targets}) < 2:
        raise UserError(
            f"{str(root)!r} holds examples for one label only; a head learns from the difference "
            "between labels: add a folder for at least one more (the labels it is mistaken for)"
        )
    return ExampleSet(root, list(labels), items, targets)


@dataclass
class HeadSource:
    """How to make the head: the examples, the prompt templates, the fit, and how images are read."""

    examples: ExampleSet
    templates: "TemplateSet"
    options: "FitOptions"
    decode: "DecodeOptions"
    batch_size: int = 32
    workers: int = 0
    use_cache: bool = True  # the head cache and the image-embedding cache


@dataclass
class FittedHead:
    """The head, and what it took: for the notes on stderr."""

    head: Head
    from_cache: bool  # read from the head cache: nothing embedded or fitted
    embedded: int = 0  # example images run through the model
    reused: int = 0  # example embeddings taken from the image cache
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def head_from_examples(
    loaded: "LoadedModel",
    source: HeadSource,
    text: "torch.Tensor",
    *,
    device: "torch.device",
    dtype: "torch.dtype",
    warn: Warn = lambda message: None,
) -> FittedHead:
    """The head for `source`, from the cache or fitted now; `text` [D, C] is the zero-shot classifier
    of the examples' labels with `source.templates`."""
    key = _head_key(loaded, source, dtype) if source.use_cache else None
    cached = _cached_head(key, source.examples.labels, text.shape[0])
    if cached is not None:
        return FittedHead(cached, from_cache=True)
    x, y, done = _embed_examples(loaded, source, device, dtype, warn)
    head = fit_examples(x, y, text, loaded, source)
    if key is not None and not done.unreadable:
        try:
            save_head(_head_path(key), head)
        except OSError as err:
            warn(
                f"cannot write the head cache ({err.strerror or err}); the examples will be "
                "fitted again next time"
            )
    return FittedHead(head, False, done.embedded, done.reused, done.unreadable)


def fit_examples(
    x: "torch.Tensor",
    y: "torch.Tensor",
    text: "torch.Tensor",
    loaded: "LoadedModel",
    source: HeadSource,
) -> Head:
    """Fit the head on embedded examples x [N, D] with labels y [N], and choose its thresholds."""
    import torch.nn.functional as F

    from zsclip.jobs.fewshot import choose_thresholds, fit_head
    from zsclip.jobs.scores import logit_scale_of, model_threshold

    fitted = fit_head(x, y, text, logit_scale_of(loaded.model), source.options)
    default = model_threshold(loaded.metadata)  # kept where the examples show nothing better
    cosine = x @ F.normalize(fitted.weight, dim=0)  # [N, C]
    thresholds, f1 = choose_thresholds(cosine, y, default)  # [C], [C]
    counts = [int(n) for n in y.bincount(minlength=text.shape[1]).tolist()]
    fit = {
        "method": fitted.method,
        "contrast": fitted.contrast,
        "lambda": fitted.lam,
        "alpha": fitted.alpha,
        "cv_nll": fitted.cv_nll,
        "folds": fitted.folds,
        "examples": counts,
        "f1": [None if math.isnan(v) else round(v, 6) for v in f1.tolist()],
        "options": source.options.to_dict(),
    }
    return Head(
        list(source.examples.labels),
        fitted.weight,
        fitted.bias,
        thresholds,
        text.float().contiguous(),
        loaded.name,
        list(source.templates.templates),
        fit,
    )


@dataclass
class _Embedded:
    embedded: int
    reused: int
    unreadable: list[tuple[str, str]]


def _embed_examples(
    loaded: "LoadedModel",
    source: HeadSource,
    device: "torch.device",
    dtype: "torch.dtype",
    warn: Warn,
) -> tuple["torch.Tensor", "torch.Tensor", _Embedded]:
    """x [N, D] and y [N] of the readable examples, and how they were had."""
    import torch

    from zsclip.jobs.pipeline import ImageEncoder

    decode = replace(source.decode, thumbnail_size=None)
    encoder = ImageEncoder.with_cache(
        loaded,
        device,
        dtype,
        decode=decode,
        batch_size=source.batch_size,
        workers=source.workers,
        use_cache=source.use_cache,
        warn=warn,
    )
    cache = encoder.cache
    examples = source.examples
    rows, targets, unreadable, position = [], [], [], 0
    try:
        for batch, features in encoder.batches(examples.items):
            readable = 0
            for entry in batch:
                if entry.error is None:
                    rows.append(features[readable])
                    targets.append(examples.targets[position])
                    readable += 1
                else:
                    unreadable.append((entry.path, entry.error))
                    warn(f"example {entry.path}: {entry.error}; left out")
                position += 1
    finally:
        reused = cache.hits if cache is not None else 0
        if cache is not None:
            cache.close()
    if not rows:
        raise UserError(f"none of the example images in {str(examples.root)!r} could be read")
    if len(set(targets)) < 2:
        raise UserError(
            f"the readable examples in {str(examples.root)!r} are for one label only; "
            "add readable examples for at least one more"
        )
    return (
        torch.stack(rows),
        torch.tensor(targets),
        _Embedded(len(rows) - reused, reused, unreadable),
    )


def _head_key(loaded: "LoadedModel", source: HeadSource, dtype: "torch.dtype") -> str | None:
    """Everything the head depends on (see the module docstring); None when the model has no file."""
    from zsclip.core.devices import precision_name
    from zsclip.jobs.cache import model_identity, stamp

    model_id = model_identity(loaded.path)
    if model_id is None:
        return None
    examples = []
    for item, target in zip(source.examples.items, source.examples.targets):
        found = stamp(item.path)
        examples.append(
            [target, item.path]
            if found is None
            else [target, found.path, found.size, found.mtime_ns]
        )
    data = {
        "format": FORMAT_VERSION,
        "solver": SOLVER,
        "model": model_id,
        "tokenizer": loaded.tokenizer.to_metadata(),
        "labels": source.examples.labels,
        "templates": list(source.templates.templates),
        "precision": precision_name(dtype),
        "context": loaded.model.config.text.context_length,
        "preprocess": loaded.preprocess.to_dict(),
        "draft_size": source.decode.draft_size,
        "examples": examples,
        "options": source.options.to_dict(),
    }
    text = json.dumps(data, sort_keys=True, default=str)  # ASCII: names not valid UTF-8 escaped
    return hashlib.sha256(text.encode("ascii")).hexdigest()[:32]


def _head_path(key: str) -> Path:
    from zsclip.paths import cache_dir

    return cache_dir() / HEAD_DIR / f"{key}.safetensors"


def _cached_head(key: str | None, labels: list[str], dim: int) -> Head | None:
    """The cached head, or None when absent, damaged or not for these labels (it is fitted again)."""
    if key is None or not _head_path(key).is_file():
        return None
    try:
        head = read_head(_head_path(key))
    except UserError:
        return None
    return head if head.labels == labels and head.embed_dim == dim else None
