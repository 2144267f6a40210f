"""Autograd-aware collectives over the tensor-parallel group, named Megatron-style.

Each name says what runs forward and what runs backward:

| function                              | forward                  | backward               |
|---------------------------------------|--------------------------|------------------------|
| copy_to_tp_region                     | identity                 | all-reduce             |
| reduce_from_tp_region                 | all-reduce               | identity               |
| gather_from_tp_region (last dim)      | all-gather               | split                  |
| scatter_to_sequence_region (dim 1)    | split                    | all-gather             |
| gather_from_sequence_region (dim 1)   | all-gather               | reduce-scatter         |
| reduce_scatter_to_sequence_region     | reduce-scatter           | all-gather             |

Activations are (batch, seq, hidden); the sequence dimension is 1. (Context parallelism's
key and value exchange is an autograd function of its own: `parallel/context.py`.) Only tensor
collectives on dimension 0 (all-gather and reduce-scatter into one tensor,
all-reduce) are used: gloo, nccl and torch-xla's process group all have them.
Every call is counted in `COMM_STATS` when enabled, for the volume benchmark.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from trntrain import faults

Group = dist.ProcessGroup | None

# torch 2.13 renamed the single-tensor collectives; torch 2.9 (Trn1) has only the old names.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = (getattr(dist, "reduce_scatter_single", None)
                          or dist.reduce_scatter_tensor)


@dataclass
class CommStats:
    """Bytes each kind of collective moved, as the logical size of its result per rank."""

    enabled: bool = False
    bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def record(self, op: str, tensor: torch.Tensor) -> None:
        if self.enabled:
            self.bytes[op] += tensor.numel() * tensor.element_size()
            self.calls[op] += 1

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()


COMM_STATS = CommStats()


def group_size(group: Group) -> int:
    return dist.get_world_size(group) if group is not None else 1


def group_rank(group: Group) -> int:
    return dist.get_rank(group) if group is not None else 0


def xla_replica_groups(group: Group) -> list[list[int]] | None:
    """The replica groups of a torch-xla process group (the mesh of its axis, given at
    its creation), or None for a group of another backend."""
    xla_backend = sys.modules.get("torch_xla.distributed.xla_backend")
    if xla_backend is None or not isinstance(group, xla_backend.ProcessGroupXla):
        return None
    return group._mesh


# -- plain collectives (no autograd) ----------------------------------------------------------

# Global ranks by id(group): looked up once, not at every collective. Keyed by id so that
# no group object outlives its teardown here (a stale entry could only mislabel a note).
_GROUP_RANKS: dict[int, list[int]] = {}


def describe(op: str, group: Group) -> str:
    ranks = _GROUP_RANKS.get(id(group))
    if ranks is None:
        ranks = _GROUP_RANKS[id(group)] = dist.get_process_group_ranks(group)
    return f"{op} over ranks {ranks}"


def _note(op: str, group: Group) -> None:
    if faults.WATCHDOG is not None:
        faults.note(describe(op, group))


def all_reduce(x: torch.Tensor, group: Group, op: dist.ReduceOp = dist.ReduceOp.SUM
               ) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    _note("all_reduce", group)
    x = x.contiguous()
    COMM_STATS.record("all_reduce", x)
    dist.all_reduce(x, op=op, group=group)
    return x


def all_gather_dim(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim` (equal shapes on all ranks)."""
    size = group_size(group)
    if size == 1:
        return x
    _note("all_gather", group)
    moved = x.movedim(dim, 0).contiguous()
    out = torch.empty((size * moved.shape[0], *moved.shape[1:]), dtype=x.dtype, device=x.device)
    COMM_STATS.record("all_gather", out)
    all_gather_single(out, moved, group=group)
    return out.movedim(0, dim)


def reduce_scatter_dim(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """Sum over ranks, each rank keeping its 1/size slice along `dim`."""
    size = group_size(group)
    if size == 1:
        return x
    _note("reduce_scatter", group)
    moved = x.movedim(dim, 0).contiguous()
    out = torch.empty((moved.shape[0] // size, *moved.shape[1:]), dtype=x.dtype,
                      device=x.device)
    COMM_STATS.record("reduce_scatter", out)
    _reduce_scatter_single(out, moved, group=group)
    return out.movedim(0, dim)


def split_dim(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """This rank's 1/size slice of `x` along `dim`."""
    size = group_size(group)
    if size == 1:
        return x
    return x.chunk(size, dim=dim)[group_rank(group)].contiguous()


# -- autograd regions ---------------------------------------------------------------------------

class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad.clone(), ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        # In place: x is a fresh partial product that nothing else reads.
        ctx.mark_dirty(x)
        return all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherLastDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather_dim(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return split_dim(grad, -1, ctx.group), None


class _ScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return split_dim(x, 1, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_dim(grad, 1, ctx.group), None


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        # Contiguous once here: q, k, v (w1, w3) each save their input for backward, and a
        # strided one would be copied, and kept, by each of them.
        return all_gather_dim(x, 1, group).contiguous()

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter_dim(grad, 1, ctx.group), None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return reduce_scatter_dim(x, 1, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_dim(grad, 1, ctx.group), None


def copy_to_tp_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group_size(group) == 1 else _CopyToRegion.apply(x, group)


def reduce_from_tp_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group_size(group) == 1 else _ReduceFromRegion.apply(x, group)


def gather_from_tp_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group_size(group) == 1 else _GatherLastDim.apply(x, group)


def scatter_to_sequence_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group_size(group) == 1 else _ScatterToSequence.apply(x, group)


def gather_from_sequence_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group_size(group) == 1 else _GatherFromSequence.apply(x, group)


def reduce_scatter_to_sequence_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group_size(group) == 1 else _ReduceScatterToSequence.apply(x, group)
