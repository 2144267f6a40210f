"""The Llama family in Hugging Face checkpoints (`LlamaForCausalLM`): parameter names
both ways, config.json both ways. The weights' layouts agree (rotate-half rotary
embeddings), so no tensor is permuted; a tied head is stored as the embedding."""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf

from trntrain.models.family import HfAdapter

LAYER_MODULES = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
TOP_LEVEL = {"tok_embeddings.weight": "model.embed_tokens.weight",
             "norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}


def hf_name(name: str, layer_modules: dict[str, str] = LAYER_MODULES) -> str:
    """`layers.<i>.<module>.weight` -> `model.layers.<i>.<hf module>.weight`."""
    if name in TOP_LEVEL:
        return TOP_LEVEL[name]
    _, index, rest = name.split(".", 2)
    module = rest.removesuffix(".weight")
    return f"model.layers.{index}.{layer_modules[module]}.weight"


def llama_hf_config(model: DictConfig, dtype: torch.dtype = torch.float32,
                    architecture: str = "LlamaForCausalLM", model_type: str = "llama") -> dict:
    config = {
        "architectures": [architecture], "model_type": model_type,
        "hidden_size": model.dim, "intermediate_size": model.ffn_hidden_dim,
        "num_attention_heads": model.n_heads,
        "num_key_value_heads": model.n_kv_heads or model.n_heads,
        "num_hidden_layers": model.n_layers, "vocab_size": model.vocab_size,
        "rms_norm_eps": model.norm_eps, "rope_theta": model.rope_theta,
        "max_position_embeddings": model.max_seq_len,
        "tie_word_embeddings": model.tie_embeddings, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if getattr(model, "head_dim", None):
        config["head_dim"] = model.head_dim
    if model.rope_scaling is not None:
        s = model.rope_scaling
        config["rope_scaling"] = {
            "rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        }
    return config


def llama_model_config(config: dict, family: str = "llama") -> DictConfig:
    """The model config of a Hugging Face config.json (KeyError: a key it lacks)."""
    scaling = config.get("rope_scaling")
    theta = config.get("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta"))
    dim, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim")
    return OmegaConf.create({
        "name": config.get("_name_or_path") or f"hf_{family}", "family": family,
        "dim": dim, "n_layers": config["num_hidden_layers"], "n_heads": heads,
        "n_kv_heads": config.get("num_key_value_heads"), "vocab_size": config["vocab_size"],
        "ffn_hidden_dim": config["intermediate_size"], "norm_eps": config["rms_norm_eps"],
        "rope_theta": theta or 10000.0,
        "rope_scaling": None if not scaling or scaling.get("rope_type") != "llama3" else {
            k: scaling[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                    "original_max_position_embeddings")},
        "max_seq_len": config.get("max_position_embeddings", 4096),
        "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
        "init_std": 0.02,
        "head_dim": head_dim if head_dim and head_dim != dim // heads else None,
    })


LLAMA_HF = HfAdapter(to_hf_name=hf_name, hf_config=llama_hf_config,
                     model_config=llama_model_config, model_types=("llama", "mistral"))
