"""Which samples each process trains on at each step: global batches, split across ranks and
micro-batches.

One optimizer step consumes one global batch of G = world_size * accum_steps * batch_size samples.
Progress through the data is kept as (epoch, position): `position` counts the samples of epoch
`epoch` already consumed, globally. Nothing here depends on the rank count except the split, so a
run saved by 8 processes can be resumed by 2 (or by 1 with --accum-steps 4): the next global batch
starts at the same sample.

Pairs files: epoch e's order is zsclip.train.data.epoch_order(n, seed, e), the same on every rank.
The global batch at `position` is order[position : position + G]; rank r takes its contiguous share
of K * B samples, split into K micro-batches of B. An epoch ends when fewer than G samples remain
(they are skipped, like a dropped last batch). With one process and K = 1 these are the epoch's
consecutive full batches. It plays DistributedSampler's part (disjoint shares, reshuffled per
epoch), positioned by global sample so that resuming needs no rank maths.

Tar shards (zsclip.train.shards): shards are split across ranks, so a rank's share of an epoch is
its own stream; `position` / world_size samples of it are skipped on resume. When the world size
changed since the save, that skip is an approximation for the rest of that epoch (a few samples may
repeat or be missed); the next epoch is exact again.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

MicroBatch = tuple[torch.Tensor, torch.Tensor]  # images [B, 3, S, S], tokens [B, L]


def advance(
    epoch: int, position: int, global_batch: int, samples_per_epoch: int
) -> tuple[int, int]:
    """(epoch, position) after one step: the next epoch starts when no whole global batch is left."""
    position += global_batch
    if position + global_batch > samples_per_epoch:
        return epoch + 1, 0
    return epoch, position


def steps_left(
    epoch: int, position: int, epochs: int, global_batch: int, samples_per_epoch: int
) -> int:
    """Optimizer steps from (epoch, position) to the end of epoch `epochs - 1`."""
    if epoch >= epochs:
        return 0
    this_epoch = max(0, (samples_per_epoch - position) // global_batch)
    return this_epoch + (epochs - 1 - epoch) * (samples_per_epoch // global_batch)


class GlobalBatchSampler:
    """A batch sampler over a pairs dataset: for `count` steps from (epoch, position), this rank's K
    micro-batches of indices, in order (so a DataLoader yields K consecutive micro-batches per
    step)."""

    def __init__(
        self,
        n: int,
        *,
        batch_size: int,
        accum_steps: int,
        rank: int,
        world_size: int,
        seed: int,
        epoch: int,
        position: int,
        count: int,
    ) -> None:
        self.n, self.batch_size, self.accum_steps = n, batch_size, accum_steps
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch, self.position, self.count = epoch, position, count
        self.global_batch = world_size * accum_steps * batch_size

    def __len__(self) -> int:
        return self.count * self.accum_steps

    def __iter__(self) -> Iterator[list[int]]:
        from zsclip.train.data import epoch_order

        epoch, position = self.epoch, self.position
        order, order_epoch = [], -1
        share = self.accum_steps * self.batch_size
        for _ in range(self.count):
            if order_epoch != epoch:
                order, order_epoch = epoch_order(self.n, self.seed, epoch), epoch
            mine = order[
                position + self.rank * share : position + (self.rank + 1) * share
            ]  # K * B indices
            for k in range(self.accum_steps):
                yield mine[k * self.batch_size : (k + 1) * self.batch_size]
            epoch, position = advance(epoch, position, self.global_batch, self.n)


def grouped(micro_batches: Iterator[MicroBatch], accum_steps: int) -> Iterator[list[MicroBatch]]:
    """Consecutive micro-batches in lists of accum_steps: one list per optimizer step."""
    step: list[MicroBatch] = []
    for micro in micro_batches:
        step.append(micro)
        if len(step) == accum_steps:
            yield step
            step = []


class PairSource:
    """Steps of a run over a pairs dataset (zsclip.train.data.PairDataset), one DataLoader for all
    remaining steps."""

    def __init__(
        self,
        dataset: Any,
        collate: Any,
        *,
        batch_size: int,
        accum_steps: int,
        rank: int,
        world_size: int,
        seed: int,
        workers: int,
    ) -> None:
        self.dataset, self.collate, self.workers = dataset, collate, workers
        self.split = dict(
            batch_size=batch_size,
            accum_steps=accum_steps,
            rank=rank,
            world_size=world_size,
            seed=seed,
        )
        self.accum_steps = accum_steps
        self.samples_per_epoch = len(dataset)

    def steps(self, epoch: int, position: int, count: int) -> Iterator[list[MicroBatch]]:
        sampler = GlobalBatchSampler(
            len(self.dataset), epoch=epoch, position=position, count=count, **self.split
        )
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=sampler, num_workers=self.workers, collate_fn=self.collate
        )
        return grouped(iter(loader), self.accum_steps)


class ShardSource:
    """Steps of a run over tar shards: one DataLoader per epoch (the shard split changes with the
    epoch)."""

    def __init__(
        self,
        dataset: Any,
        collate: Any,
        *,
        samples_per_epoch: int,
        batch_size: int,
        accum_steps: int,
        world_size: int,
        workers: int,
    ) -> None:
        self.dataset, self.collate, self.workers = (
            dataset,
            collate,
            workers,
        )  # dataset: shards.ShardDataset
        self.batch_size, self.accum_steps, self.world_size = batch_size, accum_steps, world_size
        self.samples_per_epoch = samples_per_epoch
        self.global_batch = world_size * accum_steps * batch_size
        if samples_per_epoch < self.global_batch:
            raise ValueError(
                f"{samples_per_epoch} samples an epoch cannot fill a global batch of {self.global_batch}"
            )

    def steps(self, epoch: int, position: int, count: int) -> Iterator[list[MicroBatch]]:
        from zsclip.train.shards import epoch_stream

        while count > 0:
            in_epoch = min(count, (self.samples_per_epoch - position) // self.global_batch)
            stream = epoch_stream(
                self.dataset,
                epoch,
                self.batch_size,
                in_epoch * self.accum_steps,
                position // self.world_size,
                self.workers,
                self.collate,
            )
            yield from grouped(stream, self.accum_steps)
            count -= in_epoch
            epoch, position = epoch + 1, 0
