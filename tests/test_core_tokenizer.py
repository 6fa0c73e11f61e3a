"""CLIP BPE tokenizer: ids equal the reference tokenizers', loaders agree, storage, training, vocabulary search."""

from __future__ import annotations

import gzip
import importlib.util
import json
import pickle
import random
import types
from pathlib import Path

import pytest

from zsclip.core.tokenizer import (
    NeedsStandardVocab,
    Tokenizer,
)
from zsclip.core.vocab import find_vocab, tokenizer_for_checkpoint
from zsclip.errors import UserError
from zsclip.train.bpe import train_bpe

CORGI = [49406, 320, 1125, 539, 320, 31320, 269, 49407]

# Plain text: cleaning is the identity apart from whitespace and case, so every CLIP tokenizer must agree.
PLAIN = [
    "a photo of a corgi.",
    "",
    "   ",
    "A PHOTO OF A CORGI",
    "Héllo Wörld, naïve café — résumé",
    "日本語のテキスト 中文 한국어 Ελληνικά русский",
    "🐶🐱 dog and cat 👍🏽 🇺🇸 👨‍👩‍👧",
    "12345 3.14159 1st 2nd 100% 0x1F",
    "I'm you're we've they'll she'd it's don't CAN'T",
    "  lots   of\t\twhitespace \n\n here  \r\n",
    "The QUICK brown fox's 3 dogs!!! ??? ... ---",
    "x" * 300,
]
# Text that only a faithful cleaner (ftfy + html.unescape twice) gets right.
DIRTY = [
    "&amp; &lt;3 &amp;amp; &quot;quoted&quot; &#39;s &eacute;",
    "Tom &amp; Jerry <b>bold</b> &lt;tag&gt;",
    "cafÃ© crÃ¨me brÃ»lÃ©e",
    "â€œsmart quotesâ€\x9d and ‘curly’ “quotes”",
    "ﬁne ligature, ＡＢＣ１２３ fullwidth",
    "a\x1cb\x1fc\x00d\x0be control",
    "\x1b[31mred\x1b[0m terminal",
    "\u00a0nbsp\u2003em space\u200bzero width",
    "İstanbul ǅemal ß",
    "lone \ud800 surrogate",
    "<i>x</i> &amp;lt;3 and &amp;amp;amp; twice",  # ftfy leaves entities alone when '<' is present
    "it'ſ the long-s contraction 'ſ",  # matched as 's only under IGNORECASE
]
LONG = ["dog " * 200, "é" * 300, "🐶" * 100, "word, " * 40 + "end"]
CORPUS = PLAIN + DIRTY + LONG


@pytest.fixture(scope="module")
def standard(standard_vocab_path: Path) -> Tokenizer:
    return Tokenizer.from_openai_bpe(standard_vocab_path)


@pytest.fixture(scope="module")
def hf_files(standard: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The standard vocabulary in Hugging Face's file format, written from the .gz file."""
    folder = tmp_path_factory.mktemp("hf_vocab")
    (folder / "vocab.json").write_text(
        json.dumps(standard.encoder, ensure_ascii=False), encoding="utf-8"
    )
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in standard.merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder / "vocab.json", folder / "merges.txt"


def _load_open_clip_tokenizer_module(vocab_path: Path) -> types.ModuleType:
    """open_clip/tokenizer.py (OpenAI's tokenizer, copied) loaded by file path: open_clip itself needs torchvision."""
    source = vocab_path.parent / "tokenizer.py"
    spec = importlib.util.spec_from_file_location("_reference_clip_tokenizer", source)
    if spec is None or spec.loader is None or not source.is_file():
        pytest.fail(f"reference tokenizer {source} not found next to the vocabulary")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # a failure here must fail the test, not skip it
    return module


def test_corgi(standard: Tokenizer) -> None:
    tokens = standard("a photo of a corgi.")
    assert tokens.shape == (1, 77) and str(tokens.dtype) == "torch.int64"
    assert tokens[0].tolist() == CORGI + [0] * (77 - len(CORGI))
    assert standard.encode("a photo of a corgi.") == CORGI[1:-1]
    assert (standard.vocab_size, standard.sot_token_id, standard.eot_token_id) == (
        49408,
        49406,
        49407,
    )


def test_ids_equal_openai_reference(
    standard: Tokenizer, standard_vocab_path: Path, monkeypatch
) -> None:
    ref_module = _load_open_clip_tokenizer_module(standard_vocab_path)
    reference = ref_module.SimpleTokenizer(str(standard_vocab_path))
    real_ftfy, calls = ref_module.ftfy, []

    def fix_text(text: str) -> str:  # prove the reference really cleans with ftfy
        calls.append(text)
        return real_ftfy.fix_text(text)

    monkeypatch.setattr(ref_module, "ftfy", types.SimpleNamespace(fix_text=fix_text))
    for text in CORPUS:
        assert standard.encode(text) == reference.encode(text), repr(text)
    assert len(calls) == len(CORPUS)
    rng = random.Random(0)  # and a few hundred random strings over a hostile alphabet
    alphabet = (
        [chr(i) for i in range(128)]
        + list("éÃ©â€œ\x9d🐶日\u00a0\u2028ﬁＡſK")
        + ["&amp;", "&lt;", "'s", "'ll"]
    )
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        assert standard.encode(text) == reference.encode(text), repr(text)
    assert reference.encode("cafÃ©") == reference.encode("café") != reference.encode("cafe")
    assert reference.encode("&amp;lt;3") == reference.encode("<3")
    assert (
        standard(CORPUS).tolist() == reference(CORPUS).tolist()
    )  # padding, truncation, eot kept last


def test_ids_equal_transformers_on_plain_text(
    standard: Tokenizer, hf_files: tuple[Path, Path]
) -> None:
    # transformers 5 has only the fast CLIPTokenizer, which normalises with NFC instead of ftfy: compare plain text.
    from transformers import CLIPTokenizer

    reference = CLIPTokenizer.from_pretrained(str(hf_files[0].parent))
    ours = Tokenizer.from_hf_files(*hf_files)
    for text in PLAIN + LONG:
        expected = reference(text, add_special_tokens=True, truncation=True, max_length=77)[
            "input_ids"
        ]
        assert ours.token_lists(text)[0] == expected, repr(text)


def test_hf_files_equal_openai_file(standard: Tokenizer, hf_files: tuple[Path, Path]) -> None:
    from_hf = Tokenizer.from_hf_files(*hf_files)
    assert from_hf.encoder == standard.encoder and from_hf.merges == standard.merges
    assert from_hf(CORPUS).tolist() == standard(CORPUS).tolist()
    assert from_hf.to_metadata() == {"tokenizer": "clip-bpe-49408"}


def test_truncation_and_count(standard: Tokenizer) -> None:
    tokens = standard(["dog " * 200, "a corgi", ""], context_length=16)
    assert tokens.shape == (3, 16)
    assert (
        tokens[0, -1].item() == standard.eot_token_id
        and tokens[0, 0].item() == standard.sot_token_id
    )
    assert tokens[2].tolist() == [49406, 49407] + [0] * 14
    assert (
        standard.count_truncated(["dog " * 200, "a corgi", "", "dog " * 75]) == 1
    )  # 75 + 2 = 77 fits
    assert standard.count_truncated(["dog " * 14, "dog " * 15], context_length=16) == 1
    assert all(row.argmax().item() == row.tolist().index(49407) for row in standard(CORPUS))


def test_special_tokens_and_decode(standard: Tokenizer) -> None:
    # As in OpenAI's tokenizer, the literal special-token strings in text become the special ids.
    assert standard.encode("<|endoftext|>") == [49407]
    assert standard.encode("a <|startoftext|>") == [320, 49406]
    assert standard.decode(standard.encode("Hello, wörld! 🐶")) == "hello , wörld ! 🐶"


def test_standard_metadata_is_only_a_name(standard: Tokenizer) -> None:
    meta = standard.to_metadata()
    assert meta == {"tokenizer": "clip-bpe-49408"}
    with pytest.raises(NeedsStandardVocab):
        Tokenizer.from_metadata(meta)
    assert Tokenizer.from_metadata({"model.config": "{}"}) is None
    with pytest.raises(UserError, match="upgrade"):
        Tokenizer.from_metadata({"tokenizer": "sentencepiece"})
    cut = Tokenizer.from_merges(standard.merges[:-1])
    assert cut.to_metadata()["tokenizer"] == "bpe"  # one merge short is not the standard vocabulary


CAPTIONS = [
    f"a {size} {colour} {shape}"
    for size in ("small", "big")
    for colour in ("red", "green", "blue", "yellow", "purple")
    for shape in ("circle", "square", "hexagon", "star")
]


def test_train_bpe_round_trip_and_determinism() -> None:
    corpus = CAPTIONS * 5
    tokenizer = train_bpe(corpus, 1000)
    assert tokenizer.vocab_size == 512 + len(tokenizer.merges) + 2 <= 1000
    assert tokenizer.eot_token_id == tokenizer.vocab_size - 1
    for word in ("hexagon", "purple", "yellow", "circle"):
        assert len(tokenizer.encode(word)) == 1  # frequent training words become one token each
    assert len(tokenizer.encode("a big purple hexagon")) == 4
    shuffled = corpus[:]
    random.Random(0).shuffle(shuffled)
    assert train_bpe(shuffled, 1000).merges == tokenizer.merges
    assert train_bpe(corpus, 530).merges == tokenizer.merges[:16]  # a smaller size is a prefix

    meta = tokenizer.to_metadata()
    assert meta["tokenizer"] == "bpe" and all(isinstance(v, str) for v in meta.values())
    back = Tokenizer.from_metadata(meta)
    assert back.merges == tokenizer.merges and back.encoder == tokenizer.encoder
    texts = CAPTIONS + ["an unseen café 🐶 caption"]
    assert back(texts).tolist() == tokenizer(texts).tolist()
    copy = pickle.loads(pickle.dumps(tokenizer))  # DataLoader workers pickle the tokenizer
    assert copy(texts).tolist() == tokenizer(texts).tolist()


def test_train_bpe_larger_corpus() -> None:
    rng = random.Random(1)
    nouns = [f"thing{i}" for i in range(300)] + [
        "zebra",
        "giraffe",
        "elephant",
        "kangaroo",
        "octopus",
    ]
    corpus = [f"a photo of {rng.choice(nouns)} near the {rng.choice(nouns)}" for _ in range(5000)]
    tokenizer = train_bpe(corpus, 1500)
    assert 514 < tokenizer.vocab_size <= 1500
    assert len(tokenizer.encode("a photo of a kangaroo near the octopus")) <= 9
    with pytest.raises(ValueError):
        train_bpe(corpus, 100)


def _write_openai(path: Path, merges: list[tuple[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("#version: test\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return path


def _write_hf(folder: Path, merges: list[tuple[str, str]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(
        json.dumps(Tokenizer.from_merges(merges).encoder), encoding="utf-8"
    )
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return folder


MERGES = [("d", "o"), ("do", "g</w>"), ("c", "a"), ("ca", "t</w>"), ("a", "n")]


@pytest.fixture
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ZSCLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ZSCLIP_VOCAB", raising=False)
    return tmp_path


def test_find_vocab_order(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def size(explicit=None, beside=None) -> int:
        return len(find_vocab(explicit, beside).merges)

    checkpoint = clean_env / "ckpt"
    _write_openai(clean_env / "cache" / "bpe_simple_vocab_16e6.txt.gz", MERGES[:4])
    assert size(None, checkpoint) == 4
    _write_openai(checkpoint / "bpe_simple_vocab_16e6.txt.gz", MERGES[:3])
    assert size(None, checkpoint) == 3
    (checkpoint / "model.safetensors").write_bytes(b"")
    _write_hf(checkpoint, MERGES[:2])
    assert size(None, checkpoint) == 2 and size(None, checkpoint / "model.safetensors") == 2
    explicit = _write_openai(clean_env / "mine" / "vocab.txt.gz", MERGES[:1])
    monkeypatch.setenv("ZSCLIP_VOCAB", str(explicit))
    assert size(None, checkpoint) == 1
    assert size(checkpoint / "vocab.json", checkpoint) == 2  # --vocab beats the environment
    assert size(checkpoint, None) == 2  # a folder with vocab.json + merges.txt
    assert size(_write_hf(clean_env / "hf", MERGES) / "merges.txt") == 5


def test_find_vocab_error_names_places_and_fix(clean_env: Path) -> None:
    with pytest.raises(UserError) as caught:
        find_vocab(None, clean_env / "ckpt")
    message = str(caught.value)
    assert "\n" not in message and caught.value.exit_code == 2
    for part in (
        "ZSCLIP_VOCAB",
        str(clean_env / "ckpt" / "vocab.json"),
        "zsclip download vocab",
        "--vocab",
        str(clean_env / "ckpt" / "bpe_simple_vocab_16e6.txt.gz"),
        "open_clip",
        str(clean_env / "cache" / "bpe_simple_vocab_16e6.txt.gz"),
    ):
        assert part in message
    with pytest.raises(UserError, match="does not exist"):
        find_vocab(clean_env / "missing.txt.gz", None)
    (clean_env / "bad.txt.gz").write_bytes(b"not gzip")
    with pytest.raises(UserError, match="cannot read"):
        find_vocab(clean_env / "bad.txt.gz", None)


def test_tokenizer_for_checkpoint(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trained = Tokenizer.from_merges(MERGES[:2]).to_metadata()
    beside = _write_openai(clean_env / "ckpt" / "bpe_simple_vocab_16e6.txt.gz", MERGES[:3]).parent
    monkeypatch.setenv("ZSCLIP_VOCAB", str(_write_openai(clean_env / "env.txt.gz", MERGES[:4])))
    assert (
        len(tokenizer_for_checkpoint(trained, None, beside).merges) == 2
    )  # stored merges beat the env var
    assert len(tokenizer_for_checkpoint({"tokenizer": "clip-bpe-49408"}, None, beside).merges) == 4
    monkeypatch.delenv("ZSCLIP_VOCAB")
    assert len(tokenizer_for_checkpoint({}, None, beside).merges) == 3
    assert (
        len(tokenizer_for_checkpoint(trained, beside, None).merges) == 3
    )  # --vocab beats everything
    with pytest.raises(UserError, match="model expects 49408"):
        tokenizer_for_checkpoint(trained, None, None, expected_size=49408)
