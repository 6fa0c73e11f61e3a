"""The model at work for `zsclip serve`: what one classify or embed request costs, and who waits.

A request's images are decoded in threads (the CLI's decoder and bomb checks, on bytes instead of
files), then queued for the model thread (zsclip.serve.batcher), which batches images from many
requests together. Label classifiers are built on a separate text thread through
zsclip.jobs.zeroshot.classifier_for (so they land in, and come from, the same on-disk cache as the
CLI's), and the last few are kept in memory. Scores and rows come from zsclip.jobs.classify, so a
row is exactly what `zsclip classify --format jsonl` writes for the same image.

Admission keeps memory bounded: a request enters only when its images (and texts) fit in the queue
(`queue_size`); otherwise it is refused at once (QueueFull, HTTP 503) rather than left to pile up.

Plain asyncio: no web framework here. Request-level problems raise RequestError with the HTTP status
the API answers with.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Iterator, Sequence

from zsclip.errors import UserError
from zsclip.jobs.scores import ClassifyOptions
from zsclip.serve.batcher import Batcher, TextWorker

if TYPE_CHECKING:
    import torch

    from zsclip.core.checkpoints import LoadedModel
    from zsclip.jobs.labels import TemplateSet
    from zsclip.jobs.pipeline import Decoded

# The CLI's decompression-bomb limit (zsclip.core.transform.DEFAULT_MAX_PIXELS), repeated here so
# that reading the defaults imports neither torch nor PIL; a test holds the two equal.
DEFAULT_MAX_PIXELS = 120_000_000


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; past any of these it is refused with a 4xx JSON error."""

    max_upload_bytes: int = 32 * 2**20  # the whole request body
    max_images: int = 64  # per request (never more than the queue holds)
    max_labels: int = 1000
    max_templates: int = 100
    max_texts: int = 256  # per embed request (never more than the queue holds)
    max_text_chars: int = 1000  # one label, template or text
    max_pixels: int = DEFAULT_MAX_PIXELS  # per image, from its header (the CLI's bomb check)
    request_timeout_s: float = 60.0  # from the first byte of the request to the answer


@dataclass(frozen=True)
class Batching:
    """How requests share the model."""

    max_batch: int = 32  # images per forward pass
    wait_ms: float = 50.0  # the longest an image waits for others on their way (see batcher)
    queue_size: int = 256  # images and texts admitted at once (waiting, decoding or in the model)
    workers: int = 0  # decoding threads; 0: one per core, at most 8
    classifiers_in_memory: int = 32  # label sets kept ready (beyond them: the on-disk cache)


class RequestError(Exception):
    """A request the server refuses; `status` and `code` go into the JSON error."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.headers = status, code, headers or {}


class QueueFull(RequestError):
    def __init__(self, capacity: int) -> None:
        super().__init__(
            503,
            "queue_full",
            f"the server is busy ({capacity} images and texts queued); retry after a second",
            {"Retry-After": "1"},
        )


@dataclass(frozen=True)
class Upload:
    name: str  # the row's "path": the client's file name, or image-N
    data: bytes


@dataclass(frozen=True)
class ClassifyParams:
    labels: list[str]
    templates: (
        "str | list[str] | None"  # a set in prompts/, the templates themselves, or the model's
    )
    top_k: int = 5
    multi_label: bool = False
    threshold: float | None = None  # None: the model's default, else 0.25
    min_score: float | None = None
    exact_preprocess: bool = False


class Engine:
    """One loaded model serving many requests at once (see the module docstring)."""

    def __init__(
        self,
        loaded: "LoadedModel",
        device: "torch.device",
        dtype: "torch.dtype",
        *,
        limits: Limits = Limits(),
        batching: Batching = Batching(),
        use_cache: bool = True,
    ) -> None:
        from zsclip.jobs.pipeline import default_workers
        from zsclip.jobs.scores import logit_scale_of

        self.loaded, self.device, self.dtype, self.use_cache = loaded, device, dtype, use_cache
        # a request never holds more than the whole queue, so it can always be let in eventually
        queue_size = batching.queue_size
        self.limits = replace(
            limits,
            max_images=min(limits.max_images, queue_size),
            max_texts=min(limits.max_texts, queue_size),
        )
        self.batching = batching
        self.capacity = batching.queue_size
        self.admitted = 0  # touched from the event loop only
        self.refused = 0  # requests answered 503
        self.scale = logit_scale_of(loaded.model)
        workers = batching.workers or default_workers()
        self._decoders = ThreadPoolExecutor(workers, thread_name_prefix="zsclip-decode")
        self._text = TextWorker()
        self.arriving = 0  # requests whose body is being read (see `arrival`)
        self.decoding = 0  # images of admitted requests not yet handed to the batcher
        self.batcher = Batcher(
            self._encode,
            max_batch=batching.max_batch,
            wait_s=batching.wait_ms / 1000,
            coming=lambda: self.arriving + self.decoding,
        )
        self._classifiers: OrderedDict = OrderedDict()  # key -> (weights [D, C], warnings)
        self._building: dict = {}  # key -> asyncio.Future of the same, while it is built
        self._template_sets: dict = {}  # name (None: the model's) -> TemplateSet
        # label lists that passed check_labels (Unicode folding of every label: a noticeable part
        # of a small request's time), most recent last; bounded like the classifiers
        self._checked: OrderedDict = OrderedDict()

    def start(self) -> None:
        self.batcher.start()

    def close(self) -> None:
        """Finish queued work, then stop the threads."""
        self.batcher.close()
        self._decoders.shutdown(wait=True)
        self._text.close()  # a label classifier still being built is left behind

    # -- admission ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def admit(self, count: int) -> Iterator[None]:
        """Hold `count` places in the queue for the request's lifetime, or refuse it (QueueFull)."""
        count = max(1, count)
        if self.admitted + count > self.capacity:
            self.refused += 1
            raise QueueFull(self.capacity)
        self.admitted += count
        try:
            yield
        finally:
            self.admitted -= count

    @contextlib.contextmanager
    def arrival(self) -> Iterator[None]:
        """Around reading a request's body: its images count as on their way to the model."""
        self.arriving += 1
        try:
            yield
        finally:
            self.arriving -= 1

    # -- the work -----------------------------------------------------------------------------

    async def classify(
        self, params: ClassifyParams, uploads: Sequence[Upload]
    ) -> tuple[list[dict], list[str]]:
        """Rows (the CLI's jsonl records, in upload order) and warnings for one request."""
        from zsclip.jobs.classify import prediction_record, predictions_for

        labels = self._checked_labels(params.labels)
        template_set = self._template_set(params.templates)
        options = self._options(params)
        with self.admit(len(uploads)):
            building = asyncio.ensure_future(self._classifier(labels, template_set))
            try:
                decoded = await self._decode_all(uploads, params.exact_preprocess)
                features = await self._features(decoded)
                weights, warnings = await building
            finally:
                building.cancel()  # only this request's wait: the build itself is shielded
        predictions = predictions_for(decoded, features, weights, labels, self.scale, options)
        return [prediction_record(prediction) for prediction in predictions], list(warnings)

    async def embed(
        self, uploads: Sequence[Upload], texts: Sequence[str], exact_preprocess: bool = False
    ) -> list[str]:
        """jsonl lines (the CLI's `embed` records): the images in order, then the texts."""
        from zsclip.jobs.embed import Embedding
        from zsclip.jobs.embedding_files import embedding_line

        self._check_texts(texts, "texts", self.limits.max_texts)
        with self.admit(len(uploads) + len(texts)):
            encoding = asyncio.ensure_future(self._encode_texts(list(texts)))
            try:
                decoded = await self._decode_all(uploads, exact_preprocess)
                features = await self._features(decoded)
                text_features = await encoding
            finally:
                encoding.cancel()
        lines, row = [], 0
        for entry in decoded:
            if entry.error is not None:
                lines.append(embedding_line(Embedding("path", entry.path, error=entry.error)))
            else:
                lines.append(embedding_line(Embedding("path", entry.path, features[row])))
                row += 1
        lines += [
            embedding_line(Embedding("text", text, vector))
            for text, vector in zip(texts, text_features)
        ]
        return lines

    async def _decode_all(self, uploads: Sequence[Upload], exact: bool) -> list["Decoded"]:
        """Decode every upload in the decoding threads; a bad one becomes an error entry. Until
        `_features` hands them on, the images count as on their way to the model."""
        from zsclip.jobs.pipeline import DecodeOptions, decode_bytes

        preprocess = self.loaded.preprocess
        options = DecodeOptions.for_model(preprocess.image_size, exact=exact)
        loop = asyncio.get_running_loop()
        pending = [
            loop.run_in_executor(
                self._decoders,
                decode_bytes,
                upload.name,
                upload.data,
                preprocess,
                options,
                self.limits.max_pixels,
            )
            for upload in uploads
        ]
        self.decoding += len(uploads)
        try:
            return list(await asyncio.gather(*pending))
        except BaseException:
            self.decoding -= len(uploads)
            raise

    async def _features(self, decoded: Sequence["Decoded"]) -> "torch.Tensor":
        """Unit features [n, D] of the readable entries, through the shared model thread."""
        import torch

        readable = [entry for entry in decoded if entry.pixels is not None]
        future = self.batcher.submit(readable) if readable else None
        self.decoding -= len(decoded)  # handed on (or nothing to hand on)
        if future is None:
            return torch.zeros(0, self.loaded.model.config.embed_dim)
        return await asyncio.wrap_future(future)

    def _encode(self, entries: list["Decoded"]) -> "torch.Tensor":
        """The model thread's work: the CLI's batch encoder on one batch (looked up at call time)."""
        from zsclip.jobs import pipeline

        batches = pipeline.encode_batches(
            self.loaded.model,
            [entries],
            device=self.device,
            dtype=self.dtype,
            preprocess=self.loaded.preprocess,
        )
        _, features = next(iter(batches))
        return features  # [n, D]

    async def _encode_texts(self, texts: list[str]) -> "torch.Tensor":
        import torch

        from zsclip.jobs.zeroshot import encode_texts

        if not texts:
            return torch.zeros(0, self.loaded.model.config.embed_dim)
        loaded = self.loaded

        def work():
            return encode_texts(
                loaded.model, loaded.tokenizer, texts, device=self.device, dtype=self.dtype
            )

        return await asyncio.wrap_future(self._text.submit(work))

    async def _classifier(
        self, labels: list[str], template_set: "TemplateSet"
    ) -> tuple["torch.Tensor", tuple[str, ...]]:
        """[D, C] weights (and the warnings building them gave), from memory, from a build already
        under way for another request, or built on the text thread (through the on-disk cache)."""
        key = (tuple(labels), template_set.templates)
        if key in self._classifiers:
            self._classifiers.move_to_end(key)
            return self._classifiers[key]
        if key not in self._building:
            self._building[key] = asyncio.ensure_future(self._build(key, labels, template_set))
        return await asyncio.shield(self._building[key])

    async def _build(self, key, labels: list[str], template_set: "TemplateSet"):
        from zsclip.jobs.zeroshot import classifier_for

        warnings: list[str] = []

        def work():
            return classifier_for(
                self.loaded,
                labels,
                template_set,
                device=self.device,
                dtype=self.dtype,
                use_cache=self.use_cache,
                warn=warnings.append,
            )

        try:
            weights = await asyncio.wrap_future(self._text.submit(work))
        finally:
            del self._building[key]
        self._classifiers[key] = (weights, tuple(warnings))
        while len(self._classifiers) > self.batching.classifiers_in_memory:
            self._classifiers.popitem(last=False)
        return self._classifiers[key]

    # -- checks -------------------------------------------------------------------------------

    def _checked_labels(self, labels: list[str]) -> list[str]:
        from zsclip.jobs.labels import check_labels

        self._check_texts(labels, "labels", self.limits.max_labels)
        key = tuple(labels)
        if key in self._checked:
            self._checked.move_to_end(key)
            return list(key)
        try:
            checked = check_labels(list(labels), "the request")
        except UserError as err:
            raise RequestError(422, "invalid_labels", str(err)) from None
        self._checked[key] = None
        while len(self._checked) > self.batching.classifiers_in_memory:
            self._checked.popitem(last=False)
        return checked

    def _check_texts(self, texts: Sequence[str], what: str, most: int) -> None:
        if len(texts) > most:
            raise RequestError(
                413, f"too_many_{what}", f"{len(texts)} {what}: the server takes at most {most}"
            )
        longest = max((len(text) for text in texts), default=0)
        if longest > self.limits.max_text_chars:
            raise RequestError(
                413,
                "text_too_long",
                f"one of the {what} holds {longest} characters: the server takes at most "
                f"{self.limits.max_text_chars}",
            )

    def _template_set(self, spec: "str | list[str] | None") -> "TemplateSet":
        """A set from prompts/ by name (never a file: the name comes from the network) or the
        templates themselves."""
        from zsclip.jobs.labels import TemplateSet, named_template_set

        if spec is None or isinstance(spec, str):
            if spec not in self._template_sets:  # read once: the sets in prompts/ do not change
                default = self.loaded.metadata.get("templates")
                try:
                    self._template_sets[spec] = named_template_set(spec, model_default=default)
                except UserError as err:
                    raise RequestError(422, "unknown_templates", str(err)) from None
            return self._template_sets[spec]
        self._check_texts(spec, "templates", self.limits.max_templates)
        templates = [template.strip() for template in spec]
        for template in templates:
            if "{}" not in template:
                raise RequestError(
                    422,
                    "invalid_templates",
                    f"template {template!r} has no {{}} where the label goes",
                )
        if not templates:
            raise RequestError(422, "invalid_templates", "templates is an empty list")
        return TemplateSet("request", tuple(dict.fromkeys(templates)))

    def _options(self, params: ClassifyParams) -> ClassifyOptions:
        from zsclip.jobs.scores import model_threshold

        threshold = params.threshold
        if threshold is not None and not params.multi_label:
            raise RequestError(422, "invalid_request", "threshold only applies with multi_label")
        return ClassifyOptions(
            top_k=params.top_k,
            multi_label=params.multi_label,
            threshold=model_threshold(self.loaded.metadata) if threshold is None else threshold,
            min_score=params.min_score,
        )

    # -- what the server says about itself ----------------------------------------------------

    def health(self) -> dict:
        stats = self.batcher.stats
        return {
            "status": "ok",
            "model": self.loaded.name,
            "queue": {"admitted": self.admitted, "capacity": self.capacity},
            "refused": self.refused,
            "batches": {"run": stats.batches, "images": stats.images, "largest": stats.largest},
            "limits": {
                "max_upload_bytes": self.limits.max_upload_bytes,
                "max_images": self.limits.max_images,
                "max_labels": self.limits.max_labels,
                "max_templates": self.limits.max_templates,
                "max_texts": self.limits.max_texts,
                "max_text_chars": self.limits.max_text_chars,
                "max_pixels": self.limits.max_pixels,
                "request_timeout_s": self.limits.request_timeout_s,
            },
        }

    def describe(self) -> dict:
        from zsclip.core.devices import precision_name
        from zsclip.jobs.labels import available_template_sets
        from zsclip.jobs.scores import model_threshold

        loaded, config = self.loaded, self.loaded.model.config
        return {
            "name": loaded.name,
            "builtin": loaded.builtin,
            "embed_dim": config.embed_dim,
            "image_size": loaded.preprocess.image_size,
            "context_length": config.text.context_length,
            "templates": loaded.metadata.get("templates"),
            "multi_label_threshold": model_threshold(loaded.metadata),
            "device": str(self.device),
            "precision": precision_name(self.dtype),
            "template_sets": available_template_sets(),
        }
