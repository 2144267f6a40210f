"""Qwen3 (dense): Llama with QK-norm and explicit head size.

Each head's query and key go through an RMSNorm over the head dimension after the
projection and before rotary embeddings (one weight per norm, shared by all heads);
there is no qkv bias, attention heads are `head_dim` wide whatever the model width
(Qwen3-0.6B: 16 heads of 128 on a width of 1024), and the small sizes tie the head
to the embedding. Everything else is Llama's, reused as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from trntrain.models.layers import RMSNorm, apply_rope
from trntrain.models.llama.model import Attention, Llama, LlamaArgs, TransformerBlock


@dataclass
class Qwen3Args(LlamaArgs):
    # The published Qwen3 settings (conf/model/qwen3_*.yaml repeat them).
    norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_seq_len: int = 40960
    head_dim: int | None = 128


class Qwen3Attention(Attention):
    """Llama's attention with an RMSNorm over each head's q and k before rotary."""

    def __init__(self, args: LlamaArgs) -> None:
        super().__init__(args)
        self.q_norm = RMSNorm(args.head_dim, args.norm_eps)
        self.k_norm = RMSNorm(args.head_dim, args.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # As Llama's forward, with the norms between the projection and rotary. Head
        # counts come from the projections: a tensor-parallel rank holds some heads,
        # and the norms, acting on the last dimension, do not depend on which.
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        bsz, seq = q.shape[:2]
        cos, sin = cos[:seq], sin[:seq]
        q = self.q_norm(q.view(bsz, seq, -1, self.head_dim))
        k = self.k_norm(k.view(bsz, seq, -1, self.head_dim))
        v = v.view(bsz, seq, -1, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return self.wo(self.attend(q, k, v).reshape(bsz, seq, -1))


class Qwen3Block(TransformerBlock):
    def __init__(self, args: LlamaArgs) -> None:
        super().__init__(args)
        # Replacing the attribute keeps its place among the block's modules, so the
        # parameters stay in Llama's order (the planner's `layer_params` order).
        self.attention = Qwen3Attention(args)


class Qwen3(Llama):
    """Llama's model (embedding, layers by global index, norm, head, tying, rope tables,
    initialisation by parameter name) with Qwen3 blocks. The q and k norms are
    initialised to ones like every other norm (`init_weights` matches `norm.weight`)."""

    def __init__(self, args: LlamaArgs) -> None:
        super().__init__(args)
        # Built under torch.device("meta") in training, so Llama's blocks made above
        # cost nothing there; tests on the CPU build tiny models.
        self.layers = nn.ModuleDict({str(i): Qwen3Block(args) for i in range(args.n_layers)})
