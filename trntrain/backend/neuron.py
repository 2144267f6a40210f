"""Trainium: the xla backend plus what torch-neuronx adds.

torch-neuronx is not on PyPI, so this file holds only the Neuron-specific
environment (compiler flags, compile cache, runtime settings, stochastic rounding);
everything else is XlaBackend. The values follow AWS's own trainers
(neuronx-distributed-training's training_orchestrator.py and train_setup.sh,
neuronx-distributed's Llama scripts).
"""

from __future__ import annotations

import logging
import os
from collections.abc import MutableMapping

from omegaconf import DictConfig

from trntrain.backend.xla import XlaBackend
from trntrain.errors import UserError

log = logging.getLogger(__name__)


def default_stochastic_rounding(precision: str, master_weights: bool,
                                requested: bool = True) -> bool:
    """Stochastic rounding of bf16 results, when backend.stochastic_rounding is null: as
    train.stochastic_rounding (`requested`) for pure bf16 (bf16 weights updated in bf16,
    where round-to-nearest loses small updates: AWS's bf16SR), off with fp32 master
    weights (AWS's mixed_precision mode, which runs without it) and for fp32 and
    bf16_autocast, whose weights are fp32."""
    return precision == "bf16" and not master_weights and requested


def neuron_cc_flags(cfg: DictConfig) -> str:
    flags = ["--model-type=transformer", f"-O{cfg.neuron_opt_level}"]
    if cfg.compile_cache_dir:
        flags.append(f"--cache_dir={cfg.compile_cache_dir}")
    if cfg.neuron_cc_flags:
        flags.append(cfg.neuron_cc_flags)
    return " ".join(flags)


def neuron_environment(cfg: DictConfig, stochastic_rounding: bool,
                       sharded_optimizer: bool = False) -> dict[str, str]:
    """The variables torch-neuronx, torch-xla and the Neuron runtime read at start-up,
    for the `backend` config `cfg`; `sharded_optimizer`: the run steps ZeRO-1's (or bf16
    master weights') flat fp32 slices."""
    env = {
        "NEURON_CC_FLAGS": neuron_cc_flags(cfg),
        "NEURON_RT_STOCHASTIC_ROUNDING_EN": "1" if stochastic_rounding else "0",
        # The compiler's fused softmax kernel for the decomposed attention (AWS sets it
        # whenever its config enables the softmax fusion, which its recipes all do).
        "NEURON_FUSE_SOFTMAX": "1",
        # Graphs the runtime may queue ahead of the host: AWS's scripts use 3 for tp
        # (+ ZeRO-1) runs and 7 for tp x pp runs, whose pipeline issues many graphs a step.
        "NEURON_RT_ASYNC_EXEC_MAX_INFLIGHT_REQUESTS": str(cfg.async_exec_max_inflight_requests),
    }
    if sharded_optimizer:
        # AWS keeps functionalization on for ZeRO-1 ("needed to close 3% convergence gap
        # ... for ZeRO1", NxD's run_llama3_70B_tp_pp.sh and NxDT's train_setup.sh): an
        # inherited XLA_DISABLE_FUNCTIONALIZATION=1 must not switch it off.
        env["XLA_DISABLE_FUNCTIONALIZATION"] = "0"
    if cfg.compile_cache_dir:
        env["NEURON_COMPILE_CACHE_URL"] = cfg.compile_cache_dir
    return env


def apply_environment(env: dict[str, str], environ: MutableMapping[str, str] | None = None
                      ) -> list[str]:
    """Export `env` into `environ` (os.environ) except where a variable is already set,
    and return a warning for each one already set to another value than the config's:
    a value exported by the user or a launcher wins, but never silently."""
    environ = os.environ if environ is None else environ
    warnings = []
    for key, value in env.items():
        current = environ.get(key)
        if current is None:
            environ[key] = value
        elif current != value:
            warnings.append(f"{key}={current!r} from the environment overrides {value!r}, "
                            f"the value the config implies; unset {key} to use the config's")
    return warnings


class NeuronBackend(XlaBackend):
    name = "neuron"
    default_pjrt_device = "NEURON"

    def __init__(self, local_rank: int = 0, cfg: DictConfig | None = None,
                 stochastic_rounding: bool = False, sharded_optimizer: bool = False) -> None:
        self.stochastic_rounding = stochastic_rounding
        self.sharded_optimizer = sharded_optimizer
        super().__init__(local_rank, cfg)

    @classmethod
    def from_config(cls, cfg: DictConfig, local_rank: int, precision: str,
                    master_weights: bool, zero1: bool, stochastic_rounding: bool = True
                    ) -> NeuronBackend:
        rounding = cfg.stochastic_rounding
        if rounding is None:
            rounding = default_stochastic_rounding(precision, master_weights,
                                                   stochastic_rounding)
        # The trainer steps flat fp32 slices (ShardedOptimizer) under ZeRO-1 and for bf16
        # with master weights.
        sharded = zero1 or (precision == "bf16" and master_weights)
        return cls(local_rank, cfg, stochastic_rounding=rounding, sharded_optimizer=sharded)

    @classmethod
    def unavailable(cls) -> str | None:
        return None  # told when torch-neuronx fails to import, with the import's reason

    def configure_environment(self) -> None:
        if self.cfg is not None:
            env = neuron_environment(self.cfg, self.stochastic_rounding, self.sharded_optimizer)
            for warning in apply_environment(env):
                # Every process of a node inherits the same environment: one says it.
                if self.local_rank == 0:
                    log.warning(warning)
        try:
            import torch_neuronx  # noqa: F401
        except ImportError as err:
            raise UserError(
                "backend.name='neuron' is invalid: torch-neuronx does not import "
                f"({err}); valid: a Trainium host with the Neuron SDK's torch-neuronx, or "
                "backend=xla to run the same code path on XLA:CPU."
            ) from None

    def peak_flops(self) -> float | None:
        # Dense BF16 of one Trn1 NeuronCore-v2 (a trn1.32xlarge has 32).
        return 95e12

    def uses_xla_cache(self) -> bool:
        # neuronx-cc keeps its own cache (NEURON_COMPILE_CACHE_URL).
        return False
