"""Mixtral in Hugging Face checkpoints (`MixtralForCausalLM`), in the hub's layout:
Llama's attention names, `block_sparse_moe.gate` for the router and one tensor per
expert and projection (`block_sparse_moe.experts.<e>.w1/w2/w3`), which transformers
fuses on loading."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from trntrain.errors import UserError
from trntrain.models.family import HfAdapter
from trntrain.models.llama.hf import LAYER_MODULES, TOP_LEVEL, llama_hf_config, llama_model_config


def moe_hf_name(name: str, layer_modules: dict[str, str], moe: str,
                expert_names: dict[str, str]) -> str:
    """A layer's MoE names: `feed_forward.gate` -> `<moe>.gate`,
    `feed_forward.experts.<e>.<w>` -> `<moe>.experts.<e>.<expert_names[w]>`, the rest
    as the dense family's."""
    if name in TOP_LEVEL:
        return TOP_LEVEL[name]
    _, index, rest = name.split(".", 2)
    module = rest.removesuffix(".weight")
    if module == "feed_forward.gate":
        return f"model.layers.{index}.{moe}.gate.weight"
    if module.startswith("feed_forward.experts."):
        _, _, expert, w = module.split(".")
        return f"model.layers.{index}.{moe}.experts.{expert}.{expert_names[w]}.weight"
    return f"model.layers.{index}.{layer_modules[module]}.weight"


def mixtral_hf_name(name: str) -> str:
    return moe_hf_name(name, LAYER_MODULES, "block_sparse_moe",
                       {"w1": "w1", "w2": "w2", "w3": "w3"})


def mixtral_hf_config(model: DictConfig, dtype: torch.dtype = torch.float32) -> dict:
    config = llama_hf_config(model, dtype, architecture="MixtralForCausalLM",
                             model_type="mixtral")
    for key in ("mlp_bias", "attention_bias"):
        del config[key]  # not MixtralConfig keys
    config.update({
        "intermediate_size": model.moe_ffn_hidden_dim or model.ffn_hidden_dim,
        "num_local_experts": model.num_experts, "num_experts_per_tok": model.top_k,
        "router_aux_loss_coef": model.router_aux_loss_coef, "output_router_logits": False,
        "router_jitter_noise": 0.0, "sliding_window": None, "attention_dropout": 0.0,
    })
    return config


def mixtral_model_config(config: dict) -> DictConfig:
    """The model config of a Mixtral config.json (KeyError: a key it lacks)."""
    if config.get("sliding_window") is not None:
        raise UserError("config.json describes a Mixtral model with a sliding window, "
                        "which the mixtral family does not implement; valid: "
                        "sliding_window null.")
    model = llama_model_config(config, family="mixtral")
    model.num_experts = config["num_local_experts"]
    model.top_k = config["num_experts_per_tok"]
    model.norm_topk_prob = True
    model.router_aux_loss_coef = float(config.get("router_aux_loss_coef", 0.001))
    return model


MIXTRAL_HF = HfAdapter(to_hf_name=mixtral_hf_name, hf_config=mixtral_hf_config,
                       model_config=mixtral_model_config, model_types=("mixtral",))
