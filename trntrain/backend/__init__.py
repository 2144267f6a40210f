"""Backends by name (`backend.name`): cpu, cuda, and auto to pick what this machine has."""

from __future__ import annotations

import torch

from trntrain.backend.base import Backend
from trntrain.backend.cpu import CpuBackend
from trntrain.backend.cuda import CudaBackend
from trntrain.errors import UserError

BACKENDS: dict[str, type[Backend]] = {"cpu": CpuBackend, "cuda": CudaBackend}


def detect_backend() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_backend_name(name: str) -> str:
    resolved = detect_backend() if name == "auto" else name
    if resolved == "cuda" and not torch.cuda.is_available():
        raise UserError("backend.name='cuda' is invalid: no CUDA device is visible to this "
                        "process; valid: cpu, or auto to pick what the machine has.")
    return resolved


def build_backend(name: str, local_rank: int = 0) -> Backend:
    return BACKENDS[resolve_backend_name(name)](local_rank)


__all__ = ["BACKENDS", "Backend", "build_backend", "detect_backend", "resolve_backend_name"]
