"""Eager CPU tensors with gloo collectives: every distributed feature is proven here."""

from __future__ import annotations

import torch

from trntrain.backend.base import Backend, host_peak_rss_gib


class CpuBackend(Backend):
    name = "cpu"
    dist_backend = "gloo"

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def metrics(self) -> dict[str, float]:
        return {"mem_host_peak_gib": host_peak_rss_gib()}
