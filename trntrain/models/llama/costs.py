"""What a Llama layer costs: forward FLOPs per token (pipeline cuts), training FLOPs
per token (MFU), its parameters on a tp rank and the activations it saves for backward
(the planner's memory; the accounting is in `trntrain.plan.memory`'s docstring).

Training FLOPs per token = 6 N + 12 L H Q T (PaLM, appendix B): N the parameters of
the matrix multiplications (the input embedding is a lookup, the output head a
matmul), L layers, H heads of size Q, T the sequence length; 6 = 2 (multiply-add)
x 3 (forward, two backward products), the second term the attention scores and
their weighting.
"""

from __future__ import annotations

from omegaconf import DictConfig

from trntrain.models.family import (
    ActivationSpec,
    LayerActivations,
    ParamSpec,
    head_dim,
    kv_dim,
)


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


def layer_activations(model: DictConfig, spec: ActivationSpec) -> LayerActivations:
    """Bytes per token one Llama block saves for backward on a tp rank, by
    checkpointing mode (Megatron's accounting redone for this block:
    `trntrain.plan.memory`)."""
    h, f, a, tp = model.dim, model.ffn_hidden_dim, model.n_heads, spec.tp
    hd = head_dim(model)
    kv = model.n_kv_heads or model.n_heads
    kv_local = (kv // tp if tp <= kv else 1) * hd
    # The query width: dim for Llama, wider or narrower where heads are sized on their
    # own (Qwen3: n_heads x 128); q, the core's output and wo's input have it.
    q = a * hd
    e = spec.element_bytes
    h_n = h / tp if spec.sequence_parallel else h
    norm = 4 * h_n + 4 + e * h_n
    inputs = 2 * e * h
    mlp = 4 * e * f / tp
    if spec.fused_attention:
        core = 4 * e * q / tp + 4 * a / tp
    else:
        core = 4 * e * q / tp + e * a * spec.seq_len / tp
    selective_core = e * (q / tp + 2 * kv_local + q / tp)
    # Decomposed attention's backward holds, besides the saved probabilities, the
    # gradient of the probabilities and that of the scores (softmax backward): two
    # s x s matrices per local head (measured on CPU, tests/unit/test_plan.py). Its
    # forward holds the scores and the probabilities (one matrix fewer), plus one
    # causal mask shared by the heads.
    scores = 0.0 if spec.fused_attention else 2 * e * a * spec.seq_len / tp
    # bf16: each rotary application casts its cos and sin tables to bf16 (q and k);
    # fp32: the tables themselves, once per chunk (the planner's `per_chunk`).
    rope = 4 * e * hd if e != 4 else 0
    return LayerActivations(
        saved=2 * norm + inputs + core + mlp + rope,
        # The core's inputs and wo's input; its backward first recomputes the core:
        # q, k and v as the core uses them (repeated) and the probabilities.
        selective=2 * norm + inputs + selective_core + mlp + rope,
        selective_recompute=core - e * q / tp,
        checkpointed=e * h_n,
        attention_scores=scores)
