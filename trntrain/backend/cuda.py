"""Eager CUDA tensors with nccl collectives, one GPU per process (LOCAL_RANK)."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from trntrain.backend.base import Backend, host_peak_rss_gib

# Dense BF16 tensor-core peaks (FLOP/s) by device-name fragment, from vendor datasheets.
GPU_PEAK_BF16 = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
}


class CudaBackend(Backend):
    name = "cuda"
    dist_backend = "nccl"

    def __init__(self, local_rank: int = 0, cfg: DictConfig | None = None) -> None:
        super().__init__(local_rank, cfg)
        torch.cuda.set_device(local_rank)

    @classmethod
    def unavailable(cls) -> str | None:
        if torch.cuda.is_available():
            return None
        return ("no CUDA device is visible to this process; valid: cpu, or auto to pick "
                "what the machine has.")

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.local_rank)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def metrics(self) -> dict[str, float]:
        return {
            "mem_device_peak_gib": torch.cuda.max_memory_allocated(self.device) / 2**30,
            "mem_host_peak_gib": host_peak_rss_gib(),
        }

    def peak_flops(self) -> float | None:
        name = torch.cuda.get_device_name(self.device)
        return next((peak for key, peak in GPU_PEAK_BF16.items() if key in name), None)
