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


def classify_run(model: str, folder: Path, labels: str, *extra: str, env: dict | None = None):
    """(rows, stderr lines) of one classify run."""
    run = run_cli(
        [
            "classify",
            str(folder),
            "--model",
            model,
            "-t",
            "simple",
            "-l",
            labels,
            "-f",
            "jsonl",
            *extra,
        ],
        env=env,
    )
    assert run.code == 0, run.stderr
    assert "Traceback" not in run.stderr
    return [json.loads(line) for line in run.stdout.splitlines()], run.stderr.splitlines()


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda path: path.write_bytes(b"this is not a database" * 100), id="garbage"),
        pytest.param(lambda path: path.write_bytes(path.read_bytes()[:3000]), id="truncated"),
        pytest.param(
            lambda path: (
                path.unlink(),
                sqlite3.connect(path).executescript(
                    "CREATE TABLE images (variant TEXT, name TEXT); PRAGMA user_version = 7;"
                ),
            ),
            id="foreign-schema",
        ),
    ],
)
def test_a_damaged_image_cache_warns_once_and_results_stay_right(
    model: str, photos: Path, damage
) -> None:
    classify(model, photos, "red,green")  # fills the cache
    database = Path(os.environ["ZSCLIP_CACHE"]) / "images.sqlite3"
    for suffix in ("-wal", "-shm"):  # leftovers of the first run's connection
        Path(f"{database}{suffix}").unlink(missing_ok=True)
    damage(database)
    rows, stderr = classify_run(model, photos, "red,green")
    assert rows == classify_run(model, photos, "red,green", "--no-cache")[0]
    assert len(stderr) == 1, stderr
    assert "image cache" in stderr[0] and "continuing without it" in stderr[0]


def _damage_row(vector: bytes) -> None:
    database = Path(os.environ["ZSCLIP_CACHE"]) / "images.sqlite3"
    with sqlite3.connect(database) as connection:
        connection.execute("UPDATE images SET vector = ? WHERE path LIKE '%p1.jpg'", (vector,))


@pytest.mark.parametrize("vector", [b"abc", bytes(16)], ids=["odd-length", "wrong-dimension"])
def test_a_damaged_row_in_the_image_cache_is_a_miss(
    model: str, photos: Path, vector: bytes
) -> None:
    first = classify(model, photos, "red,green")
    _damage_row(vector)
    rows, _ = classify_run(model, photos, "red,green")
    assert rows == first


@pytest.mark.parametrize("fill", [0.0, float("nan")], ids=["zeros", "nan"])
def test_a_stored_vector_that_is_not_unit_length_is_a_miss(
    model: str, photos: Path, fill: float
) -> None:
    from array import array

    first = classify(model, photos, "red,green")
    dim = len(
        json.loads(run_cli(["embed", str(photos / "p0.jpg"), "--model", model]).stdout)["embedding"]
    )
    _damage_row(array("f", [fill] * dim).tobytes())
    assert classify_run(model, photos, "red,green")[0] == first


def test_a_damaged_cache_file_names_the_command_that_removes_it(
    model: str, photos: Path, counted: dict
) -> None:
    """A file that is not a database: the one warning names the command that removes it, and after
    running that command the next run starts a new cache."""
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


def test_a_damaged_classifier_entry_is_rebuilt(model: str, photos: Path) -> None:
    """A classifier file replaced by garbage, or cut short: the labels are encoded again, the rows
    are right, and the entry is written anew."""
    from safetensors.torch import load_file

    first = classify(model, photos, "red,green,blue")
    [entry] = (Path(os.environ["ZSCLIP_CACHE"]) / "classifiers").iterdir()
    good = entry.read_bytes()
    for damaged in (b"\x00garbage" * 50, good[: len(good) // 2], good[:8]):
        entry.write_bytes(damaged)
        rows, stderr = classify_run(model, photos, "red,green,blue")
        assert rows == first
        assert len(stderr) <= 1  # at most a one-line note about the damaged entry
        assert load_file(entry)["classifier"].shape[1] == 3


def test_an_unwritable_cache_warns_once_per_cache_and_results_stay_right(
    model: str, photos: Path, tmp_path: Path
) -> None:
    """$ZSCLIP_CACHE naming a file (nothing can be created under it, even as root): each cache says
    once that it is off, and the rows are those of --no-cache."""
    in_the_way = tmp_path / "not-a-folder"
    in_the_way.write_text("a file where the cache folder should be")
    rows, stderr = classify_run(model, photos, "red,green", env={"ZSCLIP_CACHE": str(in_the_way)})
    assert rows == classify_run(model, photos, "red,green", "--no-cache")[0]
    assert len(stderr) == 2, stderr
    assert sum("classifier cache" in line for line in stderr) == 1
    assert sum("image cache" in line for line in stderr) == 1
    assert all(line.startswith("zsclip: warning: ") for line in stderr)
    assert in_the_way.read_text() == "a file where the cache folder should be"


# ------------------------------------------------------------------------------ the classifier key

KEY = {
    "model_id": "model-a",
    "tokenizer_meta": {"tokenizer.kind": "bpe", "tokenizer.merges": "a b\nab c"},
    "labels": ("red", "green", "blue"),
    "templates": ("a photo of a {}.", "a drawing of a {}."),
    "precision": "fp32",
    "context_length": 77,
}


@pytest.mark.parametrize(
    "field, other",
    [
        ("model_id", "model-b"),
        ("tokenizer_meta", {"tokenizer.kind": "bpe", "tokenizer.merges": "a b\nab d"}),
        ("tokenizer_meta", {"tokenizer.kind": "standard", "tokenizer.name": "openai"}),
        ("labels", ("green", "red", "blue")),  # the same labels in another order
        ("labels", ("red", "green", "cyan")),
        ("labels", ("red", "green")),
        ("labels", ("red", "green", "blue", "black")),
        ("templates", ("a photo of a {}.",)),
        ("templates", ("a photo of a {}.", "a drawing of the {}.")),
        ("precision", "bf16"),
        ("precision", "fp16"),
        ("context_length", 32),
    ],
)
def test_every_input_of_the_classifier_is_in_its_key(field: str, other) -> None:
    from zsclip.jobs import cache

    base = cache.classifier_key(**KEY)
    assert cache.classifier_key(**KEY) == base  # a key is stable from run to run
    assert cache.classifier_key(**{**KEY, field: other}) != base


def test_a_cached_classifier_of_another_shape_is_a_miss(tmp_path: Path) -> None:
    """An entry whose matrix does not have the shape the run needs (a tampered file, or another
    entry renamed over it) is not used: the labels are encoded again."""
    import torch

    from zsclip.jobs import cache

    key = cache.classifier_key(**KEY)
    cache.save_classifier(key, torch.ones(32, 2), ["red", "green"], root=tmp_path)
    assert cache.load_classifier(key, (32, 3), root=tmp_path) is None
    assert cache.load_classifier(key, (16, 2), root=tmp_path) is None
    assert torch.equal(cache.load_classifier(key, (32, 2), root=tmp_path), torch.ones(32, 2))


def test_the_model_identity_follows_the_file(tmp_path: Path) -> None:
    """Same file, same identity; another path, size or modification time (a checkpoint saved over
    the old one), another identity. A folder model counts every file in it."""
    from zsclip.jobs.cache import model_identity

    path = tmp_path / "model.safetensors"
    path.write_bytes(b"weights" * 100)
    first = model_identity(path)
    assert first is not None and model_identity(path) == first
    assert model_identity(tmp_path / "." / "model.safetensors") == first  # the same file
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert model_identity(path) != first
    touched = model_identity(path)
    path.write_bytes(b"weights" * 101)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # same mtime, other size
    assert model_identity(path) not in (first, touched)
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(path.read_bytes())
    assert model_identity(copy) != model_identity(path)
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    before = model_identity(folder)
    (folder / "tokenizer.json").write_text("{}")
    assert model_identity(folder) != before
    assert model_identity(tmp_path / "missing") is None and model_identity(None) is None


def test_labels_in_another_order_are_not_read_from_the_first_orders_entry(
    model: str, photos: Path
) -> None:
    """`-l green,red` after a cached `-l red,green`: each label keeps its own score (the cached
    run's rows equal the --no-cache ones, byte for byte)."""
    for labels in ("red,green,blue", "blue,red,green", "green,blue,red"):
        cached, _ = classify_run(model, photos, labels)
        fresh, _ = classify_run(model, photos, labels, "--no-cache")
        assert cached == fresh, labels
    scores = {}
    for labels in ("red,green,blue", "blue,red,green"):
        for row in classify_run(model, photos, labels, "--no-cache")[0]:
            scores.setdefault(row["path"], []).append({t["label"]: t["score"] for t in row["top"]})
    # The same scores, label by label. Not bit for bit: the softmax sums its columns in another
    # order (fp32, relative error a few 1e-7), so a score written with six decimals may round one
    # unit apart. A classifier read for the wrong order would move them by far more.
    for first, second in scores.values():
        assert first.keys() == second.keys()
        assert all(abs(first[label] - second[label]) <= 1.5e-6 for label in first)


def test_precision_and_a_rewritten_model_file_change_the_classifier(
    model: str, photos: Path, tmp_path: Path
) -> None:
    """A bf16 classifier is not served to an fp32 run; a checkpoint saved over the old one (new
    weights, same path) is not served the old one's classifier."""
    import torch

    from zsclip.core.checkpoints import load_model, save_checkpoint

    classify_run(model, photos, "red,green", "--precision", "bf16")
    fp32 = classify_run(model, photos, "red,green")[0]
    assert fp32 == classify_run(model, photos, "red,green", "--no-cache")[0]

    local = tmp_path / "model.safetensors"
    local.write_bytes(Path(model).read_bytes())
    classify_run(str(local), photos, "red,green")  # cached under the old weights
    loaded = load_model(str(local))
    with torch.no_grad():
        for parameter in loaded.model.parameters():
            parameter.mul_(-1.0)  # another model, same shapes, same file size
    save_checkpoint(local, loaded.model, preprocess=loaded.preprocess, tokenizer=loaded.tokenizer)
    retrained = classify_run(str(local), photos, "red,green")[0]
    assert retrained == classify_run(str(local), photos, "red,green", "--no-cache")[0]
    assert retrained != fp32


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

READ_AND_TRY_TO_STORE = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from zsclip.jobs.cache import FileStamp, ImageCache, vector_to_blob
    warnings = []
    cache = ImageCache("variant", Path(sys.argv[1]), dim=2, warn=warnings.append)
    stamp_a, stamp_b = FileStamp("/photos/a.jpg", 10, 20), FileStamp("/photos/b.jpg", 1, 2)
    first = cache.lookup([stamp_a, stamp_b])
    cache.store([(stamp_b, vector_to_blob([1.0, 0.0]))])  # cannot be stored: must not raise
    again = cache.lookup([stamp_a])  # ... and must not stop the reading either
    cache.close()
    print(json.dumps({"first": {p: list(v) for p, v in first.items()}, "again": list(again),
                      "warnings": warnings, "read_only": cache.read_only, "stored": cache.stored}))
""")


@pytest.mark.parametrize("folder_writable", [False, True])
def test_a_read_only_cache_is_still_read(tmp_path: Path, folder_writable: bool) -> None:
    """A cache zsclip may not write (a read-only file, in a read-only folder or not): its rows are
    used, nothing new is stored, one warning says so. (It used to be ignored altogether.) Run in a
    child process that file permissions apply to even under root (cli_helpers.obey_file_permissions):
    in a read-only folder SQLite cannot even make its shared-memory file, so only an `immutable`
    read-only connection can read the WAL-mode database there."""
    from cli_helpers import obey_file_permissions

    from zsclip.jobs.cache import FileStamp, ImageCache, vector_to_blob

    folder = tmp_path / "cache"
    cache = ImageCache("variant", folder, dim=2)
    cache.store([(FileStamp("/photos/a.jpg", 10, 20), vector_to_blob([0.6, 0.8]))])
    cache.close()
    database = folder / "images.sqlite3"
    database.chmod(0o444)
    before = database.read_bytes()
    folder.chmod(0o755 if folder_writable else 0o555)
    try:
        done = subprocess.run(
            [sys.executable, "-c", READ_AND_TRY_TO_STORE, str(folder)],
            capture_output=True,
            text=True,
            preexec_fn=obey_file_permissions,
            timeout=120,
        )
    finally:
        folder.chmod(0o755)
    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout)
    assert outcome["first"] == {"/photos/a.jpg": [pytest.approx(0.6), pytest.approx(0.8)]}
    assert outcome["again"] == ["/photos/a.jpg"]
    assert outcome["read_only"] and outcome["stored"] == 0
    assert len(outcome["warnings"]) == 1 and "cannot be written" in outcome["warnings"][0]
    assert database.read_bytes() == before  # nothing was written into it
