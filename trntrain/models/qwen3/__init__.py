"""The Qwen3 (dense) family: Llama's model, tp plan, pipeline split and costs with
QK-norm added, and a Hugging Face adapter for `Qwen3ForCausalLM`, bundled as `FAMILY`."""

from __future__ import annotations

import dataclasses

from omegaconf import DictConfig

from trntrain.models.llama import FAMILY as LLAMA
from trntrain.models.llama import llama_args
from trntrain.models.qwen3 import costs
from trntrain.models.qwen3.hf import QWEN3_HF
from trntrain.models.qwen3.model import Qwen3, Qwen3Args, Qwen3Attention, Qwen3Block
from trntrain.models.qwen3.parallelize import parallelize_qwen3


def qwen3_args(model_cfg: DictConfig) -> Qwen3Args:
    return llama_args(model_cfg, Qwen3Args)


# Llama's bundle with what QK-norm changes; a chunk is cut exactly as Llama's.
FAMILY = dataclasses.replace(
    LLAMA, name="qwen3", build=lambda model_cfg: Qwen3(qwen3_args(model_cfg)),
    parallelize=parallelize_qwen3, layer_costs=costs.layer_costs, head_cost=costs.head_cost,
    flops_per_token=costs.flops_per_token, layer_params=costs.layer_params, hf=QWEN3_HF,
    layer_activations=costs.layer_activations)

__all__ = ["FAMILY", "Qwen3", "Qwen3Args", "Qwen3Attention", "Qwen3Block", "qwen3_args"]
