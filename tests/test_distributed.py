"""Several processes (gloo on the CPU): the global-batch loss and gradients equal one process on the same batch."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from zsclip import distributed
from zsclip.distributed import World

WORLD_SIZE = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _join(rank: int, world_size: int, port: int) -> World:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    world = distributed.world_from_env()
    distributed.init(world, torch.device("cpu"))
    return world


def _check_steps(rank: int, world_size: int, world: World, accum: int) -> None:
    """A few AdamW steps under DDP, each checked against one process on the whole global batch."""
    from test_accumulate import make_batch, reference, tiny_model

    from zsclip.accumulate import contrastive_backward
    from zsclip.schedule import build_optimizer

    ddp_model, single = tiny_model(), tiny_model()
    towers = distributed.wrap(ddp_model, world, torch.device("cpu"))
    ddp_opt, single_opt = build_optimizer(ddp_model, 1e-3, 0.2), build_optimizer(single, 1e-3, 0.2)
    local = 4  # per micro-batch
    for step in range(3):
        images, tokens = make_batch(world_size * accum * local, single.config, seed=step)  # the global batch
        want_loss, want = reference(single, images, tokens)
        mine = slice(rank * accum * local, (rank + 1) * accum * local)
        micro = list(zip(images[mine].chunk(accum), tokens[mine].chunk(accum)))
        ddp_opt.zero_grad(set_to_none=True)
        got_loss = contrastive_backward(towers, micro, ddp_model.logit_scale, world).item()
        assert abs(got_loss - want_loss) < 1e-5, (accum, step, got_loss, want_loss)
        for name, param in ddp_model.named_parameters():
            torch.testing.assert_close(param.grad, want[name], atol=1e-5, rtol=1e-4,
                                       msg=lambda m, n=name: f"rank {rank} accum {accum} step {step} {n}: {m}")
        ddp_opt.step()
        single_opt.step()
    # Adam divides by sqrt(v): gradients of ~1e-8 (float noise) can move a weight by up to lr, so the weights
    # are compared at a fraction of one step's size.
    for (name, got), (_, wanted) in zip(ddp_model.named_parameters(), single.named_parameters()):
        torch.testing.assert_close(got, wanted, atol=2e-4, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def _check_gather(rank: int, world: World) -> None:
    local = torch.full((2, 3), float(rank + 1), requires_grad=True)
    gathered = distributed.gather_with_grad(local, world)  # [4, 3]
    assert gathered[:, 0].tolist() == [1.0, 1.0, 2.0, 2.0]
    weights = torch.arange(4.0).unsqueeze(1) * (rank + 1)  # each rank weighs the rows differently
    (gathered * weights).sum().backward()
    # d/d(local of rank r) = sum over ranks s of (s + 1) * arange[r's rows] = 3 * arange[r's rows]
    expected = torch.arange(4.0)[rank * 2:(rank + 1) * 2].unsqueeze(1).expand(2, 3) * 3
    torch.testing.assert_close(local.grad, expected)
    assert world.mean(torch.tensor(float(rank))).item() == 0.5
    assert world.any(rank == 1) and not world.any(False)
    assert world.sum_int(rank + 1) == 3


def _worker(rank: int, world_size: int, port: int) -> None:
    world = _join(rank, world_size, port)
    try:
        _check_gather(rank, world)
        _check_steps(rank, world_size, world, accum=1)
        _check_steps(rank, world_size, world, accum=2)
    finally:
        distributed.shutdown()


@pytest.mark.slow
def test_two_ranks_match_one_process() -> None:
    """gather's backward sums over ranks; DDP + global loss == one process, with and without accumulation."""
    mp.spawn(_worker, args=(WORLD_SIZE, free_port()), nprocs=WORLD_SIZE, join=True)


def test_world_from_env() -> None:
    assert distributed.world_from_env({}) == World(0, 1, 0)
    assert distributed.world_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == World(3, 4, 1)
    from zsclip.errors import UserError

    with pytest.raises(UserError, match="torchrun"):
        distributed.world_from_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(UserError, match="integers"):
        distributed.world_from_env({"RANK": "x"})
