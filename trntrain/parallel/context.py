"""Context parallelism: each sequence split over the `cp` ranks of a cp group.

A sequence of S tokens is cut into 2·cp chunks of L = S / (2·cp); rank i holds chunks
i and 2·cp − 1 − i ("zig-zag"), so that under causal attention every rank has the
same work: an early chunk, which sees few keys, paired with a late one, which sees
many. Everything but attention is per token and runs on the local 2·L tokens as it
is; attention needs every earlier key, and comes in two kinds (`parallel.cp_attention`):

- `allgather`: the keys and values of the whole sequence are all-gathered along the
  sequence before the attention core (reduce-scattered in backward), which then runs
  the local queries against all S keys under a mask of global token indices. Cheap with
  grouped-query attention (few kv heads), every rank runs the same static shapes, and it
  needs nothing but all-gather and reduce-scatter: the default on xla and neuron.
- `ring`: each rank's keys and values travel around the cp ring, one hop a step, while
  the rank attends to the block it holds; the partial results merge by their softmax
  normalisers (online softmax). Blocks that causality hides are skipped (the zig-zag
  makes each remaining block half of a full one), the next block's transfer overlaps
  the current one's compute, and no rank ever holds more than two blocks of keys. The
  backward passes the keys and values around again with their gradients. Needs
  point-to-point send and receive (cpu, cuda).

Positions and document ids stay those of the whole sequence in the batch (as under
sequence parallelism): rotary embeddings take each local token's own position, and the
masks compare global token indices and document ids, so packed documents stay
separate across shards.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from trntrain.models.layers import ShardedAttention, attend
from trntrain.parallel.comm import (
    Group,
    gather_from_context_region,
    group_rank,
    group_size,
)

CP_ATTENTION = ("allgather", "ring")


def zigzag_chunks(cp: int, rank: int) -> tuple[int, int]:
    """The two chunks (of 2·cp) that cp rank `rank` holds, in order."""
    return rank, 2 * cp - 1 - rank


def zigzag_index(seq_len: int, cp: int, rank: int, device: torch.device | None = None
                 ) -> torch.Tensor:
    """The global indices (2·L,) of the tokens cp rank `rank` holds, in its order."""
    length = seq_len // (2 * cp)
    return torch.cat([torch.arange(c * length, (c + 1) * length, device=device)
                      for c in zigzag_chunks(cp, rank)])


def shard_sequence(x: torch.Tensor, cp: int, rank: int, dim: int = 1) -> torch.Tensor:
    """This cp rank's tokens of `x` along `dim`: its two chunks, concatenated."""
    if cp == 1:
        return x
    chunks = x.chunk(2 * cp, dim=dim)
    first, second = zigzag_chunks(cp, rank)
    return torch.cat([chunks[first], chunks[second]], dim=dim)


def visible(q_index: torch.Tensor, k_index: torch.Tensor, q_docs: torch.Tensor | None,
            k_docs: torch.Tensor | None) -> torch.Tensor:
    """Which keys each query may attend to: (1 or batch, 1, queries, keys), True where
    the key comes no later than the query (global indices) and, for packed rows, from
    the same document."""
    mask = (k_index[None, :] <= q_index[:, None])[None, None]
    if q_docs is not None:
        mask = mask & (q_docs[:, None, :, None] == k_docs[:, None, None, :])
    return mask


class ContextParallel:
    """What a model under context parallelism needs at each forward: set on the model
    by `apply_context_parallel` (`model.context_parallel`), None otherwise."""

    def __init__(self, group: Group, mode: str, seq_len: int) -> None:
        if mode not in CP_ATTENTION:
            raise ValueError(f"cp_attention: {mode!r}, valid: {', '.join(CP_ATTENTION)}")
        self.group = group
        self.cp = group_size(group)
        self.rank = group_rank(group)
        self.mode = mode
        self.seq_len = seq_len

    def prepare(self, positions: torch.Tensor | None, documents: torch.Tensor | None,
                device: torch.device) -> tuple[torch.Tensor, ShardedAttention]:
        """The rotary positions of the local tokens (1 or batch, 2·L) and the attention
        across the shards, from the whole sequence's positions and documents (None:
        positions 0, 1, ..., one causal sequence)."""
        local = zigzag_index(self.seq_len, self.cp, self.rank, device)
        if positions is None:
            local_positions = local[None]
        else:
            local_positions = shard_sequence(positions, self.cp, self.rank)
        if self.mode == "allgather":
            keys = torch.cat([zigzag_index(self.seq_len, self.cp, r, device)
                              for r in range(self.cp)])
            k_docs = None if documents is None else documents[:, keys]
            q_docs = None if documents is None else documents[:, local]
            return local_positions, AllGatherAttention(
                visible(local, keys, q_docs, k_docs), self.group)
        return local_positions, RingAttention(self, documents, device)


class AllGatherAttention(ShardedAttention):
    """The local queries against the whole sequence's keys and values, gathered."""

    def __init__(self, mask: torch.Tensor, group: Group) -> None:
        self.mask = mask  # (1 or batch, 1, 2·L, S): built once per forward, every layer's
        self.group = group

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k = gather_from_context_region(k, self.group)
        v = gather_from_context_region(v, self.group)
        return attend(q, k, v, self.mask)


class RingAttention(ShardedAttention):
    """The local queries against each rank's keys and values in turn, around the ring."""

    def __init__(self, context: ContextParallel, documents: torch.Tensor | None,
                 device: torch.device) -> None:
        self.context = context
        cp, seq_len = context.cp, context.seq_len
        self.index = [zigzag_index(seq_len, cp, r, device) for r in range(cp)]
        self.docs = (None if documents is None
                     else [documents[:, index] for index in self.index])

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return _RingAttention.apply(q, k, v, self)

    def block(self, owner: int) -> tuple[slice, slice, torch.Tensor | None]:
        """The (query rows, key rows, mask) this rank computes against the keys of cp rank
        `owner`: with the zig-zag, an earlier owner's first chunk is wholly visible to
        both local chunks, a later owner's two chunks to the second local chunk only, and
        the rank's own keys causally; the rest is hidden. A mask only where some pair of
        the block is hidden (causality within a chunk, or documents)."""
        me, half = self.context.rank, self.index[0].numel() // 2
        if owner == me:
            rows, cols = slice(None), slice(None)
        elif owner < me:
            rows, cols = slice(None), slice(0, half)
        else:
            rows, cols = slice(half, None), slice(None)
        if owner != me and self.docs is None:
            return rows, cols, None
        q_docs = None if self.docs is None else self.docs[me][:, rows]
        k_docs = None if self.docs is None else self.docs[owner][:, cols]
        return rows, cols, visible(self.index[me][rows], self.index[owner][cols], q_docs,
                                   k_docs)


def _exchange(group: Group, send: torch.Tensor) -> tuple[torch.Tensor, list]:
    """Start sending `send` to the next cp rank and receiving the previous one's."""
    size, rank = group_size(group), group_rank(group)
    received = torch.empty_like(send)
    ops = [dist.P2POp(dist.isend, send, dist.get_global_rank(group, (rank + 1) % size), group),
           dist.P2POp(dist.irecv, received, dist.get_global_rank(group, (rank - 1) % size),
                      group)]
    return received, dist.batch_isend_irecv(ops)


def _expand(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(batch, kv heads, seq, d) -> (batch, heads, seq, d): each kv head shared by a run
    of query heads (grouped-query attention)."""
    return x.repeat_interleave(groups, dim=1) if groups > 1 else x


def _fold(x: torch.Tensor, groups: int) -> torch.Tensor:
    """The transpose of `_expand`: a run of query heads' gradients summed per kv head."""
    if groups == 1:
        return x
    b, h, s, d = x.shape
    return x.view(b, h // groups, groups, s, d).sum(2)


class _RingAttention(torch.autograd.Function):
    """Exact attention of the local queries over the whole ring's keys, in fp32, with
    each rank's keys and values visiting every rank once (forward and backward)."""

    @staticmethod
    def forward(ctx, q, k, v, ring: RingAttention):
        context = ring.context
        group, cp, me = context.group, context.cp, context.rank
        dtype = q.dtype
        # (batch, heads, seq, head_dim), fp32 for the scores and the merge.
        qf = q.transpose(1, 2).float()
        kv = torch.stack([k.transpose(1, 2), v.transpose(1, 2)]).float().contiguous()
        groups = qf.shape[1] // kv.shape[2]
        scale = 1.0 / math.sqrt(qf.shape[-1])
        out = torch.zeros_like(qf)
        lse = torch.full(qf.shape[:-1], -math.inf, device=qf.device)
        current = kv
        for step in range(cp):
            owner = (me - step) % cp
            pending = _exchange(group, current) if step < cp - 1 else None
            rows, cols, mask = ring.block(owner)
            keys = _expand(current[0][:, :, cols], groups)
            values = _expand(current[1][:, :, cols], groups)
            scores = qf[:, :, rows] @ keys.transpose(-1, -2) * scale
            if mask is not None:
                scores = scores.masked_fill(~mask, -math.inf)
            block_lse = scores.logsumexp(-1)
            block_out = torch.exp(scores - _finite(block_lse)[..., None]) @ values
            merged = torch.logaddexp(lse[:, :, rows], block_lse)
            weight_old = torch.exp(lse[:, :, rows] - _finite(merged))[..., None]
            weight_new = torch.exp(block_lse - _finite(merged))[..., None]
            out[:, :, rows] = out[:, :, rows] * weight_old + block_out * weight_new
            lse[:, :, rows] = merged
            if pending is not None:
                received, works = pending
                for work in works:
                    work.wait()
                current = received
        ctx.ring, ctx.dtype, ctx.groups, ctx.scale = ring, dtype, groups, scale
        ctx.save_for_backward(qf, kv, out, lse)
        return out.transpose(1, 2).to(dtype)

    @staticmethod
    def backward(ctx, grad_out):
        qf, kv, out, lse = ctx.saved_tensors
        ring, groups, scale = ctx.ring, ctx.groups, ctx.scale
        context = ring.context
        group, cp, me = context.group, context.cp, context.rank
        dout = grad_out.transpose(1, 2).float()
        delta = (dout * out).sum(-1)  # the softmax backward's row term
        dq = torch.zeros_like(qf)
        current = kv
        # The gradient of the keys and values being visited, passed along with them and
        # home to their owner after the last hop.
        dkv = torch.zeros_like(kv)
        for step in range(cp):
            owner = (me - step) % cp
            pending = _exchange(group, current) if step < cp - 1 else None
            rows, cols, mask = ring.block(owner)
            keys = _expand(current[0][:, :, cols], groups)
            values = _expand(current[1][:, :, cols], groups)
            scores = qf[:, :, rows] @ keys.transpose(-1, -2) * scale
            if mask is not None:
                scores = scores.masked_fill(~mask, -math.inf)
            probs = torch.exp(scores - lse[:, :, rows][..., None])
            d_out = dout[:, :, rows]
            dkv[1][:, :, cols] += _fold(probs.transpose(-1, -2) @ d_out, groups)
            d_scores = probs * (d_out @ values.transpose(-1, -2)
                                - delta[:, :, rows][..., None]) * scale
            dq[:, :, rows] += d_scores @ keys
            dkv[0][:, :, cols] += _fold(d_scores.transpose(-1, -2) @ qf[:, :, rows], groups)
            if pending is not None:
                received, works = pending
                for work in works:
                    work.wait()
                current = received
            if cp > 1:
                dkv, works = _exchange(group, dkv)
                for work in works:
                    work.wait()
        dk, dv = dkv[0].transpose(1, 2), dkv[1].transpose(1, 2)
        return (dq.transpose(1, 2).to(ctx.dtype), dk.to(ctx.dtype), dv.to(ctx.dtype), None)


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """A normaliser safe to subtract: rows that see no key in a block (-inf) get 0, so
    their exp(-inf - 0) weights are 0 rather than NaN."""
    return torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))


def apply_context_parallel(model: torch.nn.Module, group: Group, mode: str, seq_len: int
                           ) -> torch.nn.Module:
    """Shard the model's sequences over `group` (in place): its forward then takes this
    rank's zig-zag tokens and the whole sequence's positions and documents."""
    if group_size(group) > 1:
        model.context_parallel = ContextParallel(group, mode, seq_len)
    return model
