"""Where the vocabulary comes from when a checkpoint does not carry its own merges.

The standard 49,408-token vocabulary is third-party data: zsclip's files only name it, and it is
looked up in this order: --vocab (or $ZSCLIP_VOCAB), beside the checkpoint (vocab.json +
merges.txt, or bpe_simple_vocab_16e6.txt.gz), then the cache folder (`zsclip download vocab`).
"""

from __future__ import annotations

import os
from pathlib import Path

from zsclip.core.tokenizer import ENV_VOCAB, OPENAI_FILE, NeedsStandardVocab, Tokenizer
from zsclip.errors import UserError
from zsclip.paths import cache_dir


def _hf_pair(folder: Path) -> tuple[Path, Path] | None:
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    return (vocab, merges) if vocab.is_file() and merges.is_file() else None


def _load_explicit(path: Path) -> Tokenizer:
    """--vocab / ZSCLIP_VOCAB: a .txt.gz merges file, vocab.json or merges.txt (with its partner), or a
    folder."""
    if path.is_dir():
        pair = _hf_pair(path)
        if pair:
            return Tokenizer.from_hf_files(*pair)
        if (path / OPENAI_FILE).is_file():
            return Tokenizer.from_openai_bpe(path / OPENAI_FILE)
        raise UserError(
            f"vocabulary folder {path} holds neither vocab.json + merges.txt nor {OPENAI_FILE}"
        )
    if path.is_file():
        if path.name.endswith(".gz"):
            return Tokenizer.from_openai_bpe(path)
        if path.name in ("vocab.json", "merges.txt"):
            pair = _hf_pair(path.parent)
            if pair:
                return Tokenizer.from_hf_files(*pair)
            raise UserError(
                f"{path} needs its partner (vocab.json + merges.txt) in the same folder"
            )
        raise UserError(f"vocabulary {path} is not {OPENAI_FILE}, vocab.json or merges.txt")
    raise UserError(
        f"vocabulary {path} does not exist; point --vocab or {ENV_VOCAB} at {OPENAI_FILE}"
    )


def find_vocab(explicit: Path | None = None, beside: Path | None = None) -> Tokenizer:
    """The standard vocabulary's tokenizer, searched in this order:

    1. `explicit` (the --vocab option), else $ZSCLIP_VOCAB: a .txt.gz file, vocab.json/merges.txt,
       or a folder;
    2. beside the checkpoint (`beside` is its folder, or the file itself): vocab.json + merges.txt,
       else bpe_simple_vocab_16e6.txt.gz;
    3. the zsclip cache folder: bpe_simple_vocab_16e6.txt.gz.
    Raises UserError naming every place it looked and how to get the file.
    """
    if explicit is None and os.environ.get(ENV_VOCAB):
        explicit = Path(os.environ[ENV_VOCAB])
    if explicit is not None:
        return _load_explicit(Path(explicit).expanduser())
    looked = [f"--vocab/{ENV_VOCAB} (not set)"]
    if beside is not None:
        beside = Path(beside)
        folder = beside.parent if beside.is_file() else beside
        pair = _hf_pair(folder)
        if pair:
            return Tokenizer.from_hf_files(*pair)
        if (folder / OPENAI_FILE).is_file():
            return Tokenizer.from_openai_bpe(folder / OPENAI_FILE)
        looked += [f"{folder / 'vocab.json'} + merges.txt", str(folder / OPENAI_FILE)]
    cached = cache_dir() / OPENAI_FILE
    if cached.is_file():
        return Tokenizer.from_openai_bpe(cached)
    looked.append(str(cached))
    raise UserError(
        f"no BPE vocabulary found (looked at: {', '.join(looked)}); run `zsclip download vocab`, or pass "
        f"--vocab PATH (or set {ENV_VOCAB}) to {OPENAI_FILE} from OpenAI's CLIP or open_clip"
    )


def tokenizer_for_checkpoint(
    meta: dict[str, str],
    explicit: Path | None = None,
    beside: Path | None = None,
    expected_size: int | None = None,
) -> Tokenizer:
    """The tokenizer a checkpoint needs: --vocab (`explicit`), then the merges stored in the
    checkpoint, then $ZSCLIP_VOCAB, the files beside it and the cache (`find_vocab`).

    $ZSCLIP_VOCAB is read after the stored merges on purpose: a standing environment variable must
    not replace the small vocabulary a trained checkpoint carries. `expected_size` (the model's
    vocab_size) is checked.
    """
    tokenizer, context_length = None, None
    if explicit is not None:
        tokenizer = _load_explicit(Path(explicit).expanduser())
    else:
        try:
            tokenizer = Tokenizer.from_metadata(meta)
        except NeedsStandardVocab as named:
            context_length = named.context_length
    if tokenizer is None:
        tokenizer = find_vocab(None, beside)
        tokenizer.context_length = context_length or tokenizer.context_length
    if expected_size is not None and tokenizer.vocab_size != expected_size:
        raise UserError(
            f"the vocabulary has {tokenizer.vocab_size} tokens but the model expects {expected_size}; "
            f"pass the model's own vocabulary with --vocab"
        )
    return tokenizer
