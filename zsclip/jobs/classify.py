"""The classify job: images (or saved image embeddings) x a zero-shot classifier -> one Prediction per
input.

Single-label scores are the paper's: softmax(logit_scale * cosine) over the labels, so they sum to
1.

Multi-label scores answer "does this image show X?" for each label on its own:
    score(label) = sigmoid(logit_scale * (cosine(image, label) - threshold))
It is 0.5 exactly when the cosine equals `threshold`, rises towards 1 above it, and does not depend on the
other labels. A label is reported when its score is at least 0.5, i.e. when its cosine reaches the threshold.
The threshold is a cosine similarity; good values depend on the model (about 0.2-0.3 for OpenAI's CLIP
models), which is why a checkpoint may carry its own default in its metadata (`multi_label_threshold`).

"None of these" (both modes): a label is *accepted* when it is in `top`, its score reaches `min_score`
(when set) and it beats every background label (`others`, when given). Background labels are scored
like the user's labels (so in softmax mode they take their share of the probability) but never appear
in `top`; the best of their scores is kept as `Prediction.other`. The accepted labels are a prefix of
`top` (it is sorted), and `Prediction.label` is the first of them, or None: "none of these".

Jobs never print: this module yields Prediction rows; the terminal layer renders them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from zsclip.jobs.inputs import InputItem
from zsclip.jobs.scores import (
    ClassifyOptions,
    logit_scale_of,
    rounded_score,
    score_features,
)

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from zsclip.core.checkpoints import LoadedModel
    from zsclip.jobs.cache import ImageCache
    from zsclip.jobs.embedding_files import EmbeddingTable
    from zsclip.jobs.examples import FittedHead, HeadSource
    from zsclip.jobs.heads import Head
    from zsclip.jobs.pipeline import Decoded, DecodeOptions, ImageEncoder


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]] = field(
        default_factory=list
    )  # best first; multi-label: only labels that pass
    error: str | None = None
    thumbnail: bytes | None = None  # JPEG for the HTML report
    passing: int | None = None  # how many of `top`, from the first, are accepted; None: all
    other: float | None = None  # with background labels: the best background label's score
    sidecar_error: str | None = None  # with --xmp: why the sidecar could not be written

    @property
    def accepted(self) -> list[tuple[str, float]]:
        """The labels of `top` that pass --min-score and beat the background labels."""
        return self.top if self.passing is None else self.top[: self.passing]

    @property
    def label(self) -> str | None:
        accepted = self.accepted
        return accepted[0][0] if accepted else None

    @property
    def score(self) -> float | None:
        accepted = self.accepted
        return accepted[0][1] if accepted else None

    @property
    def unsure(self) -> bool:
        """Scored, but no label was accepted (below --min-score, or a background label won)."""
        return self.error is None and bool(self.top) and self.label is None

    def keywords(self, multi_label: bool) -> list[str]:
        """The labels to tag the image with: every accepted label (multi-label), else the answer."""
        if multi_label:
            return [label for label, _ in self.accepted]
        return [] if self.label is None else [self.label]


def ranked(
    scores: "torch.Tensor", labels: Sequence[str], options: ClassifyOptions
) -> list[tuple[str, float]]:
    """[C] scores -> the top-k (label, score) pairs, best first; multi-label keeps only scores >= 0.5."""
    k = min(options.top_k, len(labels))
    values, indices = scores.topk(k)
    pairs = [(labels[i], float(v)) for v, i in zip(values.tolist(), indices.tolist())]
    if options.multi_label:
        pairs = [(label, value) for label, value in pairs if value >= 0.5]
    return pairs


def _scores(
    features: "torch.Tensor",
    classifier: "torch.Tensor",
    scale: float,
    options: ClassifyOptions,
    head: "Head | None",
) -> "torch.Tensor":
    """[N, C] scores: the few-shot head's when there is one, else the zero-shot classifier's. Columns
    of `classifier` beyond the head's labels (background labels) are scored zero-shot beside it."""
    if head is not None:
        return head.scores(features, scale, options, classifier[:, len(head.labels) :])
    return score_features(features, classifier, scale, options)


def judged(scores: "torch.Tensor", labels: Sequence[str], options: ClassifyOptions) -> dict:
    """[C + B] scores (the user's C labels, then the B background labels) -> the Prediction fields
    `top`, `passing` and `other` (see the module docstring)."""
    count = len(labels)
    top = ranked(scores[:count], labels, options)
    other = float(scores[count:].max()) if options.others else None
    passing = 0
    for _, value in top:
        if options.min_score is not None and value < options.min_score:
            break
        if other is not None and value <= other:
            break
        passing += 1
    limited = options.min_score is not None or other is not None
    return {"top": top, "passing": passing if limited else None, "other": other}


def prediction_for(
    path: str, scores: "torch.Tensor", labels: Sequence[str], options: ClassifyOptions
) -> Prediction:
    """[C + B] scores of one input (its labels, then the background labels) -> its Prediction
    (see `judged`)."""
    return Prediction(path, **judged(scores, labels, options))


def predictions_for(
    batch: "Sequence[Decoded]",
    features: "torch.Tensor",
    classifier: "torch.Tensor",
    labels: Sequence[str],
    scale: float,
    options: ClassifyOptions,
    head: "Head | None" = None,
) -> Iterator[Prediction]:
    """One Prediction per entry of a decoded batch, in order: unreadable entries carry their error,
    the others are scored from `features` [n, D] (one row per readable entry) x `classifier`
    [D, C + B] (the labels, then the background labels), or by the few-shot `head` beside the
    background labels when there is one."""
    scores = _scores(features, classifier, scale, options, head)  # [n, C + B]
    row = 0
    for entry in batch:
        if entry.error is not None:
            yield Prediction(entry.path, error=entry.error)
            continue
        prediction = prediction_for(entry.path, scores[row], labels, options)
        prediction.thumbnail = entry.thumbnail
        yield prediction
        row += 1


def prediction_record(prediction: Prediction) -> dict[str, Any]:
    """The jsonl contract, shared by `classify` and `zsclip serve`: path, label, score, top (and with
    background labels, other) -- or path, error. `label` and `score` are null when no label was
    accepted."""
    if prediction.error is not None:
        return {"path": prediction.path, "error": prediction.error}
    record = {
        "path": prediction.path,
        "label": prediction.label,
        "score": None if prediction.score is None else rounded_score(prediction.score),
        "top": [{"label": label, "score": rounded_score(score)} for label, score in prediction.top],
    }
    if prediction.other is not None:
        record["other"] = rounded_score(prediction.other)
    return record


def classify_images(
    encoder: "ImageEncoder",
    items: Sequence[InputItem],
    classifier: "torch.Tensor",
    labels: Sequence[str],
    options: ClassifyOptions,
    head: "Head | None" = None,
) -> Iterator[Prediction]:
    """One Prediction per input, in input order; unreadable inputs get `error` and the run goes on.
    With the encoder's cache, images whose embedding is stored (file unchanged) are neither decoded
    nor encoded. With a few-shot `head`, it scores instead of `classifier`'s first C columns."""
    if classifier.shape[1] != len(labels) + len(options.others):
        raise ValueError(
            f"classifier has {classifier.shape[1]} columns for "
            f"{len(labels)} + {len(options.others)} labels"
        )
    scale = logit_scale_of(encoder.model)
    for batch, features in encoder.batches(items):
        yield from predictions_for(batch, features, classifier, labels, scale, options, head)


def classify_embeddings(
    table: "EmbeddingTable",
    classifier: "torch.Tensor",
    labels: Sequence[str],
    scale: float,
    options: ClassifyOptions,
    head: "Head | None" = None,
) -> Iterator[Prediction]:
    """Predictions for saved image embeddings, in the file's order, without touching the images."""
    import torch.nn.functional as F

    features = F.normalize(
        table.vectors.float(), dim=-1
    )  # [N, D]; already unit length, made sure of
    scores = _scores(features, classifier, scale, options, head) if len(table.keys) else None
    errors = sorted(table.errors, key=lambda error: error[0])  # stable: keeps the file order
    next_error = 0
    for row, key in enumerate(table.keys):
        while next_error < len(errors) and errors[next_error][0] <= row:
            yield Prediction(errors[next_error][1], error=errors[next_error][2])
            next_error += 1
        yield prediction_for(key, scores[row], labels, options)
    for _, key, reason in errors[next_error:]:
        yield Prediction(key, error=reason)


@dataclass
class ClassifyRequest:
    """What to classify and how: the labels and prompt set, and either image inputs or a file of
    saved image embeddings."""

    labels: list[str]
    templates: str | None = None  # a set name or file; None: the model's own set, else photo
    items: Sequence[InputItem] | None = None  # image inputs, or ...
    embeddings: "Path | None" = None  # ... image embeddings saved by `zsclip embed`
    options: ClassifyOptions = ClassifyOptions()
    batch_size: int = 32
    workers: int = 0
    decode: "DecodeOptions | None" = None  # None: exact decoding
    use_cache: bool = True  # the classifier cache and the image-embedding cache
    xmp: bool = False  # write the accepted labels as keywords into XMP sidecars (zsclip.jobs.xmp)
    # few-shot (zsclip.jobs.examples): example images to fit a head on, or a head read from a file;
    # with either, `templates` must be the TemplateSet they were (or are to be) fitted with
    examples: "HeadSource | None" = None
    head: "Head | None" = None


@dataclass
class ClassifyRun:
    predictions: Iterator[Prediction]  # lazy: images are read as it is consumed
    total: int  # rows it will yield
    cache: "ImageCache | None"  # the image-embedding cache in use, for its hit counts
    head: "FittedHead | None" = None  # the few-shot head in use, and how it was had


def start(
    loaded: "LoadedModel",
    request: ClassifyRequest,
    *,
    device: "torch.device",
    dtype: "torch.dtype",
    warn: Callable[[str], None] = lambda message: None,
) -> ClassifyRun:
    """The classify job: builds (or reads from its cache) the zero-shot classifier, then predicts
    lazily for the images or the saved embeddings."""
    from zsclip.jobs.pipeline import DecodeOptions, ImageEncoder
    from zsclip.jobs.zeroshot import classifier_for

    classifier = classifier_for(
        loaded,
        list(request.labels) + list(request.options.others),  # background labels last
        request.templates,
        device=device,
        dtype=dtype,
        use_cache=request.use_cache,
        warn=warn,
    )  # [D, C + B]
    text = classifier[:, : len(request.labels)]  # [D, C] the user's labels, for the few-shot head
    fitted = few_shot_head(loaded, request, text, device=device, dtype=dtype, warn=warn)
    head = fitted.head if fitted is not None else None
    if request.embeddings is not None:
        table = read_image_embeddings(request.embeddings, loaded, warn)
        scale = logit_scale_of(loaded.model)
        predictions = classify_embeddings(
            table, classifier, request.labels, scale, request.options, head
        )
        predictions = tagged(predictions, request.options.multi_label, request.xmp)
        return ClassifyRun(predictions, len(table.keys) + len(table.errors), None, fitted)
    decode = request.decode or DecodeOptions()
    encoder = ImageEncoder.with_cache(
        loaded,
        device,
        dtype,
        decode=decode,
        batch_size=request.batch_size,
        workers=request.workers,
        use_cache=request.use_cache,
        warn=warn,
    )
    cache = encoder.cache
    items = request.items or []
    predictions = classify_images(encoder, items, classifier, request.labels, request.options, head)
    return ClassifyRun(
        tagged(predictions, request.options.multi_label, request.xmp), len(items), cache, fitted
    )


def few_shot_head(
    loaded: "LoadedModel",
    request: ClassifyRequest,
    classifier: "torch.Tensor",
    *,
    device: "torch.device",
    dtype: "torch.dtype",
    warn: Callable[[str], None],
) -> "FittedHead | None":
    """The request's head: fitted on (or cached for) its examples, or the head it was given, checked
    against the model (`classifier` [D, C] is the model's zero-shot classifier for the labels)."""
    from zsclip.jobs.examples import FittedHead, head_from_examples
    from zsclip.jobs.heads import check_model

    if request.examples is not None:
        return head_from_examples(
            loaded, request.examples, classifier, device=device, dtype=dtype, warn=warn
        )
    if request.head is None:
        return None
    dim = loaded.model.config.embed_dim
    check_model(request.head, "the head", loaded.name, dim, classifier)
    return FittedHead(request.head, from_cache=False)


def tagged(predictions: Iterator[Prediction], multi_label: bool, xmp: bool) -> Iterator[Prediction]:
    """With `xmp`: each prediction's keywords written into the image's XMP sidecar as it passes
    (zsclip.jobs.xmp); a sidecar that cannot be written is noted on the prediction."""
    if not xmp:
        yield from predictions
        return
    from zsclip.jobs.xmp import XmpError, tag_image

    for prediction in predictions:
        if prediction.error is None:
            try:
                tag_image(prediction.path, prediction.keywords(multi_label))
            except XmpError as err:
                prediction.sidecar_error = str(err)
        yield prediction


def read_image_embeddings(
    path: "Path", loaded: "LoadedModel", warn: Callable[[str], None], *, command: str = "classify"
) -> "EmbeddingTable":
    """A file of saved image embeddings, checked against the model that will score them
    (`command` names the one reading it, in the messages)."""
    from zsclip.errors import UserError
    from zsclip.jobs.embedding_files import read_embeddings

    table = read_embeddings(path)
    if table.kind != "path":
        raise UserError(
            f"{path} holds text embeddings; {command} needs image embeddings "
            "(zsclip embed IMAGES -o FILE)"
        )
    dim, expected = (table.vectors.shape[1] if table.keys else None), loaded.model.config.embed_dim
    if dim is not None and dim != expected:
        raise UserError(
            f"{path} holds {dim}-dimensional embeddings but model {loaded.name} makes {expected}; "
            f"{command} with the model that embedded them (--model)"
        )
    if table.model_name and table.model_name != loaded.name:
        warn(
            f"{path} was embedded with model {table.model_name!r}, not {loaded.name!r}; "
            "scores may be meaningless"
        )
    return table
