"""Learning-rate schedule (pure function) and the paper's AdamW set-up with its weight-decay
exceptions."""

from __future__ import annotations

import math

import torch

BETAS = (0.9, 0.98)
EPS = 1e-6


def lr_at(
    step: int, base_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0
) -> float:
    """Linear warmup from ~0 to base_lr over `warmup_steps`, then cosine decay to `min_lr` at
    `total_steps`.

    `step` counts optimizer steps from 0; the lr returned is the one used for that step.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * progress))


def decays(name: str, param: torch.nn.Parameter) -> bool:
    """Weight decay applies to weight matrices only: not to gains, biases, logit_scale (all < 2-D),
    nor to the class embedding (1-D) and the positional embeddings."""
    return param.ndim >= 2 and "positional_embedding" not in name


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed weights and everything exempt from decay."""
    decayed, exempt = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decayed if decays(name, param) else exempt).append(param)
    return [
        {"params": decayed, "weight_decay": weight_decay},
        {"params": exempt, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=BETAS, eps=EPS)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
