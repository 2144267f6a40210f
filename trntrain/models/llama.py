"""The Llama family (Llama 2, Llama 3/3.1, Mistral without sliding windows) in one definition.

A plain `nn.Module` with an args dataclass. Parallelism is applied from outside;
nothing here knows about process groups. Rotary embeddings use the rotate-half
layout of Hugging Face checkpoints, so their weights load without permutation.
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


@dataclass
class LlamaArgs:
    dim: int
    n_layers: int
    n_heads: int
    vocab_size: int
    ffn_hidden_dim: int
    n_kv_heads: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads


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


def rope_cos_sin(args: LlamaArgs, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (seq_len, head_dim), halves repeated for rotate-half."""
    inv_freq = rope_inv_freq(args.head_dim, args.rope_theta, args.rope_scaling)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (batch, seq, heads, head_dim); cos, sin: (seq, head_dim)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    return x * cos + rotated * sin


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


class Attention(nn.Module):
    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.kv_heads
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # Shapes come from the projections: under sequence parallelism x holds a
        # slice of the sequence and the projections return all of it.
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        bsz, seq = q.shape[:2]
        cos, sin = cos[:seq], sin[:seq]
        q = q.view(bsz, seq, -1, self.head_dim)
        k = k.view(bsz, seq, -1, self.head_dim)
        v = v.view(bsz, seq, -1, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return self.wo(self.attend(q, k, v).reshape(bsz, seq, -1))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The attention core, (batch, seq, heads, head_dim) in and out."""
        # Head counts come from the tensors: a tensor-parallel shard holds fewer heads.
        groups = q.shape[2] // k.shape[2]
        if groups > 1:
            # repeat_interleave rather than SDPA's enable_gqa: every backend (XLA too) has it.
            k = k.repeat_interleave(groups, dim=2)
            v = v.repeat_interleave(groups, dim=2)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        return out.transpose(1, 2)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


class Llama(nn.Module):
    """The whole model, or a pipeline chunk of it: a chunk keeps some of the layers
    (under their global indices) and has None for the parts it does not hold."""

    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings: nn.Module | None = nn.Embedding(args.vocab_size, args.dim)
        # A dict keyed by global layer index: a pipeline chunk keeps parameter names.
        self.layers = nn.ModuleDict({str(i): TransformerBlock(args) for i in range(args.n_layers)})
        self.norm: nn.Module | None = RMSNorm(args.dim, args.norm_eps)
        self.output: nn.Module | None = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_cos_sin(args, args.max_seq_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """tokens (batch, seq) -> logits (batch, seq, vocab); a pipeline chunk maps
        tokens or hidden states to hidden states or logits, as its parts say."""
        h = self.tok_embeddings(x) if self.tok_embeddings is not None else x
        for layer in self.layers.values():
            h = layer(h, self.rope_cos, self.rope_sin)
        if self.norm is not None:
            h = self.norm(h)
        return self.output(h) if self.output is not None else h

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Initialise every parameter from (seed, its name) alone.

        The same parameter gets the same values whatever else the model holds, so a
        sharded or pipelined layout can rebuild exactly the weights of the full model.
        Residual output projections are scaled down by depth (GPT-2 / torchtitan).
        A tensor-parallel shard (`tp_shard`) takes its slice of the full draw.
        """
        tied = self.args.tie_embeddings
        if tied and self.tok_embeddings is not None and self.output is not None:
            # to_empty() after a meta-device build allocates the two names separately.
            self.output.weight = self.tok_embeddings.weight
        depth_std = self.args.init_std / math.sqrt(2 * self.args.n_layers)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
                continue
            std = depth_std if name.endswith(("wo.weight", "w2.weight")) else self.args.init_std
            # A tied head on the last pipeline stage starts as the first stage's embedding.
            identity = "tok_embeddings.weight" if tied and name == "output.weight" else name
            full = normal_tensor(getattr(param, "tp_full_shape", param.shape), std,
                                 parameter_seed(seed, identity))
            if hasattr(param, "tp_shard"):
                dim, start, length = param.tp_shard
                full = full.narrow(dim, start, length)
            param.copy_(full)
        cos, sin = rope_cos_sin(self.args, self.args.max_seq_len)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)


def parameter_seed(seed: int, name: str) -> int:
    """A stable per-parameter seed (Python's hash() differs between processes)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def normal_tensor(shape: tuple[int, ...], std: float, seed: int) -> torch.Tensor:
    """N(0, std) values drawn on the CPU from `seed`: the same on every device and layout."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
