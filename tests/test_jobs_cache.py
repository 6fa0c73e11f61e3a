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
    """A file that is not a database: one warning naming the command that removes it."""
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
    [line] = [line for line in run.stderr.splitlines() if "image cache" in line]  # said once
    # ... with the command that removes it; running that command lets the next run start afresh
    command = line.split("Remove it to start a new one: ", 1)[1]
    assert command.startswith("rm -f ") and str(database) in command
    subprocess.run(command, shell=True, check=True)
    assert not database.exists()
    classify(model, photos, "red,green")
    assert counted["images"] == 10 and database.is_file()  # the new cache was filled
    classify(model, photos, "red,green")
    assert counted["images"] == 10


def _damage_rows(database: Path) -> list[str]:
    """Give two stored rows a damaged vector: one cut short, one full of NaN. Returns their paths."""
    with sqlite3.connect(database) as connection:
        (first, length), (second, _) = connection.execute(
            "SELECT path, length(vector) FROM images ORDER BY path LIMIT 2"
        ).fetchall()
        nan = b"\x00\x00\xc0\x7f" * (length // 4)
        connection.execute(
            "UPDATE images SET vector = substr(vector, 1, 12) WHERE path = ?", [first]
        )
        connection.execute("UPDATE images SET vector = ? WHERE path = ?", [nan, second])
    return [first, second]


def test_damaged_cache_rows_are_dropped_recomputed_and_reported_once(
    model: str, photos: Path, counted: dict
) -> None:
    """A row whose vector has the wrong length or is not finite is a miss: the image is encoded again
    and its row replaced; one warning line says so. (It used to end the run with a ValueError.)"""
    fresh = classify(model, photos, "red,green")
    database = Path(os.environ["ZSCLIP_CACHE"]) / "images.sqlite3"
    damaged = _damage_rows(database)
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
    assert run.code == 0, run.stderr
    assert counted["images"] == 5 + 2  # only the damaged ones were encoded again
    assert same_predictions([json.loads(line) for line in run.stdout.splitlines()], fresh)
    warnings = [line for line in run.stderr.splitlines() if "damaged" in line]
    assert len(warnings) == 1 and "computed again" in warnings[0]
    assert any(path in warnings[0] for path in damaged)
    classify(model, photos, "red,green")  # the replaced rows are good again
    assert counted["images"] == 7


def test_a_row_of_another_length_is_a_miss_for_the_model() -> None:
    from zsclip.jobs.cache import FileStamp, ImageCache, vector_to_blob

    warnings: list[str] = []
    cache = ImageCache("v", Path(os.environ["ZSCLIP_CACHE"]), dim=4, warn=warnings.append)
    good, short, long_, scaled = (FileStamp(f"/{name}.jpg", 1, 2) for name in "abcd")
    cache.store(
        [
            (good, vector_to_blob([0.5, 0.5, 0.5, 0.5])),
            (short, vector_to_blob([1.0, 0.0])),
            (long_, vector_to_blob([1.0, 0, 0, 0, 0])),
            (scaled, vector_to_blob([2.0, 0, 0, 0])),  # right length, not a unit vector
        ]
    )
    found = cache.lookup([good, short, long_, scaled])
    assert list(found) == ["/a.jpg"] and cache.damaged == 3 and len(warnings) == 1


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


# ------------------------------------------------------------------------------------ read-only cache


def _in_a_child_that_cannot_write(function) -> object:
    """Run `function()` in a forked child and return its JSON-able result. Root ignores permission
    bits, and the tests run as root in CI: there the child gives up root for the `nobody` user first,
    so the cache's read-only file and folder really cannot be written, as for an ordinary user."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 0
        try:
            os.close(read_end)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            payload = json.dumps({"result": function()})
        except BaseException as err:  # noqa: BLE001 - report anything to the parent
            payload, status = json.dumps({"error": repr(err)}), 1
        os.write(write_end, payload.encode())
        os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    reply = json.loads(data)
    assert "error" not in reply, reply
    return reply["result"]


@pytest.fixture
def shared_cache(tmp_path: Path):
    """A cache folder in a world-readable place (pytest's tmp_path is private to root) holding one
    stored row; permissions are restored afterwards so it can be removed."""
    import shutil
    import tempfile

    from zsclip.jobs.cache import FileStamp, ImageCache, vector_to_blob

    folder = Path(tempfile.mkdtemp(prefix="zsclip-ro-cache-"))
    cache = ImageCache("variant", folder, dim=2)
    cache.store([(FileStamp("/photos/a.jpg", 10, 20), vector_to_blob([0.6, 0.8]))])
    cache.close()
    yield folder
    folder.chmod(0o755)
    shutil.rmtree(folder)


def _read_and_try_to_store(folder: str) -> dict:
    from zsclip.jobs.cache import FileStamp, ImageCache, vector_to_blob

    warnings: list[str] = []
    cache = ImageCache("variant", Path(folder), dim=2, warn=warnings.append)
    stamp_a, stamp_b = FileStamp("/photos/a.jpg", 10, 20), FileStamp("/photos/b.jpg", 1, 2)
    first = cache.lookup([stamp_a, stamp_b])
    cache.store([(stamp_b, vector_to_blob([1.0, 0.0]))])  # cannot be stored: must not raise
    again = cache.lookup([stamp_a])  # ... and must not stop the reading either
    cache.close()
    return {
        "first": {path: list(vector) for path, vector in first.items()},
        "again": list(again),
        "warnings": warnings,
        "read_only": cache.read_only,
        "stored": cache.stored,
    }


@pytest.mark.parametrize("folder_writable", [False, True])
def test_a_read_only_cache_is_still_read(shared_cache: Path, folder_writable: bool) -> None:
    """A cache zsclip may not write (a read-only file, in a read-only folder or not): its rows are
    used, nothing new is stored, one warning says so. (It used to be ignored altogether.)"""
    database = shared_cache / "images.sqlite3"
    database.chmod(0o444)
    shared_cache.chmod(0o777 if folder_writable else 0o555)
    outcome = _in_a_child_that_cannot_write(lambda: _read_and_try_to_store(str(shared_cache)))
    assert outcome["first"] == {"/photos/a.jpg": [pytest.approx(0.6), pytest.approx(0.8)]}
    assert outcome["again"] == ["/photos/a.jpg"]
    assert outcome["read_only"] and outcome["stored"] == 0
    assert len(outcome["warnings"]) == 1 and "cannot be written" in outcome["warnings"][0]
