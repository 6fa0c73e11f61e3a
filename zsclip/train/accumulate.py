"""One optimizer step's forward and backward over the global batch, in K micro-batches (`--accum-steps
K`).

A contrastive batch cannot be accumulated like an ordinary one: every pair is a negative for every
other, so K separate losses over B pairs are not the loss over K * B pairs. zsclip caches features
instead (two passes):

  pass 1  embed all K micro-batches without a graph (cheap in memory) and all-gather them: the features of
          the whole global batch, N = W * K * B rows, as constants.
  pass 2  for each micro-batch k: embed it again, now with a graph, gather the fresh [W * B, D] features of
          micro-batch k from every rank, splice them into the cached matrix in place of their constant copies,
          and back-propagate this rank's rows of the global loss (zsclip.train.distributed.local_rows_loss).

The forward is deterministic (no dropout in CLIP), so the spliced matrix has exactly the values of one
K * B-batch forward; micro-batch k's features receive exactly dL/df_k, and the K backward passes add up to the
gradient of the global batch. Two corrections keep it exact:
  - logit_scale enters every pass-2 loss; only the last pass lets its gradient through (the others use a
    detached copy), or it would be counted K times.
  - BatchNorm (the ResNet towers) would update its running statistics in both passes; pass 1 puts them back.
    BatchNorm still normalises with micro-batch statistics, so ResNet towers are close to, not exactly, a
    K * B batch. ViT towers (LayerNorm only) are exact.

Under DistributedDataParallel all but the last micro-batch run inside `no_sync()`: the gradients
pile up locally and are averaged across ranks once, at the end. Memory per rank: the towers' graph
for B samples, plus one [K * B, N] logit matrix per direction.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Sequence

import torch
from torch import nn

from zsclip.train.distributed import (
    World,
    gather_no_grad,
    gather_with_grad,
    local_rows_loss,
    normalized,
    unwrap,
)

MicroBatch = tuple[torch.Tensor, torch.Tensor]  # (images [B, 3, S, S], tokens [B, L])


def contrastive_backward(
    towers: nn.Module,
    micro_batches: Sequence[MicroBatch],
    logit_scale: torch.Tensor,
    world: World,
    *,
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
) -> torch.Tensor:
    """Add the gradient of the global-batch loss to every parameter's .grad; return that loss.

    towers: zsclip.train.distributed.Towers, possibly inside DistributedDataParallel. micro_batches:
    this rank's K micro-batches of equal size B. The returned loss (detached) is the global one, the
    same on every rank. If it is not finite, nothing is back-propagated (the caller stops). The
    caller zeroes the gradients before and steps the optimizer after. `backward` lets fp16 training
    scale the loss first.
    """
    k_steps = len(micro_batches)
    if k_steps == 0:
        raise ValueError("contrastive_backward needs at least one micro-batch")
    sizes = {images.shape[0] for images, _ in micro_batches}
    if len(sizes) != 1:
        raise ValueError(f"micro-batches must all have the same size, got {sorted(sizes)}")
    batch = sizes.pop()
    cache = _cached_features(towers, micro_batches, world, autocast) if k_steps > 1 else None
    global_loss = torch.tensor(float("nan"))
    for k, (images, tokens) in enumerate(micro_batches):
        last = k == k_steps - 1
        with _sync_context(towers, last):
            with autocast():
                image_features, text_features = towers(images, tokens)  # [B, D] each
            fresh_images = gather_with_grad(normalized(image_features), world)  # [W * B, D]
            fresh_texts = gather_with_grad(normalized(text_features), world)
            all_images = _splice(
                cache[0] if cache else None, fresh_images, k, world, batch
            )  # [N, D]
            all_texts = _splice(cache[1] if cache else None, fresh_texts, k, world, batch)
            rows = slice(
                world.rank * k_steps * batch, (world.rank + 1) * k_steps * batch
            )  # this rank's K * B
            scale_input = logit_scale if last else logit_scale.detach()
            loss = local_rows_loss(
                all_images[rows],
                all_texts[rows],
                all_images,
                all_texts,
                scale_input,
                offset=rows.start,
            )
            if k == 0:
                global_loss = world.mean(loss.detach())
                if not torch.isfinite(global_loss):
                    return global_loss  # every rank sees the same value, so every rank stops here
            backward(loss)
    return global_loss


def _sync_context(towers: nn.Module, last: bool) -> ContextManager:
    """DDP's no_sync() for every micro-batch but the last: reduce the gradients once per optimizer
    step."""
    if not last and hasattr(towers, "no_sync"):
        return towers.no_sync()
    return contextlib.nullcontext()


@torch.no_grad()
def _cached_features(
    towers: nn.Module,
    micro_batches: Sequence[MicroBatch],
    world: World,
    autocast: Callable[[], ContextManager],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 1: normalised features of the whole global batch, [W, K, B, D] each, rank-major."""
    plain = unwrap(towers)  # no DDP forward: nothing here is back-propagated
    image_parts, text_parts = [], []
    with _norm_stats_kept(plain):
        for images, tokens in micro_batches:
            with autocast():
                image_features, text_features = plain(images, tokens)
            image_parts.append(normalized(image_features))
            text_parts.append(normalized(text_features))
    k_steps, batch = len(micro_batches), micro_batches[0][0].shape[0]
    local_images = torch.cat(image_parts)  # [K * B, D]
    local_texts = torch.cat(text_parts)
    dim = local_images.shape[-1]
    all_images = gather_no_grad(local_images, world).view(world.world_size, k_steps, batch, dim)
    all_texts = gather_no_grad(local_texts, world).view(world.world_size, k_steps, batch, dim)
    return all_images, all_texts


def _splice(
    cache: torch.Tensor | None, fresh: torch.Tensor, k: int, world: World, batch: int
) -> torch.Tensor:
    """The global [N, D] matrix: cached constants, with micro-batch k of every rank replaced by
    `fresh`.

    cache [W, K, B, D] (None when K = 1: then `fresh` is the whole global batch); fresh [W * B, D].
    """
    if cache is None:
        return fresh
    fresh = fresh.view(world.world_size, 1, batch, fresh.shape[-1])  # [W, 1, B, D]
    spliced = torch.cat([cache[:, :k], fresh, cache[:, k + 1 :]], dim=1)  # [W, K, B, D]
    return spliced.reshape(-1, fresh.shape[-1])  # [W * K * B, D], rank-major like the cache


@contextlib.contextmanager
def _norm_stats_kept(module: nn.Module) -> Any:
    """Put BatchNorm running statistics back after pass 1, so each micro-batch updates them once."""
    norms = [
        m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
    ]
    saved = [
        {name: buf.clone() for name, buf in m.named_buffers(recurse=False) if buf is not None}
        for m in norms
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for norm, buffers in zip(norms, saved):
                for name, value in buffers.items():
                    getattr(norm, name).copy_(value)
