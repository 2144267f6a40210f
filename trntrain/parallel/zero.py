"""ZeRO-1 and fp32 master weights: AdamW on flat fp32 shards of the parameters.

The trainable parameters are packed into flat buckets, each bucket homogeneous in
what the optimizer and the gradient norm must know (weight decay or not, tp shard
or tp replica, counted in the norm or a tied duplicate). Each data-parallel rank
owns a contiguous 1/dp slice of every bucket and keeps, for that slice only, the
fp32 master weights and AdamW's two moments. A step:

1. reduce-scatter each bucket's gradients over dp (averaged): every rank receives
   the gradient of its slice, cast to fp32 for the optimizer;
2. the global gradient norm from the slices (summed over dp, tp where sharded, pp);
3. AdamW on the fp32 master slices;
4. all-gather the updated slices over dp and copy them into the (fp32 or bf16)
   parameters.

The collectives move the parameters' dtype by default (`parallel.zero1_comm_dtype=
param`), as torch-xla's and neuronx-distributed's ZeRO-1 do: on a bf16 run the
gradients are reduced in bf16 and the weights gathered in bf16 (which loses nothing:
the parameters are bf16, and rounding before or after the gather gives the same
bits). Under `train.fp32_grad_accumulation` the gradients are already accumulated in
fp32 `main_grad` buffers and are reduced in fp32, in the dtype the gradients have (as
neuronx-distributed does), so that the dp sum keeps the precision the accumulation
bought. `zero1_comm_dtype=fp32` communicates both in fp32. An fp32 run moves fp32
either way.

A checkpoint stores each rank's slice as it is, without any gathering
(`slice_parts` says which elements of which parameter a slice holds: see
trntrain/checkpoint/state.py).

Without a dp group (dp=1) nothing is sharded and this is plain fp32 master
weights for bf16 training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch import nn

from trntrain.optim import build_optimizer, decays
from trntrain.parallel.comm import Group, all_gather_dim, group_rank, group_size
from trntrain.parallel.comm import reduce_scatter_dim as reduce_scatter
from trntrain.parallel.flat import pack, unpack
from trntrain.parallel.gradients import global_norm, gradient, is_expert

COMM_DTYPES = ("param", "fp32")
MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass
class Bucket:
    params: list[nn.Parameter]
    decay: bool
    tp_sharded: bool
    counted: bool  # False for a tied head counted on the first pipeline stage
    numel: int
    padded: int  # numel rounded up to a multiple of the group's size
    master: torch.Tensor  # this rank's fp32 slice, padded.numel() // size elements
    # The group the bucket is sharded over: dp, or for experts under expert parallelism
    # the ranks holding the same experts (edp), whose gradients are summed and divided
    # by dp; its size and this rank's place in it.
    group: Group = None
    size: int = 1
    rank: int = 0


@dataclass(frozen=True)
class SlicePart:
    """Elements [start, stop) of `param` (flattened: this rank's tp shard of it) held
    by this rank's slice of the parameter's bucket, from `offset` in the slice."""

    param: nn.Parameter
    start: int
    stop: int
    offset: int

    @property
    def numel(self) -> int:
        return self.stop - self.start


def _category(p: nn.Parameter) -> tuple[bool, bool, bool, torch.dtype, bool]:
    return (decays(p), hasattr(p, "tp_shard"), not getattr(p, "pp_duplicate", False),
            p.dtype, is_expert(p))


class ShardedOptimizer:
    """AdamW over master slices of flat parameter buckets, sharded over `dp_group`.

    `comm_dtype` ("param" or "fp32") and `fp32_grad_accumulation` decide the dtype
    of the dp collectives (see the module's docstring). The slices are fp32 master
    weights, or bf16 for pure bf16 (`master_dtype`, train.master_weights=false), whose
    AdamW then rounds stochastically where `stochastic_rounding_seed` is given."""

    def __init__(self, params: list[nn.Parameter], optim_cfg: DictConfig, dp_group: Group,
                 bucket_mb: float, comm_dtype: str = "param",
                 fp32_grad_accumulation: bool = False,
                 master_dtype: torch.dtype = torch.float32,
                 stochastic_rounding_seed: int | None = None, edp_group: Group = None
                 ) -> None:
        if comm_dtype not in COMM_DTYPES:
            raise ValueError(f"comm_dtype={comm_dtype!r}; valid: one of {COMM_DTYPES}")
        self.dp_group = dp_group
        self.dp = group_size(dp_group)
        self.dp_rank = group_rank(dp_group)
        self.edp_group = edp_group
        self.comm_fp32 = comm_dtype == "fp32"
        self.fp32_grads = fp32_grad_accumulation
        self.master_dtype = master_dtype
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
        self.optimizer = build_optimizer([b.master for b in self.buckets],
                                         [b.decay for b in self.buckets], optim_cfg,
                                         stochastic_rounding_seed)

    def _add_bucket(self, params: list[nn.Parameter], key: tuple) -> None:
        decay, tp_sharded, counted, _, expert = key
        group = self.edp_group if expert else self.dp_group
        size, rank = group_size(group), group_rank(group)
        numel = sum(p.numel() for p in params)
        padded = -(-numel // size) * size
        flat = pack([p.detach() for p in params], self.master_dtype, padded)
        master = flat.chunk(size)[rank].clone()
        self.buckets.append(Bucket(params, decay, tp_sharded, counted, numel, padded, master,
                                   group, size, rank))

    # The parameters are cast to bf16 after the buckets are built, so the dtypes are
    # read from them when communicating, not remembered from construction.
    def grad_comm_dtype(self, b: Bucket) -> torch.dtype:
        """The dtype the gradients of bucket `b` are reduce-scattered in."""
        if self.comm_fp32 or self.fp32_grads:
            return torch.float32
        return b.params[0].dtype

    def weight_comm_dtype(self, b: Bucket) -> torch.dtype:
        """The dtype the updated weights of bucket `b` are all-gathered in."""
        return torch.float32 if self.comm_fp32 else b.params[0].dtype

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Each rank's slice of the dp-averaged gradient, as its master slice's .grad."""
        for b in self.buckets:
            grads = [g if (g := gradient(p)) is not None else torch.zeros_like(p)
                     for p in b.params]
            flat = pack(grads, self.grad_comm_dtype(b), b.padded)
            if self.dp > 1:
                flat.div_(self.dp)  # experts: summed over edp, divided by all of dp
            b.master.grad = reduce_scatter(flat, 0, b.group).to(self.master_dtype)
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
                square = b.master.grad.float().pow(2).sum()
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
            flat = all_gather_dim(b.master.to(self.weight_comm_dtype(b)), 0, b.group)
            for p, updated in zip(b.params, unpack(flat, b.params), strict=True):
                p.copy_(updated)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for b in self.buckets:
            b.master.grad = None
            for p in b.params:
                p.grad = p.main_grad = None

    # -- checkpoint state: this rank's slices, never gathered ----------------------------------

    def slice_parts(self, b: Bucket) -> list[SlicePart]:
        """The parameters (parts of them) this rank's slice of bucket `b` holds, in order."""
        size = b.padded // b.size
        low, high = b.rank * size, (b.rank + 1) * size
        parts, position = [], 0
        for p in b.params:
            start, stop = max(low, position), min(high, position + p.numel())
            if start < stop:
                parts.append(SlicePart(p, start - position, stop - position, start - low))
            position += p.numel()
        return parts

    @staticmethod
    def stores_master(b: Bucket) -> bool:
        """Whether a checkpoint needs the master slice: fp32 weights are the master
        weights themselves, stored once (as the model's)."""
        return any(p.dtype != torch.float32 for p in b.params)

    def state_slices(self, b: Bucket) -> dict[str, torch.Tensor]:
        """This rank's slices of bucket `b` a checkpoint stores (on the device): the
        moments (zeros before the first step) and, where needed, the master."""
        state = self.optimizer.state.get(b.master, {})
        out = {"master": b.master} if self.stores_master(b) else {}
        for name in MOMENTS:
            out[name] = state.get(name, torch.zeros_like(b.master))
        return out

    @torch.no_grad()
    def load_state_slices(self, slices: list[dict[str, torch.Tensor]], step: float) -> None:
        """Take each bucket's slices (host tensors: master and moments, in bucket order),
        as `state_slices` gave them and `slice_parts` lays them out."""
        for b, loaded in zip(self.buckets, slices, strict=True):
            b.master.copy_(loaded["master"])
            self.optimizer.state[b.master] = {
                "step": torch.tensor(step, dtype=torch.float32),
                **{name: loaded[name].to(b.master.device) for name in MOMENTS},
            }

    def state_bytes(self) -> int:
        """Bytes of the optimizer's state on this rank: master slices and AdamW moments."""
        total = sum(b.master.numel() * b.master.element_size() for b in self.buckets)
        for state in self.optimizer.state.values():
            total += sum(v.numel() * v.element_size() for v in state.values()
                         if isinstance(v, torch.Tensor) and v.ndim > 0)
        return total
