"""Backend: what differs between devices, behind one interface the trainer calls.

Eager backends (cpu, cuda) make most of these no-ops; the lazy-tensor XLA backend
gives them their meaning (the step boundary cuts the traced graph, host reads are
device round trips), so the trainer calls them at the right places regardless.
"""

from __future__ import annotations

import contextlib
import resource
import sys
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from omegaconf import DictConfig
from torch import nn

from trntrain.data.base import Batch


class Backend:
    name: ClassVar[str]
    # The torch.distributed process-group backend.
    dist_backend: ClassVar[str]
    # Lazy tensors (XLA): reading a value back inside a step costs a device round trip.
    lazy: ClassVar[bool] = False

    def __init__(self, local_rank: int = 0, cfg: DictConfig | None = None) -> None:
        self.local_rank = local_rank
        self.cfg = cfg

    @classmethod
    def from_config(cls, cfg: DictConfig, local_rank: int, precision: str,
                    master_weights: bool, zero1: bool, stochastic_rounding: bool = True
                    ) -> Backend:
        """The backend of config group `cfg`; the training precision, master weights,
        stochastic rounding and ZeRO-1 matter to backends whose environment depends on
        them (neuron)."""
        return cls(local_rank, cfg)

    @classmethod
    def unavailable(cls) -> str | None:
        """Why this machine cannot run the backend, and what would do instead (None: it can)."""
        return None

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    def autocast(self, precision: str) -> contextlib.AbstractContextManager:
        if precision == "bf16_autocast":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device, non_blocking=True)

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.step()

    def cut_graph(self) -> None:
        """Where a lazy backend compiles (once) and runs the graph traced so far: after
        each micro-batch, each pipeline action and the optimizer step, so that every
        graph stays small and the same few graphs repeat every step."""

    def group_options(self, axis_groups: list[list[int]]) -> Any:
        """`pg_options` of `torch.distributed.new_group` for one group of an axis whose
        groups are `axis_groups` (None: the process-group backend needs nothing)."""
        return None

    def compile_count(self) -> int:
        """Graphs compiled so far (lazy backends; eager ones compile none)."""
        return 0

    def synchronize(self) -> None:
        """Wait for queued device work, so that host timings mean something."""

    # Tracing graphs to compile them ahead (neuron_parallel_compile): outputs are not
    # real, so nothing of the run may be kept.
    precompiling: bool = False

    def step_limit(self) -> int | None:
        """Stop after this many steps whatever train.max_steps says (graph extraction)."""
        return None

    def process_group_kwargs(self) -> dict:
        """Arguments of torch.distributed.init_process_group for this device."""
        return {"backend": self.dist_backend}

    def metrics(self) -> dict[str, float]:
        """Figures for metrics.jsonl at a logging step: peak memory in GiB, compile counts."""
        return {}

    def peak_flops(self) -> float | None:
        """Dense BF16 peak of one device in FLOP/s; None where MFU is not meaningful."""
        return None

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def batches(self, batches: Iterator[list[Batch]], prefetch: bool = True
                ) -> Iterator[list[Batch]]:
        """Move each step's micro-batches to the device (prefetch: ahead of use, on
        backends that copy in a background thread)."""
        for step_batches in batches:
            yield [Batch(*(None if t is None else self.to_device(t) for t in batch))
                   for batch in step_batches]


def host_peak_rss_gib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in KiB on Linux and bytes on macOS.
    return peak / (2**30 if sys.platform == "darwin" else 2**20)
