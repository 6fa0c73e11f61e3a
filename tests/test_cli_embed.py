"""`zsclip embed` end to end: stdout formats, .npy/.safetensors/.jsonl files and their row order, texts."""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from pathlib import Path

import pytest
from cli_helpers import build_tiny_checkpoint, make_photo_folder, run_cli

DIM = 32  # the tiny preset's embedding size


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("embed")
    return {
        "model": str(build_tiny_checkpoint(root)),
        "root": root,
        "expected": make_photo_folder(root / "photos"),
    }


def embed(world: dict, *args: str, input: str | None = None):
    return run_cli(["embed", "--model", world["model"], *args], input=input)


def norm(vector: list[float]) -> float:
    return math.sqrt(sum(v * v for v in vector))


def test_jsonl_rows_are_unit_fp32_vectors_in_input_order(world: dict) -> None:
    result = embed(world, str(world["root"] / "photos"))
    assert result.code == 0 and result.stderr == ""
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["path"] for row in rows] == world["expected"]
    for row in rows:
        assert list(row) == ["path", "embedding"] and len(row["embedding"]) == DIM
        assert abs(norm(row["embedding"]) - 1) < 1e-5


def test_stdin_and_tsv(world: dict) -> None:
    result = embed(world, "-", "--format", "tsv", input="\n".join(world["expected"]))
    assert result.code == 0, result.stderr
    rows = list(csv.reader(io.StringIO(result.stdout), delimiter="\t"))
    assert rows[0] == ["path"] + [f"e{i}" for i in range(DIM)]
    assert [row[0] for row in rows[1:]] == world["expected"]  # the comma-laden name survives
    assert all(abs(norm([float(v) for v in row[1:]]) - 1) < 1e-5 for row in rows[1:])


def test_npy_file_with_sidecar_and_bad_inputs(world: dict, tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"")
    out = tmp_path / "photos.npy"
    result = embed(world, str(world["root"] / "photos"), str(bad), "-o", str(out))
    assert result.code == 1 and result.stdout == ""
    assert result.stderr.count("zsclip: error:") == 1 and str(bad) in result.stderr
    array = np.load(out)
    assert array.dtype == np.float32 and array.shape == (4, DIM)
    assert np.allclose(np.linalg.norm(array, axis=1), 1, atol=1e-5)
    sidecar = Path(f"{out}.paths.txt").read_text(encoding="utf-8").splitlines()
    assert sidecar == world["expected"]  # the unreadable input has no row
    direct = [json.loads(line) for line in embed(world, *world["expected"]).stdout.splitlines()]
    assert np.allclose(
        array, np.array([row["embedding"] for row in direct], dtype=np.float32), atol=1e-6
    )


def test_safetensors_file_carries_row_order(world: dict, tmp_path: Path) -> None:
    from safetensors import safe_open

    out = tmp_path / "photos.safetensors"
    assert embed(world, str(world["root"] / "photos"), "-o", str(out)).code == 0
    with safe_open(str(out), framework="pt") as handle:
        meta = handle.metadata()
        tensor = handle.get_tensor("embeddings")
    assert json.loads(meta["zsclip.rows"]) == world["expected"] and meta["zsclip.kind"] == "path"
    assert tuple(tensor.shape) == (4, DIM) and str(tensor.dtype) == "torch.float32"


def test_texts_and_texts_file(world: dict, tmp_path: Path) -> None:
    texts = tmp_path / "texts.txt"
    texts.write_text("a photo of a corgi\n\na jazz album, blue\n", encoding="utf-8")
    result = embed(world, "--text", "hello world", "--texts-file", str(texts))
    assert result.code == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["text"] for row in rows] == [
        "hello world",
        "a photo of a corgi",
        "a jazz album, blue",
    ]
    assert all(abs(norm(row["embedding"]) - 1) < 1e-5 for row in rows)
    out = tmp_path / "texts.npy"
    assert embed(world, "--texts-file", str(texts), "-o", str(out)).code == 0
    assert Path(f"{out}.texts.txt").read_text().splitlines() == [
        "a photo of a corgi",
        "a jazz album, blue",
    ]


def test_text_embedding_is_the_single_template_classifier(world: dict) -> None:
    """embed --text "a photo of a corgi." is the classifier column for label corgi with the one-line set."""
    import torch

    from zsclip.core.checkpoints import load_model
    from zsclip.jobs.labels import load_templates
    from zsclip.jobs.zeroshot import build_classifier

    [row] = [
        json.loads(line)
        for line in embed(world, "--text", "a photo of a corgi.").stdout.splitlines()
    ]
    loaded = load_model(world["model"])
    weights = build_classifier(
        loaded.model,
        loaded.tokenizer,
        ["corgi", "cat"],
        load_templates("simple"),
        device=torch.device("cpu"),
    )
    assert weights.shape == (DIM, 2)
    assert torch.allclose(weights[:, 0], torch.tensor(row["embedding"]), atol=1e-5)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--text", "x", "IMAGE"], "not both"),
        ([], "nothing to embed"),
        (["IMAGE", "-o", "out.csv"], ".npy"),
        (["IMAGE", "--format", "csv"], "jsonl or tsv"),
        (["--text", ""], "empty"),
    ],
)
def test_embed_usage_errors(world: dict, args: list[str], message: str) -> None:
    args = [world["expected"][0] if a == "IMAGE" else a for a in args]
    result = embed(world, *args)
    assert result.code == 2 and message in result.stderr and result.stdout == ""


def test_awkward_keys_round_trip_through_every_file_format(tmp_path: Path) -> None:
    import torch

    from zsclip.jobs.embed import Embedding
    from zsclip.jobs.embedding_files import EmbeddingFile, read_embeddings

    keys = ["plain.jpg", "new\nline.jpg", '"quoted".jpg', "tab\t, comma.jpg", "日本.jpg"]
    vectors = torch.nn.functional.normalize(torch.randn(len(keys), 8), dim=-1)
    for suffix in (".npy", ".safetensors", ".jsonl"):
        sink = EmbeddingFile(tmp_path / f"e{suffix}", model_name="m")
        for key, vector in zip(keys, vectors):
            sink.write(Embedding("path", key, vector))
        sink.write(Embedding("path", "bad.jpg", error="empty file"))
        sink.close()
        table = read_embeddings(tmp_path / f"e{suffix}")
        assert table.keys == keys and table.kind == "path"
        assert torch.allclose(table.vectors, vectors, atol=1e-7)
        if suffix == ".jsonl":
            assert table.errors == [(5, "bad.jpg", "empty file")]


def test_no_numpy_at_run_time(world: dict, tmp_path: Path, monkeypatch) -> None:
    """Writing .npy/.safetensors and reading them back must work where numpy is not installed."""
    monkeypatch.setitem(sys.modules, "numpy", None)  # any `import numpy` now fails
    for suffix in (".npy", ".safetensors"):
        out = tmp_path / f"photos{suffix}"
        assert embed(world, str(world["root"] / "photos"), "-o", str(out)).code == 0
        result = run_cli(
            [
                "classify",
                "--model",
                world["model"],
                "--embeddings",
                str(out),
                "-l",
                "a,b",
                "-t",
                "simple",
            ]
        )
        assert result.code == 0, result.stderr
        assert len(result.stdout.splitlines()) == 4


def test_npy_header_is_aligned_for_numpy(tmp_path: Path) -> None:
    from zsclip.jobs.embedding_files import _npy_header

    for rows in (0, 7, 123456):
        header = _npy_header(rows, 512)
        assert (
            len(header) % 64 == 0
            and header.endswith(b"\n")
            and header.startswith(b"\x93NUMPY\x01\x00")
        )


def test_bf16_embeddings_are_still_unit_fp32_and_close(world: dict) -> None:
    exact, low = (
        [
            json.loads(line)["embedding"]
            for line in embed(world, *world["expected"], "--precision", p).stdout.splitlines()
        ]
        for p in ("fp32", "bf16")
    )
    assert len(low) == len(exact) == 4
    for a, b in zip(exact, low):
        assert abs(norm(b) - 1) < 1e-5
        assert sum(x * y for x, y in zip(a, b)) > 0.98


def _npy_pair(tmp_path: Path, keys: list[str], seed: int):
    import torch

    from zsclip.jobs.embed import Embedding
    from zsclip.jobs.embedding_files import EmbeddingFile

    torch.manual_seed(seed)
    vectors = torch.nn.functional.normalize(torch.randn(len(keys), 8), dim=-1)
    sink = EmbeddingFile(tmp_path / "e.npy")
    for key, vector in zip(keys, vectors):
        sink.write(Embedding("path", key, vector))
    return sink, vectors


def test_npy_and_its_row_list_are_never_mixed_after_a_crash(tmp_path: Path, monkeypatch) -> None:
    """The .npy and its row list are two files: a crash between putting the two in place must not
    leave new keys read against old rows (or the reverse) without a word."""
    import torch

    import zsclip.atomic
    from zsclip.errors import UserError
    from zsclip.jobs.embedding_files import pair_marker, read_embeddings

    sink, old = _npy_pair(tmp_path, ["a.jpg", "b.jpg"], seed=0)
    sink.close()
    commit = zsclip.atomic.OutputFile.commit

    def crash_before_the_npy(self) -> None:
        if self.name.endswith(".npy"):
            self.discard()  # its temporary dies with the process (the next run sweeps it)
            raise SystemExit("killed between the two files")
        commit(self)

    monkeypatch.setattr(zsclip.atomic.OutputFile, "commit", crash_before_the_npy)
    sink, new = _npy_pair(tmp_path, ["c.jpg", "d.jpg"], seed=1)  # same row count, new keys
    with pytest.raises(SystemExit):
        sink.close()
    assert (tmp_path / "e.npy.paths.txt").read_text() == "c.jpg\nd.jpg\n"  # the new keys are in
    with pytest.raises(UserError, match="two different runs"):
        read_embeddings(tmp_path / "e.npy")  # ... beside the old rows: refused

    monkeypatch.setattr(zsclip.atomic.OutputFile, "commit", commit)
    sink, new = _npy_pair(tmp_path, ["c.jpg", "d.jpg"], seed=1)
    sink.close()  # a whole write puts the pair right and removes the marker
    table = read_embeddings(tmp_path / "e.npy")
    assert table.keys == ["c.jpg", "d.jpg"] and torch.allclose(table.vectors, new)
    assert not pair_marker(tmp_path / "e.npy").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.npy", "e.npy.paths.txt"]


def test_a_marker_left_after_both_files_are_in_place_is_harmless(tmp_path: Path) -> None:
    """A crash after both renames but before the marker is removed: the pair is whole and is read."""
    import hashlib

    from zsclip.jobs.embedding_files import pair_marker, read_embeddings

    sink, vectors = _npy_pair(tmp_path, ["a.jpg", "b.jpg"], seed=0)
    sink.close()
    digest = {
        kind: hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
        for kind, name in (("npy", "e.npy"), ("rows", "e.npy.paths.txt"))
    }
    pair_marker(tmp_path / "e.npy").write_text(json.dumps(digest))
    assert read_embeddings(tmp_path / "e.npy").keys == ["a.jpg", "b.jpg"]
