"""Fuzzing the training pairs reader (zsclip.train.data.read_pairs): random bytes and random mutations of
valid .tsv, .csv and .jsonl pairs files. Each must parse (rows, plus problems with line numbers) or
fail with one UserError line: never another exception, a hang or runaway memory."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from fuzz_helpers import FUZZ, bounded, files_from
from hypothesis import given

from zsclip.errors import UserError
from zsclip.train.data import read_pairs

VALID = {
    "tsv": "image\tcaption\nred/a.png\ta red circle\n\nblue b.png\ta blue, small square\n".encode(),
    "csv": (
        'image,caption\nred/a.png,"a red circle, large"\n'
        '"b,1.png","said ""hi"""\n/abs/c.png,plain\n'
    ).encode(),
    "jsonl": (
        '{"image": "a.png", "caption": "a red circle"}\n\n'
        '{"path": "b.png", "text": "caf\\u00e9 \\"quoted\\""}\n'
    ).encode(),
    "txt": "a.png\tone\nb.png\ttwo\n".encode("utf-8-sig"),
}


@pytest.fixture(scope="module")
def folder():
    with tempfile.TemporaryDirectory(prefix="zsclip-fuzz-pairs-") as name:
        yield Path(name)


def test_the_valid_files_parse(folder: Path) -> None:
    for suffix, data in VALID.items():
        path = folder / f"seed.{suffix}"
        path.write_bytes(data)
        pairs, problems = read_pairs(path)
        assert len(pairs) >= 2 and problems == [], (suffix, problems)


@FUZZ
@given(case=files_from(VALID))
def test_any_bytes_parse_or_give_one_user_error(folder: Path, case) -> None:
    suffix, data = case
    path = folder / f"fuzz.{suffix}"
    path.write_bytes(data)
    with bounded(seconds=20, memory_mib=256):
        try:
            pairs, problems = read_pairs(path)
        except UserError as err:
            assert "\n" not in str(err)
            return
    for pair in pairs:
        assert pair.caption.strip() and str(pair.image).strip()
    for problem in problems:
        assert "\n" not in problem and problem.startswith(f"{path.name}:")


def test_a_csv_field_beyond_the_csv_modules_limit_is_one_line(folder: Path) -> None:
    """Found by fuzzing: csv raises its own error for a field over 128 KiB (it was a traceback)."""
    path = folder / "long.csv"
    path.write_bytes(b'image,caption\na.png,short\nb.png,"' + b"x" * 200_000 + b'"\n')
    with pytest.raises(UserError, match="not valid CSV after line 2") as info:
        read_pairs(path)
    assert "\n" not in str(info.value)
