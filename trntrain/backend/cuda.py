"""Eager CUDA tensors with nccl collectives, one GPU per process (LOCAL_RANK)."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from trntrain.backend.base import Backend, host_peak_rss_gib
from trntrain.errors import UserError

# Dense BF16 tensor-core peaks (FLOP/s) by device-name fragment, from vendor datasheets.
# The first fragment the name contains wins: the PCIe and NVL parts of a chip come before
# its SXM part, whose name ("NVIDIA H100 80GB HBM3") carries no suffix.
GPU_PEAK_BF16 = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H200 NVL": 835e12,
    "GH200": 989e12,
    "H200": 989e12,
    "H100": 989e12,
    "H800": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
}


def peak_bf16_flops(device_name: str) -> float | None:
    """Dense BF16 peak of the GPU `torch.cuda.get_device_name` calls `device_name`."""
    return next((peak for key, peak in GPU_PEAK_BF16.items() if key in device_name), None)


def device_index(local_rank: int, device_count: int) -> int:
    """The GPU of the process with this LOCAL_RANK: its own index, or 0 where the launcher
    shows each process only its own GPU (CUDA_VISIBLE_DEVICES of one device, as SLURM's
    --gpus-per-task does)."""
    if device_count == 1:
        return 0
    if local_rank >= device_count:
        raise UserError(f"backend.name='cuda' is invalid for LOCAL_RANK={local_rank}: this "
                        f"process sees {device_count} GPUs; valid: one process per GPU "
                        f"(torchrun --nproc_per_node at most {device_count})")
    return local_rank


class CudaBackend(Backend):
    name = "cuda"
    dist_backend = "nccl"

    def __init__(self, local_rank: int = 0, cfg: DictConfig | None = None) -> None:
        super().__init__(local_rank, cfg)
        self.index = device_index(local_rank, torch.cuda.device_count())
        torch.cuda.set_device(self.index)
        # max_memory_allocated is a peak since the process started: each run reports its own.
        torch.cuda.reset_peak_memory_stats(self.index)

    @classmethod
    def unavailable(cls) -> str | None:
        if torch.cuda.is_available():
            return None
        return ("no CUDA device is visible to this process; valid: cpu, or auto to pick "
                "what the machine has.")

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.index)

    def process_group_kwargs(self) -> dict:
        # Binds the process group to this GPU: NCCL's communicator is created at once,
        # on this device, and subgroups split from it, rather than guessed from the rank.
        return {"backend": self.dist_backend, "device_id": self.device}

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def metrics(self) -> dict[str, float]:
        return {
            # Peak of tensors allocated; reserved adds the caching allocator's free blocks
            # (what nvidia-smi shows of this process, less the CUDA context).
            "mem_device_peak_gib": torch.cuda.max_memory_allocated(self.device) / 2**30,
            "mem_device_reserved_peak_gib": torch.cuda.max_memory_reserved(self.device) / 2**30,
            "mem_host_peak_gib": host_peak_rss_gib(),
        }

    def peak_flops(self) -> float | None:
        return peak_bf16_flops(torch.cuda.get_device_name(self.device))
