"""AdamW with weight-decay groups and the learning-rate schedules (warmup, then cosine, WSD or constant)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from pretrain import parallel
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


class GatedAdamW(torch.optim.AdamW):
    """AdamW that applies an update only where its `gate` (the loss-spike guard, when on) allows it: a refused step
    leaves the weights, the moments and the step count as they were. ZeRO calls it after reducing the gradients and
    taking their global norm, which the gate reads."""

    gate = None  # a pretrain.training.spike_guard.SpikeGate, set by the trainer

    @torch.no_grad()
    def step(self, closure=None):
        if self.gate is not None and not self.gate.allows_update():
            return None
        return super().step(closure)


class NonFiniteSkippingAdamW(GatedAdamW):
    """AdamW that leaves the parameters untouched when any rank's gradients hold inf or NaN.

    DeepSpeed's ZeRO optimizers check the global gradient norm and skip such steps themselves; without ZeRO it calls
    the client optimizer directly and reads its `overflow` afterwards (skipping the scheduler step and counting it),
    so this gives ZeRO stage 0 the same behaviour.
    """

    overflow = False

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        found = bool(torch.stack(torch._foreach_norm(grads)).isfinite().logical_not().any()) if grads else False
        [found_anywhere] = parallel.all_reduce_numbers([found], op=dist.ReduceOp.MAX)
        self.overflow = bool(found_anywhere)
        return None if self.overflow else super().step(closure)


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, zero_stage: int) -> torch.optim.Optimizer:
    on_cuda = next(model.parameters()).is_cuda
    adamw = NonFiniteSkippingAdamW if zero_stage == 0 else GatedAdamW
    return adamw(
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
