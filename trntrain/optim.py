"""Optimizer and learning-rate schedule from the `optim` config group."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from omegaconf import DictConfig
from torch import nn

from trntrain.plugins import Registry


def decays(p: nn.Parameter) -> bool:
    """Weight decay applies to matrices only: norm gains are left undecayed."""
    return p.ndim >= 2


def build_adamw(decayed: list[torch.Tensor], undecayed: list[torch.Tensor],
                optim_cfg: DictConfig) -> torch.optim.AdamW:
    """AdamW over two groups, with and without weight decay."""
    groups = [{"params": decayed, "weight_decay": optim_cfg.weight_decay},
              {"params": undecayed, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=optim_cfg.lr, betas=tuple(optim_cfg.betas),
        eps=optim_cfg.eps,
    )


# optim.name -> the torch optimizer over a decayed and an undecayed group of tensors;
# packages add theirs through the `trntrain.optimizers` entry point group.
OptimizerBuilder = Callable[[list[torch.Tensor], list[torch.Tensor], DictConfig],
                            torch.optim.Optimizer]
OPTIMIZERS: Registry[OptimizerBuilder] = Registry("trntrain.optimizers")
OPTIMIZERS["adamw"] = build_adamw


def build_optimizer(tensors: list[torch.Tensor], decay: list[bool], optim_cfg: DictConfig
                    ) -> torch.optim.Optimizer:
    """The optimizer optim.name names, over `tensors` (parameters, or the flat fp32 slices
    of the sharded optimizer), weight decay where `decay` says."""
    decayed = [t for t, d in zip(tensors, decay, strict=True) if d]
    undecayed = [t for t, d in zip(tensors, decay, strict=True) if not d]
    return OPTIMIZERS[optim_cfg.name](decayed, undecayed, optim_cfg)


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
