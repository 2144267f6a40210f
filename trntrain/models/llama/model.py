"""The Llama family (Llama 2, Llama 3/3.1, Mistral without sliding windows) in one definition.

A plain `nn.Module` with an args dataclass. Parallelism is applied from outside;
nothing here knows about process groups. Rotary embeddings use the rotate-half
layout of Hugging Face checkpoints, so their weights load without permutation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from trntrain.models.layers import (
    FeedForward,
    KVCache,
    LayerCache,
    RMSNorm,
    RopeScaling,
    apply_rope,
    attend,
    document_mask,
    normal_tensor,
    parameter_seed,
    rope_at,
    rope_cos_sin,
)


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
    # None: dim / n_heads; set where a family's heads are not a split of the width.
    head_dim: int | None = None

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads


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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None, cache: LayerCache | None = None
                ) -> torch.Tensor:
        """cos, sin: the rotary tables (their first rows are used) or each token's rows
        (`rope_at`); mask: None for causal attention, else `attend`'s boolean mask;
        cache: where this layer's keys and values are kept between forwards."""
        # Shapes come from the projections: under sequence parallelism x holds a
        # slice of the sequence and the projections return all of it.
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        bsz, seq = q.shape[:2]
        if cos.dim() == 2:
            cos, sin = cos[:seq], sin[:seq]
        q = q.view(bsz, seq, -1, self.head_dim)
        k = k.view(bsz, seq, -1, self.head_dim)
        v = v.view(bsz, seq, -1, self.head_dim)
        q, k = self.shape_qk(q, k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v)
        return self.wo(self.attend(q, k, v, mask).reshape(bsz, seq, -1))

    def shape_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What a family does to each head's query and key, (batch, seq, heads, head_dim),
        before rotary embeddings: nothing for Llama (Qwen3: an RMSNorm)."""
        return q, k

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """The attention core (a method, so that selective checkpointing can wrap it)."""
        return attend(q, k, v, mask)


class TransformerBlock(nn.Module):
    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None, cache: LayerCache | None = None
                ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, cache)
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
        cos, sin = rope_cos_sin(args.head_dim, args.rope_theta, args.rope_scaling,
                                args.max_seq_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # Set from outside (`apply_context_parallel`): the sequence is sharded over ranks.
        self.context_parallel = None

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None,
                documents: torch.Tensor | None = None, cache: KVCache | None = None
                ) -> torch.Tensor:
        """tokens (batch, seq) -> logits (batch, seq, vocab); a pipeline chunk maps
        tokens or hidden states to hidden states or logits, as its parts say.

        Packed sequences: `positions` (batch, seq) is each token's position within its
        document (the rotary embeddings' positions) and `documents` (batch, seq) its
        document index; a token attends to the tokens before it in its own document
        only. Both are of the whole sequence, also under sequence and context
        parallelism (where x holds a part of it: under context parallelism this rank's
        zig-zag chunks, `trntrain.parallel.context`). None: positions 0, 1, ... and
        causal attention over the whole row. `cache` (a KVCache, with `positions`):
        decoding, each layer's keys and values written at `positions` and the queries
        attending to all those before.
        """
        h = self.tok_embeddings(x) if self.tok_embeddings is not None else x
        mask = None
        if self.context_parallel is not None:
            if cache is not None:
                raise ValueError("decoding with a KV cache is not context-parallel")
            positions, mask = self.context_parallel.prepare(positions, documents, h.device)
        elif cache is not None:
            if positions is None or documents is not None:
                raise ValueError("decoding with a KV cache takes positions and no documents")
            mask = cache.mask(positions)
        elif documents is not None:
            mask = document_mask(documents)  # once for every layer
        cos, sin = rope_at(self.rope_cos, self.rope_sin, positions)
        for name, layer in self.layers.items():
            if mask is None:
                # The plain call: a block written for (x, cos, sin) needs nothing more.
                h = layer(h, cos, sin)
            else:
                h = layer(h, cos, sin, mask,
                          cache.layer(name, positions) if cache is not None else None)
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
        a = self.args
        cos, sin = rope_cos_sin(a.head_dim, a.rope_theta, a.rope_scaling, a.max_seq_len)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)


