"""Fuzzing the tokenizer: encoding random Unicode (lone surrogates, control and format characters,
every script), and loading random or mutated vocabulary files and checkpoint metadata. Encoding never
fails; loading gives a Tokenizer or one UserError line: never another exception, a hang or runaway
memory."""

from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path

import pytest
from fuzz_helpers import FUZZ, bounded, mutations
from hypothesis import given
from hypothesis import strategies as st

from zsclip.core.tokenizer import END_OF_WORD, Tokenizer, _byte_symbols
from zsclip.errors import UserError

# A small vocabulary with the standard id layout: every byte, a few merges, start and end.
MERGES = [("t", "h"), ("th", "e" + END_OF_WORD), ("a", "n"), ("an", "d" + END_OF_WORD), ("c", "a")]
SMALL = Tokenizer.from_merges(MERGES)

ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=200)  # surrogates included


@pytest.fixture(scope="module")
def standard(standard_vocab_path: Path) -> Tokenizer:
    return Tokenizer.from_openai_bpe(standard_vocab_path)


def _check_ids(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    batch = tokenizer([text, "a photo"], context_length=16)  # [2, 16]
    assert batch.shape == (2, 16) and int(batch[0, 0]) == tokenizer.sot_token_id
    assert tokenizer.eot_token_id in batch[0].tolist()


@FUZZ
@given(text=ANY_TEXT)
def test_any_text_encodes(text: str) -> None:
    with bounded(seconds=20, memory_mib=256):
        _check_ids(SMALL, text)


@FUZZ
@given(text=ANY_TEXT)
def test_any_text_encodes_with_the_standard_vocabulary(standard: Tokenizer, text: str) -> None:
    with bounded(seconds=20, memory_mib=256):
        _check_ids(standard, text)


def test_text_from_undecodable_command_line_bytes_encodes() -> None:
    """Arguments that are not UTF-8 reach Python as lone surrogates (surrogateescape); cleaning turns
    them into U+FFFD, so they encode like the replacement character instead of failing."""
    label = b"caf\xe9 \xff".decode("utf-8", "surrogateescape")
    assert SMALL.encode(label) == SMALL.encode("caf\ufffd \ufffd")
    assert SMALL.encode("\ud800 x") == SMALL.encode("\ufffd x")


# ---- loading

SYMBOLS = _byte_symbols()
MERGES_TEXT = "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in MERGES) + "\n"
VOCAB_JSON = json.dumps(SMALL.encoder, ensure_ascii=False)
META = SMALL.to_metadata() | {"tokenizer.vocab": VOCAB_JSON}


@pytest.fixture(scope="module")
def folder():
    with tempfile.TemporaryDirectory(prefix="zsclip-fuzz-tokenizer-") as name:
        yield Path(name)


def test_the_valid_files_load(folder: Path) -> None:
    (folder / "vocab.json").write_text(VOCAB_JSON, encoding="utf-8")
    (folder / "merges.txt").write_text(MERGES_TEXT, encoding="utf-8")
    assert Tokenizer.from_hf_files(folder / "vocab.json", folder / "merges.txt").encode("the") == (
        SMALL.encode("the")
    )
    (folder / "bpe.txt.gz").write_bytes(gzip.compress(MERGES_TEXT.encode()))
    assert Tokenizer.from_openai_bpe(folder / "bpe.txt.gz").merges == MERGES
    assert Tokenizer.from_metadata(META).encode("the cat") == SMALL.encode("the cat")


def _loads_or_refuses(load) -> None:
    with bounded(seconds=20, memory_mib=512):
        try:
            tokenizer = load()
        except UserError as err:
            assert "\n" not in str(err).strip() and len(str(err)) < 600
            return
    if tokenizer is not None:
        _check_ids(tokenizer, "the cat and a dog")


@FUZZ
@given(
    vocab=st.one_of(mutations(VOCAB_JSON.encode()), st.binary(max_size=300)),
    merges=st.one_of(mutations(MERGES_TEXT.encode()), st.binary(max_size=300)),
)
def test_hugging_face_files_load_or_refuse(folder: Path, vocab: bytes, merges: bytes) -> None:
    (folder / "vocab.json").write_bytes(vocab)
    (folder / "merges.txt").write_bytes(merges)
    _loads_or_refuses(lambda: Tokenizer.from_hf_files(folder / "vocab.json", folder / "merges.txt"))


@FUZZ
@given(
    data=st.one_of(
        mutations(gzip.compress(MERGES_TEXT.encode())),
        mutations(MERGES_TEXT.encode()).map(gzip.compress),
        st.binary(max_size=300),
    )
)
def test_openai_merges_files_load_or_refuse(folder: Path, data: bytes) -> None:
    (folder / "bpe.txt.gz").write_bytes(data)
    _loads_or_refuses(lambda: Tokenizer.from_openai_bpe(folder / "bpe.txt.gz"))


def test_a_gzip_bomb_is_refused_without_inflating_it(folder: Path) -> None:
    """Merges are read only as far as a real vocabulary needs: a small .gz of endless data is refused."""
    with gzip.open(folder / "bomb.txt.gz", "wb", compresslevel=1) as handle:
        for _ in range(16):
            handle.write(
                b"\0" * (4 << 20)
            )  # 64 MiB inflated (or as much as you like), no line break
    with bounded(seconds=60, memory_mib=64), pytest.raises(UserError, match="merges"):
        Tokenizer.from_openai_bpe(folder / "bomb.txt.gz")


_TEXT_FIELDS = st.one_of(
    st.text(max_size=40), st.sampled_from(["0", "1", "-5", "77", "1e9", "99999999999"])
)


@FUZZ
@given(
    merges=st.one_of(
        mutations(MERGES_TEXT.encode()).map(lambda b: b.decode("utf-8", "replace")),
        st.text(max_size=200),
    ),
    vocab=st.one_of(
        st.none(),
        mutations(VOCAB_JSON.encode()).map(lambda b: b.decode("utf-8", "replace")),
        st.text(max_size=100),
    ),
    context=st.one_of(st.none(), _TEXT_FIELDS),
)
def test_checkpoint_metadata_loads_or_refuses(merges: str, vocab, context) -> None:
    meta = {"tokenizer": "bpe", "tokenizer.merges": merges}
    if vocab is not None:
        meta["tokenizer.vocab"] = vocab
    if context is not None:
        meta["tokenizer.context_length"] = context
    _loads_or_refuses(lambda: Tokenizer.from_metadata(meta))
