"""Model families by name (`model.family`); packages add their own through the
`trntrain.models` entry point group with a `build(model_cfg) -> nn.Module`."""

from __future__ import annotations

from collections.abc import Callable

from omegaconf import DictConfig, OmegaConf
from torch import nn

from trntrain.models.llama import Llama, LlamaArgs, RopeScaling
from trntrain.plugins import Registry

MODEL_FAMILIES: Registry[Callable[[DictConfig], nn.Module]] = Registry("trntrain.models")


def llama_args(model_cfg: DictConfig) -> LlamaArgs:
    fields = OmegaConf.to_container(model_cfg, resolve=True)
    for key in ("name", "family"):
        fields.pop(key, None)
    scaling = fields.pop("rope_scaling", None)
    return LlamaArgs(**fields, rope_scaling=RopeScaling(**scaling) if scaling else None)


@MODEL_FAMILIES.register("llama")
def build_llama(model_cfg: DictConfig) -> Llama:
    return Llama(llama_args(model_cfg))


def build_model(model_cfg: DictConfig) -> nn.Module:
    """The model of `model_cfg`, with uninitialised weights on the current default device."""
    return MODEL_FAMILIES[model_cfg.family](model_cfg)


def count_parameters(model: nn.Module) -> int:
    """Parameters counted once each (a tied embedding is one tensor)."""
    return sum(p.numel() for p in model.parameters())


__all__ = ["Llama", "LlamaArgs", "MODEL_FAMILIES", "build_model", "count_parameters", "llama_args"]
