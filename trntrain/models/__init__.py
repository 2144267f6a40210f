"""Model families by name (`model.family`). A family builds the plain model from its
config and applies tensor parallelism to it from outside; packages add families
through the `trntrain.models` entry point group with a `ModelFamily`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from trntrain.models.llama import Llama, LlamaArgs, RopeScaling
from trntrain.parallel.comm import Group
from trntrain.parallel.tensor_parallel import parallelize_llama
from trntrain.plugins import Registry


@dataclass(frozen=True)
class ModelFamily:
    build: Callable[[DictConfig], nn.Module]
    # (model, tp_group, sequence_parallel) -> the model with tensor-parallel layers.
    parallelize: Callable[[nn.Module, Group, bool], nn.Module]


MODEL_FAMILIES: Registry[ModelFamily] = Registry("trntrain.models")


def llama_args(model_cfg: DictConfig) -> LlamaArgs:
    fields = OmegaConf.to_container(model_cfg, resolve=True)
    for key in ("name", "family"):
        fields.pop(key, None)
    scaling = fields.pop("rope_scaling", None)
    return LlamaArgs(**fields, rope_scaling=RopeScaling(**scaling) if scaling else None)


MODEL_FAMILIES["llama"] = ModelFamily(
    build=lambda model_cfg: Llama(llama_args(model_cfg)), parallelize=parallelize_llama,
)


def build_model(model_cfg: DictConfig, tp_group: Group = None,
                sequence_parallel: bool = False) -> nn.Module:
    """The model of `model_cfg`, sharded over `tp_group`, with uninitialised weights on
    the current default device (build under `torch.device("meta")`, then `to_empty`)."""
    family = MODEL_FAMILIES[model_cfg.family]
    return family.parallelize(family.build(model_cfg), tp_group, sequence_parallel)


def materialize(model: nn.Module, device: torch.device, seed: int) -> nn.Module:
    """Allocate a meta-device model on `device` and initialise its weights from `seed`.

    `to_empty` creates new Parameter objects, so the sharding attributes that
    parallelisation attached (tp_shard, tp_full_shape, tp_grad_reduce) are carried over.
    """
    attrs = {name: {k: v for k, v in vars(p).items() if k.startswith("tp_")}
             for name, p in model.named_parameters()}
    model.to_empty(device=device)
    for name, p in model.named_parameters(remove_duplicate=False):
        for key, value in attrs.get(name, {}).items():
            setattr(p, key, value)
    model.init_weights(seed)
    return model


def count_parameters(model: nn.Module) -> int:
    """Parameters counted once each (a tied embedding is one tensor)."""
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "MODEL_FAMILIES",
    "Llama",
    "LlamaArgs",
    "ModelFamily",
    "build_model",
    "count_parameters",
    "llama_args",
    "materialize",
]
