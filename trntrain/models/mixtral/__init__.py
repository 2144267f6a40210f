"""The Mixtral family: Llama's bundle with the MoE feed-forward, its costs from the
active parameters, expert parallelism and a Hugging Face adapter for
`MixtralForCausalLM`, bundled as `FAMILY`."""

from __future__ import annotations

import dataclasses

from omegaconf import DictConfig

from trntrain.models import moe_costs
from trntrain.models.llama import FAMILY as LLAMA
from trntrain.models.llama import llama_args
from trntrain.models.llama.costs import layer_params as llama_layer_params
from trntrain.models.mixtral.hf import MIXTRAL_HF
from trntrain.models.mixtral.model import Mixtral, MixtralArgs, MixtralBlock
from trntrain.models.moe import shard_experts


def mixtral_args(model_cfg: DictConfig) -> MixtralArgs:
    return llama_args(model_cfg, MixtralArgs)


# Llama's tp plan leaves the experts whole (replicated over tp); a chunk is cut as Llama's.
FAMILY = dataclasses.replace(
    LLAMA, name="mixtral", build=lambda model_cfg: Mixtral(mixtral_args(model_cfg)),
    layer_costs=moe_costs.layer_costs, head_cost=moe_costs.head_cost,
    flops_per_token=moe_costs.flops_per_token,
    layer_params=moe_costs.layer_params_of(llama_layer_params), hf=MIXTRAL_HF,
    layer_activations=moe_costs.layer_activations, parallelize_experts=shard_experts,
    context_parallel=False)

__all__ = ["FAMILY", "Mixtral", "MixtralArgs", "MixtralBlock", "mixtral_args"]
