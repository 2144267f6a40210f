"""The Llama family's tensor-parallel plan: which layer becomes which tp layer.

Column-parallel q, k, v, w1, w3 (each input entering the tp region once for the
layers that share it), row-parallel wo and w2, a vocabulary-parallel embedding and
head; k and v replicated when tp exceeds the kv heads; the norms' gradients summed
over tp under sequence parallelism (each rank sees other tokens).
"""

from __future__ import annotations

from torch import nn

from trntrain.models.layers import FeedForward, RMSNorm
from trntrain.parallel.comm import Group, group_size
from trntrain.parallel.tensor_parallel import (
    ColumnParallelLinear,
    ReplicatedKVLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    enter_tp_region,
)


def parallelize_attention(attn: nn.Module, tp_group: Group, sp: bool, kv_heads: int,
                          head_dim: int) -> None:
    """q, k, v column-parallel on one shared input, wo row-parallel, in place."""
    tp = group_size(tp_group)

    def enter_region_once(module: nn.Module, inputs: tuple) -> tuple:
        # q, k and v read one input: one collective for all of them.
        return (enter_tp_region(inputs[0], tp_group, sp), *inputs[1:])

    attn.register_forward_pre_hook(enter_region_once)
    attn.wq = ColumnParallelLinear(attn.wq, tp_group, sp, shared_input=True)
    if tp <= kv_heads:
        attn.wk = ColumnParallelLinear(attn.wk, tp_group, sp, shared_input=True)
        attn.wv = ColumnParallelLinear(attn.wv, tp_group, sp, shared_input=True)
    else:
        attn.wk = ReplicatedKVLinear(attn.wk, tp_group, kv_heads, head_dim)
        attn.wv = ReplicatedKVLinear(attn.wv, tp_group, kv_heads, head_dim)
    attn.wo = RowParallelLinear(attn.wo, tp_group, sp)


def parallelize_mlp(ffn: nn.Module, tp_group: Group, sp: bool) -> None:
    """SwiGLU: w1 and w3 column-parallel on one shared input, w2 row-parallel."""

    def enter_region_once(module: nn.Module, inputs: tuple) -> tuple:
        return (enter_tp_region(inputs[0], tp_group, sp), *inputs[1:])

    ffn.register_forward_pre_hook(enter_region_once)
    ffn.w1 = ColumnParallelLinear(ffn.w1, tp_group, sp, shared_input=True)
    ffn.w3 = ColumnParallelLinear(ffn.w3, tp_group, sp, shared_input=True)
    ffn.w2 = RowParallelLinear(ffn.w2, tp_group, sp)


def parallelize_llama(model: nn.Module, tp_group: Group, sequence_parallel: bool) -> nn.Module:
    """Swap the model's layers for tensor-parallel ones, in place (weights are left
    uninitialised: call `init_weights` afterwards)."""
    if group_size(tp_group) == 1:
        return model
    args, sp = model.args, sequence_parallel
    model.tok_embeddings = VocabParallelEmbedding(model.tok_embeddings, tp_group, sp)
    for layer in model.layers.values():
        parallelize_attention(layer.attention, tp_group, sp, args.kv_heads, args.head_dim)
        if isinstance(layer.feed_forward, FeedForward):
            # An MoE block's experts stay whole on every tp rank (docs/moe.md).
            parallelize_mlp(layer.feed_forward, tp_group, sp)
        if sp:  # the block's own norms (not those inside attention) see a sequence shard
            for norm in layer.children():
                if isinstance(norm, RMSNorm):
                    norm.weight.tp_grad_reduce = True
    if sp:
        model.norm.weight.tp_grad_reduce = True
    model.output = ColumnParallelLinear(model.output, tp_group, sp)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model

