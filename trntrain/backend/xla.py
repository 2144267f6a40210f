"""torch-xla lazy tensors: the code path of Trainium, run here on XLA:CPU.

The trainer cuts the traced graph (`cut_graph`, `torch_xla.sync()`) after every
micro-batch, every pipeline action and the optimizer step, as AWS's trainers do:
one graph per optimizer step would grow with the micro-batch count (256 for the
70B preset) in size, compile time and device memory. A graph that has not been
seen before is compiled, which on Neuron takes minutes, so the trainer keeps
shapes static and reads nothing back to the host inside a step; `metrics()`
reports the compile count so that recompilation in steady state is visible in
metrics.jsonl.

Process groups carry the mesh of their axis (every group of it), as
neuronx-distributed creates them: torch-xla otherwise writes each group's own
ranks into the collectives' replica groups, and every tp, dp or pp group would
compile graphs of its own.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator

import torch
from omegaconf import DictConfig

from trntrain.backend.base import Backend, host_peak_rss_gib
from trntrain.data.base import Batch

# neuron_parallel_compile runs the script with this set: tensors are placeholders,
# the point is to collect every graph the run will need and compile them in parallel.
EXTRACT_GRAPHS_ENV = "NEURON_EXTRACT_GRAPHS_ONLY"


def is_precompile(cfg: DictConfig) -> bool:
    return bool(cfg.precompile) or os.environ.get(EXTRACT_GRAPHS_ENV, "") not in ("", "0")


class XlaBackend(Backend):
    name = "xla"
    dist_backend = "xla"
    lazy = True
    default_pjrt_device = "CPU"

    def __init__(self, local_rank: int = 0, cfg: DictConfig | None = None) -> None:
        super().__init__(local_rank, cfg)
        configured = cfg.pjrt_device if cfg is not None else None
        # The PJRT client reads this when torch_xla initialises its runtime.
        os.environ["PJRT_DEVICE"] = (configured or os.environ.get("PJRT_DEVICE")
                                     or self.default_pjrt_device)
        self.configure_environment()
        import torch_xla
        import torch_xla.debug.metrics

        self._torch_xla = torch_xla
        self._metrics = torch_xla.debug.metrics
        if cfg is not None and cfg.compile_cache_dir and self.uses_xla_cache():
            import torch_xla.runtime as xr

            xr.initialize_cache(cfg.compile_cache_dir, readonly=False)
        self._device = torch_xla.device()
        self.precompiling = cfg is not None and is_precompile(cfg)

    @classmethod
    def unavailable(cls) -> str | None:
        if importlib.util.find_spec("torch_xla") is not None:
            return None
        return ("torch_xla is not installed in this environment; valid: cpu, or run from "
                ".venv-xla (make setup-xla) or install the extra: pip install 'trntrain[xla]'.")

    def configure_environment(self) -> None:
        """Set what must be in the environment before torch_xla starts its runtime."""

    def uses_xla_cache(self) -> bool:
        return True

    @property
    def device(self) -> torch.device:
        return self._device

    def process_group_kwargs(self) -> dict:
        import torch_xla.distributed.xla_backend  # noqa: F401  (registers "xla")

        return {"backend": "xla", "init_method": "xla://"}

    def autocast(self, precision: str) -> contextlib.AbstractContextManager:
        if precision == "bf16_autocast":
            return torch.autocast("xla", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def cut_graph(self) -> None:
        self._torch_xla.sync()

    def group_options(self, axis_groups: list[list[int]]) -> dict:
        # Read by torch_xla.distributed.xla_backend.new_xla_process_group (it replaces
        # dist.new_group once imported): the replica groups of the axis's collectives.
        return {"xla_pg_options": {"mesh": axis_groups}}

    def step_limit(self) -> int | None:
        return self.cfg.precompile_steps if self.precompiling else None

    def synchronize(self) -> None:
        import torch_xla.core.xla_model as xm

        xm.wait_device_ops()

    def batches(self, batches: Iterator[list[Batch]], prefetch: bool = True
                ) -> Iterator[list[Batch]]:
        """Each step's micro-batches, copied to the device by a background thread ahead of
        use; without prefetch, on the calling thread as they are asked for."""
        if not prefetch:
            yield from super().batches(batches)
            return
        from torch_xla.distributed.parallel_loader import MpDeviceLoader

        loader = MpDeviceLoader(_Iterable(batches), self.device, loader_prefetch_size=4,
                                device_prefetch_size=2)
        # The copy rewrites every tuple as a list (torch_xla.utils.utils.
        # for_each_instance_rewrite): the micro-batches become Batch again.
        for step_batches in loader:
            yield [Batch(*batch) for batch in step_batches]

    def compile_count(self) -> int:
        data = self._metrics.metric_data("CompileTime")
        return int(data[0]) if data else 0

    def compile_seconds(self) -> float:
        """Seconds spent compiling graphs so far (the CompileTime metric's sum, in ns)."""
        data = self._metrics.metric_data("CompileTime")
        return data[1] / 1e9 if data else 0.0

    def host_transfer_count(self) -> int:
        """Device-to-host transfers so far: each one is a synchronisation."""
        data = self._metrics.metric_data("TransferFromDeviceTime")
        return int(data[0]) if data else 0

    def metrics(self) -> dict[str, float]:
        return {"xla_compiles": self.compile_count(), "xla_compile_s": self.compile_seconds(),
                "mem_host_peak_gib": host_peak_rss_gib()}


class _Iterable:
    """MpDeviceLoader wants an iterable; the trainer hands it a generator."""

    def __init__(self, iterator: Iterator) -> None:
        self.iterator = iterator

    def __iter__(self) -> Iterator:
        return self.iterator
