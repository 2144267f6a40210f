"""Qwen3's tensor-parallel plan: Llama's, and the q and k norms' gradients summed over tp.

The q and k norms act inside the tp region on the heads a rank holds, with one weight
shared by all heads: each rank's gradient for that weight comes from its own heads
only (its query heads; its kv heads, or its share of the query heads reading a
replicated kv head when tp exceeds them), so the full gradient is the sum over tp,
with or without sequence parallelism (transformers' Qwen3 tp plan:
`replicated_with_grad_allreduce`).
"""

from __future__ import annotations

from torch import nn

from trntrain.models.llama.parallelize import parallelize_llama
from trntrain.parallel.comm import Group, group_size


def parallelize_qwen3(model: nn.Module, tp_group: Group, sequence_parallel: bool) -> nn.Module:
    """Swap the model's layers for tensor-parallel ones, in place (weights are left
    uninitialised: call `init_weights` afterwards)."""
    if group_size(tp_group) == 1:
        return model
    parallelize_llama(model, tp_group, sequence_parallel)
    for layer in model.layers.values():
        layer.attention.q_norm.weight.tp_grad_reduce = True
        layer.attention.k_norm.weight.tp_grad_reduce = True
    return model
