"""Gradients across process groups: bucketed reductions and the global-norm clip.

After backward:
1. tp: gradients of tp-replicated parameters that differ between tp ranks
   (`tp_grad_reduce`: norms under sequence parallelism, replicated kv weights)
   are summed over the tp group;
2. dp: every gradient is averaged over the data-parallel group, but those of experts
   under expert parallelism (`ep_expert`), which are summed over the ranks holding the
   same experts (the edp group: each copy already holds the gradient of the tokens its
   ep group sent it) and divided by dp;
3. the global norm counts each parameter once: shards summed over tp, replicated
   parameters taken once, experts summed over the ep group (each rank holds others).

Reductions run on flat buckets, one collective per bucket: a small collective
costs about as much as a large one on gloo and on EFA, so few large ones win.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn

from trntrain.optim import build_optimizer, decays
from trntrain.parallel.comm import Group, all_reduce, group_size
from trntrain.parallel.flat import pack, unpack


def gradient(p: nn.Parameter) -> torch.Tensor | None:
    """The accumulated gradient: `main_grad` (fp32) under fp32 gradient accumulation."""
    main = getattr(p, "main_grad", None)
    return main if main is not None else p.grad


def set_gradient(p: nn.Parameter, value: torch.Tensor) -> None:
    if getattr(p, "main_grad", None) is not None:
        p.main_grad = value
    else:
        p.grad = value


def accumulate_in_fp32(p: nn.Parameter) -> None:
    """Post-accumulate-grad hook: add each backward's bf16 gradient into an fp32
    `main_grad`, so that micro-batches sum without bf16 rounding (Megatron's main_grad)."""
    if getattr(p, "main_grad", None) is None:
        p.main_grad = p.grad.float()
    else:
        p.main_grad.add_(p.grad)
    p.grad = None


def gradient_buckets(params: list[nn.Parameter], bucket_bytes: int) -> list[list[nn.Parameter]]:
    """Consecutive parameters grouped up to `bucket_bytes` each, one dtype per bucket."""
    buckets: list[list[nn.Parameter]] = []
    size = 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        if buckets and size + nbytes <= bucket_bytes and buckets[-1][0].dtype == p.dtype:
            buckets[-1].append(p)
            size += nbytes
        else:
            buckets.append([p])
            size = nbytes
    return buckets


class GradientReducer:
    """Sums (or averages) the .grad of `params` over `group`, bucket by bucket."""

    def __init__(self, params: list[nn.Parameter], group: Group, bucket_mb: float,
                 average: bool) -> None:
        self.group = group
        self.size = group_size(group)
        self.average = average
        # Reverse order: the last layers' gradients are ready first, should overlap come.
        self.buckets = gradient_buckets(params[::-1], int(bucket_mb * 2**20))

    @torch.no_grad()
    def reduce(self) -> None:
        if self.size == 1:
            return
        for bucket in self.buckets:
            grads = [gradient(p) if gradient(p) is not None else torch.zeros_like(p)
                     for p in bucket]
            flat = pack(grads)
            if self.average:
                flat.div_(self.size)
            all_reduce(flat, self.group)
            for p, reduced in zip(bucket, unpack(flat, grads), strict=True):
                set_gradient(p, reduced)


def is_tp_sharded(param: nn.Parameter) -> bool:
    return hasattr(param, "tp_shard")


def is_expert(param: nn.Parameter) -> bool:
    """An expert's weight sharded by expert parallelism (ep > 1)."""
    return getattr(param, "ep_expert", False)


def _norm(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    if not grads:
        return torch.zeros((), device=device)
    return torch.nn.utils.get_total_norm(grads).float()


def global_norm(sharded_squares: torch.Tensor, replicated_squares: torch.Tensor,
                tp_group: Group, pp_group: Group, dp_group: Group = None) -> torch.Tensor:
    """The global norm from this rank's sums of squares: tp shards add over the tp group,
    replicated parameters count once, slices held per dp rank (ZeRO) add over dp, and
    pipeline stages add their parts."""
    squares = all_reduce(sharded_squares, tp_group) + replicated_squares
    if dp_group is not None:
        squares = all_reduce(squares, dp_group)
    return all_reduce(squares, pp_group).sqrt()


@torch.no_grad()
def clip_grad_norm_(params: list[nn.Parameter], max_norm: float, tp_group: Group,
                    pp_group: Group = None, ep_group: Group = None) -> torch.Tensor:
    """Scale gradients so that their global norm is at most `max_norm` (0: only measure).

    Returns the norm before clipping, identical on every rank, as a device tensor.
    Stages add their parts; a tied head (`pp_duplicate`) is counted on the first stage;
    the experts of the ep group's ranks add theirs.
    """
    with_grad = [p for p in params if p.grad is not None]
    counted = [p for p in with_grad if not getattr(p, "pp_duplicate", False)]
    device = with_grad[0].grad.device
    sharded = _norm([p.grad for p in counted if is_tp_sharded(p)], device)
    replicated = _norm([p.grad for p in counted if not is_tp_sharded(p) and not is_expert(p)],
                       device).pow(2)
    experts = [p.grad for p in counted if is_expert(p)]
    if experts:
        replicated = replicated + all_reduce(_norm(experts, device).pow(2), ep_group)
    total = global_norm(sharded.pow(2), replicated, tp_group, pp_group)
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(with_grad, max_norm, total)
    return total


class ReplicatedOptimizer:
    """AdamW on the parameters themselves, each dp rank holding all of its state, the
    gradients all-reduced over dp: the interface of `ShardedOptimizer` (reduce the
    gradients, clip, step, zero, state bytes), so the trainer holds either one alike."""

    def __init__(self, params: list[nn.Parameter], optim_cfg: DictConfig, dp_group: Group,
                 bucket_mb: float, stochastic_rounding_seed: int | None = None,
                 ep_group: Group = None, edp_group: Group = None) -> None:
        self.params = params
        self.optimizer = build_optimizer(params, [decays(p) for p in params], optim_cfg,
                                         stochastic_rounding_seed)
        self._reducer = GradientReducer([p for p in params if not is_expert(p)], dp_group,
                                        bucket_mb, average=True)
        self.experts = [p for p in params if is_expert(p)]
        self._expert_reducer = GradientReducer(self.experts, edp_group, bucket_mb,
                                               average=False)
        self.dp = group_size(dp_group)
        self.ep_group = ep_group

    def reduce_gradients(self) -> None:
        self._reducer.reduce()
        self._expert_reducer.reduce()
        if self.dp > 1:
            with torch.no_grad():
                for p in self.experts:
                    if (g := gradient(p)) is not None:
                        g.div_(self.dp)

    def clip_grad_norm_(self, max_norm: float, tp_group: Group, pp_group: Group
                        ) -> torch.Tensor:
        return clip_grad_norm_(self.params, max_norm, tp_group, pp_group, self.ep_group)

    def step(self) -> None:
        self.optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_bytes(self) -> int:
        """Bytes of AdamW's moments on this rank (its step counters are scalars)."""
        return sum(v.numel() * v.element_size() for state in self.optimizer.state.values()
                   for v in state.values() if isinstance(v, torch.Tensor) and v.ndim > 0)
