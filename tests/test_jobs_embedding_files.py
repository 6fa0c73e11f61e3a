"""Reading embeddings files back (`classify --embeddings`): damaged or foreign files are one UserError
line, checked against the file's real length before anything is allocated."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from zsclip.errors import UserError
from zsclip.jobs.embed import Embedding
from zsclip.jobs.embedding_files import EmbeddingFile, read_embeddings

NPY_HEADER = "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 2), }"


def npy(header: str, data: bytes = struct.pack("<2f", 0.6, 0.8), version: int = 1) -> bytes:
    text = header.encode("latin1")
    size = struct.pack("<H", len(text)) if version == 1 else struct.pack("<I", len(text))
    return b"\x93NUMPY" + bytes([version, 0]) + size + text + data


def safetensors(header: object, data: bytes = struct.pack("<2f", 0.6, 0.8)) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def tensor_entry(**changes) -> dict:
    entry = {"dtype": "F32", "shape": [1, 2], "data_offsets": [0, 8]}
    return {"embeddings": {**entry, **changes}, "__metadata__": {"zsclip.rows": '["a.jpg"]'}}


DAMAGED = {
    # .npy
    "npy-not-npy": ("x.npy", b"just some text"),
    "npy-list-header": ("x.npy", npy("[1, 2, 3]")),
    "npy-unclosed-header": ("x.npy", npy("{'descr': '<f4'")),
    "npy-huge-rows": ("x.npy", npy(NPY_HEADER.replace("(1, 2)", f"({2**62}, 1)"))),
    "npy-3d": ("x.npy", npy(NPY_HEADER.replace("(1, 2)", "(1, 1, 2)"))),
    "npy-negative": ("x.npy", npy(NPY_HEADER.replace("(1, 2)", "(-1, 2)"))),
    "npy-shape-text": ("x.npy", npy(NPY_HEADER.replace("(1, 2)", "'ab'"))),
    "npy-integers": ("x.npy", npy(NPY_HEADER.replace("<f4", "<i4"))),
    "npy-big-endian": ("x.npy", npy(NPY_HEADER.replace("<f4", ">f4"))),
    "npy-fortran": ("x.npy", npy(NPY_HEADER.replace("False", "True"))),
    "npy-short-data": ("x.npy", npy(NPY_HEADER, b"\0" * 4)),
    "npy-extra-data": ("x.npy", npy(NPY_HEADER, b"\0" * 12)),
    "npy-header-past-end": ("x.npy", b"\x93NUMPY\x02\x00" + struct.pack("<I", 2**31) + b"{}"),
    "npy-nan": ("x.npy", npy(NPY_HEADER, struct.pack("<2f", float("nan"), 1.0))),
    # .safetensors
    "st-huge-header": ("x.safetensors", struct.pack("<Q", 2**62) + b"{}"),
    "st-short": ("x.safetensors", b"\x01\x02"),
    "st-list-header": ("x.safetensors", safetensors([1, 2])),
    "st-no-tensor": ("x.safetensors", safetensors({"__metadata__": {"zsclip.rows": "[]"}})),
    "st-integers": ("x.safetensors", safetensors(tensor_entry(dtype="I32"))),
    "st-huge-shape": ("x.safetensors", safetensors(tensor_entry(shape=[2**62, 1]))),
    "st-3d": ("x.safetensors", safetensors(tensor_entry(shape=[1, 1, 2]))),
    "st-offsets-past-end": ("x.safetensors", safetensors(tensor_entry(data_offsets=[0, 2**40]))),
    "st-offsets-text": ("x.safetensors", safetensors(tensor_entry(data_offsets="0-8"))),
    "st-rows-not-json": (
        "x.safetensors",
        safetensors({**tensor_entry(), "__metadata__": {"zsclip.rows": "[oops"}}),
    ),
    "st-rows-not-strings": (
        "x.safetensors",
        safetensors({**tensor_entry(), "__metadata__": {"zsclip.rows": "[1]"}}),
    ),
    "st-rows-miscounted": (
        "x.safetensors",
        safetensors({**tensor_entry(), "__metadata__": {"zsclip.rows": '["a", "b"]'}}),
    ),
    # .jsonl
    "jsonl-string-value": ("x.jsonl", b'{"path": "a", "embedding": ["x", 1]}\n'),
    "jsonl-list-record": ("x.jsonl", b"[1, 2]\n"),
    "jsonl-number-key": ("x.jsonl", b'{"path": 3, "embedding": [1, 2]}\n'),
    "jsonl-scalar-embedding": ("x.jsonl", b'{"path": "a", "embedding": 5}\n'),
    "jsonl-nested": ("x.jsonl", b'{"path": "a", "embedding": [[1, 2]]}\n'),
    "jsonl-bool": ("x.jsonl", b'{"path": "a", "embedding": [true, 1]}\n'),
    "jsonl-infinite": ("x.jsonl", b'{"path": "a", "embedding": [1e999, 1]}\n'),
    "jsonl-huge-int": ("x.jsonl", b'{"path": "a", "embedding": [1' + b"0" * 400 + b"]}\n"),
    "jsonl-ragged": (
        "x.jsonl",
        b'{"path": "a", "embedding": [1, 0]}\n{"path": "b", "embedding": [1]}\n',
    ),
    "jsonl-not-json": ("x.jsonl", b'{"path": "a", "embedding": [1, 0]\n'),
    "jsonl-not-utf8": ("x.jsonl", b'{"path": "\xff", "embedding": [1, 0]}\n'),
    "jsonl-deep": ("x.jsonl", b"[" * 100000 + b"]" * 100000 + b"\n"),
}


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_a_damaged_embeddings_file_is_one_line(tmp_path: Path, case: str) -> None:
    name, data = DAMAGED[case]
    path = tmp_path / name
    path.write_bytes(data)
    (tmp_path / f"{name}.paths.txt").write_text("a.jpg\n")  # the .npy row list, where one is read
    with pytest.raises(UserError) as info:
        read_embeddings(path)
    message = str(info.value)
    assert "\n" not in message and len(message) < 500 and str(path) in message


def test_a_sidecar_with_the_wrong_row_count_or_a_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "x.npy"
    path.write_bytes(npy(NPY_HEADER))
    sidecar = tmp_path / "x.npy.paths.txt"
    sidecar.write_text("a.jpg\nb.jpg\n")
    with pytest.raises(UserError, match="lists 2 rows"):
        read_embeddings(path)
    sidecar.write_text("[1, 2]\n")  # a JSON-quoted key must be a string
    read_embeddings(path)  # "[1, 2]" does not start with a quote: a plain key
    sidecar.write_text('"unterminated\n')
    with pytest.raises(UserError, match="damaged"):
        read_embeddings(path)


def test_not_a_file(tmp_path: Path) -> None:
    (tmp_path / "d.npy").mkdir()
    with pytest.raises(UserError, match="not a file"):
        read_embeddings(tmp_path / "d.npy")
    with pytest.raises(UserError, match="does not exist"):
        read_embeddings(tmp_path / "none.npy")


def test_good_files_still_read(tmp_path: Path) -> None:
    """The checks refuse nothing zsclip writes, nor an .npy that numpy writes."""
    vectors = torch.nn.functional.normalize(torch.randn(3, 5), dim=-1)
    for suffix in (".npy", ".safetensors", ".jsonl"):
        sink = EmbeddingFile(tmp_path / f"e{suffix}")
        for index, vector in enumerate(vectors):
            sink.write(Embedding("text", f"t{index}", vector))
        sink.close()
        table = read_embeddings(tmp_path / f"e{suffix}")
        assert table.kind == "text" and table.keys == ["t0", "t1", "t2"]
        assert torch.allclose(table.vectors, vectors, atol=1e-7)
    empty = EmbeddingFile(tmp_path / "none.npy")
    empty.close()
    assert read_embeddings(tmp_path / "none.npy").vectors.shape == (0, 0)
    numpy = pytest.importorskip("numpy")
    numpy.save(tmp_path / "np.npy", vectors.numpy().astype("<f8"))
    (tmp_path / "np.npy.paths.txt").write_text("a\nb\nc\n")
    assert torch.allclose(read_embeddings(tmp_path / "np.npy").vectors, vectors, atol=1e-7)
