"""AdamW with the usual weight-decay exemptions, and the paper's learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: matrices decay; norms, biases (any tensor of fewer than 2 dims) and embedding tables do
    not, since shrinking them toward zero only fights the normalisation or the token statistics."""
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        exempt = parameter.ndim < 2 or id(parameter) in embedding_weights
        (no_decay if exempt else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float,
                    device: torch.device) -> torch.optim.AdamW:
    # the fused kernel is one launch per step on GPU; on CPU the plain loop is the deterministic reference
    fused = device.type == "cuda"
    return torch.optim.AdamW(parameter_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, fused=fused)


def learning_rate(step: int, max_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """The rate for optimizer step `step` (0-based): a linear warm-up reaching max_lr at step warmup_steps - 1, then a
    cosine from max_lr down to min_lr, reached at the last step (total_steps - 1)."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 1:
        return max_lr
    progress = min(1.0, (step - warmup_steps) / (decay_steps - 1))
    return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, max_lr: float, min_lr: float, warmup_steps: int,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """`learning_rate` as a LambdaLR (its multiplier is relative to max_lr, the optimizer's lr)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate(step, max_lr, min_lr, warmup_steps, total_steps) / max_lr
    )
