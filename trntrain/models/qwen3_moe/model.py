"""Qwen3-MoE: Qwen3's attention (QK-norm, heads of head_dim) with a mixture-of-experts
feed-forward in every layer (`trntrain.models.moe.MoE`; the top-k probabilities
renormalised where `norm_topk_prob`, as the published models do). The published
models have no dense layers (`decoder_sparse_step` 1, no `mlp_only_layers`) and no
shared expert."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from trntrain.models.moe import moe_feed_forward, pool_routing
from trntrain.models.qwen3.model import Qwen3, Qwen3Args, Qwen3Block


@dataclass
class Qwen3MoeArgs(Qwen3Args):
    num_experts: int = 128
    top_k: int = 8
    moe_ffn_hidden_dim: int | None = None
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.0
    router_z_loss_coef: float = 0.0
    router_aux_loss_pooling: str = "layer"
    capacity_factor: float | None = None


class Qwen3MoeBlock(Qwen3Block):
    def __init__(self, args: Qwen3MoeArgs) -> None:
        super().__init__(args)
        self.feed_forward = moe_feed_forward(args)


class Qwen3Moe(Qwen3):
    def __init__(self, args: Qwen3MoeArgs) -> None:
        super().__init__(args)
        self.layers = nn.ModuleDict({str(i): Qwen3MoeBlock(args) for i in range(args.n_layers)})
        pool_routing(self, args.router_aux_loss_pooling)
