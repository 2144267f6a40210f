"""Trainium: the xla backend plus what torch-neuronx adds.

torch-neuronx is not on PyPI, so this file holds only the Neuron-specific
environment (compiler flags, compile cache, stochastic rounding, graph
extraction for neuron_parallel_compile); everything else is XlaBackend.
"""

from __future__ import annotations

import os

from omegaconf import DictConfig

from trntrain.backend.xla import XlaBackend
from trntrain.errors import UserError

# neuron_parallel_compile runs the script with this set: tensors are placeholders,
# the point is to collect every graph the run will need and compile them in parallel.
EXTRACT_GRAPHS_ENV = "NEURON_EXTRACT_GRAPHS_ONLY"


def neuron_cc_flags(cfg: DictConfig) -> str:
    flags = ["--model-type=transformer", f"-O{cfg.neuron_opt_level}"]
    if cfg.compile_cache_dir:
        flags.append(f"--cache_dir={cfg.compile_cache_dir}")
    if cfg.neuron_cc_flags:
        flags.append(cfg.neuron_cc_flags)
    return " ".join(flags)


def neuron_environment(cfg: DictConfig, stochastic_rounding: bool) -> dict[str, str]:
    """The variables torch-neuronx and the Neuron runtime read at start-up."""
    env = {
        "NEURON_CC_FLAGS": neuron_cc_flags(cfg),
        "NEURON_RT_STOCHASTIC_ROUNDING_EN": "1" if stochastic_rounding else "0",
    }
    if cfg.compile_cache_dir:
        env["NEURON_COMPILE_CACHE_URL"] = cfg.compile_cache_dir
    return env


def is_precompile(cfg: DictConfig) -> bool:
    return bool(cfg.precompile) or os.environ.get(EXTRACT_GRAPHS_ENV, "") not in ("", "0")


class NeuronBackend(XlaBackend):
    name = "neuron"
    default_pjrt_device = "NEURON"

    def __init__(self, local_rank: int = 0, cfg: DictConfig | None = None,
                 stochastic_rounding: bool = False) -> None:
        self.stochastic_rounding = stochastic_rounding
        super().__init__(local_rank, cfg)

    def configure_environment(self) -> None:
        if self.cfg is not None:
            for key, value in neuron_environment(self.cfg, self.stochastic_rounding).items():
                # A value exported by the user (or a launcher) wins over the config.
                os.environ.setdefault(key, value)
        try:
            import torch_neuronx  # noqa: F401
        except ImportError as err:
            raise UserError(
                "backend.name='neuron' is invalid: torch-neuronx does not import "
                f"({err}); valid: a Trainium host with the Neuron SDK's torch-neuronx, or "
                "backend=xla to run the same code path on XLA:CPU."
            ) from None

    def step_limit(self) -> int | None:
        if self.cfg is not None and is_precompile(self.cfg):
            return self.cfg.precompile_steps
        return None

    def peak_flops(self) -> float | None:
        # Dense BF16 of one Trn1 NeuronCore-v2 (a trn1.32xlarge has 32).
        return 95e12

    def uses_xla_cache(self) -> bool:
        # neuronx-cc keeps its own cache (NEURON_COMPILE_CACHE_URL).
        return False
