"""The image-embedding and label-classifier caches: reuse, invalidation, keys, concurrency, damage."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cli_helpers import build_tiny_checkpoint, make_image, run_cli


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(build_tiny_checkpoint(tmp_path_factory.mktemp("cache-model")))


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    for index, colour in enumerate(colours):
        make_image(tmp_path / "photos" / f"p{index}.jpg", size=(96, 72), color=colour)
    make_image(tmp_path / "photos" / "q.png", size=(40, 60), color=(90, 10, 160))
    return tmp_path / "photos"


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts the images and prompts that go through the model's towers."""
    import zsclip.core.text_prefix
    from zsclip.core.model import CLIP

    counts = {"images": 0, "texts": 0}
    encode_image, encode_texts = (
        CLIP.encode_image,
        zsclip.core.text_prefix.encode_with_shared_prefixes,
    )

    def count_images(self, images):
        counts["images"] += images.shape[0]
        return encode_image(self, images)

    def count_texts(model, tokens, **kwargs):
        counts["texts"] += tokens.shape[0]
        return encode_texts(model, tokens, **kwargs)

    monkeypatch.setattr(CLIP, "encode_image", count_images)
    monkeypatch.setattr(zsclip.core.text_prefix, "encode_with_shared_prefixes", count_texts)
    return counts


def classify(model: str, folder: Path, labels: str, *extra: str) -> list[dict]:
    run = run_cli(
        [
            "classify",
            str(folder),
            "--model",
            model,
            "-t",
            "simple",
            "--labels",
            labels,
            "-f",
            "jsonl",
            *extra,
        ]
    )
    assert run.code == 0, run.stderr
    return [json.loads(line) for line in run.stdout.splitlines()]


def same_predictions(a: list[dict], b: list[dict]) -> bool:
    return [r["path"] for r in a] == [r["path"] for r in b] and all(
        [t["label"] for t in x["top"]] == [t["label"] for t in y["top"]]
        and all(abs(s["score"] - t["score"]) < 1e-5 for s, t in zip(x["top"], y["top"]))
        for x, y in zip(a, b)
    )


def test_second_run_with_new_labels_encodes_no_image(
    model: str, photos: Path, counted: dict
) -> None:
    classify(model, photos, "red,green")
    assert counted["images"] == 5
    again = classify(model, photos, "blue,yellow,purple")
    assert counted["images"] == 5  # every embedding came from the cache
    fresh = classify(model, photos, "blue,yellow,purple", "--no-cache")
    assert counted["images"] == 10
    assert same_predictions(again, fresh)


def test_a_modified_file_is_encoded_again(model: str, photos: Path, counted: dict) -> None:
    classify(model, photos, "red,green")
    changed = photos / "p1.jpg"
    make_image(changed, size=(96, 72), color=(250, 250, 250))
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a clearly newer mtime
    counted["images"] = 0
    again = classify(model, photos, "red,green")
    assert counted["images"] == 1
    assert same_predictions(again, classify(model, photos, "red,green", "--no-cache"))


def test_preprocessing_and_precision_are_part_of_the_key(
    model: str, photos: Path, counted: dict
) -> None:
    classify(model, photos, "red,green")
    classify(model, photos, "red,green", "--exact-preprocess")
    assert counted["images"] == 10  # exact and draft embeddings are kept apart
    classify(model, photos, "red,green", "--precision", "bf16")
    assert counted["images"] == 15
    classify(model, photos, "red,green", "--exact-preprocess")
    assert counted["images"] == 15


def test_no_cache_writes_nothing(model: str, photos: Path) -> None:
    classify(model, photos, "red,green", "--no-cache")
    assert not any(Path(os.environ["ZSCLIP_CACHE"]).iterdir())


def test_embed_shares_the_cache_and_says_so(model: str, photos: Path, counted: dict) -> None:
    classify(model, photos, "red,green")
    run = run_cli(["embed", str(photos), "--model", model, "-f", "jsonl"])
    assert run.code == 0 and counted["images"] == 5
    assert "5 image embedding(s) reused from the cache" in run.stderr
    rows = [json.loads(line) for line in run.stdout.splitlines()]
    fresh = run_cli(["embed", str(photos), "--model", model, "-f", "jsonl", "--no-cache", "-q"])
    for cached, computed in zip(rows, (json.loads(line) for line in fresh.stdout.splitlines())):
        assert max(abs(a - b) for a, b in zip(cached["embedding"], computed["embedding"])) < 1e-6


def test_label_classifier_is_cached_per_labels_and_templates(
    model: str, photos: Path, counted: dict
) -> None:
    first = classify(model, photos, "red,green")
    prompts = counted["texts"]
    assert prompts == 2
    assert same_predictions(classify(model, photos, "red,green"), first)
    assert counted["texts"] == prompts  # read from the cache
    classify(model, photos, "red,blue")
    assert counted["texts"] == prompts + 2
    run_cli(
        [
            "classify",
            str(photos),
            "--model",
            model,
            "-t",
            "plain",
            "--labels",
            "red,green",
            "-f",
            "jsonl",
        ]
    )
    assert counted["texts"] > prompts + 2  # another template set, another classifier
    entries = list((Path(os.environ["ZSCLIP_CACHE"]) / "classifiers").iterdir())
    assert len(entries) == 3 and all(
        p.suffix == ".safetensors" for p in entries
    )  # no temporaries left


def test_a_damaged_cache_warns_and_the_run_goes_on(model: str, photos: Path, counted: dict) -> None:
    database = Path(os.environ["ZSCLIP_CACHE"]) / "images.sqlite3"
    database.parent.mkdir(parents=True, exist_ok=True)
    database.write_bytes(b"this is not a database" * 100)
    run = run_cli(
        [
            "classify",
            str(photos),
            "--model",
            model,
            "-t",
            "simple",
            "--labels",
            "red,green",
            "-f",
            "jsonl",
        ]
    )
    assert run.code == 0 and len(run.stdout.splitlines()) == 5
    assert "image cache" in run.stderr and "continuing without it" in run.stderr


WRITER = textwrap.dedent("""
    import sys
    from zsclip.jobs.cache import FileStamp, ImageCache, vector_to_blob
    name, rounds = sys.argv[1], int(sys.argv[2])
    cache = ImageCache("variant", timeout=30)
    for round_ in range(rounds):
        batch = [(FileStamp(f"/photos/{i}.jpg", i, round_), vector_to_blob([float(i), float(round_)]))
                 for i in range(round_ % 7, 400, 7)]
        cache.store(batch)
        seen = cache.lookup(FileStamp(f"/photos/{i}.jpg", i, round_) for i in range(400))
        assert all(list(v) == [float(int(p.split("/")[-1][:-4])), float(round_)] for p, v in seen.items()), name
    print(name, "ok", cache.stored)
""")


def test_two_processes_write_and_read_the_same_cache_at_once(tmp_path: Path) -> None:
    env = {**os.environ, "ZSCLIP_CACHE": str(tmp_path / "shared")}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, name, "150"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    for worker in workers:
        out, err = worker.communicate(timeout=120)
        assert worker.returncode == 0, err
        assert "ok" in out
    with sqlite3.connect(tmp_path / "shared" / "images.sqlite3") as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        rows = connection.execute(
            "SELECT path, size, mtime_ns, length(vector) FROM images"
        ).fetchall()
    assert len(rows) == 400  # one row per path: newer versions replaced older ones
    assert all(
        length == 8 and size == int(path.split("/")[-1][:-4]) for path, size, _, length in rows
    )
