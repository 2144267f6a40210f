"""Backends by name (`backend.name`): cpu, cuda, xla, neuron, and auto."""

from __future__ import annotations

import importlib.util

import torch
from omegaconf import DictConfig

from trntrain.backend.base import Backend
from trntrain.backend.cpu import CpuBackend
from trntrain.backend.cuda import CudaBackend
from trntrain.errors import UserError


def detect_backend() -> str:
    """neuron where torch-neuronx is installed, then cuda, then cpu (xla is never guessed)."""
    if importlib.util.find_spec("torch_neuronx") is not None:
        return "neuron"
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_backend_name(name: str) -> str:
    resolved = detect_backend() if name == "auto" else name
    if resolved == "cuda" and not torch.cuda.is_available():
        raise UserError("backend.name='cuda' is invalid: no CUDA device is visible to this "
                        "process; valid: cpu, or auto to pick what the machine has.")
    if resolved == "xla" and importlib.util.find_spec("torch_xla") is None:
        raise UserError("backend.name='xla' is invalid: torch_xla is not installed in this "
                        "environment; valid: cpu, or run from .venv-xla (make setup-xla) or "
                        "install the extra: pip install 'trntrain[xla]'.")
    return resolved


def default_stochastic_rounding(precision: str, master_weights: bool) -> bool:
    """Stochastic rounding of bf16 results, when backend.stochastic_rounding is null: on
    for pure bf16 (bf16 weights updated in bf16, where round-to-nearest loses small
    updates: AWS's bf16SR), off with fp32 master weights (AWS's mixed_precision mode,
    which runs without it) and for fp32 and bf16_autocast, whose weights are fp32."""
    return precision == "bf16" and not master_weights


def build_backend(cfg: DictConfig, local_rank: int = 0, precision: str = "fp32",
                  master_weights: bool = True, zero1: bool = False) -> Backend:
    """The backend of the `backend` config group, for the process with this LOCAL_RANK;
    `precision`, `master_weights` (train.*) and `zero1` (parallel.zero1) decide the
    Neuron environment."""
    name = resolve_backend_name(cfg.name)
    if name == "cpu":
        return CpuBackend(local_rank, cfg)
    if name == "cuda":
        return CudaBackend(local_rank, cfg)
    if name == "xla":
        from trntrain.backend.xla import XlaBackend

        return XlaBackend(local_rank, cfg)
    from trntrain.backend.neuron import NeuronBackend

    rounding = cfg.stochastic_rounding
    if rounding is None:
        rounding = default_stochastic_rounding(precision, master_weights)
    # The trainer steps flat fp32 slices (ShardedOptimizer) under ZeRO-1 and for bf16
    # with master weights.
    sharded = zero1 or (precision == "bf16" and master_weights)
    return NeuronBackend(local_rank, cfg, stochastic_rounding=rounding, sharded_optimizer=sharded)


__all__ = ["Backend", "build_backend", "default_stochastic_rounding", "detect_backend",
           "resolve_backend_name"]
