"""Training on several processes: torchrun's environment, the process group, and the global-batch loss.

`torchrun --nproc_per_node N -m zsclip train ...` starts N copies of zsclip with RANK, WORLD_SIZE
and LOCAL_RANK set. Each copy joins one process group (nccl on CUDA, gloo on CPU), wraps the model's
two towers in DistributedDataParallel and trains on its own slice of every global batch.

The contrastive loss needs every negative of the global batch, so image and text features are
all-gathered. zsclip uses the memory-light form: rank r scores only its own n rows (its images
against all N texts, its texts against all N images), an [n, N] matrix instead of [N, N], with the
right answer of local row i at column r * n + i.

Why the gradients come out equal to one process on the whole batch:
the global loss is L = mean over all N rows = (1/W) * sum_r L_r, where L_r is rank r's mean over its
n rows.
`gather_with_grad` sums, in its backward, what every rank's L_r says about each slice of features,
so rank s
back-propagates sum_r dL_r/df_s through its towers. DistributedDataParallel then *averages* the
parameter
gradients over the W ranks: (1/W) * sum_s sum_r dL_r/df_s * df_s/dtheta = (1/W) * sum_r dL_r/dtheta
= dL/dtheta.
logit_scale enters each L_r directly; the average gives (1/W) * sum_r dL_r/dscale = dL/dscale as
well. So each rank calls backward on its own local mean, with no extra factor of W anywhere.
"""

from __future__ import annotations

import ctypes
import datetime
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from zsclip.errors import UserError
from zsclip.train.loss import clip_labels, scale

# Rank 0 may validate and write checkpoints while the others wait in the next collective; NCCL's
# default 10-minute watchdog would kill a long validation, so the group is created with a generous
# timeout.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=60)


@dataclass(frozen=True)
class World:
    """Where this process stands: its rank among world_size processes, and its GPU index on this
    machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The average of a (detached) scalar over all ranks; the same number on every rank."""
        if not self.distributed:
            return value
        value = value.detach().clone().float()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value / self.world_size

    def any(self, flag: bool, device: torch.device | str = "cpu") -> bool:
        """True on every rank when it is True on any rank (so all ranks stop at the same step)."""
        if not self.distributed:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item() > 0)

    def sum_int(self, number: int, device: torch.device | str = "cpu") -> int:
        if not self.distributed:
            return number
        value = torch.tensor([float(number)], device=device, dtype=torch.float64)
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return int(value.item())

    def broadcast_json(self, obj: Any, device: torch.device | str = "cpu") -> Any:
        """Rank 0's `obj` (JSON types) on every rank; the other ranks pass None.

        Sent as UTF-8 bytes in a uint8 tensor, length first: no pickle, and no numpy (which
        torch.distributed.broadcast_object_list needs, and zsclip does not depend on at run time).
        """
        if not self.distributed:
            return obj
        data = json.dumps(obj).encode("utf-8") if self.is_main else b""
        length = torch.tensor([len(data)], dtype=torch.int64, device=device)
        dist.broadcast(length, src=0)
        if self.is_main:
            buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
        else:
            buffer = torch.empty(int(length.item()), dtype=torch.uint8, device=device)
        dist.broadcast(buffer, src=0)
        if self.is_main:
            return obj
        received = buffer.cpu().contiguous()  # [length] uint8
        return json.loads(ctypes.string_at(received.data_ptr(), received.numel()).decode("utf-8"))

    def broadcast_tensors(
        self, tensors: dict[str, torch.Tensor] | None, device: torch.device | str = "cpu"
    ) -> dict[str, torch.Tensor]:
        """Rank 0's named CPU tensors on every rank (names, dtypes and shapes go first, as JSON)."""
        if not self.distributed:
            return dict(tensors or {})
        specs = [
            [name, str(t.dtype).removeprefix("torch."), list(t.shape)]
            for name, t in (tensors or {}).items()
        ]
        specs = self.broadcast_json(specs if self.is_main else None, device)
        out = {}
        for name, dtype, shape in specs:
            if self.is_main:
                buffer = tensors[name].detach().contiguous().to(device)  # type: ignore[index]
            else:
                buffer = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
            dist.broadcast(buffer, src=0)
            out[name] = tensors[name] if self.is_main else buffer.cpu()  # type: ignore[index]
        return out


def world_from_env(env: Mapping[str, str] | None = None) -> World:
    """Read torchrun's RANK, WORLD_SIZE and LOCAL_RANK; a plain `zsclip train` is rank 0 of 1."""
    env = os.environ if env is None else env
    try:
        world_size = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local_rank = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise UserError(
            "RANK, WORLD_SIZE and LOCAL_RANK must be integers; launch with torchrun"
        ) from None
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise UserError(
            f"inconsistent torchrun environment (RANK={rank}, WORLD_SIZE={world_size}); "
            "launch with torchrun, or unset these variables for a single process"
        )
    return World(rank, world_size, local_rank)


def is_main() -> bool:
    """True in the process that writes files and talks to people (rank 0, or the only process)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return world_from_env().is_main


def device_for(world: World, requested: torch.device) -> torch.device:
    """Each process drives one GPU: cuda:LOCAL_RANK. On the CPU all ranks share the machine."""
    if requested.type != "cuda" or not world.distributed:
        return requested
    if world.local_rank >= torch.cuda.device_count():
        raise UserError(
            f"LOCAL_RANK {world.local_rank} but only {torch.cuda.device_count()} GPU(s) here; "
            "use --nproc_per_node at most the number of GPUs"
        )
    return torch.device("cuda", world.local_rank)


def init(world: World, device: torch.device) -> None:
    """Join the process group (nccl for CUDA, gloo for the CPU). Nothing to do for a single process."""
    if not world.distributed or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    # torchrun sets MASTER_ADDR and MASTER_PORT; "env://" reads them.
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=world.rank,
        world_size=world.world_size,
        timeout=COLLECTIVE_TIMEOUT,
    )


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------
# gathering

# torch 2.13 renamed the flat-tensor collectives (*_single); older releases only have the *_tensor
# names.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _GatherWithGrad(torch.autograd.Function):
    """all_gather in the forward; in the backward each rank gets the sum over ranks of the gradient of
    its slice.

    torch.distributed.nn.functional.all_gather does the same; this one is written out so the
    arithmetic the module docstring relies on (a sum, not a mean) is visible, and it uses one flat
    tensor per collective.
    """

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor) -> torch.Tensor:  # local [n, D] -> [W * n, D]
        world_size, rank = dist.get_world_size(), dist.get_rank()
        ctx.rank, ctx.n = rank, local.shape[0]
        out = local.new_empty((world_size * local.shape[0], *local.shape[1:]))
        _all_gather_flat(out, local.contiguous())
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # grad [W * n, D] -> [n, D]
        grad = grad.contiguous()
        if dist.get_backend() == dist.Backend.NCCL:
            local = grad.new_empty((ctx.n, *grad.shape[1:]))
            _reduce_scatter_flat(local, grad, op=dist.ReduceOp.SUM)
            return local
        dist.all_reduce(
            grad, op=dist.ReduceOp.SUM
        )  # gloo has no reduce_scatter: sum everything, keep our slice
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n].clone()


def gather_with_grad(local: torch.Tensor, world: World) -> torch.Tensor:
    """[n, D] on each rank -> [W * n, D], rank-major, with gradients flowing back to every rank's
    slice."""
    if not world.distributed:
        return local
    return _GatherWithGrad.apply(local)


def gather_no_grad(local: torch.Tensor, world: World) -> torch.Tensor:
    """[n, ...] on each rank -> [W * n, ...], rank-major, as constants."""
    if not world.distributed:
        return local.detach()
    out = local.new_empty((world.world_size * local.shape[0], *local.shape[1:]))
    _all_gather_flat(out, local.detach().contiguous())
    return out


# ------------------------------------------------------------------------------------------------
# the loss


def local_rows_loss(
    local_images: torch.Tensor,
    local_texts: torch.Tensor,
    all_images: torch.Tensor,
    all_texts: torch.Tensor,
    logit_scale: torch.Tensor,
    offset: int,
) -> torch.Tensor:
    """This rank's share of the symmetric contrastive loss: the mean over its n rows, both directions.

    local_* [n, D] and all_* [N, D] are L2-normalised; local pair i is global pair offset + i. With
    one rank (n = N, offset 0) this is exactly zsclip.train.loss.clip_loss.
    """
    s = scale(logit_scale)
    logits_per_image = s * local_images @ all_texts.t()  # [n, N]
    logits_per_text = s * local_texts @ all_images.t()  # [n, N]
    labels = clip_labels(local_images.shape[0], device=local_images.device, offset=offset)
    return (
        F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)
    ) / 2


def normalized(features: torch.Tensor) -> torch.Tensor:
    """fp32, unit-length features: the loss is always computed in fp32, whatever the autocast
    precision."""
    return F.normalize(features.float(), dim=-1)


# ------------------------------------------------------------------------------------------------
# the model


class Towers(nn.Module):
    """The two encoders as one forward, so DistributedDataParallel sees them (it only hooks `forward`).

    forward(images [B, 3, S, S], tokens [B, L]) -> (image features [B, D], text features [B, D]),
    not normalised. The CLIP module itself is unchanged: checkpoints save `towers.clip`, never this
    wrapper.
    """

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip = clip

    def forward(
        self, images: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.clip.encode_image(images), self.clip.encode_text(tokens)


def wrap(clip: nn.Module, world: World, device: torch.device) -> nn.Module:
    """Towers(clip), inside DistributedDataParallel when there is more than one process."""
    towers = Towers(clip)
    if not world.distributed:
        return towers
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    # DDP broadcasts rank 0's parameters and buffers here, so every rank starts from the same model.
    return DistributedDataParallel(towers, device_ids=device_ids)


def unwrap(module: nn.Module) -> nn.Module:
    """The plain Towers inside a DDP wrapper (for forwards that must not talk to the other ranks)."""
    return getattr(module, "module", module)
