"""The Llama family: the model, its tp plan, its pipeline split and costs, its Hugging
Face adapter, bundled as `FAMILY`."""

from __future__ import annotations

import dataclasses

from omegaconf import DictConfig, OmegaConf
from torch import nn

from trntrain.models.family import ModelFamily
from trntrain.models.layers import RopeScaling
from trntrain.models.llama import costs
from trntrain.models.llama.hf import LLAMA_HF
from trntrain.models.llama.model import Attention, Llama, LlamaArgs, TransformerBlock
from trntrain.models.llama.parallelize import parallelize_llama


def llama_args(model_cfg: DictConfig, args_class: type[LlamaArgs] = LlamaArgs) -> LlamaArgs:
    """The args dataclass of a model config (`args_class`: a family's subclass); keys the
    class does not have (the MoE keys of a dense family, at their defaults) are left out."""
    fields = OmegaConf.to_container(model_cfg, resolve=True)
    known = {f.name for f in dataclasses.fields(args_class)}
    fields = {k: v for k, v in fields.items() if k in known}
    scaling = fields.pop("rope_scaling", None)
    return args_class(**fields, rope_scaling=RopeScaling(**scaling) if scaling else None)


def keep_chunk(model: nn.Module, layers: range, first: bool, last: bool) -> nn.Module:
    """Reduce a full (meta-device) model to one pipeline chunk, in place: the layers of
    the chunk under their global indices, the embedding on the first, the final norm
    and head on the last."""
    model.layers = nn.ModuleDict({str(i): model.layers[str(i)] for i in layers})
    if not first:
        model.tok_embeddings = None
    if not last:
        model.norm = None
        model.output = None
    return model


FAMILY = ModelFamily(
    name="llama",
    build=lambda model_cfg: Llama(llama_args(model_cfg)),
    parallelize=parallelize_llama,
    keep_chunk=keep_chunk,
    layer_costs=costs.layer_costs,
    head_cost=costs.head_cost,
    flops_per_token=costs.flops_per_token,
    layer_params=costs.layer_params,
    hf=LLAMA_HF,
    context_parallel=True,
)

__all__ = ["FAMILY", "Attention", "Llama", "LlamaArgs", "RopeScaling", "TransformerBlock",
           "keep_chunk", "llama_args"]
