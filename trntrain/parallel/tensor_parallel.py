"""Tensor- and sequence-parallel layers; each family's tp plan swaps them in
(`trntrain.models.<family>.parallelize`).

A sharded parameter keeps the name it has in the plain model and records how it
was cut (`tp_shard = (dim, start, length)` of `tp_full_shape`), so that
`Llama.init_weights` draws the full tensor from the same seed and keeps this
rank's slice: any layout starts from the weights of tp=1.

Parameters that every tp rank holds whole but whose gradients differ between
ranks are marked `tp_grad_reduce`: the norm weights under sequence parallelism
(each rank sees other tokens) and key/value projections replicated when tp
exceeds n_kv_heads (each rank back-propagates other query heads). Their
gradients are summed over the tp group after backward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from trntrain.data.base import IGNORE_INDEX
from trntrain.parallel.comm import (
    Group,
    all_reduce,
    copy_to_tp_region,
    gather_from_sequence_region,
    group_rank,
    group_size,
    reduce_from_tp_region,
    reduce_scatter_to_sequence_region,
)


def _empty_like_weight(linear: nn.Linear | nn.Embedding, shape: tuple[int, ...]) -> nn.Parameter:
    w = linear.weight
    return nn.Parameter(torch.empty(shape, dtype=w.dtype, device=w.device))


def shard_weight(module: nn.Linear | nn.Embedding, group: Group, dim: int) -> nn.Parameter:
    """This rank's empty 1/tp slice of `module.weight` along `dim`, marked with how it was
    cut (`tp_shard = (dim, start, length)` of `tp_full_shape`) for initialisation and
    checkpoints."""
    full = tuple(module.weight.shape)
    length = full[dim] // group_size(group)
    shape = list(full)
    shape[dim] = length
    param = _empty_like_weight(module, tuple(shape))
    param.tp_full_shape = full
    param.tp_shard = (dim, group_rank(group) * length, length)
    return param


def enter_tp_region(x: torch.Tensor, group: Group, sequence_parallel: bool) -> torch.Tensor:
    """The input of column-parallel layers: replicated activations are copied into the
    region (gradients all-reduced backward), sequence shards are all-gathered."""
    if sequence_parallel:
        return gather_from_sequence_region(x, group)
    return copy_to_tp_region(x, group)


def leave_tp_region(y: torch.Tensor, group: Group, sequence_parallel: bool) -> torch.Tensor:
    """The output of row-parallel layers: partial sums all-reduced, or reduce-scattered
    along the sequence under sequence parallelism."""
    if sequence_parallel:
        return reduce_scatter_to_sequence_region(y, group)
    return reduce_from_tp_region(y, group)


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W's output rows split over tp: each rank returns its slice of y.

    Input: replicated, or sequence-sharded under sequence parallelism; it enters the
    tp region here unless `shared_input` says the caller did it once for several
    layers reading the same input (q, k, v; w1, w3).
    """

    def __init__(self, linear: nn.Linear, group: Group, sequence_parallel: bool,
                 shared_input: bool = False) -> None:
        super().__init__()
        self.group = group
        self.sequence_parallel = sequence_parallel
        self.shared_input = shared_input
        self.weight = shard_weight(linear, group, 0)
        self.start = self.weight.tp_shard[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.shared_input:
            x = enter_tp_region(x, self.group, self.sequence_parallel)
        return F.linear(x, self.weight)


class RowParallelLinear(nn.Module):
    """y = x W^T with W's input columns split over tp; x arrives split the same way.

    The partial products are summed: all-reduce, or reduce-scatter along the
    sequence under sequence parallelism.
    """

    def __init__(self, linear: nn.Linear, group: Group, sequence_parallel: bool) -> None:
        super().__init__()
        self.group = group
        self.sequence_parallel = sequence_parallel
        self.weight = shard_weight(linear, group, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return leave_tp_region(F.linear(x, self.weight), self.group, self.sequence_parallel)


class ReplicatedKVLinear(nn.Module):
    """Key or value projection when tp > n_kv_heads: every rank holds the whole weight
    and uses the rows of the kv head its query heads read. Its input has entered the
    tp region already (shared with the query projection)."""

    def __init__(self, linear: nn.Linear, group: Group, n_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.weight = _empty_like_weight(linear, tuple(linear.weight.shape))
        self.weight.tp_grad_reduce = True
        tp = group_size(group)
        kv_head = group_rank(group) * n_kv_heads // tp
        self.rows = slice(kv_head * head_dim, (kv_head + 1) * head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight[self.rows])


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split over tp by vocabulary range; each rank looks up the
    tokens it owns and the partial results are summed (or reduce-scattered
    along the sequence under sequence parallelism)."""

    def __init__(self, embedding: nn.Embedding, group: Group, sequence_parallel: bool) -> None:
        super().__init__()
        self.group = group
        self.sequence_parallel = sequence_parallel
        self.weight = shard_weight(embedding, group, 0)
        self.start = self.weight.tp_shard[1]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        h = F.embedding(local.masked_fill(outside, 0), self.weight)
        h = h.masked_fill(outside.unsqueeze(-1), 0.0)
        return leave_tp_region(h, self.group, self.sequence_parallel)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross-entropy over logits split by vocabulary range, without gathering them:
    only (batch, seq)-sized maxima, sums and target logits cross the group."""

    @staticmethod
    def forward(ctx, logits, labels, vocab_start, group):
        ctx.dtype = logits.dtype
        logits = logits.float()
        global_max = all_reduce(logits.max(dim=-1).values, group, dist.ReduceOp.MAX)
        shifted = logits - global_max.unsqueeze(-1)
        local = labels - vocab_start
        # Labels of other ranks' slices, and ignored ones (negative: IGNORE_INDEX).
        outside = (local < 0) | (local >= logits.shape[-1])
        local = local.masked_fill(outside, 0)
        target = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        target = all_reduce(target, group)
        exp = shifted.exp()
        sum_exp = all_reduce(exp.sum(dim=-1), group)
        trained = labels != IGNORE_INDEX
        loss = (sum_exp.log() - target).masked_fill(~trained, 0.0)
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), local, outside, trained)
        return loss

    @staticmethod
    def backward(ctx, grad):
        softmax, local, outside, trained = ctx.saved_tensors
        grad_logits = softmax.clone()
        hit = (~outside).to(softmax.dtype)
        grad_logits.scatter_add_(-1, local.unsqueeze(-1), -hit.unsqueeze(-1))
        grad_logits.mul_((trained.to(softmax.dtype) * grad).unsqueeze(-1))
        return grad_logits.to(ctx.dtype), None, None, None


def vocab_parallel_token_losses(logits: torch.Tensor, labels: torch.Tensor, vocab_start: int,
                                group: Group) -> torch.Tensor:
    """Next-token loss of every position, (rows, seq), 0 where the label is IGNORE_INDEX,
    from this rank's vocabulary slice of the logits."""
    return _VocabParallelCrossEntropy.apply(logits, labels, vocab_start, group)


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, vocab_start: int,
                                 group: Group) -> torch.Tensor:
    """Summed next-token loss over the trained labels (not IGNORE_INDEX) from this rank's
    vocabulary slice of the logits."""
    return vocab_parallel_token_losses(logits, labels, vocab_start, group).sum()

