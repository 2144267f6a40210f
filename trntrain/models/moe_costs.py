"""What an MoE layer costs, for any attention of a dense family: its parameters (total
and active), FLOPs from the active ones, and its parameters on a rank for the planner.

A layer holds the attention and its norms (the dense family's), the router (E x dim)
and E SwiGLU experts of 3 x dim x f parameters (f = moe_ffn_hidden_dim, else
ffn_hidden_dim); a token runs the router and top_k experts, so the active parameters
count top_k experts per layer. Training FLOPs per token are PaLM's 6 N + 12 L H Q T
with N the active matmul parameters (the router included): MFU on active parameters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from omegaconf import DictConfig, OmegaConf

from trntrain.models.family import ActivationSpec, LayerActivations, ParamSpec
from trntrain.models.llama import costs as llama_costs


def expert_hidden_dim(model: DictConfig) -> int:
    return model.moe_ffn_hidden_dim or model.ffn_hidden_dim


def expert_params(model: DictConfig) -> int:
    return 3 * model.dim * expert_hidden_dim(model)


def attention_matmul_params(model: DictConfig) -> int:
    q = llama_costs.q_dim(model)
    return model.dim * (q + 2 * llama_costs.kv_dim(model)) + q * model.dim


def layer_active_matmul_params(model: DictConfig) -> int:
    return (attention_matmul_params(model) + model.num_experts * model.dim
            + model.top_k * expert_params(model))


def layer_costs(model: DictConfig, seq_len: int) -> list[float]:
    """Forward FLOPs per token of each layer: the active matmuls and attention."""
    attention = 4 * seq_len * llama_costs.q_dim(model)
    return [2 * layer_active_matmul_params(model) + attention] * model.n_layers


head_cost = llama_costs.head_cost


def flops_per_token(model: DictConfig, seq_len: int) -> float:
    active = model.n_layers * layer_active_matmul_params(model) + model.vocab_size * model.dim
    return 6 * active + 12 * model.n_layers * llama_costs.q_dim(model) * seq_len


def layer_params_of(dense_layer_params: Callable[[DictConfig, int], list[ParamSpec]]
                    ) -> Callable[[DictConfig, int], list[ParamSpec]]:
    """One MoE layer's parameters on a tp rank, in the module's order: the dense family's
    without its MLP (the last three), then the router and the experts' w1, w2, w3 (whole
    on every tp rank)."""

    def layer_params(model: DictConfig, tp: int) -> list[ParamSpec]:
        h, f = model.dim, expert_hidden_dim(model)
        experts = [ParamSpec(f * h, True, False, expert=True)] * 3 * model.num_experts
        return [*dense_layer_params(model, tp)[:-3], ParamSpec(model.num_experts * h, True, False),
                *experts]

    return layer_params


def parameter_counts(model: DictConfig, layer_params: Callable[[DictConfig, int],
                     list[ParamSpec]]) -> tuple[int, int]:
    """(total, active) parameters: embeddings, head (once when tied), final norm and the
    layers, the active ones with top_k of the num_experts experts of each layer."""
    layer = sum(p.numel for p in layer_params(model, 1))
    idle = (model.num_experts - model.top_k) * expert_params(model)
    embeddings = model.vocab_size * model.dim * (1 if model.tie_embeddings else 2)
    total = model.n_layers * layer + embeddings + model.dim
    return total, total - model.n_layers * idle


def layer_activations(model: DictConfig, spec: ActivationSpec) -> LayerActivations:
    """One MoE block's saved activations per token: the dense family's with its MLP's
    replaced by top_k experts' (each token runs k SwiGLUs of width f), plus the routed
    copies of the token the dispatch keeps (its input gathered per expert and the
    expert outputs before weighting: 2 k h e). An estimate from the block's structure,
    not measured (docs/moe.md); dispatch buffers under a capacity factor are counted at
    capacity 1."""
    width = model.top_k * expert_hidden_dim(model)
    # The planner's search passes the schema's dataclass, the rest a DictConfig.
    dense = (dataclasses.replace(model, ffn_hidden_dim=width) if dataclasses.is_dataclass(model)
             else OmegaConf.merge(model, {"ffn_hidden_dim": width}))
    act = (family_layer_activations(model))(dense, spec)
    routed = 2 * model.top_k * model.dim * spec.element_bytes
    return dataclasses.replace(act, saved=act.saved + routed, selective=act.selective + routed)


def family_layer_activations(model: DictConfig
                             ) -> Callable[[DictConfig, ActivationSpec], LayerActivations]:
    if model.family == "qwen3_moe":
        from trntrain.models.qwen3.costs import layer_activations as qwen3

        return qwen3
    return llama_costs.layer_activations
