"""What a Qwen3 layer costs: Llama's, plus the two QK-norm weights.

The FLOPs are Llama's (`trntrain.models.llama.costs`, which already takes the query
width as n_heads x head_dim, not the model width): the norms are elementwise work,
which neither the pipeline's layer costs nor the 6 N + 12 L H Q T count (PaLM's
formula counts matrix multiplications only, and the other norms are left out too).
The parameters add the q and k norms, one head_dim vector each, replicated over tp.
"""

from __future__ import annotations

from omegaconf import DictConfig

from trntrain.models.family import ParamSpec, head_dim
from trntrain.models.llama import costs as llama_costs

layer_costs = llama_costs.layer_costs
head_cost = llama_costs.head_cost
flops_per_token = llama_costs.flops_per_token


def layer_params(model: DictConfig, tp: int) -> list[ParamSpec]:
    """One Qwen3 block's parameters on a tp rank, in the module's order: attention norm,
    wq, wk, wv, wo, q norm, k norm, ffn norm, w1, w2, w3."""
    params = llama_costs.layer_params(model, tp)
    norms = [ParamSpec(head_dim(model), False, False)] * 2
    return [*params[:5], *norms, *params[5:]]
