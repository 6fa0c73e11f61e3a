"""Fuzzing the embeddings reader (`classify --embeddings`): random bytes and random mutations of valid
.npy (with its row list), .safetensors and .jsonl files. Each must read back as a consistent table or
fail with one UserError line: never another exception, a hang or an allocation a header merely claims."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from fuzz_helpers import FUZZ, bounded, files_from
from hypothesis import given

from zsclip.errors import UserError
from zsclip.jobs.embed import Embedding
from zsclip.jobs.embedding_files import EmbeddingFile, read_embeddings, sidecar_path

KEYS = ["a.jpg", "new\nline.jpg", '"quoted".jpg']


def _valid_files(folder: Path) -> dict[str, bytes]:
    generator = torch.Generator().manual_seed(0)
    vectors = torch.nn.functional.normalize(torch.randn(len(KEYS), 4, generator=generator), dim=-1)
    files = {}
    for suffix in ("npy", "safetensors", "jsonl"):
        sink = EmbeddingFile(folder / f"seed.{suffix}", model_name="m")
        for key, vector in zip(KEYS, vectors):
            sink.write(Embedding("path", key, vector))
        sink.write(Embedding("path", "bad.jpg", error="empty file"))
        sink.close()
        files[suffix] = (folder / f"seed.{suffix}").read_bytes()
    files["paths.txt"] = sidecar_path(folder / "seed.npy", "path").read_bytes()
    return files


@pytest.fixture(scope="module")
def folder():
    with tempfile.TemporaryDirectory(prefix="zsclip-fuzz-embeddings-") as name:
        yield Path(name)


# The strategy needs the seeds at import time: build them once, in a temporary folder.
with tempfile.TemporaryDirectory() as _seed_folder:
    SEEDS = _valid_files(Path(_seed_folder))


def test_the_valid_files_read(folder: Path) -> None:
    for suffix in ("npy", "safetensors", "jsonl"):
        (folder / f"seed.{suffix}").write_bytes(SEEDS[suffix])
    sidecar_path(folder / "seed.npy", "path").write_bytes(SEEDS["paths.txt"])
    for suffix in ("npy", "safetensors", "jsonl"):
        assert read_embeddings(folder / f"seed.{suffix}").keys == KEYS


@FUZZ
@given(case=files_from(SEEDS))
def test_any_bytes_read_or_give_one_user_error(folder: Path, case) -> None:
    name, data = case
    # a damaged row list beside an intact .npy, or a damaged file beside its intact row list
    suffix = "npy" if name == "paths.txt" else name
    path = folder / f"fuzz.{suffix}"
    path.write_bytes(SEEDS["npy"] if name == "paths.txt" else data)
    sidecar_path(path, "path").write_bytes(data if name == "paths.txt" else SEEDS["paths.txt"])
    with bounded(seconds=20, memory_mib=256):
        try:
            table = read_embeddings(path)
        except UserError as err:
            assert "\n" not in str(err) and len(str(err)) < 600
            return
    assert table.vectors.dtype == torch.float32 and table.vectors.dim() == 2
    assert table.vectors.shape[0] == len(table.keys)
    assert all(isinstance(key, str) for key in table.keys) and table.kind in ("path", "text")
    assert bool(torch.isfinite(table.vectors).all())
