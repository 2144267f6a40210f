"""Optimizer and learning-rate schedule from the `optim` config group."""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig
from torch import nn


def build_optimizer(params: list[nn.Parameter], optim_cfg: DictConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (norm gains are left undecayed)."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": optim_cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=optim_cfg.lr, betas=tuple(optim_cfg.betas),
        eps=optim_cfg.eps,
    )


def lr_factor(step: int, optim_cfg: DictConfig, max_steps: int) -> float:
    """Multiplier of optim.lr at optimizer step `step` (0-based).

    Linear warm-up over optim.warmup_steps (the first step already has a non-zero
    rate), then cosine or linear decay to optim.min_lr_ratio at the last step.
    """
    warmup = optim_cfg.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if optim_cfg.decay == "constant" or max_steps <= warmup + 1:
        return 1.0
    progress = min((step - warmup) / (max_steps - 1 - warmup), 1.0)
    floor = optim_cfg.min_lr_ratio
    if optim_cfg.decay == "linear":
        return floor + (1 - floor) * (1 - progress)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_lr_scheduler(optimizer: torch.optim.Optimizer, optim_cfg: DictConfig,
                       max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, optim_cfg, max_steps)
    )
