"""Backends by name (`backend.name`): cpu, cuda, xla, neuron, and auto; packages add
theirs through the `trntrain.backends` entry point group with a Backend subclass."""

from __future__ import annotations

import importlib.util

import torch
from omegaconf import DictConfig

from trntrain.backend.base import Backend
from trntrain.backend.cpu import CpuBackend
from trntrain.backend.cuda import CudaBackend
from trntrain.backend.neuron import NeuronBackend, default_stochastic_rounding
from trntrain.backend.xla import XlaBackend
from trntrain.errors import UserError
from trntrain.plugins import Registry

BACKENDS: Registry[type[Backend]] = Registry("trntrain.backends")
BACKENDS["cpu"] = CpuBackend
BACKENDS["cuda"] = CudaBackend
BACKENDS["xla"] = XlaBackend
BACKENDS["neuron"] = NeuronBackend
# backend.name=auto: the first of these the machine has (xla is never guessed).
AUTO = "auto"


def detect_backend() -> str:
    """neuron where torch-neuronx is installed, then cuda, then cpu (xla is never guessed)."""
    if importlib.util.find_spec("torch_neuronx") is not None:
        return "neuron"
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_backend_name(name: str) -> str:
    """backend.name with auto resolved; a UserError where this machine lacks what it needs."""
    resolved = detect_backend() if name == AUTO else name
    missing = BACKENDS[resolved].unavailable()
    if missing:
        raise UserError(f"backend.name={resolved!r} is invalid: {missing}")
    return resolved


def build_backend(cfg: DictConfig, local_rank: int = 0, precision: str = "fp32",
                  master_weights: bool = True, zero1: bool = False,
                  stochastic_rounding: bool = True) -> Backend:
    """The backend of the `backend` config group, for the process with this LOCAL_RANK;
    `precision`, `master_weights`, `stochastic_rounding` (train.*) and `zero1`
    (parallel.zero1) decide the Neuron environment."""
    backend_class = BACKENDS[resolve_backend_name(cfg.name)]
    return backend_class.from_config(cfg, local_rank, precision, master_weights, zero1,
                                     stochastic_rounding)


__all__ = ["AUTO", "BACKENDS", "Backend", "build_backend", "default_stochastic_rounding",
           "detect_backend", "resolve_backend_name"]
