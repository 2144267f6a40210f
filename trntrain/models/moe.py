"""The mixture-of-experts feed-forward block shared by the MoE families (Mixtral,
Qwen3-MoE): a top-k softmax router, SwiGLU experts, the load-balancing and z losses,
dropless or fixed-capacity dispatch, and expert parallelism over a process group.

Routing (transformers' Mixtral and Qwen3-MoE): router logits `gate(x)` (tokens x E),
probabilities softmax(logits) in fp32, the k largest kept and, with `norm_topk_prob`
(always for Mixtral, Qwen3-MoE's config flag), divided by their sum. Each token's
output is the weighted sum of its k experts' SwiGLU outputs.

Experts are a `ModuleDict` of `FeedForward`s under their global index
(`feed_forward.experts.5.w1.weight`), so a parameter keeps its name in every layout
and maps one to one onto Hugging Face's per-expert tensors; expert parallelism keeps
the experts of its rank (`shard_experts`), as a pipeline chunk keeps its layers.

Dispatch:
- dropless (`capacity_factor` None): the (token, expert) assignments are sorted by
  expert, sent to the experts' ranks with one all-to-all of uneven splits (the sizes
  exchanged first: a host synchronisation, so cpu/cuda only), run expert by expert,
  and sent back;
- capacity (`capacity_factor` c): each expert takes at most C = ceil(c x tokens x k / E)
  of a rank's assignments, first choices before second ones, earlier tokens first;
  the rest are dropped (their share of the output is zero: the token passes through
  the residual). The buffers are (E, C, dim) whatever the routing, so every step has
  the same shapes (XLA), and the all-to-all splits are even.

Auxiliary losses, per layer and micro-batch, averaged over the layers:
- load balancing (Switch Transformer, eq. 4-6, as transformers' `load_balancing_loss_func`
  of one layer): E x sum_e f_e P_e, f_e the fraction of assignments to expert e
  (before dropping), P_e its mean router probability;
- z-loss (ST-MoE): the mean over tokens of logsumexp(logits)^2.
transformers pools the statistics of all layers before the product; here each
layer's loss stands alone (as Switch, Megatron and torchtitan do), which keeps the
loss of a pipeline stage independent of the others: the two agree on a one-layer
model. The losses never appear in the model's output: each block adds
`aux_scale x (coef x loss) / n_layers` to the gradient in its backward (Megatron's
`MoEAuxLossAutoScaler`), so pipeline stages and activation checkpointing need
nothing more; the trainer sets `aux_scale` to the micro-batch's share of the step.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from trntrain.models.layers import FeedForward
from trntrain.parallel.comm import COMM_STATS, Group, group_rank, group_size, xla_replica_groups


class _AuxLossGradient(torch.autograd.Function):
    """Identity on `out`; in backward, `aux` receives the gradient `scale` (the auxiliary
    loss is added to the objective without being part of any output)."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        ctx.aux_dtype = aux.dtype
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.full((), ctx.scale, dtype=ctx.aux_dtype, device=grad.device), None


class RoutingPool:
    """The assignments per expert of every layer in the last forward, for the pooled
    load-balancing loss E · Σ_e f_e P_e with f and P taken over the tokens of all layers
    (transformers' `load_balancing_loss_func`). Each layer stores its own entry (so a
    recomputation under activation checkpointing rewrites the same values); the backward,
    which runs after the whole forward, reads the pooled fraction."""

    def __init__(self) -> None:
        self.loads: dict[int, torch.Tensor] = {}
        self.tokens: dict[int, int] = {}

    def record(self, layer: int, load: torch.Tensor, tokens: int) -> None:
        self.loads[layer], self.tokens[layer] = load.detach(), tokens

    def fraction(self) -> torch.Tensor:
        """f_e: the share of all layers' assignments routed to expert e, per token."""
        return torch.stack(list(self.loads.values())).sum(0) / sum(self.tokens.values())


class _PooledLoadBalancingGradient(torch.autograd.Function):
    """Identity on `out`; in backward, a layer's mean router probabilities P_l receive the
    gradient of scale · E · Σ_e f_e P_e / L, with f pooled over the layers when the
    backward runs (f carries no gradient, as in every definition of this loss)."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, mean_probs: torch.Tensor, pool: RoutingPool,
                layer: int, scale: float) -> torch.Tensor:
        ctx.pool, ctx.layer, ctx.scale = pool, layer, scale
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        pool = ctx.pool
        fraction = pool.fraction()
        # P_e = Σ_l T_l P_l,e / Σ_l T_l: the layer's share of the pooled mean probability.
        weight = pool.tokens[ctx.layer] / sum(pool.tokens.values())
        grad_probs = ctx.scale * fraction.numel() * fraction * weight
        return grad, grad_probs.to(grad.device), None, None, None


class _AllToAll(torch.autograd.Function):
    """all_to_all_single along dim 0 with the given split sizes (None: even); its backward
    is the all-to-all back, the splits swapped."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, output_splits: list[int] | None,
                input_splits: list[int] | None, group: Group) -> torch.Tensor:
        ctx.group, ctx.output_splits, ctx.input_splits = group, output_splits, input_splits
        return all_to_all(x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return all_to_all(grad, ctx.input_splits, ctx.output_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, output_splits: list[int] | None,
               input_splits: list[int] | None, group: Group) -> torch.Tensor:
    """Rank r's rows input_splits[r] go to rank r; the rows received, by source rank."""
    x = x.contiguous()
    replica_groups = xla_replica_groups(group)
    if replica_groups is not None:
        # ProcessGroupXla.alltoall_base exchanges over the whole world whatever the group
        # (torch-xla 2.9): torch-xla's all-to-all over the group's replica groups instead.
        # XLA's AllToAll has even splits only, which the capacity rule gives.
        if output_splits is not None or input_splits is not None:
            raise ValueError("an all-to-all on an XLA group needs even splits")
        import torch_xla.core.xla_model as xm

        out = xm.all_to_all(x, 0, 0, group_size(group), groups=replica_groups,
                            pin_layout=False)
        COMM_STATS.record("all_to_all", out)
        return out
    rows = sum(output_splits) if output_splits is not None else x.shape[0]
    out = x.new_empty((rows, *x.shape[1:]))
    COMM_STATS.record("all_to_all", out)
    dist.all_to_all_single(out, x, output_splits, input_splits, group=group)
    return out


def differentiable_all_to_all(x: torch.Tensor, output_splits: list[int] | None,
                              input_splits: list[int] | None, group: Group) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    return _AllToAll.apply(x, output_splits, input_splits, group)


class MoEStats:
    """Routing statistics of one block accumulated on the device (no host read) until the
    trainer collects them: assignments per expert, dropped assignments, the summed
    load-balancing and z losses, and the number of forwards."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self.load: torch.Tensor | None = None
        self.dropped: torch.Tensor | None = None
        self.lb_loss: torch.Tensor | None = None
        self.z_loss: torch.Tensor | None = None
        self.calls = 0

    def add(self, load: torch.Tensor, dropped: torch.Tensor, lb: torch.Tensor,
            z: torch.Tensor) -> None:
        if self.load is None:
            self.load, self.dropped = load.float(), dropped.float()
            self.lb_loss, self.z_loss = lb.float(), z.float()
        else:
            self.load = self.load + load
            self.dropped = self.dropped + dropped
            self.lb_loss = self.lb_loss + lb
            self.z_loss = self.z_loss + z
        self.calls += 1

    def reset(self) -> None:
        self.load = self.dropped = self.lb_loss = self.z_loss = None
        self.calls = 0


class MoE(nn.Module):
    """The feed-forward of an MoE block: (batch, seq, dim) -> (batch, seq, dim)."""

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, top_k: int,
                 norm_topk_prob: bool = True, capacity_factor: float | None = None,
                 aux_loss_coef: float = 0.0, z_loss_coef: float = 0.0, n_layers: int = 1
                 ) -> None:
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
        self.num_experts = num_experts
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.capacity_factor = capacity_factor
        self.aux_loss_coef = aux_loss_coef
        self.z_loss_coef = z_loss_coef
        self.n_layers = n_layers
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.experts = nn.ModuleDict({str(e): FeedForward(dim, hidden_dim)
                                      for e in range(num_experts)})
        # Expert parallelism (`shard_experts`): the group, this rank's first expert.
        self.ep_group: Group = None
        self.first_expert = 0
        # The weight of this micro-batch's auxiliary losses in the step's objective.
        self.aux_scale = 1.0
        self.stats = MoEStats(num_experts)
        self.record_stats = True
        # With model.router_aux_loss_pooling=global (`pool_routing`): the pool the blocks
        # share, and this block's layer index in it.
        self.pool: RoutingPool | None = None
        self.layer = 0

    # -- expert parallelism --------------------------------------------------------------------

    @property
    def ep(self) -> int:
        return group_size(self.ep_group)

    @property
    def local_experts(self) -> int:
        return self.num_experts // self.ep

    def shard(self, ep_group: Group) -> None:
        """Keep this rank's experts (a contiguous run of E / ep under their global indices),
        their inputs coming from and going back to the ranks of `ep_group`."""
        ep = group_size(ep_group)
        if ep == 1:
            return
        if self.num_experts % ep:
            raise ValueError(f"ep={ep} does not divide num_experts={self.num_experts}")
        local = self.num_experts // ep
        self.ep_group, self.first_expert = ep_group, group_rank(ep_group) * local
        self.experts = nn.ModuleDict({str(e): self.experts[str(e)] for e in
                                      range(self.first_expert, self.first_expert + local)})

    # -- routing -------------------------------------------------------------------------------

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (tokens, dim) -> (logits (tokens, E), weights (tokens, k), experts (tokens, k))."""
        logits = self.gate(x)
        probs = F.softmax(logits.float(), dim=-1)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights.to(x.dtype), chosen

    def aux_losses(self, logits: torch.Tensor, chosen: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(load-balancing loss, z-loss, assignments per expert, mean router probability
        per expert) of one forward."""
        probs = F.softmax(logits.float(), dim=-1)
        tokens = logits.shape[0]
        load = torch.zeros(self.num_experts, dtype=torch.float32, device=logits.device)
        load = load.index_add(0, chosen.reshape(-1),
                              torch.ones(chosen.numel(), dtype=torch.float32,
                                         device=logits.device))
        mean_probs = probs.mean(dim=0)
        lb = self.num_experts * (load / tokens * mean_probs).sum()
        z = torch.logsumexp(logits.float(), dim=-1).pow(2).mean()
        return lb, z, load, mean_probs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        logits, weights, chosen = self.route(flat)
        lb, z, load, mean_probs = self.aux_losses(logits, chosen)
        if self.capacity_factor is None:
            out = self.dropless(flat, weights, chosen, load)
            dropped = torch.zeros((), device=x.device)
        else:
            out, dropped = self.with_capacity(flat, weights, chosen)
        if self.training and self.record_stats and torch.is_grad_enabled():
            self.stats.add(load.detach(), dropped.detach(), lb.detach(), z.detach())
        if self.pool is None:
            aux = (self.aux_loss_coef * lb + self.z_loss_coef * z) / self.n_layers
        else:
            aux = self.z_loss_coef * z / self.n_layers
            # Only forwards a backward follows: an evaluation, or a frozen reference's
            # forward under no_grad, leaves the pool to the training forward.
            if torch.is_grad_enabled() and mean_probs.requires_grad and self.aux_loss_coef:
                self.pool.record(self.layer, load, flat.shape[0])
                out = _PooledLoadBalancingGradient.apply(
                    out, mean_probs, self.pool, self.layer, self.aux_scale * self.aux_loss_coef)
        if torch.is_grad_enabled() and aux.requires_grad:
            out = _AuxLossGradient.apply(out, aux, self.aux_scale)
        return out.reshape(shape)

    # -- dispatch ------------------------------------------------------------------------------

    def local_expert_modules(self) -> Iterator[FeedForward]:
        for e in range(self.first_expert, self.first_expert + self.local_experts):
            yield self.experts[str(e)]

    def dropless(self, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor,
                 load: torch.Tensor) -> torch.Tensor:
        """Every assignment reaches its expert: sorted by expert, exchanged with uneven
        splits, run expert by expert, sent back, weighted and summed per token."""
        k, ep, local = self.top_k, self.ep, self.local_experts
        order = torch.argsort(chosen.reshape(-1), stable=True)
        token = order // k
        routed = x[token]
        counts = load.long()
        if ep == 1:
            per_expert = counts.tolist()
            received, output_splits, input_splits = routed, None, None
        else:
            # recv[r * local + j]: the rows rank r sends to this rank's expert j.
            recv = all_to_all(counts, None, None, self.ep_group)
            input_splits = counts.view(ep, local).sum(1).tolist()
            output_splits = recv.view(ep, local).sum(1).tolist()
            received = differentiable_all_to_all(routed, output_splits, input_splits,
                                                 self.ep_group)
            per_source = recv.view(ep, local).tolist()
        if ep == 1:
            grouped = received
        else:
            # Regroup the rows received (by source rank, then expert) by expert.
            starts, offset = [], 0
            for r in range(ep):
                row = []
                for j in range(local):
                    row.append(offset)
                    offset += per_source[r][j]
                starts.append(row)
            index = torch.cat([torch.arange(starts[r][j], starts[r][j] + per_source[r][j])
                               for j in range(local) for r in range(ep)]).to(x.device)
            grouped = received[index]
            per_expert = [sum(per_source[r][j] for r in range(ep)) for j in range(local)]
        outputs = [expert(rows) for expert, rows in
                   zip(self.local_expert_modules(), grouped.split(per_expert), strict=True)]
        done = torch.cat(outputs)
        if ep > 1:
            back = torch.empty_like(index)
            back[index] = torch.arange(index.numel(), device=index.device)
            done = differentiable_all_to_all(done[back], input_splits, output_splits,
                                             self.ep_group)
        weighted = done * weights.reshape(-1)[order, None]
        return torch.zeros_like(x).index_add(0, token, weighted)

    def capacity(self, tokens: int) -> int:
        return math.ceil(self.capacity_factor * tokens * self.top_k / self.num_experts)

    def with_capacity(self, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """At most C assignments per expert (first choices first, then by token), in
        (E, C, dim) buffers: shapes fixed by the micro-batch alone."""
        tokens, dim = x.shape
        num, k, ep, local = self.num_experts, self.top_k, self.ep, self.local_experts
        cap = self.capacity(tokens)
        # Slot-major order: every token's first choice before any second choice.
        expert = chosen.t().reshape(-1)  # (k * tokens)
        one_hot = F.one_hot(expert, num)
        position = (one_hot.cumsum(0) * one_hot).sum(-1) - 1
        kept = position < cap
        # Dropped assignments go to a spare last row, cut off below.
        slot = torch.where(kept, expert * cap + position, torch.full_like(expert, num * cap))
        token = torch.arange(tokens, device=x.device).repeat(k)
        buffer = x.new_zeros((num * cap + 1, dim)).index_add(0, slot, x[token])
        buffer = buffer[:-1]
        if ep > 1:
            # To each rank its experts' C rows from every rank: (ep sources, local, C, dim).
            buffer = differentiable_all_to_all(buffer, None, None, self.ep_group)
            buffer = buffer.view(ep, local, cap, dim).transpose(0, 1).reshape(local, ep * cap, dim)
        else:
            buffer = buffer.view(local, cap, dim)
        done = torch.stack([expert_module(buffer[j]) for j, expert_module in
                            enumerate(self.local_expert_modules())])
        if ep > 1:
            done = done.view(local, ep, cap, dim).transpose(0, 1).reshape(ep * local * cap, dim)
            done = differentiable_all_to_all(done, None, None, self.ep_group)
        done = torch.cat([done.reshape(num * cap, dim), done.new_zeros((1, dim))])
        w = weights.t().reshape(-1) * kept.to(weights.dtype)
        out = torch.zeros_like(x).index_add(0, token, done[slot] * w[:, None])
        return out, (~kept).sum()


def moe_modules(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def shard_experts(model: nn.Module, ep_group: Group) -> nn.Module:
    """Expert parallelism: every MoE block of `model` keeps this rank's experts."""
    for m in moe_modules(model):
        m.shard(ep_group)
    return model


def set_aux_loss_scale(model: nn.Module, scale: float) -> None:
    """The weight of one forward's auxiliary losses in the objective (the trainer's: one
    over the micro-batches of the global batch)."""
    for m in moe_modules(model):
        m.aux_scale = scale


def is_expert_parameter(name: str) -> bool:
    return ".experts." in name


def moe_feed_forward(args: object) -> MoE:
    """The MoE block of an args dataclass with the MoE fields (`MixtralArgs`,
    `Qwen3MoeArgs`)."""
    return MoE(args.dim, args.moe_ffn_hidden_dim or args.ffn_hidden_dim, args.num_experts,
               args.top_k, args.norm_topk_prob, args.capacity_factor,
               args.router_aux_loss_coef, args.router_z_loss_coef, args.n_layers)


def pool_routing(model: nn.Module, pooling: str) -> None:
    """model.router_aux_loss_pooling: "layer" leaves each block's load-balancing loss to
    itself; "global" has the blocks of `model` share one RoutingPool."""
    if pooling == "layer":
        return
    if pooling != "global":
        raise ValueError(f"router_aux_loss_pooling={pooling!r}: 'layer' or 'global'")
    pool = RoutingPool()
    for layer, block in moe_blocks_by_layer(model).items():
        block.pool, block.layer = pool, layer


def moe_blocks_by_layer(model: nn.Module) -> dict[int, MoE]:
    """The MoE blocks of a model or pipeline chunk by global layer index."""
    return {int(i): m for i, layer in model.layers.items() for m in moe_modules(layer)}


@torch.no_grad()
def moe_metrics(blocks: dict[int, MoE], n_layers: int, num_experts: int,
                device: torch.device, groups: list[Group]) -> dict[str, float]:
    """The routing statistics since the last call, over every layer (pipeline stages) and
    every data-parallel rank (sum over `groups`; every rank must call): the mean
    load-balancing and z losses, the fraction of assignments dropped by the capacity,
    and the load imbalance (max / mean assignments per expert) averaged over layers and
    at its worst. The statistics are reset."""
    from trntrain.parallel.comm import all_reduce

    load = torch.zeros(n_layers, num_experts, device=device)
    other = torch.zeros(n_layers, 4, device=device)  # dropped, lb, z, calls
    for i, m in blocks.items():
        s = m.stats
        if s.calls:
            load[i] = s.load
            other[i] = torch.stack([s.dropped, s.lb_loss, s.z_loss,
                                    torch.tensor(float(s.calls), device=device)])
        s.reset()
    packed = torch.cat([load.flatten(), other.flatten()])
    for group in groups:
        packed = all_reduce(packed, group)
    load = packed[:load.numel()].view(n_layers, num_experts)
    other = packed[load.numel():].view(n_layers, 4)
    calls = other[:, 3].sum()
    if calls == 0:
        return {}
    active = other[:, 3] > 0
    imbalance = load[active].max(1).values / load[active].mean(1)
    return {"moe_aux_loss": (other[:, 1].sum() / calls).item(),
            "moe_z_loss": (other[:, 2].sum() / calls).item(),
            "moe_dropped_fraction": (other[:, 0].sum() / load.sum()).item(),
            "moe_load_imbalance": imbalance.mean().item(),
            "moe_load_imbalance_max": imbalance.max().item()}
