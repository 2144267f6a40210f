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

from trntrain.models.layers import RMSNorm
from trntrain.models.llama.model import Attention, Llama, LlamaArgs, TransformerBlock


@dataclass
class Qwen3Args(LlamaArgs):
    # The published Qwen3 settings (conf/model/qwen3_*.yaml repeat them).
    norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_seq_len: int = 40960
    head_dim: int | None = 128


class Qwen3Attention(Attention):
    """Llama's attention with an RMSNorm over each head's q and k before rotary (its
    `shape_qk`)."""

    def __init__(self, args: LlamaArgs) -> None:
        super().__init__(args)
        self.q_norm = RMSNorm(args.head_dim, args.norm_eps)
        self.k_norm = RMSNorm(args.head_dim, args.norm_eps)

    def shape_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Head counts come from the projections: a tensor-parallel rank holds some
        # heads, and the norms, acting on the last dimension, do not depend on which.
        return self.q_norm(q), self.k_norm(k)


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
