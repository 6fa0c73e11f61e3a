"""Tar shards (key.jpg + key.txt, as img2dataset writes them) read across ranks and workers."""

from __future__ import annotations

import io
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch

pytest.importorskip("webdataset")

from zsclip.core.transform import PreprocessConfig  # noqa: E402
from zsclip.errors import UserError  # noqa: E402
from zsclip.train import shards  # noqa: E402

PREPROCESS = PreprocessConfig(image_size=16)


def _jpeg(colour: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (12, 10), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def write_shards(
    folder: Path, n_shards: int = 4, per_shard: int = 5, broken: dict[str, str] | None = None
) -> list[str]:
    """Shards 00000.tar ... with captions 'caption NNNN'; broken maps a key to 'image' or 'caption' damage."""
    broken = broken or {}
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as archive:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                image = (
                    b"not a jpeg at all"
                    if broken.get(key) == "image"
                    else _jpeg((s * 40, i * 30, 90))
                )
                _add(archive, f"{key}.jpg", image)
                if broken.get(key) != "caption":
                    _add(archive, f"{key}.txt", f"caption {key}".encode())
                _add(archive, f"{key}.json", b"{}")
    return [str(folder / f"{s:05d}.tar") for s in range(n_shards)]


def read_rank(
    urls: list[str],
    rank: int,
    world_size: int,
    epoch: int,
    workers: int = 2,
    skipped: shards.SkipCounter | None = None,
) -> list[str]:
    dataset = shards.ShardDataset(
        urls,
        PREPROCESS,
        seed=7,
        rank=rank,
        world_size=world_size,
        shuffle_buffer=3,
        skipped=skipped,
    )
    dataset.set_epoch(epoch)
    captions = []
    for image, caption in torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=workers
    ):
        assert image.shape == (3, 16, 16) and image.dtype == torch.uint8
        captions.append(caption)
    return captions


def test_every_sample_once_per_epoch_across_2_ranks_x_2_workers(tmp_path: Path) -> None:
    urls = write_shards(tmp_path)
    expected = {f"caption {s:05d}{i:04d}" for s in range(4) for i in range(5)}
    assignments = []
    for epoch in (0, 1):
        per_rank = [read_rank(urls, rank, 2, epoch) for rank in (0, 1)]
        counts = Counter(per_rank[0] + per_rank[1])
        assert set(counts) == expected and set(counts.values()) == {1}, counts
        assert len(per_rank[0]) == len(per_rank[1]) == 10  # 2 shards of 5 each
        assignments.append(sorted(per_rank[0]))
    # the split is a pure function of (seed, epoch): the same again, and reshuffled between epochs
    assert sorted(read_rank(urls, 0, 2, 0)) == assignments[0]
    orders = [shards.epoch_shards(urls, 7, e) for e in range(4)]
    assert len({tuple(o) for o in orders}) > 1


def test_bad_samples_are_counted_and_skipped(tmp_path: Path) -> None:
    urls = write_shards(tmp_path, broken={"000010002": "image", "000030004": "caption"})
    Path(urls[2]).write_bytes(Path(urls[2]).read_bytes()[:700])  # a shard cut short mid-file
    skipped = shards.SkipCounter()
    got = read_rank(urls, 0, 1, epoch=0, skipped=skipped)
    assert "caption 000010002" not in got and "caption 000030004" not in got
    assert len(got) == len(set(got))
    assert len(got) == 20 - 5 - 2  # the cut shard is lost from its first member on; two bad samples
    assert (
        skipped.value >= 3
    )  # bad image, missing caption, and the damaged shard (webdataset may report it twice)


def test_epoch_stream_gives_equal_steps_and_resumes(tmp_path: Path) -> None:
    from zsclip.train.data import Collate

    class Tokens:  # a stand-in tokenizer: one row per caption
        def __call__(self, texts, context_length=None):
            return torch.tensor([[int(t.split()[-1])] for t in texts])

    urls = write_shards(tmp_path, n_shards=2, per_shard=5)
    dataset = shards.ShardDataset(urls, PREPROCESS, seed=1, rank=0, world_size=1, shuffle_buffer=0)
    collate = Collate(Tokens(), 1, PREPROCESS)
    batches = list(
        shards.epoch_stream(dataset, 0, batch=3, needed=3, skip=0, workers=0, collate=collate)
    )
    assert [b[0].shape[0] for b in batches] == [3, 3, 3]
    seen = torch.cat([b[1] for b in batches]).flatten().tolist()
    assert len(set(seen)) == 9
    resumed = list(
        shards.epoch_stream(dataset, 0, batch=3, needed=2, skip=3, workers=0, collate=collate)
    )
    assert torch.cat([b[1] for b in resumed]).flatten().tolist() == seen[3:9]
    # more steps than the shards hold: the rank starts its share again rather than stopping early
    long = list(
        shards.epoch_stream(dataset, 0, batch=3, needed=5, skip=0, workers=0, collate=collate)
    )
    assert len(long) == 5


def test_rebatch_joins_short_worker_batches() -> None:
    chunks = [(torch.zeros(n, 1), torch.arange(n).unsqueeze(1)) for n in (2, 3, 1, 4)]
    sizes = [images.shape[0] for images, _ in shards.rebatch(chunks, 4)]
    assert sizes == [4, 4]  # 10 samples: two full batches, 2 left over


def test_patterns_and_counts(tmp_path: Path) -> None:
    urls = write_shards(tmp_path, n_shards=3, per_shard=4, broken={"000010001": "caption"})
    assert shards.looks_like_shards(str(tmp_path / "{00000..00002}.tar"))
    assert not shards.looks_like_shards("pairs.tsv")
    assert shards.expand_shards(str(tmp_path / "{00000..00002}.tar")) == urls
    with pytest.raises(UserError, match="not found"):
        shards.expand_shards(str(tmp_path / "{00000..00009}.tar"))
    assert [shards.count_samples(url) for url in urls] == [4, 3, 4]
    assert shards.read_captions(urls[1]) == [f"caption 00001{i:04d}" for i in (0, 2, 3)]
    assert shards.split(list("abcdefg"), 1, 3) == ["b", "e"]
