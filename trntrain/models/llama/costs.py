"""What a Llama layer costs: forward FLOPs per token (pipeline cuts), training FLOPs
per token (MFU), and its parameters on a tp rank (the planner's memory).

Training FLOPs per token = 6 N + 12 L H Q T (PaLM, appendix B): N the parameters of
the matrix multiplications (the input embedding is a lookup, the output head a
matmul), L layers, H heads of size Q, T the sequence length; 6 = 2 (multiply-add)
x 3 (forward, two backward products), the second term the attention scores and
their weighting.
"""

from __future__ import annotations

from omegaconf import DictConfig

from trntrain.models.family import ParamSpec, head_dim, kv_dim


def q_dim(model: DictConfig) -> int:
    return model.n_heads * head_dim(model)


def layer_matmul_parameters(model: DictConfig) -> int:
    h = model.dim
    return h * (q_dim(model) + 2 * kv_dim(model)) + q_dim(model) * h + 3 * h * model.ffn_hidden_dim


def matmul_parameters(model: DictConfig) -> int:
    return model.n_layers * layer_matmul_parameters(model) + model.vocab_size * model.dim


def layer_costs(model: DictConfig, seq_len: int) -> list[float]:
    """Forward FLOPs per token of each transformer layer (all equal)."""
    attention = 4 * seq_len * q_dim(model)
    return [2 * layer_matmul_parameters(model) + attention] * model.n_layers


def head_cost(model: DictConfig) -> float:
    return 2 * model.dim * model.vocab_size


def flops_per_token(model: DictConfig, seq_len: int) -> float:
    return 6 * matmul_parameters(model) + 12 * model.n_layers * q_dim(model) * seq_len


def layer_params(model: DictConfig, tp: int) -> list[ParamSpec]:
    """One transformer block's parameters on a tp rank, in the module's order."""
    h, f, q, kv = model.dim, model.ffn_hidden_dim, q_dim(model), kv_dim(model)
    sharded = tp > 1
    kv_sharded = tp <= (model.n_kv_heads or model.n_heads)
    kv_numel = (kv // tp if kv_sharded else kv) * h
    return [
        ParamSpec(h, False, False),  # attention_norm
        ParamSpec(q * h // tp, True, sharded),  # wq
        ParamSpec(kv_numel, True, sharded and kv_sharded),  # wk
        ParamSpec(kv_numel, True, sharded and kv_sharded),  # wv
        ParamSpec(h * q // tp, True, sharded),  # wo
        ParamSpec(h, False, False),  # ffn_norm
        ParamSpec(f * h // tp, True, sharded),  # w1
        ParamSpec(f * h // tp, True, sharded),  # w2
        ParamSpec(f * h // tp, True, sharded),  # w3
    ]
