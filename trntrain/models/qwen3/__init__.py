"""The Qwen3 (dense) family: Llama's model, tp plan, pipeline split and costs with
QK-norm added, and a Hugging Face adapter for `Qwen3ForCausalLM`, bundled as `FAMILY`."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from trntrain.models.family import ModelFamily
from trntrain.models.layers import RopeScaling
from trntrain.models.llama import keep_chunk
from trntrain.models.qwen3 import costs
from trntrain.models.qwen3.hf import QWEN3_HF
from trntrain.models.qwen3.model import Qwen3, Qwen3Args, Qwen3Attention, Qwen3Block
from trntrain.models.qwen3.parallelize import parallelize_qwen3


def qwen3_args(model_cfg: DictConfig) -> Qwen3Args:
    fields = OmegaConf.to_container(model_cfg, resolve=True)
    for key in ("name", "family"):
        fields.pop(key, None)
    scaling = fields.pop("rope_scaling", None)
    return Qwen3Args(**fields, rope_scaling=RopeScaling(**scaling) if scaling else None)


FAMILY = ModelFamily(
    name="qwen3",
    build=lambda model_cfg: Qwen3(qwen3_args(model_cfg)),
    parallelize=parallelize_qwen3,
    # A chunk keeps layers, embedding, norm and head exactly as Llama's does.
    keep_chunk=keep_chunk,
    layer_costs=costs.layer_costs,
    head_cost=costs.head_cost,
    flops_per_token=costs.flops_per_token,
    layer_params=costs.layer_params,
    hf=QWEN3_HF,
)

__all__ = ["FAMILY", "Qwen3", "Qwen3Args", "Qwen3Attention", "Qwen3Block", "qwen3_args"]
