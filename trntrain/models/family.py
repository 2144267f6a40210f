"""The bundle a model family gives the rest of trntrain (torchtitan's TrainSpec).

The trainer, the planner, the Hugging Face checkpointer and `trntrain convert` call
only this: a new family is a package with a `FAMILY` of this type, under
`trntrain/models/<name>/` or in any installed package registered under the
`trntrain.models` entry point group.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch import nn

from trntrain.parallel.comm import Group


@dataclass(frozen=True)
class ParamSpec:
    """One parameter as the planner counts it (the trainer's `Trainer.params` order)."""

    numel: int
    matrix: bool  # ndim >= 2: weight decay
    tp_sharded: bool
    counted: bool = True  # False: a tied head duplicated on the last pipeline stage
    expert: bool = False  # an MoE expert's: sharded over parallel.ep


@dataclass(frozen=True)
class ActivationSpec:
    """What one layer's saved activations depend on besides the model (the planner's
    layout and settings)."""

    tp: int
    sequence_parallel: bool
    element_bytes: int  # an activation element: 2 for bf16, 4 for fp32
    seq_len: int
    fused_attention: bool  # False: the s x s probabilities are kept (XLA)


@dataclass(frozen=True)
class LayerActivations:
    """Bytes per token of a micro-batch that one layer holds for its backward."""

    saved: float  # saved without checkpointing (what full checkpointing recomputes)
    selective: float  # saved under selective checkpointing (the attention core's inputs)
    selective_recompute: float  # what selective checkpointing rebuilds for the backward
    checkpointed: float  # saved under full checkpointing (the block's input)
    attention_scores: float  # the s x s buffers of the attention backward (unfused)


def llama_layer_activations(model: DictConfig, spec: ActivationSpec) -> LayerActivations:
    """The default `ModelFamily.layer_activations`: a Llama block's."""
    from trntrain.models.llama.costs import layer_activations

    return layer_activations(model, spec)


@dataclass(frozen=True)
class HfAdapter:
    """How the family's weights and config are named in Hugging Face checkpoints."""

    # trntrain parameter name (`layers.3.attention.wq.weight`) -> Hugging Face name.
    to_hf_name: Callable[[str], str]
    # The model config -> config.json's dict, weights stored in `dtype`.
    hf_config: Callable[[DictConfig, torch.dtype], dict]
    # config.json's dict -> the model config (`trntrain convert` from Hugging Face).
    model_config: Callable[[dict], DictConfig]
    # config.json `model_type` values this family reads.
    model_types: tuple[str, ...]


@dataclass(frozen=True)
class ModelFamily:
    name: str
    # The plain model of a model config (build under torch.device("meta"), then
    # `materialize`): the whole model, with `tok_embeddings`, `layers` (a ModuleDict by
    # global index), `norm` and `output`, and `init_weights(seed)`.
    build: Callable[[DictConfig], nn.Module]
    # (model, tp_group, sequence_parallel) -> the model with tensor-parallel layers.
    parallelize: Callable[[nn.Module, Group, bool], nn.Module]
    # (model, layers, first, last) -> the model reduced to one pipeline chunk, in place.
    keep_chunk: Callable[[nn.Module, range, bool, bool], nn.Module]
    # (model config, seq_len) -> forward FLOPs per token of each layer (pipeline cuts).
    layer_costs: Callable[[DictConfig, int], list[float]]
    # (model config) -> forward FLOPs per token of the output head.
    head_cost: Callable[[DictConfig], float]
    # (model config, seq_len) -> training FLOPs per token (MFU).
    flops_per_token: Callable[[DictConfig, int], float]
    # (model config, tp) -> one layer's parameters on a tp rank (the planner).
    layer_params: Callable[[DictConfig, int], list[ParamSpec]]
    hf: HfAdapter
    # (model config, spec) -> one layer's saved activations per token (the planner's
    # memory); a family whose block saves what Llama's does keeps the default.
    layer_activations: Callable[[DictConfig, ActivationSpec], LayerActivations] = (
        llama_layer_activations)
    # (model, ep_group) -> the model keeping this rank's experts (expert parallelism,
    # parallel.ep); None: a family without experts (validation refuses ep > 1).
    parallelize_experts: Callable[[nn.Module, Group], nn.Module] | None = None
    # Whether the model takes context parallelism (`trntrain.parallel.context`: a Llama
    # forward, sharding set on `model.context_parallel`).
    context_parallel: bool = False


def head_dim(model: DictConfig) -> int:
    """Size of an attention head: model.head_dim, else dim / n_heads."""
    explicit = getattr(model, "head_dim", None)
    return explicit if explicit else model.dim // model.n_heads


def kv_dim(model: DictConfig) -> int:
    """Width of the k and v projections: kv heads (n_heads without GQA) x head size."""
    return (model.n_kv_heads or model.n_heads) * head_dim(model)
