"""AdamW with weight-decay groups and the learning-rate schedules (warmup, then cosine, WSD or constant)."""

from __future__ import annotations

import math

import torch

from pretrain.config import OptimConfig


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Matrices decay; vectors (norm weights) do not: decaying a gain towards zero only fights the norm."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    on_cuda = next(model.parameters()).is_cuda
    return torch.optim.AdamW(
        parameter_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        # The fused kernel updates every parameter in one launch; it exists on CUDA only.
        fused=on_cuda,
    )


def learning_rate(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """The learning rate for optimizer step `step` (0-based)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":
        # Warmup-stable-decay: hold the peak, then decay linearly to min_lr over the last decay_fraction.
        decay_start = total_steps - int(cfg.decay_fraction * total_steps)
        if step < decay_start:
            return cfg.lr
        progress = (step - decay_start) / max(1, total_steps - decay_start)
        return cfg.lr + (cfg.min_lr - cfg.lr) * min(1.0, progress)
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate(step, cfg, total_steps) / cfg.lr)
