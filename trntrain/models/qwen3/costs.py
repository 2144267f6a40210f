"""What a Qwen3 layer costs: Llama's, plus the two QK-norm weights.

The FLOPs are Llama's (`trntrain.models.llama.costs`, which already takes the query
width as n_heads x head_dim, not the model width): the norms are elementwise work,
which neither the pipeline's layer costs nor the 6 N + 12 L H Q T count (PaLM's
formula counts matrix multiplications only, and the other norms are left out too).
The parameters add the q and k norms, one head_dim vector each, replicated over tp.

The saved activations add, to Llama's, what the q and k norms keep for backward
(`RMSNorm` on each head of the rank's q and k, width w = heads x head_dim): the fp32
input (4 w: the upcast, or in fp32 the projection's output itself), the fp32 1/rms
per head (4 w / head_dim) and the normalised value cast back, the weight's input
(e w: in fp32 the fp32 product itself). Rotary needs only its tables, so nothing
else changes; the norms act outside the attention core, so selective checkpointing
keeps them, and full checkpointing recomputes them with the block. Measured with
`saved_tensors_hooks` on one block against Llama's, tests/unit/test_qwen3.py.
"""

from __future__ import annotations

import dataclasses

from omegaconf import DictConfig

from trntrain.models.family import ActivationSpec, LayerActivations, ParamSpec, head_dim
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


def qk_norm_activations(model: DictConfig, spec: ActivationSpec) -> float:
    """Bytes per token the q and k norms of one block save on a tp rank: per norm, over
    the rank's heads of width w, 4 w + 4 w / head_dim + e w."""
    hd, tp, e = head_dim(model), spec.tp, spec.element_bytes
    kv = model.n_kv_heads or model.n_heads
    q_local = model.n_heads // tp * hd
    # k and v split when tp divides the kv heads, else one kv head per rank.
    k_local = (kv // tp if tp <= kv else 1) * hd
    return sum(4 * w + 4 * (w // hd) + e * w for w in (q_local, k_local))


def layer_activations(model: DictConfig, spec: ActivationSpec) -> LayerActivations:
    """Llama's, with the q and k norms' saved tensors, kept without checkpointing and
    under selective checkpointing (recomputed, with the block, under full)."""
    llama = llama_costs.layer_activations(model, spec)
    qk = qk_norm_activations(model, spec)
    return dataclasses.replace(llama, saved=llama.saved + qk, selective=llama.selective + qk)
