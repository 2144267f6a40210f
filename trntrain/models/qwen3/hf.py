"""Qwen3 in Hugging Face checkpoints (`Qwen3ForCausalLM`): Llama's names plus the q and
k norms, and Llama's config.json with Qwen3's keys (head_dim always written: Qwen3Config
defaults it to 128, not to hidden_size / num_attention_heads)."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from trntrain.errors import UserError
from trntrain.models.family import HfAdapter, head_dim
from trntrain.models.llama.hf import LAYER_MODULES, hf_name, llama_hf_config, llama_model_config

QWEN3_LAYER_MODULES = {
    **LAYER_MODULES,
    "attention.q_norm": "self_attn.q_norm",
    "attention.k_norm": "self_attn.k_norm",
}
# Qwen3Config's head size when config.json leaves it out.
HF_DEFAULT_HEAD_DIM = 128


def qwen3_hf_name(name: str) -> str:
    """`layers.<i>.attention.q_norm.weight` -> `model.layers.<i>.self_attn.q_norm.weight`,
    the other names as Llama's."""
    return hf_name(name, QWEN3_LAYER_MODULES)


def qwen3_hf_config(model: DictConfig, dtype: torch.dtype = torch.float32) -> dict:
    config = llama_hf_config(model, dtype, architecture="Qwen3ForCausalLM", model_type="qwen3")
    del config["mlp_bias"]  # not a Qwen3Config key
    config.update({
        "head_dim": head_dim(model), "attention_dropout": 0.0,
        # Published Qwen3 configs spell out that no layer uses a sliding window.
        "use_sliding_window": False, "sliding_window": None,
        "max_window_layers": model.n_layers,
    })
    return config


def qwen3_model_config(config: dict) -> DictConfig:
    """The model config of a Qwen3 config.json (KeyError: a key it lacks; UserError: a
    Qwen3 variant this model does not implement)."""
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    unsupported = {
        "use_sliding_window": bool(config.get("use_sliding_window", False)),
        "attention_bias": bool(config.get("attention_bias", False)),
        f"rope type {rope_type!r}": rope_type not in ("default", "llama3"),
    }
    found = [what for what, present in unsupported.items() if present]
    if found:
        raise UserError(f"config.json describes a Qwen3 model with {', '.join(found)}, "
                        f"which the qwen3 family does not implement; valid: full attention "
                        f"without qkv bias, default or llama3 rope scaling.")
    model = llama_model_config(config, family="qwen3")
    model.head_dim = config.get("head_dim") or HF_DEFAULT_HEAD_DIM
    return model


QWEN3_HF = HfAdapter(to_hf_name=qwen3_hf_name, hf_config=qwen3_hf_config,
                     model_config=qwen3_model_config, model_types=("qwen3",))
