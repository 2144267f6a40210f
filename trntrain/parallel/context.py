"""Context parallelism: each sequence split over the `cp` ranks of a cp group.

A sequence of S tokens is cut into 2·cp chunks of L = S / (2·cp); rank i holds chunks
i and 2·cp − 1 − i ("zig-zag"), so that under causal attention every rank has the
same work: an early chunk, which sees few keys, paired with a late one, which sees
many. Everything but attention is per token and runs on the local 2·L tokens as it
is; attention needs every earlier key, and comes in two kinds (`parallel.cp_attention`):

- `allgather`: the keys and values of the whole sequence are all-gathered along the
  sequence (kv heads only: cheap with grouped-query attention), and the local queries
  attend to all S keys in tiles of KEY_TILE under masks of global token indices; the
  backward gathers them again and reduce-scatters their gradients, so that a rank keeps
  only its own between the two. Every rank runs the same static shapes and only
  all-gather and reduce-scatter: the default on xla and neuron.
- `ring`: each rank's keys and values travel around the cp ring, one hop a step, while
  the rank attends to the block it holds; the partial results merge by their softmax
  normalisers (online softmax), in the same tiles. The next block's transfer overlaps
  the current one's compute, and no rank ever holds more than two blocks of keys. The
  backward passes the keys and values around again with their gradients. Needs
  point-to-point send and receive (cpu, cuda).

Both skip the chunk pairs causality hides (with the zig-zag, half of the work), and
neither ever holds a (local tokens x S) score matrix: a tile's, L x KEY_TILE per head.

Positions and document ids stay those of the whole sequence in the batch (as under
sequence parallelism): rotary embeddings take each local token's own position, and the
masks compare global token indices and document ids, so packed documents stay
separate across shards.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist

from trntrain.parallel.comm import (
    Group,
    all_gather_dim,
    group_rank,
    group_size,
    reduce_scatter_dim,
)

CP_ATTENTION = ("allgather", "ring")


class ShardedAttention:
    """An attention whose keys are spread over the cp ranks: passed to the model's
    attention where a mask goes (`trntrain.models.layers.attend`), it brings its own
    core."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


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
        # One causal sequence per row: its tiles and masks are the same at every forward.
        self._unpacked: dict[torch.device, ShardedAttention] = {}

    def prepare(self, positions: torch.Tensor | None, documents: torch.Tensor | None,
                device: torch.device) -> tuple[torch.Tensor, ShardedAttention]:
        """The rotary positions of the local tokens (1 or batch, 2·L) and the attention
        across the shards, from the whole sequence's positions and documents (None:
        positions 0, 1, ..., one causal sequence)."""
        if positions is None:
            local_positions = zigzag_index(self.seq_len, self.cp, self.rank, device)[None]
        else:
            local_positions = shard_sequence(positions, self.cp, self.rank)
        kind = AllGatherAttention if self.mode == "allgather" else RingAttention
        if documents is not None:
            return local_positions, kind(self, documents, device)
        if device not in self._unpacked:
            self._unpacked[device] = kind(self, None, device)
        return local_positions, self._unpacked[device]


# Keys per tile: a tile's scores, probabilities and their gradient, (heads, L,
# KEY_TILE) in fp32 each, are the largest transient of the core (at 128k tokens over
# cp=4 with 4 local heads: 3 x 128 MiB). Measured on CPU (tests/bench/bench_context.py,
# 4096 tokens, cp=2): 512 keys take half the time and transient memory of 2048 (below
# glibc's 32 MiB mmap threshold, no page faults per tile); fewer, larger tiles would
# make a smaller graph on XLA.
KEY_TILE = 512


# The score of a hidden pair: finite, as -inf would make the normaliser of a row that a
# tile hides entirely -inf and its weights NaN (exp(-inf + inf)), which XLA does not
# guard as torch's logsumexp does. Such a row's tile then has a normaliser near MASKED
# and merges with weight exp(MASKED - real) = 0; every row sees at least its own key.
MASKED = -1e30


class Tile(NamedTuple):
    """A block of the attention: local query rows against some keys, with the mask of
    which pairs are visible (None: every pair)."""

    rows: slice
    cols: slice
    mask: torch.Tensor | None


class Shards:
    """The global token indices and document ids of every cp rank's tokens."""

    def __init__(self, context: ContextParallel, documents: torch.Tensor | None,
                 device: torch.device) -> None:
        self.context = context
        self.index = [zigzag_index(context.seq_len, context.cp, r, device)
                      for r in range(context.cp)]
        self.docs = (None if documents is None
                     else [documents[:, index] for index in self.index])
        self.chunk = self.index[0].numel() // 2  # L

    def tiles(self, owner: int, offset: int = 0) -> list[Tile]:
        """What this rank computes against cp rank `owner`'s keys (their columns in a
        tensor where they start at `offset`): each pair of a local chunk and one of the
        owner's that causality does not hide wholly (the owner's chunk no later), cut
        into tiles of at most KEY_TILE keys, with a mask where some pair is hidden (the
        chunk on the diagonal of causality, or other documents). With the zig-zag an
        earlier owner's first chunk is seen by both local chunks, a later owner's two
        by the second only, and the rank's own chunks as the causal triangle's three
        blocks."""
        me, length = self.context.rank, self.chunk
        step = min(length, KEY_TILE)
        tiles = []
        for q_slot, q_chunk in enumerate(zigzag_chunks(self.context.cp, me)):
            rows = slice(q_slot * length, (q_slot + 1) * length)
            for k_slot, k_chunk in enumerate(zigzag_chunks(self.context.cp, owner)):
                if k_chunk > q_chunk:
                    continue
                for start in range(k_slot * length, (k_slot + 1) * length, step):
                    cols = slice(start, start + step)
                    mask = None
                    if k_chunk == q_chunk or self.docs is not None:
                        q_docs = None if self.docs is None else self.docs[me][:, rows]
                        k_docs = None if self.docs is None else self.docs[owner][:, cols]
                        mask = visible(self.index[me][rows], self.index[owner][cols], q_docs,
                                       k_docs)
                    tiles.append(Tile(rows, slice(offset + start, offset + start + step),
                                      mask))
        return tiles


class AllGatherAttention(ShardedAttention):
    """The local queries against the whole sequence's keys and values, all-gathered
    (kv heads only) and again in backward, where their gradients are reduce-scattered
    back: a rank keeps only its own keys and values between the two. Computed in
    tiles with an online softmax, so no (local tokens x S) matrix is ever held."""

    def __init__(self, context: ContextParallel, documents: torch.Tensor | None,
                 device: torch.device) -> None:
        self.context = context
        shards = Shards(context, documents, device)
        # The gathered keys: owner after owner, each its two chunks.
        self.tiles = [tile for owner in range(context.cp)
                      for tile in shards.tiles(owner, offset=2 * shards.chunk * owner)]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return _TiledAttention.apply(q, k, v, self.tiles, self.context.group)


class RingAttention(ShardedAttention):
    """The local queries against each rank's keys and values in turn, around the ring."""

    def __init__(self, context: ContextParallel, documents: torch.Tensor | None,
                 device: torch.device) -> None:
        self.context = context
        shards = Shards(context, documents, device)
        self.tiles = [shards.tiles(owner) for owner in range(context.cp)]  # by owner

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return _RingAttention.apply(q, k, v, self)


def _exchange(group: Group, send: torch.Tensor) -> tuple[torch.Tensor, list]:
    """Start sending `send` to the next cp rank and receiving the previous one's."""
    size, rank = group_size(group), group_rank(group)
    received = torch.empty_like(send)
    ops = [dist.P2POp(dist.isend, send, dist.get_global_rank(group, (rank + 1) % size), group),
           dist.P2POp(dist.irecv, received, dist.get_global_rank(group, (rank - 1) % size),
                      group)]
    return received, dist.batch_isend_irecv(ops)


def _wait(works: list) -> None:
    for work in works:
        work.wait()


def _expand(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(batch, kv heads, seq, d) -> (batch, heads, seq, d), fp32: each kv head shared
    by a run of query heads (grouped-query attention)."""
    x = x.float()
    return x.repeat_interleave(groups, dim=1) if groups > 1 else x


def _fold(x: torch.Tensor, groups: int) -> torch.Tensor:
    """The transpose of `_expand`: a run of query heads' gradients summed per kv head."""
    if groups == 1:
        return x
    b, h, s, d = x.shape
    return x.view(b, h // groups, groups, s, d).sum(2)


class Queries:
    """Query rows (batch, heads, rows, d) in fp32 and their scores against a tile's keys."""

    def __init__(self, q: torch.Tensor, kv_heads: int) -> None:
        self.q = q.transpose(1, 2).float()
        self.groups = self.q.shape[1] // kv_heads
        self.scale = 1.0 / math.sqrt(self.q.shape[-1])

    def scores(self, tile: Tile, keys: torch.Tensor) -> torch.Tensor:
        scores = self.q[:, :, tile.rows] @ keys.transpose(-1, -2) * self.scale
        return scores if tile.mask is None else scores.masked_fill(~tile.mask, MASKED)


class Softmax:
    """The attention of the queries over keys met tile by tile: each tile's softmax
    merges into the running output by the normalisers (log-sum-exp) of the two (flash
    attention's recurrence, in fp32)."""

    def __init__(self, q: torch.Tensor, kv_heads: int) -> None:
        self.queries = Queries(q, kv_heads)
        self.out = torch.zeros_like(self.queries.q)
        self.lse = torch.full(self.out.shape[:-1], MASKED, device=q.device)

    def add(self, tile: Tile, k: torch.Tensor, v: torch.Tensor) -> None:
        """Merge the tile's columns of the keys k and values v, (batch, kv heads, keys,
        d)."""
        groups = self.queries.groups
        scores = self.queries.scores(tile, _expand(k[:, :, tile.cols], groups))
        tile_lse = scores.logsumexp(-1)
        tile_out = torch.exp(scores - tile_lse[..., None]) @ _expand(v[:, :, tile.cols], groups)
        old = self.lse[:, :, tile.rows]
        merged = torch.logaddexp(old, tile_lse)
        self.out[:, :, tile.rows] = (self.out[:, :, tile.rows] * torch.exp(old - merged)[..., None]
                                     + tile_out * torch.exp(tile_lse - merged)[..., None])
        self.lse[:, :, tile.rows] = merged

    def result(self, dtype: torch.dtype) -> torch.Tensor:
        return self.out.transpose(1, 2).to(dtype)


class SoftmaxGrad:
    """The backward of `Softmax`, visiting the tiles again and recomputing their
    probabilities from the final normaliser: dq accumulated here, dk and dv into the
    caller's buffers."""

    def __init__(self, q: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                 grad_out: torch.Tensor, kv_heads: int) -> None:
        self.queries = Queries(q, kv_heads)
        self.lse = lse
        self.dout = grad_out.transpose(1, 2).float()
        self.delta = (self.dout * out.transpose(1, 2).float()).sum(-1)  # softmax's row term
        self.dq = torch.zeros_like(self.queries.q)

    def add(self, tile: Tile, k: torch.Tensor, v: torch.Tensor, dk: torch.Tensor,
            dv: torch.Tensor) -> None:
        """Add the tile's share of the gradients of k and v (batch, kv heads, keys, d)
        to dk and dv (fp32, the same shape), in the tile's columns."""
        queries, rows, cols = self.queries, tile.rows, tile.cols
        keys = _expand(k[:, :, cols], queries.groups)
        values = _expand(v[:, :, cols], queries.groups)
        probs = torch.exp(queries.scores(tile, keys) - self.lse[:, :, rows][..., None])
        dout = self.dout[:, :, rows]
        dv[:, :, cols] += _fold(probs.transpose(-1, -2) @ dout, queries.groups)
        d_scores = probs * (dout @ values.transpose(-1, -2)
                            - self.delta[:, :, rows][..., None]) * queries.scale
        self.dq[:, :, rows] += d_scores @ keys
        dk[:, :, cols] += _fold(d_scores.transpose(-1, -2) @ queries.q[:, :, rows],
                                queries.groups)

    def result(self, dtype: torch.dtype) -> torch.Tensor:
        return self.dq.transpose(1, 2).to(dtype)


def _fp32(x: torch.Tensor) -> torch.autocast:
    """No autocast inside the core: its scores and merges stay in fp32 under bf16."""
    return torch.autocast(x.device.type, enabled=False)


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)  # (batch, seq, heads, d) <-> (batch, heads, seq, d)


class _TiledAttention(torch.autograd.Function):
    """Exact attention of the local queries over the all-gathered keys and values, tile
    by tile; saves q, the local k and v, the output and its normaliser only."""

    @staticmethod
    def forward(ctx, q, k, v, tiles: list[Tile], group: Group):
        with _fp32(q):
            kh = _heads_first(all_gather_dim(k, 1, group))
            vh = _heads_first(all_gather_dim(v, 1, group))
            softmax = Softmax(q, kh.shape[1])
            for tile in tiles:
                softmax.add(tile, kh, vh)
            out = softmax.result(q.dtype)
        ctx.tiles, ctx.group = tiles, group
        ctx.save_for_backward(q, k, v, out, softmax.lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        group = ctx.group
        kh = _heads_first(all_gather_dim(k, 1, group))
        vh = _heads_first(all_gather_dim(v, 1, group))
        grad = SoftmaxGrad(q, out, lse, grad_out, kh.shape[1])
        dk = torch.zeros(kh.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros_like(dk)
        for tile in ctx.tiles:
            grad.add(tile, kh, vh, dk, dv)
        # Every rank's queries add to every rank's keys: summed back onto their owners.
        dk = reduce_scatter_dim(_heads_first(dk).to(k.dtype), 1, group)
        dv = reduce_scatter_dim(_heads_first(dv).to(v.dtype), 1, group)
        return grad.result(q.dtype), dk, dv, None, None


class _RingAttention(torch.autograd.Function):
    """Exact attention of the local queries over the whole ring's keys, each rank's
    keys and values visiting every rank once, forward and backward (where their
    gradient travels with them and reaches their owner after one more hop)."""

    @staticmethod
    def forward(ctx, q, k, v, ring: RingAttention):
        group, cp, me = ring.context.group, ring.context.cp, ring.context.rank
        with _fp32(q):
            softmax = Softmax(q, k.shape[2])
            current = torch.stack([_heads_first(k), _heads_first(v)]).contiguous()
            for step in range(cp):
                pending = _exchange(group, current) if step < cp - 1 else None
                for tile in ring.tiles[(me - step) % cp]:
                    softmax.add(tile, current[0], current[1])
                if pending is not None:
                    current, works = pending
                    _wait(works)
            out = softmax.result(q.dtype)
        ctx.ring = ring
        ctx.save_for_backward(q, k, v, out, softmax.lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        ring = ctx.ring
        group, cp, me = ring.context.group, ring.context.cp, ring.context.rank
        grad = SoftmaxGrad(q, out, lse, grad_out, k.shape[2])
        current = torch.stack([_heads_first(k), _heads_first(v)]).contiguous()
        dkv = torch.zeros(current.shape, dtype=torch.float32, device=current.device)
        for step in range(cp):
            pending = _exchange(group, current) if step < cp - 1 else None
            for tile in ring.tiles[(me - step) % cp]:
                grad.add(tile, current[0], current[1], dkv[0], dkv[1])
            if pending is not None:
                current, works = pending
                _wait(works)
            if cp > 1:
                dkv, works = _exchange(group, dkv)
                _wait(works)
        return (grad.result(q.dtype), _heads_first(dkv[0]).to(k.dtype),
                _heads_first(dkv[1]).to(v.dtype), None)


def apply_context_parallel(model: torch.nn.Module, group: Group, mode: str, seq_len: int
                           ) -> torch.nn.Module:
    """Shard the model's sequences over `group` (in place): its forward then takes this
    rank's zig-zag tokens and the whole sequence's positions and documents."""
    if group_size(group) > 1:
        model.context_parallel = ContextParallel(group, mode, seq_len)
    return model
