"""LoRA adapters over the tp layers, applied from outside to a built model.

`apply_lora` swaps each targeted linear layer of the blocks (plain, column-,
row-parallel or replicated-kv, whatever the family's tp plan made of it) for a
`LoRALinear` that keeps the base weight under its own name (`...wq.weight`, so
checkpoints and Hugging Face names are unchanged) and adds `lora_A` (r x in) and
`lora_B` (out x r): y = x W^T + (alpha / r) B A x. Every other parameter is frozen
(requires_grad False), so the trainer gives it no gradient, no optimizer state and
no master copy.

Under tensor parallelism the adapters are cut like the layer they sit on, with no
collective of their own:
- column-parallel (W split by output rows, input replicated in the tp region):
  A replicated, B split by output like W. Each rank's gradient of A comes from its
  own output slice only, so it is summed over tp (`tp_grad_reduce`), like the
  input's gradient, which the region's entry already all-reduces;
- row-parallel (W split by input columns, x split likewise): A split by input like
  W, B replicated. B A_r x_r is this rank's partial product, added to the base's
  partial product before their one reduction (all-reduce, or reduce-scatter along
  the sequence under sp); B's gradient is partial on each rank, summed over tp;
- replicated kv (tp > kv heads): A and B whole, B's rows of this rank's kv head
  used, both gradients summed over tp like the base weight's.

Initialisation follows PEFT's (A kaiming-uniform, B zero, so the model starts as
its base) with A drawn, like every weight (`Llama.init_weights`), from the seed
and the parameter's global name: any layout starts from the same adapters.
Dropout masks are drawn per rank, so layouts agree exactly only with dropout 0.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from functools import lru_cache

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from trntrain.models import build_model, family_of
from trntrain.models.layers import parameter_seed
from trntrain.parallel.tensor_parallel import (
    ColumnParallelLinear,
    ReplicatedKVLinear,
    RowParallelLinear,
    enter_tp_region,
    leave_tp_region,
)

ALL_LINEAR = "all-linear"
ADAPTERS = ("lora_A", "lora_B")
LINEAR_LAYERS = (nn.Linear, ColumnParallelLinear, RowParallelLinear, ReplicatedKVLinear)


def lora_enabled(peft: DictConfig | None) -> bool:
    return peft is not None and peft.get("name", "none") == "lora"


def is_adapter(name: str) -> bool:
    """Whether a parameter name is a LoRA adapter's (`...wq.lora_A`)."""
    return name.rsplit(".", 1)[-1] in ADAPTERS


def hf_module_name(model_cfg: DictConfig, name: str) -> str:
    """A trntrain module name (`layers.0.attention.wq`) as Hugging Face names it
    (`model.layers.0.self_attn.q_proj`), through the family's adapter."""
    return family_of(model_cfg).hf.to_hf_name(f"{name}.weight").removesuffix(".weight")


def block_linears(model: nn.Module, model_cfg: DictConfig) -> dict[str, str]:
    """The linear layers of the blocks: trntrain module name -> its Hugging Face leaf
    name (q_proj, ..., down_proj)."""
    return {name: hf_module_name(model_cfg, name).rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if name.startswith("layers.") and isinstance(module, LINEAR_LAYERS + (LoRALinear,))}


def known_targets(model_cfg: DictConfig) -> list[str]:
    """The Hugging Face leaf names the family's blocks have, in their order."""
    return list(_known_targets(OmegaConf.to_yaml(model_cfg)))


@lru_cache(maxsize=64)
def _known_targets(model_yaml: str) -> tuple[str, ...]:
    # Cached: the planner's layout search validates thousands of layouts of one model.
    model_cfg = OmegaConf.create(model_yaml)
    with torch.device("meta"):
        plain = build_model(model_cfg)
    return tuple(dict.fromkeys(block_linears(plain, model_cfg).values()))


def targeted(model: nn.Module, model_cfg: DictConfig, targets: Iterable[str]) -> list[str]:
    """Names of the block linear layers that `targets` selects."""
    targets = set(targets)
    return [name for name, leaf in block_linears(model, model_cfg).items()
            if ALL_LINEAR in targets or leaf in targets]


class LoRALinear(nn.Module):
    """A linear layer of any tp kind (`kind`: plain, column, row, replicated_kv) with its
    base weight frozen and a low-rank update: y = x W^T + scaling * (x A^T) B^T."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.kind = {ColumnParallelLinear: "column", RowParallelLinear: "row",
                     ReplicatedKVLinear: "replicated_kv"}.get(type(base), "plain")
        self.weight = base.weight
        self.group = getattr(base, "group", None)
        self.sequence_parallel = getattr(base, "sequence_parallel", False)
        self.shared_input = getattr(base, "shared_input", False)
        if self.kind == "column":
            self.start = base.start
        self.rows = getattr(base, "rows", None)
        self.scaling = alpha / rank
        self.enabled = True  # off: the base layer alone (adapters_disabled)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        w = self.weight
        out_full, in_full = getattr(w, "tp_full_shape", w.shape)
        out_local, in_local = w.shape
        self.lora_A = nn.Parameter(torch.empty(rank, in_local, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.empty(out_local, rank, dtype=w.dtype, device=w.device))
        if self.kind == "column":
            self._shard(self.lora_B, (out_full, rank), 0, w.tp_shard[1], out_local)
            self.lora_A.tp_grad_reduce = True
        elif self.kind == "row":
            self._shard(self.lora_A, (rank, in_full), 1, w.tp_shard[1], in_local)
            self.lora_B.tp_grad_reduce = True
        elif self.kind == "replicated_kv":
            self.lora_A.tp_grad_reduce = True
            self.lora_B.tp_grad_reduce = True

    @staticmethod
    def _shard(param: nn.Parameter, full: tuple[int, int], dim: int, start: int,
               length: int) -> None:
        # The layout record of tensor_parallel.shard_weight: initialisation and
        # checkpoints treat the adapter like any other shard.
        param.tp_full_shape = full
        param.tp_shard = (dim, start, length)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "column" and not self.shared_input:
            x = enter_tp_region(x, self.group, self.sequence_parallel)
        weight, lora_b = self.weight, self.lora_B
        if self.kind == "replicated_kv":
            weight, lora_b = weight[self.rows], lora_b[self.rows]
        y = F.linear(x, weight)
        if self.enabled:
            y = y + F.linear(F.linear(self.dropout(x), self.lora_A), lora_b) * self.scaling
        if self.kind == "row":
            # The adapter's partial product joins the base's in their one reduction.
            y = leave_tp_region(y, self.group, self.sequence_parallel)
        return y


@contextlib.contextmanager
def adapters_disabled(modules: Iterable[nn.Module]) -> Iterator[None]:
    """The base model alone inside the block: every LoRA layer of `modules` skips its
    update (DPO's reference under LoRA, with no copy of the weights)."""
    layers = [m for module in modules for m in module.modules() if isinstance(m, LoRALinear)]
    for layer in layers:
        layer.enabled = False
    try:
        yield
    finally:
        for layer in layers:
            layer.enabled = True


def _require_grad_of_output(module: nn.Module, inputs: tuple, output: torch.Tensor
                            ) -> torch.Tensor:
    # A frozen embedding's output needs no gradient, and a reentrant checkpoint (XLA's)
    # of a block whose inputs need none back-propagates nothing into the block's
    # adapters (transformers' enable_input_require_grads).
    if not output.requires_grad:
        output.requires_grad_(True)
    return output


def apply_lora(model: nn.Module, model_cfg: DictConfig, peft: DictConfig) -> list[str]:
    """Swap the targeted layers of a built (meta-device) model or pipeline chunk for
    `LoRALinear`, in place, and freeze every other parameter; returns the swapped names.
    Call `init_adapters` after the model is materialised."""
    names = targeted(model, model_cfg, peft.target_modules)
    for name in names:
        parent_name, attr = name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, LoRALinear(getattr(parent, attr), peft.rank, peft.alpha,
                                         peft.dropout))
    for name, p in model.named_parameters():
        if not is_adapter(name):
            p.requires_grad_(False)
    if getattr(model, "tok_embeddings", None) is not None:
        model.tok_embeddings.register_forward_hook(_require_grad_of_output)
    return names


@torch.no_grad()
def init_adapters(model: nn.Module, seed: int) -> None:
    """A: PEFT's kaiming-uniform (bound 1 / sqrt(fan_in)) drawn from (seed, its global
    name) on the CPU, this rank's slice kept; B: zero. The model starts as its base."""
    for name, module in model.named_modules():
        if not isinstance(module, LoRALinear):
            continue
        a = module.lora_A
        shape = tuple(getattr(a, "tp_full_shape", a.shape))
        gen = torch.Generator(device="cpu").manual_seed(parameter_seed(seed, f"{name}.lora_A"))
        bound = 1.0 / math.sqrt(shape[1])
        full = torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=gen)
        if hasattr(a, "tp_shard"):
            dim, start, length = a.tp_shard
            full = full.narrow(dim, start, length)
        a.copy_(full)
        module.lora_B.zero_()


def adapter_names(model_cfg: DictConfig, peft: DictConfig) -> list[str]:
    """The adapter parameters of the whole (unsharded) model, by name."""
    with torch.device("meta"):
        plain = build_model(model_cfg)
        apply_lora(plain, model_cfg, peft)
    return [name for name, _ in plain.named_parameters() if is_adapter(name)]
