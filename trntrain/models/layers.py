"""Layers shared by the model families: RMSNorm, rotary embeddings, the attention core
and its masks (causal, block-diagonal causal over packed documents, a KV cache's), the
SwiGLU MLP, and the deterministic initialisation by parameter name.

Nothing here knows about process groups: tensor parallelism swaps in the layers of
`trntrain.parallel.tensor_parallel` from outside (each family's `parallelize`).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class RopeScaling:
    """Llama-3.1 scaling: long wavelengths slowed by `factor`, short ones kept."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if scaling is None:
        return inv_freq.float()
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_len / scaling.low_freq_factor
    high_freq_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    # Between the two wavelengths, interpolate smoothly from scaled to unscaled.
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, smoothed, scaled).float()


def rope_cos_sin(head_dim: int, theta: float, scaling: RopeScaling | None, seq_len: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (seq_len, head_dim), halves repeated for rotate-half."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (batch, seq, heads, head_dim); cos, sin: (seq, head_dim), the same positions for
    every row, or (batch, seq, head_dim), each token's own (`rope_at`)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    cos, sin = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)
    return x * cos + rotated * sin


def rope_at(cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor | None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary tables (max_seq_len, head_dim) for `positions` (batch, seq): each token's
    rows, (batch, seq, head_dim). None: the tables themselves, of which the attention
    takes the first `seq` rows (positions 0, 1, ... in every row)."""
    if positions is None:
        return cos, sin
    return cos[positions], sin[positions]


def document_mask(documents: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal attention over packed documents: (batch, seq) document ids ->
    a boolean (batch, 1, seq, seq) mask, True where token i may attend to token j: j <= i
    in the same document. Static in shape (XLA compiles it once per sequence length);
    every token sees at least itself, so no row of the softmax is empty."""
    seq = documents.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=documents.device).tril()
    same = documents[:, :, None] == documents[:, None, :]
    return (same & causal).unsqueeze(1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the activation dtype, as the reference models do.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.type_as(x)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention, (batch, seq, heads, head_dim) in and out; k and v may have fewer heads
    (grouped-query attention), each shared by a run of query heads, and more positions
    than q (a KV cache's). `mask`: None for plain causal attention over q's positions,
    else a boolean (batch, 1, q positions, k positions), True where a query may attend
    (`document_mask`, `KVCache.mask`); or, under context parallelism, the attention
    across the shards, which brings its own core (`trntrain.parallel.context`)."""
    if mask is not None and not isinstance(mask, torch.Tensor):
        return mask.attend(q, k, v)
    # Head counts come from the tensors: a tensor-parallel shard holds fewer heads.
    groups = q.shape[2] // k.shape[2]
    if groups > 1:
        # repeat_interleave rather than SDPA's enable_gqa: every backend (XLA too) has it.
        k = k.repeat_interleave(groups, dim=2)
        v = v.repeat_interleave(groups, dim=2)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if mask is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2)


class KVCache:
    """The keys and values of every layer for `max_len` positions, for decoding one token
    at a time: a forward with the cache writes each layer's k and v at the positions of
    its tokens, and its queries attend to every position written up to their own.

    The tensors are allocated on the first write, (batch, max_len, kv heads, head_dim)
    in the dtype and on the device of the keys (a tensor-parallel rank holds its own kv
    heads), and keep that shape: every decoding step has the same shapes (XLA compiles
    it once). Positions are written in place, so a prompt is prefilled in one forward
    and each new token then costs one forward of one position.
    """

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self.keys: dict[str, torch.Tensor] = {}
        self.values: dict[str, torch.Tensor] = {}

    def mask(self, positions: torch.Tensor) -> torch.Tensor:
        """(batch, 1, seq, max_len): the query at position p attends to positions <= p."""
        slots = torch.arange(self.max_len, device=positions.device)
        return (slots[None, None, :] <= positions[:, :, None]).unsqueeze(1)

    def layer(self, name: str, positions: torch.Tensor) -> LayerCache:
        """What the attention of layer `name` writes into for tokens at `positions`."""
        return LayerCache(self, name, positions)

    def write(self, name: str, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k and v (batch, seq, kv heads, head_dim) of layer `name` at `positions`
        (batch, seq); returns the layer's keys and values at every position."""
        if name not in self.keys:
            shape = (k.shape[0], self.max_len, *k.shape[2:])
            self.keys[name] = torch.zeros(shape, dtype=k.dtype, device=k.device)
            self.values[name] = torch.zeros(shape, dtype=v.dtype, device=v.device)
        index = positions[:, :, None, None].expand_as(k)
        self.keys[name].scatter_(1, index, k)
        self.values[name].scatter_(1, index, v)
        return self.keys[name], self.values[name]


@dataclass
class LayerCache:
    """One layer's view of a KVCache for one forward: `update(k, v)` stores the new keys
    and values and returns all of them."""

    cache: KVCache
    name: str
    positions: torch.Tensor

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.write(self.name, self.positions, k, v)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))



def parameter_seed(seed: int, name: str) -> int:
    """A stable per-parameter seed (Python's hash() differs between processes)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def normal_tensor(shape: tuple[int, ...], std: float, seed: int) -> torch.Tensor:
    """N(0, std) values drawn on the CPU from `seed`: the same on every device and layout."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
