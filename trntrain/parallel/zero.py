"""ZeRO-1 and fp32 master weights: AdamW on flat fp32 shards of the parameters.

The trainable parameters are packed into flat buckets, each bucket homogeneous in
what the optimizer and the gradient norm must know (weight decay or not, tp shard
or tp replica, counted in the norm or a tied duplicate). Each data-parallel rank
owns a contiguous 1/dp slice of every bucket and keeps, for that slice only, the
fp32 master weights and AdamW's two moments. A step:

1. reduce-scatter each bucket's gradients over dp (averaged, in fp32): every rank
   receives the gradient of its slice;
2. the global gradient norm from the slices (summed over dp, tp where sharded, pp);
3. AdamW on the master slices;
4. all-gather the updated slices over dp and copy them into the (fp32 or bf16)
   parameters.

Without a dp group (dp=1) nothing is sharded and this is plain fp32 master
weights for bf16 training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch import nn

from trntrain.parallel.comm import Group, all_gather_dim, group_rank, group_size
from trntrain.parallel.comm import reduce_scatter_dim as reduce_scatter
from trntrain.parallel.gradients import global_norm, gradient


@dataclass
class Bucket:
    params: list[nn.Parameter]
    decay: bool
    tp_sharded: bool
    counted: bool  # False for a tied head counted on the first pipeline stage
    numel: int
    padded: int  # numel rounded up to a multiple of dp
    master: torch.Tensor  # this rank's fp32 slice, padded.numel() // dp elements


def _category(p: nn.Parameter) -> tuple[bool, bool, bool, torch.dtype]:
    return (p.ndim >= 2, hasattr(p, "tp_shard"), not getattr(p, "pp_duplicate", False),
            p.dtype)


class ShardedOptimizer:
    """AdamW over fp32 master slices of flat parameter buckets, sharded over `dp_group`."""

    def __init__(self, params: list[nn.Parameter], optim_cfg: DictConfig, dp_group: Group,
                 bucket_mb: float) -> None:
        self.dp_group = dp_group
        self.dp = group_size(dp_group)
        self.dp_rank = group_rank(dp_group)
        limit = int(bucket_mb * 2**20) // 4
        self.buckets: list[Bucket] = []
        open_buckets: dict[tuple, list[nn.Parameter]] = {}
        for p in params:
            key = _category(p)
            current = open_buckets.setdefault(key, [])
            if current and sum(q.numel() for q in current) + p.numel() > limit:
                self._add_bucket(current, key)
                current = open_buckets[key] = []
            current.append(p)
        for key, current in open_buckets.items():
            if current:
                self._add_bucket(current, key)
        groups = [
            {"params": [b.master for b in self.buckets if b.decay],
             "weight_decay": optim_cfg.weight_decay},
            {"params": [b.master for b in self.buckets if not b.decay], "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW(
            [g for g in groups if g["params"]], lr=optim_cfg.lr, betas=tuple(optim_cfg.betas),
            eps=optim_cfg.eps,
        )

    def _add_bucket(self, params: list[nn.Parameter], key: tuple) -> None:
        decay, tp_sharded, counted, _ = key
        numel = sum(p.numel() for p in params)
        padded = -(-numel // self.dp) * self.dp
        flat = torch.zeros(padded, dtype=torch.float32, device=params[0].device)
        torch.cat([p.detach().reshape(-1).float() for p in params], out=flat[:numel])
        master = flat.chunk(self.dp)[self.dp_rank].clone()
        self.buckets.append(Bucket(params, decay, tp_sharded, counted, numel, padded, master))

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Each rank's slice of the dp-averaged gradient, in fp32, as its master's .grad."""
        for b in self.buckets:
            flat = torch.zeros(b.padded, dtype=torch.float32, device=b.master.device)
            grads = [gradient(p).reshape(-1).float() if gradient(p) is not None
                     else torch.zeros(p.numel(), device=b.master.device) for p in b.params]
            torch.cat(grads, out=flat[:b.numel])
            if self.dp > 1:
                flat.div_(self.dp)
            b.master.grad = reduce_scatter(flat, 0, self.dp_group)
            for p in b.params:
                p.grad = p.main_grad = None

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, tp_group: Group, pp_group: Group
                        ) -> torch.Tensor:
        """Global norm of the gradient, each parameter counted once; clip if max_norm > 0."""
        device = self.buckets[0].master.device
        sharded = torch.zeros((), device=device)
        replicated = torch.zeros((), device=device)
        for b in self.buckets:
            if b.counted:
                square = b.master.grad.pow(2).sum()
                if b.tp_sharded:
                    sharded = sharded + square
                else:
                    replicated = replicated + square
        total = global_norm(sharded, replicated, tp_group, pp_group, self.dp_group)
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_([b.master for b in self.buckets], max_norm,
                                                 total)
        return total

    @torch.no_grad()
    def step(self) -> None:
        self.optimizer.step()
        for b in self.buckets:
            flat = all_gather_dim(b.master, 0, self.dp_group)
            offset = 0
            for p in b.params:
                p.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for b in self.buckets:
            b.master.grad = None
            for p in b.params:
                p.grad = p.main_grad = None

    def _slices(self, b: Bucket) -> dict[str, torch.Tensor]:
        state = self.optimizer.state.get(b.master, {})
        out = {"master": b.master}
        for name in ("exp_avg", "exp_avg_sq"):
            out[name] = state.get(name, torch.zeros_like(b.master))
        return out

    @torch.no_grad()
    def per_parameter_state(self) -> dict[nn.Parameter, dict[str, torch.Tensor]]:
        """Master weights and moments of every parameter (this rank's tp/pp part of it),
        gathered over dp: the layout-free form a checkpoint stores."""
        out: dict[nn.Parameter, dict[str, torch.Tensor]] = {p: {} for b in self.buckets
                                                            for p in b.params}
        for b in self.buckets:
            slices = self._slices(b)
            if all(p.dtype == torch.float32 for p in b.params):
                del slices["master"]  # fp32 weights are the master weights: stored once
            for name, piece in slices.items():
                flat = all_gather_dim(piece, 0, self.dp_group)
                offset = 0
                for p in b.params:
                    out[p][name] = flat[offset:offset + p.numel()].view(p.shape)
                    offset += p.numel()
        return out

    @torch.no_grad()
    def load_per_parameter_state(self, moments: dict[nn.Parameter, dict[str, torch.Tensor]],
                                 masters: dict[nn.Parameter, torch.Tensor], step: float) -> None:
        """Take this rank's slices of per-parameter state (the inverse of the above); a
        parameter without a saved master starts from its own value."""
        for b in self.buckets:
            pieces = {"master": [masters.get(p, p.detach()) for p in b.params]}
            for name in ("exp_avg", "exp_avg_sq"):
                pieces[name] = [moments[p][name] for p in b.params]
            slices = {}
            for name, tensors in pieces.items():
                flat = torch.zeros(b.padded, dtype=torch.float32, device=b.master.device)
                torch.cat([t.reshape(-1).float() for t in tensors], out=flat[:b.numel])
                slices[name] = flat.chunk(self.dp)[self.dp_rank].clone()
            b.master.copy_(slices["master"])
            self.optimizer.state[b.master] = {
                "step": torch.tensor(step, dtype=torch.float32),
                "exp_avg": slices["exp_avg"], "exp_avg_sq": slices["exp_avg_sq"],
            }

    def state_bytes(self) -> int:
        """Bytes of the optimizer's state on this rank: master slices and AdamW moments."""
        total = sum(b.master.numel() * b.master.element_size() for b in self.buckets)
        for state in self.optimizer.state.values():
            total += sum(v.numel() * v.element_size() for v in state.values()
                         if isinstance(v, torch.Tensor) and v.ndim > 0)
        return total
