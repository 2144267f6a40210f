"""Mixtral: Llama's attention (grouped-query, rotary) with a mixture-of-experts
feed-forward in every layer (`trntrain.models.moe.MoE`: top-k of num_experts SwiGLU
experts, the top-k router probabilities renormalised to sum to one)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from trntrain.models.llama.model import Llama, LlamaArgs, TransformerBlock
from trntrain.models.moe import moe_feed_forward, pool_routing


@dataclass
class MixtralArgs(LlamaArgs):
    rope_theta: float = 1_000_000.0
    max_seq_len: int = 32768
    num_experts: int = 8
    top_k: int = 2
    moe_ffn_hidden_dim: int | None = None
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.0
    router_z_loss_coef: float = 0.0
    router_aux_loss_pooling: str = "layer"
    capacity_factor: float | None = None


class MixtralBlock(TransformerBlock):
    def __init__(self, args: MixtralArgs) -> None:
        super().__init__(args)
        # Replaced in place: the parameters keep the block's order (ffn_norm, then these).
        self.feed_forward = moe_feed_forward(args)


class Mixtral(Llama):
    """Llama's model (embedding, layers by global index, norm, head, rope tables,
    initialisation by parameter name) with Mixtral blocks."""

    def __init__(self, args: MixtralArgs) -> None:
        super().__init__(args)
        self.layers = nn.ModuleDict({str(i): MixtralBlock(args) for i in range(args.n_layers)})
        pool_routing(self, args.router_aux_loss_pooling)
