"""Global batches: split across ranks and micro-batches, positioned by global sample (resumable at any world size)."""

from __future__ import annotations

from zsclip.train import batches
from zsclip.train.data import epoch_batches, epoch_order


def rank_steps(
    n, *, batch_size, accum_steps, world_size, rank, epoch=0, position=0, count=1, seed=3
):
    sampler = batches.GlobalBatchSampler(
        n,
        batch_size=batch_size,
        accum_steps=accum_steps,
        rank=rank,
        world_size=world_size,
        seed=seed,
        epoch=epoch,
        position=position,
        count=count,
    )
    lists = list(sampler)
    assert len(lists) == len(sampler) == count * accum_steps
    return [
        lists[i : i + accum_steps] for i in range(0, len(lists), accum_steps)
    ]  # per step: K lists


def test_one_process_is_the_plain_epoch_order() -> None:
    steps = rank_steps(20, batch_size=4, accum_steps=1, world_size=1, rank=0, count=12)
    plain = epoch_batches(20, 4, 3, 0) + epoch_batches(20, 4, 3, 1) + epoch_batches(20, 4, 3, 2)[:2]
    assert [s[0] for s in steps] == plain


def test_ranks_and_micro_batches_partition_each_global_batch() -> None:
    n, b, k, w = 50, 3, 2, 2  # global batch 12: 4 steps an epoch, 2 samples left over
    per_rank = [
        rank_steps(n, batch_size=b, accum_steps=k, world_size=w, rank=r, count=5) for r in range(w)
    ]
    for step in range(5):
        got = [i for r in range(w) for micro in per_rank[r][step] for i in micro]
        epoch, index = divmod(step, 4)
        assert got == epoch_order(n, 3, epoch)[index * 12 : (index + 1) * 12]
        assert all(len(micro) == b for r in range(w) for micro in per_rank[r][step])


def test_resume_at_another_world_size_continues_at_the_same_sample() -> None:
    # 3 steps at 4 ranks x batch 2 (global 8), then resume with 1 rank x 2 micro-batches of 2 (global 4).
    n = 40
    epoch, position = 0, 0
    seen = []
    for _ in range(3):
        seen += [
            i
            for r in range(4)
            for m in rank_steps(
                n, batch_size=2, accum_steps=1, world_size=4, rank=r, epoch=epoch, position=position
            )[0]
            for i in m
        ]
        epoch, position = batches.advance(epoch, position, 8, n)
    assert (epoch, position) == (0, 24)
    later = rank_steps(
        n,
        batch_size=2,
        accum_steps=2,
        world_size=1,
        rank=0,
        epoch=epoch,
        position=position,
        count=4,
    )
    seen += [i for step in later for m in step for i in m]
    assert seen == epoch_order(n, 3, 0)  # the whole epoch, each sample once, in order
    assert batches.advance(0, 36, 4, n) == (1, 0)


def test_steps_left() -> None:
    assert batches.steps_left(0, 0, 2, 8, 50) == 12  # 6 a epoch
    assert batches.steps_left(0, 24, 2, 4, 50) == (50 - 24) // 4 + 12
    assert batches.steps_left(2, 0, 2, 8, 50) == 0


def test_grouped() -> None:
    assert list(batches.grouped(iter(range(7)), 3)) == [[0, 1, 2], [3, 4, 5]]
