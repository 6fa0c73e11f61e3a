"""The Python API, in the shape users of OpenAI's `clip` package know.

model, preprocess = zsclip.load("ViT-B/32")   # a name, a path in any supported format, or None
(built-in) image = preprocess(PIL.Image.open("corgi.jpg")).unsqueeze(0) text = zsclip.tokenize(["a
photo of a corgi.", "a photo of a cat."], model) logits_per_image, logits_per_text = model(image,
text)

hits = zsclip.search("photos/", "a dog on the beach")   # ranked Hit(path, score), best first
groups = zsclip.duplicates("photos/")                  # Group(paths, min_score, identical)
"""

from __future__ import annotations

import os
import weakref

import torch

from zsclip.core.checkpoints import LoadedModel, load_model
from zsclip.core.model import CLIP
from zsclip.core.transform import Preprocess
from zsclip.paths import builtin_models

# Tokenizers of models handed out by `load`, so `tokenize(texts, model)` uses the model's own
# vocabulary; weak keys, so a model the caller drops is not kept alive here.
_TOKENIZERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def load(
    name_or_path: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    *,
    vocab: str | os.PathLike | None = None,
    offline: bool = False,
) -> tuple[CLIP, Preprocess]:
    """A model in eval mode and the preprocessing it expects. Device defaults to CUDA when available."""
    loaded = load_full(name_or_path, device=device, vocab=vocab, offline=offline)
    return loaded.model, Preprocess(loaded.preprocess)


def load_full(
    name_or_path: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    *,
    vocab: str | os.PathLike | None = None,
    offline: bool = False,
) -> LoadedModel:
    """Like `load`, but returns everything the checkpoint holds: tokenizer, preprocessing config,
    metadata."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = load_model(name_or_path, vocab=vocab, device=device, offline=offline)
    _TOKENIZERS[loaded.model] = loaded.tokenizer
    return loaded


def tokenize(
    texts: str | list[str], model: CLIP | None = None, context_length: int | None = None
) -> torch.Tensor:
    """Token ids [N, context_length] for `model` (one returned by `load`); without a model, the
    built-in one's."""
    tokenizer = _TOKENIZERS.get(model) if model is not None else None
    if tokenizer is None:
        if model is not None:
            raise ValueError(
                "tokenize() needs a model returned by zsclip.load(), or model=None for the built-in one"
            )
        tokenizer = load_model(None).tokenizer
    if context_length is None and model is not None:
        context_length = model.config.text.context_length
    return tokenizer(texts, context_length=context_length)


def available_models() -> list[str]:
    """Names `load` accepts: the built-in models, then the downloadable ones."""
    names = [p.stem for p in builtin_models()]
    try:
        from zsclip.core import catalogue as hub
    except ImportError:
        return names
    return names + list(hub.known_names())


# ------------------------------------------------------------------------------ search, duplicates


def _inputs(inputs) -> list:
    """Files and folders (one path or several) -> InputItems, as the CLI expands them."""
    from zsclip.jobs.inputs import expand_inputs

    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    return expand_inputs([os.fspath(path) for path in inputs])


def _listed(value) -> list:
    """One value or several -> a list (a string is one value, not its characters)."""
    if value is None:
        return []
    return [value] if isinstance(value, (str, os.PathLike)) else list(value)


def _model(model, device):
    """A LoadedModel from `model` (a name, a path, None for the default, or one from load_full)
    and the torch device and dtype to run it with."""
    from zsclip.core.devices import resolve_device

    if isinstance(model, LoadedModel):
        return model, next(model.model.parameters()).device, torch.float32
    torch_device = resolve_device(str(device) if device is not None else "auto")
    return load_model(model, device=torch_device), torch_device, torch.float32


def search(
    inputs,
    text: str | list[str] | None = None,
    *,
    image: str | os.PathLike | list | None = None,
    negative: str | list[str] | None = None,
    top_k: int | None = 20,
    min_score: float | None = None,
    model=None,
    device: str | torch.device | None = None,
    cache: bool = True,
    index: str = "auto",
) -> list:
    """Images under `inputs` (files, folders) ranked by cosine similarity to the query, best first:
    a list of `zsclip.jobs.search.Hit` (path, score); unreadable images follow with `error` set.

        zsclip.search("photos/", "a dog on the beach at sunset", top_k=10)
        zsclip.search("photos/", image="photos/corgi.jpg", min_score=0.8, top_k=None)

    `model` is a name, a path, None (the default model) or a LoadedModel from `load_full` (loaded
    once for many searches). The image cache makes a second search over the same folder cost only
    the query."""
    from zsclip.jobs import search as job
    from zsclip.jobs.pipeline import DecodeOptions

    query = job.Query(
        tuple(_listed(text)), tuple(os.fspath(p) for p in _listed(image)), tuple(_listed(negative))
    )
    query.check()
    loaded, torch_device, dtype = _model(model, device)
    request = job.SearchRequest(
        query=query,
        items=_inputs(inputs),
        limit=job.Limit(top_k, min_score),
        decode=DecodeOptions.for_model(loaded.preprocess.image_size),
        use_cache=cache,
        index=index,
    )
    run = job.start(loaded, request, device=torch_device, dtype=dtype)
    if run.cache is not None:
        run.cache.close()
    return run.hits


def duplicates(
    inputs,
    threshold: float | None = None,
    *,
    model=None,
    device: str | torch.device | None = None,
    cache: bool = True,
    index: str = "auto",
) -> list:
    """Groups of near-duplicate and byte-identical images under `inputs`: a list of
    `zsclip.jobs.duplicates.Group` (paths in input order, min_score, identical). `threshold`
    defaults to the model's own, else the generic one (docs/search.md). Unreadable images are in
    no group; one `UserWarning` names how many and the first of them with its reason."""
    from zsclip.jobs import duplicates as job
    from zsclip.jobs.pipeline import DecodeOptions

    loaded, torch_device, dtype = _model(model, device)
    request = job.DuplicatesRequest(
        items=_inputs(inputs),
        threshold=job.default_threshold(loaded.metadata) if threshold is None else threshold,
        decode=DecodeOptions.for_model(loaded.preprocess.image_size),
        use_cache=cache,
        index=index,
    )
    run = job.start(loaded, request, device=torch_device, dtype=dtype)
    if run.cache is not None:
        run.cache.close()
    if run.errors:
        import warnings

        path, reason = run.errors[0]
        more = f" (and {len(run.errors) - 1} more)" if len(run.errors) > 1 else ""
        warnings.warn(f"zsclip.duplicates: cannot read {path}: {reason}{more}", stacklevel=2)
    return run.groups
