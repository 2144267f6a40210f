"""Qwen3-MoE in Hugging Face checkpoints (`Qwen3MoeForCausalLM`), in the hub's layout:
Qwen3's attention names, `mlp.gate` for the router and one tensor per expert and
projection (`mlp.experts.<e>.gate_proj/up_proj/down_proj`)."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from trntrain.errors import UserError
from trntrain.models.family import HfAdapter
from trntrain.models.mixtral.hf import moe_hf_name
from trntrain.models.qwen3.hf import QWEN3_LAYER_MODULES, qwen3_hf_config, qwen3_model_config


def qwen3_moe_hf_name(name: str) -> str:
    return moe_hf_name(name, QWEN3_LAYER_MODULES, "mlp",
                       {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"})


def qwen3_moe_hf_config(model: DictConfig, dtype: torch.dtype = torch.float32) -> dict:
    config = qwen3_hf_config(model, dtype)
    config.update({
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "num_experts": model.num_experts, "num_experts_per_tok": model.top_k,
        "moe_intermediate_size": model.moe_ffn_hidden_dim or model.ffn_hidden_dim,
        "norm_topk_prob": model.norm_topk_prob, "decoder_sparse_step": 1,
        "mlp_only_layers": [], "router_aux_loss_coef": model.router_aux_loss_coef,
        "output_router_logits": False,
    })
    return config


def qwen3_moe_model_config(config: dict) -> DictConfig:
    """The model config of a Qwen3-MoE config.json (UserError: dense layers among the
    sparse ones, which this family does not implement)."""
    if config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1:
        raise UserError("config.json describes a Qwen3-MoE model with dense layers "
                        "(mlp_only_layers or decoder_sparse_step), which the qwen3_moe "
                        "family does not implement; valid: every layer sparse.")
    model = qwen3_model_config({**config, "model_type": "qwen3"})
    model.family = "qwen3_moe"
    model.num_experts = config["num_experts"]
    model.top_k = config["num_experts_per_tok"]
    model.moe_ffn_hidden_dim = config["moe_intermediate_size"]
    model.norm_topk_prob = bool(config.get("norm_topk_prob", False))
    model.router_aux_loss_coef = float(config.get("router_aux_loss_coef", 0.001))
    return model


QWEN3_MOE_HF = HfAdapter(to_hf_name=qwen3_moe_hf_name, hf_config=qwen3_moe_hf_config,
                         model_config=qwen3_moe_model_config, model_types=("qwen3_moe",))
