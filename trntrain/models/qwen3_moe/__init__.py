"""The Qwen3-MoE family: Qwen3's bundle with the MoE feed-forward, its costs from the
active parameters, expert parallelism and a Hugging Face adapter for
`Qwen3MoeForCausalLM`, bundled as `FAMILY`."""

from __future__ import annotations

import dataclasses

from omegaconf import DictConfig

from trntrain.models import moe_costs
from trntrain.models.llama import llama_args
from trntrain.models.moe import shard_experts
from trntrain.models.qwen3 import FAMILY as QWEN3
from trntrain.models.qwen3.costs import layer_params as qwen3_layer_params
from trntrain.models.qwen3_moe.hf import QWEN3_MOE_HF
from trntrain.models.qwen3_moe.model import Qwen3Moe, Qwen3MoeArgs, Qwen3MoeBlock


def qwen3_moe_args(model_cfg: DictConfig) -> Qwen3MoeArgs:
    return llama_args(model_cfg, Qwen3MoeArgs)


FAMILY = dataclasses.replace(
    QWEN3, name="qwen3_moe", build=lambda model_cfg: Qwen3Moe(qwen3_moe_args(model_cfg)),
    layer_costs=moe_costs.layer_costs, head_cost=moe_costs.head_cost,
    flops_per_token=moe_costs.flops_per_token,
    layer_params=moe_costs.layer_params_of(qwen3_layer_params), hf=QWEN3_MOE_HF,
    layer_activations=moe_costs.layer_activations, parallelize_experts=shard_experts,
    context_parallel=False)

__all__ = ["FAMILY", "Qwen3Moe", "Qwen3MoeArgs", "Qwen3MoeBlock", "qwen3_moe_args"]
