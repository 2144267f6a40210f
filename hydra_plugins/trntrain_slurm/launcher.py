"""The launcher of `hydra/launcher=slurm` (conf/hydra/launcher/slurm.yaml).

Hydra accepts launchers only from the `hydra_plugins` namespace package, and imports
every module in it when any Hydra application starts (each rank of a run included):
this module imports nothing heavy, and the work is done in trntrain.launcher.sweep.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf


class TrntrainSlurmLauncher(Launcher):
    """Submits the points of a sweep as one SLURM array job (see trntrain.launcher.sweep)
    and returns once they are queued; `trntrain sweep status` follows them."""

    def __init__(self, **params: Any) -> None:
        self.params = {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v)
                       else v for k, v in params.items()}
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        from trntrain.cli import reported
        from trntrain.errors import UserError

        # Before the sweeper creates the directory: a name made of the time would be new
        # at every run of the command, which then could not find its unfinished points.
        raw = OmegaConf.to_container(config.hydra.sweep, resolve=False)["dir"]
        with reported():
            if "${now:" in str(raw):
                raise UserError(
                    f"hydra.sweep.dir={raw} is invalid with hydra/launcher=slurm: it names a "
                    f"new directory each time, so running the command again would not resume "
                    f"the sweep; valid: a fixed directory on storage the nodes share, e.g. "
                    f"hydra.sweep.dir=/fsx/sweeps/lr.")

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
               ) -> Sequence[JobReturn]:
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import open_dict, read_write

        from trntrain.cli import reported
        from trntrain.launcher import sweep

        assert self.config is not None and self.hydra_context is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).absolute()
        points = []
        with reported():
            settings = sweep.Settings(**self.params)
            try:
                for num, overrides in enumerate(job_overrides, start=initial_job_idx):
                    cfg = self.hydra_context.config_loader.load_sweep_config(
                        self.config, list(overrides))
                    with open_dict(cfg.hydra.job):
                        cfg.hydra.job.num = num
                        cfg.hydra.job.id = f"slurm_{num}"
                    # hydra.sweep.subdir may interpolate the job's number or overrides.
                    HydraConfig.instance().set_config(cfg)
                    run_dir = sweep_dir / str(cfg.hydra.sweep.subdir)
                    backend = str(cfg.hydra.runtime.choices.backend)
                    with read_write(cfg), open_dict(cfg):
                        del cfg["hydra"]
                    points.append(sweep.Point(num, list(overrides), run_dir, cfg, backend))
            finally:
                HydraConfig.instance().set_config(self.config)
            decisions = sweep.launch(points, sweep_dir, settings)
        return [JobReturn(overrides=d.point.overrides, status=JobStatus.COMPLETED,
                          _return_value=d.job, working_dir=str(d.point.run_dir))
                for d in decisions]
