"""Model families by name (`model.family`).

Each family is a package of this one (`trntrain/models/<name>/`, found by its
`FAMILY`) or of any installed package registered under the `trntrain.models` entry
point group; `family.py` says what a family provides.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache

import torch
from omegaconf import DictConfig
from torch import nn

from trntrain.models.family import HfAdapter, ModelFamily, ParamSpec, head_dim, kv_dim
from trntrain.parallel.comm import Group
from trntrain.parallel.pipeline import partition_layers
from trntrain.plugins import Registry

MODEL_FAMILIES: Registry[ModelFamily] = Registry("trntrain.models")


def _register_builtin() -> None:
    for module in pkgutil.iter_modules(__path__):
        if module.ispkg:
            family = importlib.import_module(f"{__name__}.{module.name}").FAMILY
            MODEL_FAMILIES[family.name] = family


_register_builtin()


def family_of(model_cfg: DictConfig) -> ModelFamily:
    return MODEL_FAMILIES[model_cfg.family]


def family_for_hf(model_type: str) -> ModelFamily | None:
    """The family that reads Hugging Face configs of this `model_type`, if any."""
    return next((f for f in MODEL_FAMILIES.values() if model_type in f.hf.model_types), None)


def partition_model(model_cfg: DictConfig, seq_len: int, chunks: int) -> list[range]:
    """The layers of each of the `chunks` pipeline chunks (pp x virtual_pp, 1 without a
    pipeline), balanced by the family's layer costs, the last chunk also running the
    output head: the trainer's cut and the planner's."""
    family = family_of(model_cfg)
    return list(_partition(tuple(family.layer_costs(model_cfg, seq_len)), chunks,
                           family.head_cost(model_cfg)))


@lru_cache(maxsize=256)
def _partition(costs: tuple[float, ...], chunks: int, head_cost: float) -> tuple[range, ...]:
    # Cached: the planner's layout search asks for the same cut thousands of times.
    return tuple(partition_layers(list(costs), chunks, head_cost))


def build_model(model_cfg: DictConfig, tp_group: Group = None,
                sequence_parallel: bool = False) -> nn.Module:
    """The model of `model_cfg`, sharded over `tp_group`, with uninitialised weights on
    the current default device (build under `torch.device("meta")`, then `to_empty`)."""
    family = family_of(model_cfg)
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
    "HfAdapter",
    "ModelFamily",
    "ParamSpec",
    "build_model",
    "count_parameters",
    "family_for_hf",
    "family_of",
    "head_dim",
    "kv_dim",
    "materialize",
    "partition_model",
]
