"""zsclip: CLIP (Radford et al. 2021) for zero-shot image classification, from the shell and from
Python.

    import zsclip
    model, preprocess = zsclip.load("ViT-B/32")           # or a path, or the built-in model: zsclip.load()
    tokens = zsclip.tokenize(["a photo of a corgi."], model)
    hits = zsclip.search("photos/", "a dog on the beach")  # best first; zsclip.duplicates("photos/")

Heavy modules (torch, PIL) are imported on first use, so `import zsclip` is cheap.
"""

from __future__ import annotations

from zsclip.version import __version__

__all__ = ["load", "tokenize", "available_models", "search", "duplicates", "__version__"]


def __getattr__(name: str):
    if name in ("load", "tokenize", "available_models", "search", "duplicates"):
        from zsclip import api

        return getattr(api, name)
    raise AttributeError(f"module 'zsclip' has no attribute {name!r}")
