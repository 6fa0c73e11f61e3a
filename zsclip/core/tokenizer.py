"""CLIP's byte-level BPE tokenizer (Radford et al. 2021), with its merges as data rather than a global.

Encoding follows OpenAI's published tokenizer exactly: text is cleaned (ftfy.fix_text, html.unescape
twice, whitespace collapsed and stripped, lower-cased), split by CLIP's pre-tokenisation pattern,
each piece mapped byte by byte onto printable symbols, then merged pair by pair in order of merge
rank, the last symbol of a word carrying the end-of-word marker `</w>`.

Id layout (the standard one, and the one `from_merges` and zsclip.train.bpe build): 256 byte
symbols, the same 256 with `</w>`, one id per merge, then <|startoftext|> and <|endoftext|>. The end
token is thus the largest id, which the model relies on (it reads the text feature at the argmax of
the token ids). The standard vocabulary has 48,894 merges: 49,408 ids, start 49406, end 49407.
Padding is 0 and truncation keeps the end token last.

Checkpoints: `to_metadata()` stores only the name "clip-bpe-49408" for the standard vocabulary (it
is third-party data and is not copied into our files), and the merges otherwise. `from_metadata()`
returns a Tokenizer, None when nothing is stored, and raises `NeedsStandardVocab` when the metadata
names the standard vocabulary, so the caller runs `find_vocab`; zsclip.core.vocab's
`tokenizer_for_checkpoint` does the whole search.
"""

from __future__ import annotations

import array
import functools
import gzip
import hashlib
import html
import json
import re
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import regex

from zsclip.errors import UserError

if TYPE_CHECKING:
    import torch

SOT, EOT = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
CONTEXT_LENGTH = 77
OPENAI_FILE = "bpe_simple_vocab_16e6.txt.gz"
STANDARD_NAME = "clip-bpe-49408"
STANDARD_MERGES = 49152 - 256 - 2  # 48,894: OpenAI keeps this many lines of the file
# sha256 of the standard merges joined as "a b" lines with "\n" (a fact about the public file, not
# the file).
STANDARD_MERGES_SHA256 = "f61f2adf497e6f5357c347aeb4646fabe82f341e946de5bdec5d2858e41bef4a"
# distinct words kept encoded; labels x templates repeat a few hundred words
WORD_CACHE_SIZE = 65536
ENV_VOCAB = "ZSCLIP_VOCAB"

# CLIP's pre-tokenisation: special tokens, English contractions, letter runs, single digits, other
# runs.
_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
# Plain printable ASCII without '&' (plus tab and line breaks) is left unchanged by ftfy and
# html.unescape, so cleaning can skip ftfy, which costs ~40 us a string (labels x templates add up
# on the classify path).
_ASCII_CLEAN = re.compile(r"[\t\n\r\x20-\x25\x27-\x7e]*")
# The same split for cleaned ASCII text (single spaces, lower case), where the stdlib engine is
# faster.
_ASCII_PATTERN = re.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^ a-z0-9]+"
)


class NeedsStandardVocab(Exception):
    """Raised by `Tokenizer.from_metadata` when a checkpoint names the standard vocabulary instead of
    storing it.

    The caller then looks for the file with `find_vocab` (or uses `tokenizer_for_checkpoint`).
    """

    def __init__(self, name: str = STANDARD_NAME, context_length: int = CONTEXT_LENGTH) -> None:
        super().__init__(
            f"the checkpoint uses the standard vocabulary {name!r}; find it with find_vocab()"
        )
        self.name = name
        self.context_length = context_length


@functools.lru_cache(maxsize=1)
def _byte_symbols() -> tuple[str, ...]:
    """Symbol for each byte value: printable Latin-1 bytes stand for themselves, the rest move to
    256+n.

    This is the order of the first 256 vocabulary entries (printable ranges first, then the rest).
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    shifted = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(shifted)})
    return tuple(table[b] for b in range(256))


def _vocab_order() -> list[str]:
    # The standard vocabulary lists symbols in the printable-first order, not by byte value.
    return sorted(_byte_symbols(), key=ord)


def _clean(text: str) -> str:
    """OpenAI's cleaning: ftfy, html.unescape twice, whitespace collapsed and stripped, lower-cased."""
    if not _ASCII_CLEAN.fullmatch(text):
        import ftfy  # ~0.1 s to import; only text that is not plain ASCII needs it

        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


def split_words(text: str) -> list[str]:
    """Cleaned, pre-tokenised pieces of `text` (before the byte mapping)."""
    text = _clean(text)
    return (_ASCII_PATTERN if text.isascii() else _PATTERN).findall(text)


def word_symbols(word: str) -> list[str]:
    """Initial BPE symbols of one piece: one per UTF-8 byte, the last one marked as the end of the
    word."""
    symbols = _byte_symbols()
    parts = [symbols[b] for b in word.encode("utf-8")]
    parts[-1] += END_OF_WORD
    return parts


def merge_pair(parts: list[str], first: str, second: str) -> list[str]:
    """Every non-overlapping occurrence of (first, second), left to right, joined into one symbol."""
    out: list[str] = []
    i, n = 0, len(parts)
    while i < n:
        if i + 1 < n and parts[i] == first and parts[i + 1] == second:
            out.append(first + second)
            i += 2
        else:
            out.append(parts[i])
            i += 1
    return out


def _layout_encoder(merges: list[tuple[str, str]]) -> dict[str, int]:
    """The standard id layout for a merges list; a repeated merged symbol keeps its later id, as
    OpenAI's does."""
    base = _vocab_order()
    tokens = base + [s + END_OF_WORD for s in base] + [a + b for a, b in merges] + [SOT, EOT]
    return {token: i for i, token in enumerate(tokens)}


def _merges_digest(merges: list[tuple[str, str]]) -> str:
    return hashlib.sha256("\n".join(f"{a} {b}" for a, b in merges).encode("utf-8")).hexdigest()


def _parse_merges(lines: Iterable[str], source: str) -> list[tuple[str, str]]:
    """'left right' lines to pairs; blank lines and a '#version' header are skipped."""
    merges = [
        tuple(pair) for pair in map(str.split, lines) if pair and not pair[0].startswith("#version")
    ]
    bad = next((pair for pair in merges if len(pair) != 2), None)
    if bad is not None:
        raise UserError(f"{source}: {' '.join(bad)[:60]!r} is not a BPE merge ('left right')")
    return merges  # type: ignore[return-value]


# The first STANDARD_MERGES lines of the standard file are ~0.5 MB; a file that has not given that many
# lines after this much inflated data is not a merges file (a gzip bomb would inflate without end).
_MAX_MERGES_BYTES = 16 * 1024 * 1024
# Context lengths a checkpoint may ask for: room for start and end, and no absurd padding buffers.
MAX_CONTEXT_LENGTH = 65536


def _read_merges_gz(path: str | Path) -> bytes:
    """Inflate only as far as needed: the file holds 262k lines, OpenAI uses the first 48,895."""
    chunks, lines, size = [], 0, 0
    with gzip.open(path, "rb") as f:
        while lines <= STANDARD_MERGES and (chunk := f.read(1 << 18)):
            chunks.append(chunk)
            lines += chunk.count(b"\n")
            size += len(chunk)
            if size > _MAX_MERGES_BYTES and lines <= STANDARD_MERGES:
                raise OSError(f"{size >> 20} MiB inflated without {STANDARD_MERGES} merge lines")
    return b"".join(chunks)


def _parse_encoder(text: object, source: str) -> dict[str, int]:
    """A vocabulary's token -> id mapping from JSON text, checked: string keys, non-negative ids."""
    try:
        encoder = json.loads(text) if isinstance(text, str) else None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, huge integers, deep nesting
        reason = " ".join(str(exc).split())[:120] or type(exc).__name__
        raise UserError(f"{source} is not valid JSON: {reason}") from None
    valid = isinstance(encoder, dict) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in encoder.values()
    )
    if not valid:
        raise UserError(f"{source} is not a token -> id mapping (non-negative integer ids)")
    return encoder


def _check_vocab(encoder: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """A vocabulary read from files must hold every byte symbol, every merged symbol and both special
    tokens."""
    missing = [t for t in (*_vocab_order(), SOT, EOT) if t not in encoder]
    missing += [a + b for a, b in merges if a + b not in encoder]
    if missing:
        raise UserError(
            f"the vocabulary lacks {len(missing)} token(s) its merges need, e.g. {missing[0]!r}"
        )


def _stored_context_length(meta: dict[str, str]) -> int:
    text = meta.get("tokenizer.context_length", str(CONTEXT_LENGTH))
    value = int(text) if re.fullmatch(r"[0-9]{1,9}", str(text).strip()) else 0
    # at least room for the start and end tokens; at most what anything is ever sized by
    if not 2 <= value <= MAX_CONTEXT_LENGTH:
        raise UserError(
            f"checkpoint field tokenizer.context_length must be an integer of at least 2 and at "
            f"most {MAX_CONTEXT_LENGTH}, not {str(text)[:20]!r}"
        )
    return value


def _stored_vocab(text: str) -> dict[str, int]:
    """A vocabulary stored in checkpoint metadata: a JSON object of symbols to non-negative ids."""
    try:
        encoder = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than Python goes
        encoder = None
    if not isinstance(encoder, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in encoder.values()
    ):
        raise UserError(
            "checkpoint field tokenizer.vocab must be a JSON object of symbols to token ids"
        )
    return encoder


class Tokenizer:
    """Byte-level BPE: `encoder` maps symbols (and the two special tokens) to ids; `merges` in rank
    order."""

    def __init__(
        self,
        encoder: dict[str, int],
        merges: list[tuple[str, str]],
        context_length: int = CONTEXT_LENGTH,
    ) -> None:
        if SOT not in encoder or EOT not in encoder:
            raise UserError(
                f"the vocabulary has no {SOT} / {EOT} tokens; it is not a CLIP vocabulary"
            )
        self.encoder = encoder
        self.merges = [tuple(m) for m in merges]
        self.context_length = context_length
        self.sot_token_id = encoder[SOT]
        self.eot_token_id = encoder[EOT]
        self.vocab_size = max(encoder.values()) + 1
        if self.eot_token_id != self.vocab_size - 1:
            raise UserError(
                f"the vocabulary's {EOT} must have the largest id (the model reads the text there)"
            )
        self._ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        self._decoder: dict[int, str] | None = None
        # is_standard() hashes the merges: ~80 ms, so once per tokenizer
        self._standard: bool | None = None
        self._layout = False  # True when `encoder` was built by _layout_encoder(merges)
        self._setup_cache()

    def _setup_cache(self) -> None:
        # A bounded LRU of word -> ids; built per instance so each tokenizer has its own.
        self._word_ids = functools.lru_cache(maxsize=WORD_CACHE_SIZE)(self._bpe_ids)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state[
            "_word_ids"
        ]  # an lru_cache wrapper does not pickle (DataLoader workers pickle us)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._setup_cache()

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, context={self.context_length})"

    # ---- loaders
    # -------------------------------------------------------------------------------------------
    @classmethod
    def from_merges(
        cls, merges: Iterable[tuple[str, str]], context_length: int = CONTEXT_LENGTH
    ) -> Tokenizer:
        """A tokenizer with the standard id layout for these merges (rank order)."""
        merges = [(a, b) for a, b in merges]
        tokenizer = cls(_layout_encoder(merges), merges, context_length)
        tokenizer._layout = True  # is_standard() need not build the layout again to compare
        return tokenizer

    @classmethod
    def from_openai_bpe(cls, path: str | Path, context_length: int = CONTEXT_LENGTH) -> Tokenizer:
        """OpenAI's `bpe_simple_vocab_16e6.txt.gz`: a version header, then merges; the first 48,894 are
        used."""
        try:
            data = _read_merges_gz(path)
            lines = data.decode("utf-8").split("\n")[
                1 : STANDARD_MERGES + 1
            ]  # drop the version header
        except (OSError, EOFError, UnicodeDecodeError, zlib.error) as exc:
            reason = " ".join(str(exc).split())[:200]
            raise UserError(
                f"cannot read BPE merges from {path}: {reason}; expected {OPENAI_FILE}"
            ) from None
        return cls.from_merges(_parse_merges(lines, str(path)), context_length)

    @classmethod
    def from_hf_files(
        cls, vocab_json: str | Path, merges_txt: str | Path, context_length: int = CONTEXT_LENGTH
    ) -> Tokenizer:
        """Hugging Face `vocab.json` (ids used as given) and `merges.txt` (a '#version' header, then
        merges)."""
        try:
            vocab_text = Path(vocab_json).read_text(encoding="utf-8")
            merges = _parse_merges(
                Path(merges_txt).read_text(encoding="utf-8").splitlines(), str(merges_txt)
            )
        except (OSError, UnicodeDecodeError) as exc:
            reason = " ".join(str(exc).split())[:200]
            raise UserError(f"cannot read {vocab_json} + {merges_txt}: {reason}") from None
        encoder = _parse_encoder(vocab_text, str(vocab_json))
        _check_vocab(encoder, merges)
        return cls(encoder, merges, context_length)

    # ---- checkpoint storage
    # --------------------------------------------------------------------------------
    def is_standard(self) -> bool:
        """True for exactly OpenAI's 49,408-token vocabulary (same merges and same ids)."""
        if self._standard is None:
            self._standard = (
                self.vocab_size == 49408
                and len(self.merges) == STANDARD_MERGES
                and _merges_digest(self.merges) == STANDARD_MERGES_SHA256
                and (self._layout or self.encoder == _layout_encoder(self.merges))
            )
        return self._standard

    def to_metadata(self, *, self_contained: bool = False) -> dict[str, str]:
        """String-valued entries for a safetensors header: the standard vocabulary's name, or the
        merges themselves. `self_contained` stores even the standard merges (1.3 MiB of header), so
        that the file loads where the standard vocabulary cannot be found or fetched."""
        meta = (
            {"tokenizer": STANDARD_NAME}
            if self.is_standard() and not self_contained
            else {
                "tokenizer": "bpe",
                "tokenizer.merges": "\n".join(f"{a} {b}" for a, b in self.merges),
            }
        )
        if meta["tokenizer"] == "bpe" and self.encoder != _layout_encoder(self.merges):
            meta["tokenizer.vocab"] = json.dumps(
                self.encoder, ensure_ascii=False
            )  # ids not in our layout
        if meta["tokenizer"] == "bpe" or self.context_length != CONTEXT_LENGTH:
            meta["tokenizer.context_length"] = str(self.context_length)
        return meta

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> Tokenizer | None:
        """The tokenizer stored by `to_metadata`; None if none is stored.

        Raises NeedsStandardVocab when the metadata names the standard vocabulary (its merges are
        not stored); the caller then uses `find_vocab`. Raises UserError for a tokenizer kind this
        version does not know.
        """
        kind = meta.get("tokenizer")
        if kind is None:
            return None
        context_length = _stored_context_length(meta)
        if kind == STANDARD_NAME:
            raise NeedsStandardVocab(kind, context_length)
        if kind != "bpe":
            raise UserError(
                f"the checkpoint uses tokenizer {kind!r}, which this zsclip does not know; upgrade zsclip"
            )
        merges = _parse_merges(
            str(meta.get("tokenizer.merges", "")).split("\n"), "checkpoint metadata"
        )
        if "tokenizer.vocab" in meta:
            encoder = _stored_vocab(meta["tokenizer.vocab"])
            _check_vocab(encoder, merges)
            return cls(encoder, merges, context_length)
        return cls.from_merges(merges, context_length)

    # ---- encoding
    # ------------------------------------------------------------------------------------------
    def _bpe_ids(self, word: str) -> tuple[int, ...]:
        """Ids of one pre-tokenised piece (uncached; `_word_ids` is the cached entry point)."""
        if word in (SOT, EOT):
            return (self.encoder[word],)
        ranks, parts = self._ranks, word_symbols(word)
        while len(parts) > 1:
            # The adjacent pair with the lowest merge rank is merged everywhere in the word, then
            # repeat.
            best, best_rank = None, len(ranks)
            for pair in zip(parts, parts[1:]):
                rank = ranks.get(pair, best_rank)
                if rank < best_rank:
                    best, best_rank = pair, rank
            if best is None:
                break
            parts = merge_pair(parts, *best)
        return tuple(self.encoder[p] for p in parts)

    def encode(self, text: str) -> list[int]:
        """Ids of `text`, without start/end tokens and without truncation."""
        ids: list[int] = []
        for word in split_words(text):
            ids.extend(self._word_ids(word))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text for ids (special tokens and padding dropped); words separated by single spaces."""
        if self._decoder is None:
            self._decoder = {i: t for t, i in self.encoder.items()}
        to_byte = {s: b for b, s in enumerate(_byte_symbols())}
        skip = {self.sot_token_id, self.eot_token_id, 0}
        text = "".join(self._decoder[i] for i in ids if i not in skip)
        raw = bytearray()
        for piece in text.split(END_OF_WORD):
            raw += bytes(to_byte[c] for c in piece) + b" "
        return raw.decode("utf-8", errors="replace").strip()

    def token_lists(
        self, texts: str | list[str], context_length: int | None = None
    ) -> list[list[int]]:
        """[sot, ids..., eot] per text, cut to `context_length` with the end token kept last (not
        padded)."""
        length = context_length or self.context_length
        if length < 2:
            raise ValueError("context_length must leave room for the start and end tokens")
        out = []
        for text in [texts] if isinstance(texts, str) else texts:
            ids = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(ids) > length:
                ids = ids[: length - 1] + [self.eot_token_id]
            out.append(ids)
        return out

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        """LongTensor [N, L]: start, ids, end, zero padding; too-long texts are cut and still end with
        eot."""
        import torch

        length = context_length or self.context_length
        # One flat int64 buffer: several times faster than torch.tensor on nested lists for many
        # prompts.
        flat, padding = array.array("q"), array.array("q", [0]) * length
        for row in self.token_lists(texts, length):
            flat.extend(row)
            flat.extend(padding[: length - len(row)])
        if not flat:
            return torch.zeros(0, length, dtype=torch.long)
        return (
            torch.frombuffer(flat, dtype=torch.long).view(-1, length).clone()
        )  # clone: own the memory

    def count_truncated(self, texts: str | list[str], context_length: int | None = None) -> int:
        """How many of `texts` do not fit in `context_length` tokens with their start and end tokens."""
        length = context_length or self.context_length
        return sum(
            len(self.encode(t)) + 2 > length for t in ([texts] if isinstance(texts, str) else texts)
        )
