"""Fuzzing the checkpoint readers: random bytes, and random damage to valid files of every format
(zsclip .safetensors, an OpenAI state dict written by torch.save, a TorchScript archive, a Hugging
Face folder), must load or fail with one UserError line: never another exception, never a hang,
never a runaway allocation.

Damage goes where each reader looks: bytes anywhere (mostly near the ends, where headers and zip
directories are), the contents of one zip member rewritten with a valid CRC (so data.pkl reaches the
unpickler), and JSON values swapped into a zsclip header or a config.json. The runs are derandomized
so CI is repeatable; ZSCLIP_FUZZ_EXAMPLES=N runs N random examples per test instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import struct
import tempfile
import zipfile
from pathlib import Path

import pytest
from checkpoint_files import Formats, build_formats

from zsclip.core.checkpoints import load_path
from zsclip.errors import UserError

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_CAMPAIGN = int(os.environ.get("ZSCLIP_FUZZ_EXAMPLES", "0"))
HANG_SECONDS = 60  # far beyond any honest load of these 1 MB files: only a hang gets near it
RSS_GROWTH_LIMIT = 1 << 30  # bytes; the files are ~1 MB, so anything near this is a runaway


def fuzz(examples: int):
    return settings(
        max_examples=_CAMPAIGN or examples,
        derandomize=not _CAMPAIGN,
        deadline=None,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.function_scoped_fixture,  # the memory guard: once per test, on purpose
        ],
    )


@pytest.fixture(scope="module")
def formats(tmp_path_factory) -> Formats:
    return build_formats(tmp_path_factory.mktemp("formats"))


@pytest.fixture(autouse=True)
def _no_runaway_memory():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    yield
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    assert grown < RSS_GROWTH_LIMIT, f"peak memory grew by {grown:,} bytes"


@contextlib.contextmanager
def _hang_guard():
    def hung(signum, frame):
        raise TimeoutError(f"loading took over {HANG_SECONDS} s: a hang")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(HANG_SECONDS)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _loads_or_says_why(path: Path) -> None:
    """Success, or one non-empty line of UserError; anything else fails the test."""
    with _hang_guard():
        try:
            load_path(path)
        except UserError as err:
            message = str(err)
            assert message.strip() and "\n" not in message and "\r" not in message, message


@contextlib.contextmanager
def _scratch(like: Path):
    """A fresh folder holding copies of the vocabulary files beside `like`."""
    with tempfile.TemporaryDirectory() as folder:
        for name in ("vocab.json", "merges.txt"):
            if (like.parent / name).is_file():
                shutil.copy(like.parent / name, Path(folder) / name)
        yield Path(folder)


# ------------------------------------------------------------------------------------------- damage

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=6,
)


def _damage(data: bytes, draw) -> bytes:
    """One to four edits: flips, overwrites, insertions, deletions, a truncation; positions mostly
    within 8 KiB of either end (headers, pickles, zip directories), sometimes anywhere."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        n = len(out)
        if n == 0:
            out += draw(st.binary(max_size=16))
            continue
        near = st.integers(0, min(n, 8192) - 1) | st.integers(max(0, n - 8192), n - 1)
        pos = draw(near | st.integers(0, n - 1))
        op = draw(st.sampled_from(["flip", "overwrite", "insert", "delete", "truncate"]))
        if op == "flip":
            out[pos] ^= draw(st.integers(1, 255))
        elif op == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=16))
            out[pos : pos + len(chunk)] = chunk
        elif op == "insert":
            out[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del out[pos : pos + draw(st.integers(1, 64))]
        else:
            del out[pos:]
    return bytes(out)


def _rewrite_member(src: Path, dst: Path, draw) -> None:
    """Copy a zip archive with one member's contents damaged (the CRC made to match)."""
    with zipfile.ZipFile(src) as old:
        infos = old.infolist()
        pickles = [i for i, info in enumerate(infos) if info.filename.endswith(".pkl")]
        index = draw(st.sampled_from(pickles) | st.integers(0, len(infos) - 1))
        with zipfile.ZipFile(dst, "w") as new:
            for i, info in enumerate(infos):
                data = old.read(info)
                new.writestr(info, _damage(data, draw) if i == index else data)


def _set_json(value, draw):
    """`value` (parsed JSON) with one field somewhere replaced by random JSON, or removed."""
    if not isinstance(value, dict) or not value:
        return draw(_JSON)
    key = draw(st.sampled_from(sorted(value)))
    out = dict(value)
    choice = draw(st.sampled_from(["replace", "descend", "delete"]))
    if choice == "delete":
        del out[key]
    elif choice == "descend":
        out[key] = _set_json(value[key], draw)
    else:
        out[key] = draw(_JSON)
    return out


# -------------------------------------------------------------------------------------------- tests

_PREFIXES = [
    b"",
    b"PK\x03\x04",
    b"PK\x05\x06",
    b"\x80\x02",
    b"\x80\x05",
    struct.pack("<Q", 64) + b"{",
]


@fuzz(60)
@given(
    prefix=st.sampled_from(_PREFIXES),
    body=st.binary(max_size=2048),
    suffix=st.sampled_from([".pt", ".bin", ".safetensors"]),
)
def test_random_bytes(prefix, body, suffix):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"model{suffix}"
        path.write_bytes(prefix + body)
        _loads_or_says_why(path)


@pytest.mark.parametrize("kind", ["zsclip", "openai", "torchscript", "huggingface"])
@fuzz(30)
@given(data=st.data())
def test_damaged_bytes(formats, kind, data):
    src = getattr(formats, kind)
    weights = src / "model.safetensors" if kind == "huggingface" else src
    with _scratch(weights) as folder:
        if kind == "huggingface":
            shutil.copy(src / "config.json", folder / "config.json")
        target = folder / weights.name
        target.write_bytes(_damage(weights.read_bytes(), data.draw))
        _loads_or_says_why(folder if kind == "huggingface" else target)


@pytest.mark.parametrize("kind", ["openai", "torchscript"])
@fuzz(40)
@given(data=st.data())
def test_damaged_zip_members(formats, kind, data):
    src = getattr(formats, kind)
    with _scratch(src) as folder:
        _rewrite_member(src, folder / src.name, data.draw)
        _loads_or_says_why(folder / src.name)


@fuzz(30)
@given(data=st.data())
def test_lying_zsclip_header(formats, data):
    from safetensors.torch import load_file

    from zsclip.core.safetensors_io import read_metadata, write_safetensors

    metadata = read_metadata(formats.zsclip)
    key = data.draw(st.sampled_from(sorted(metadata)))
    if key in ("config", "preprocess"):
        value = _set_json(json.loads(metadata[key]), data.draw)
        metadata[key] = json.dumps(value) if data.draw(st.booleans()) else json.dumps(value)[:-1]
    else:
        metadata[key] = data.draw(st.text(max_size=24))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.safetensors"
        write_safetensors(path, load_file(formats.zsclip), metadata)
        _loads_or_says_why(path)


@fuzz(40)
@given(data=st.data())
def test_lying_hf_config(formats, data):
    config = json.loads((formats.huggingface / "config.json").read_text())
    text = json.dumps(_set_json(config, data.draw))
    if data.draw(st.booleans()):
        text = _damage(text.encode(), data.draw).decode("utf-8", "replace")
    with _scratch(formats.huggingface / "model.safetensors") as folder:
        (folder / "config.json").write_text(text)
        os.symlink(formats.huggingface / "model.safetensors", folder / "model.safetensors")
        _loads_or_says_why(folder)
