"""The embed job: images or texts -> L2-normalised fp32 embeddings, one row per input, in input order.

Image embeddings come from the same pipeline classify uses (so `classify --embeddings` gives the
same answers as classifying the images); text embeddings are the text tower's features for the raw
text (no templates). Jobs never print: this module yields Embedding rows; the terminal layer writes
them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

from zsclip.jobs.inputs import InputItem

if TYPE_CHECKING:
    import torch

    from zsclip.core.model import CLIP
    from zsclip.core.tokenizer import Tokenizer
    from zsclip.jobs.pipeline import ImageEncoder


@dataclass
class Embedding:
    kind: str  # "path" or "text": the key's name in the output
    key: str
    vector: "torch.Tensor | None" = None  # [D] float32, unit length
    error: str | None = None


def embed_images(encoder: "ImageEncoder", items: Sequence[InputItem]) -> Iterator[Embedding]:
    """One Embedding per input, in input order; unreadable inputs carry `error` instead of a vector.
    With the encoder's cache, stored embeddings of unchanged files are reused."""
    for batch, features in encoder.batches(items):
        row = 0
        for entry in batch:
            if entry.error is not None:
                yield Embedding("path", entry.path, error=entry.error)
            else:
                yield Embedding("path", entry.path, features[row].clone())
                row += 1


def embed_texts(
    model: "CLIP",
    tokenizer: "Tokenizer",
    texts: Sequence[str],
    *,
    device: "torch.device",
    dtype: "torch.dtype",
    batch_size: int = 256,
) -> Iterator[Embedding]:
    """One Embedding per text, computed `batch_size` texts at a time."""
    from zsclip.jobs.zeroshot import encode_texts

    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start : start + batch_size])
        features = encode_texts(model, tokenizer, chunk, device=device, dtype=dtype)  # [B, D]
        for text, vector in zip(chunk, features):
            yield Embedding("text", text, vector.clone())
