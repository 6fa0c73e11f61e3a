"""The scale-out side of a training run, kept out of the loop: the process group, who writes, the data
source, the DDP-wrapped towers and gradient scaling. Used by zsclip.train.setup and
zsclip.train.loop.

Under torchrun every process runs the same setup; rank 0 alone reads the saved state (and hands it
to the others, so machines without the output folder can resume) and alone writes the model, state,
log and report.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from zsclip.errors import UserError
from zsclip.train import batches
from zsclip.train import distributed as dist_

# decoded samples each shard-reading worker shuffles among (img2dataset writes in source order)
SHUFFLE_BUFFER = 500


def start(
    config: Any, resolve_device: Callable[[str], torch.device]
) -> tuple[dist_.World, torch.device, Any]:
    """Read torchrun's environment, pick this process's device, join the process group.

    Returns the world, the device and the config with world_size filled in.
    """
    world = dist_.world_from_env()
    device = dist_.device_for(world, resolve_device(config.device))
    dist_.init(world, device)
    return world, device, replace(config, world_size=world.world_size)


def is_shards(data: str) -> bool:
    from zsclip.train.shards import looks_like_shards

    return looks_like_shards(data)


def wrap(model: Any, world: dist_.World, device: torch.device) -> Any:
    """The towers the loop calls: DDP-wrapped when there are several processes."""
    return dist_.wrap(model, world, device)


def saved_position(state: dict) -> tuple[int, int]:
    """(epoch, global sample position) of a saved run."""
    return int(state["epoch"]), int(state["position"])


class RankZeroError(UserError):
    """Raised on the other ranks when rank 0 failed a step they all wait for; rank 0 has already said
    why, so these processes exit with its code and print nothing."""


def from_rank_zero(world: dist_.World, device: Any, work: Callable[[], Any]) -> Any:
    """`work()` on rank 0 only, its JSON result on every rank. A UserError on rank 0 reaches every rank
    (as RankZeroError on the others), so nobody waits for a broadcast that never comes."""
    if not world.distributed:
        return work()
    result, error = None, None
    if world.is_main:
        try:
            result = work()
        except UserError as err:
            error = err
    message = {"error": [str(error), error.exit_code] if error else None, "result": result}
    message = world.broadcast_json(message, device)
    if error is not None:
        raise error
    if message["error"]:
        raise RankZeroError(*message["error"])
    return message["result"]


def shared_state(
    world: dist_.World, device: Any, read: Callable[[], tuple[Any, dict] | None]
) -> tuple[Any, dict] | None:
    """`read()` -> (JSON document, named tensors) or None, done by rank 0 only and sent to every rank
    (so machines without the output folder can resume). No pickle crosses between processes."""
    if not world.distributed:
        return read()
    holder: dict[str, Any] = {}

    def plain_part() -> Any:
        holder["parts"] = read()
        return None if holder["parts"] is None else holder["parts"][0]

    plain = from_rank_zero(world, device, plain_part)
    if plain is None:
        return None
    tensors = world.broadcast_tensors(holder["parts"][1] if world.is_main else None, device)
    return plain, tensors


class MemoryLog:
    """What ranks other than 0 keep instead of log.jsonl: the records, in memory only."""

    def __init__(self, records: list[dict] | None = None) -> None:
        self.records = list(records or [])

    def write(self, record: dict) -> None:
        self.records.append(record)


@dataclass
class ShardData:
    urls: list[str]
    samples_per_epoch: int
    captions: list[str]  # read only when a vocabulary is to be learned from them


def shard_data(
    pattern: str, world: dist_.World, workers: int, need_captions: bool, warn: Callable[[str], None]
) -> ShardData:
    from zsclip.train import shards

    urls = shards.expand_shards(pattern)
    if len(urls) < world.world_size:
        raise UserError(
            f"{len(urls)} shard(s) for {world.world_size} processes: each process needs at least one; "
            "split the data into more shards"
        )
    if len(urls) % (world.world_size * max(1, workers)):
        warn(
            f"{len(urls)} shards do not divide evenly among {world.world_size} process(es) x {max(1, workers)} "
            "loader worker(s); some workers read more than others"
        )
    counts = [shards.count_samples(url) for url in urls]
    captions = [c for url in urls for c in shards.read_captions(url)] if need_captions else []
    return ShardData(urls, sum(counts), captions)


def data_source(
    config: Any, world: dist_.World, *, dataset: Any, collate: Any, shard_info: ShardData | None
) -> Any:
    """A batches.PairSource or batches.ShardSource for this rank."""
    split = dict(
        batch_size=config.batch_size,
        accum_steps=config.accum_steps,
        world_size=world.world_size,
        workers=config.workers,
    )
    if shard_info is None:
        return batches.PairSource(dataset, collate, rank=world.rank, seed=config.seed, **split)
    return batches.ShardSource(
        dataset, collate, samples_per_epoch=shard_info.samples_per_epoch, **split
    )


def shard_dataset(info: ShardData, preprocess: Any, config: Any, world: dist_.World) -> Any:
    from zsclip.train.shards import ShardDataset

    return ShardDataset(
        info.urls,
        preprocess,
        seed=config.seed,
        rank=world.rank,
        world_size=world.world_size,
        shuffle_buffer=SHUFFLE_BUFFER,
    )


def grad_scaler(device: torch.device, dtype: torch.dtype) -> Any:
    """fp16 needs its loss scaled (gradients underflow otherwise); bf16 and fp32 get a scaler that does
    nothing."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def check_global_batch(samples: int, config: Any, world: dist_.World, source: str) -> int:
    """The global batch (world size x accum steps x batch size); refuses data that cannot fill one."""
    global_batch = world.world_size * config.accum_steps * config.batch_size
    if samples < global_batch:
        raise UserError(
            f"{source} has {samples} usable samples, fewer than the global batch of {global_batch} "
            f"({world.world_size} process(es) x --accum-steps {config.accum_steps} x --batch-size "
            f"{config.batch_size}); lower --batch-size or --accum-steps"
        )
    return global_batch
