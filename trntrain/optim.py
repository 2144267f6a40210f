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


def stochastic_round(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """fp32 `x` rounded to bf16 up or down at random, in proportion to its distance from
    each (so that the rounding is unbiased: updates far below a bf16 step still move the
    weight on average, where round-to-nearest drops them): random bits added below
    bf16's 16 kept bits, then truncated."""
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device,
                          generator=generator)
    bits = (x.contiguous().view(torch.int32) + noise) & -65536  # keep the high 16 bits
    # Exact: the low 16 bits are zero. inf and nan are left to round as bf16 does.
    rounded = bits.view(torch.float32).to(torch.bfloat16)
    return torch.where(torch.isfinite(x), rounded, x.to(torch.bfloat16))


class StochasticAdamW(torch.optim.Optimizer):
    """AdamW for bf16 weights with bf16 moments: the update in fp32, then weights and
    moments rounded back to bf16 stochastically (train.stochastic_rounding). Pure bf16
    then keeps 2 + 4 bytes of state per weight instead of 4 + 8 with fp32 masters.

    The noise is a function of (seed, step, tensor index) alone, so runs with the same
    seed are bitwise equal and a resume draws what the uninterrupted run drew. Each
    rank draws for the tensors it holds: under dp the replicas draw alike and stay
    equal; tp shards and ZeRO-1 slices draw their own noise, so other layouts follow
    the single-process run statistically, not bit for bit.
    """

    def __init__(self, groups: list[dict], lr: float, betas: tuple[float, float], eps: float,
                 seed: int) -> None:
        super().__init__(groups, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": 0.0})
        self.seed = seed

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        index = 0
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                step = int(state["step"])
                gen = torch.Generator(p.device).manual_seed(
                    (self.seed * 1_000_003 + step) * 10_007 + index)
                grad = p.grad.float()
                weight = p.float().mul_(1 - group["lr"] * group["weight_decay"])
                exp_avg = state["exp_avg"].float().lerp_(grad, 1 - beta1)
                exp_avg_sq = state["exp_avg_sq"].float().mul_(beta2).addcmul_(
                    grad, grad, value=1 - beta2)
                denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** step)).add_(group["eps"])
                weight.addcdiv_(exp_avg, denom, value=-group["lr"] / (1 - beta1 ** step))
                p.copy_(stochastic_round(weight, gen))
                state["exp_avg"].copy_(stochastic_round(exp_avg, gen))
                state["exp_avg_sq"].copy_(stochastic_round(exp_avg_sq, gen))


def build_stochastic_adamw(decayed: list[torch.Tensor], undecayed: list[torch.Tensor],
                           optim_cfg: DictConfig, seed: int) -> StochasticAdamW:
    groups = [{"params": decayed, "weight_decay": optim_cfg.weight_decay},
              {"params": undecayed, "weight_decay": 0.0}]
    return StochasticAdamW([g for g in groups if g["params"]], lr=optim_cfg.lr,
                           betas=tuple(optim_cfg.betas), eps=optim_cfg.eps, seed=seed)


# optim.name -> the torch optimizer over a decayed and an undecayed group of tensors;
# packages add theirs through the `trntrain.optimizers` entry point group.
OptimizerBuilder = Callable[[list[torch.Tensor], list[torch.Tensor], DictConfig],
                            torch.optim.Optimizer]
OPTIMIZERS: Registry[OptimizerBuilder] = Registry("trntrain.optimizers")
OPTIMIZERS["adamw"] = build_adamw


def build_optimizer(tensors: list[torch.Tensor], decay: list[bool], optim_cfg: DictConfig,
                    stochastic_rounding_seed: int | None = None) -> torch.optim.Optimizer:
    """The optimizer optim.name names, over `tensors` (parameters, or the flat slices of
    the sharded optimizer), weight decay where `decay` says; AdamW with stochastic
    rounding (seeded) for pure bf16 where `stochastic_rounding_seed` is given."""
    decayed = [t for t, d in zip(tensors, decay, strict=True) if d]
    undecayed = [t for t, d in zip(tensors, decay, strict=True) if not d]
    if stochastic_rounding_seed is not None:
        return build_stochastic_adamw(decayed, undecayed, optim_cfg, stochastic_rounding_seed)
    return OPTIMIZERS[optim_cfg.name](decayed, undecayed, optim_cfg)


def uses_stochastic_rounding(train_cfg: DictConfig, backend_name: str) -> bool:
    """Whether the optimizer rounds in software: pure bf16 (no master weights) with
    train.stochastic_rounding, on an eager backend (Neuron's runtime rounds itself)."""
    return (train_cfg.precision == "bf16" and not train_cfg.master_weights
            and train_cfg.stochastic_rounding and backend_name in SOFTWARE_ROUNDING_BACKENDS)


# Backends where stochastic rounding is done by StochasticAdamW; on neuron the runtime
# does it (NEURON_RT_STOCHASTIC_ROUNDING_EN), on xla there is no seeded device RNG here.
SOFTWARE_ROUNDING_BACKENDS = ("cpu", "cuda")


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
