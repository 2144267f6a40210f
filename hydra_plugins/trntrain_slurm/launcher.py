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

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


class TrntrainSlurmLauncher(Launcher):
    """Submits the points of a sweep as one SLURM array job (see trntrain.launcher.sweep)
    and returns once they are queued; `trntrain sweep status` follows them."""

    def __init__(self, **params: Any) -> None:
        self.params = {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v)
                       else v for k, v in params.items()}
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        # (number, overrides) -> sweep.Point: points composed in setup.
        self.composed: dict[tuple[int, tuple[str, ...]], Any] = {}

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        from trntrain.cli import reported
        from trntrain.errors import UserError

        self.config = config
        self.hydra_context = hydra_context
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
            if config.hydra.sweeper.get("_target_") == BASIC_SWEEPER:
                from trntrain.launcher import sweep

                # All of the checks, before the sweeper writes anything.
                self._compose_sweep()
                sweep.check(list(self.composed.values()), self.sweep_dir(),
                            sweep.Settings(**self.params))

    def _compose_sweep(self) -> None:
        """Every point of Hydra's basic sweep composed now, as its sweeper will list them,
        so that a point that does not compose is one line naming it (the sweeper's own
        check, later, prints Hydra's report instead)."""
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        assert self.config is not None and self.hydra_context is not None
        sweeper = self.config.hydra.sweeper
        arguments = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
        arguments += list(self.config.hydra.overrides.task)
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        batches = BasicSweeper.split_arguments(parser.parse_overrides(arguments),
                                               sweeper.get("max_batch_size"))
        num = 0
        for batch in batches:
            for overrides in batch:
                self.composed[num, tuple(overrides)] = self._compose(num, overrides)
                num += 1

    def _compose(self, num: int, overrides: Sequence[str]) -> Any:
        from hydra.core.hydra_config import HydraConfig
        from hydra.errors import HydraException
        from omegaconf import open_dict, read_write
        from omegaconf.errors import OmegaConfBaseException

        from trntrain.config.compose_errors import explain
        from trntrain.errors import UserError
        from trntrain.launcher import sweep

        assert self.config is not None and self.hydra_context is not None
        label = f"sweep point #{num} ({' '.join(overrides) or 'no overrides'})"
        try:
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config,
                                                                     list(overrides))
            with open_dict(cfg.hydra.job):
                cfg.hydra.job.num = num
                cfg.hydra.job.id = f"slurm_{num}"
            # hydra.sweep.subdir may interpolate the job's number or overrides.
            HydraConfig.instance().set_config(cfg)
            run_dir = Path(str(cfg.hydra.sweep.dir)).absolute() / str(cfg.hydra.sweep.subdir)
            backend = str(cfg.hydra.runtime.choices.backend)
            with read_write(cfg), open_dict(cfg):
                del cfg["hydra"]
        except (HydraException, OmegaConfBaseException) as err:
            raise UserError(f"{label}: {explain(err)} Nothing was submitted.") from None
        finally:
            HydraConfig.instance().set_config(self.config)
        return sweep.Point(num, list(overrides), run_dir, cfg, backend)

    def sweep_dir(self) -> Path:
        assert self.config is not None
        return Path(str(self.config.hydra.sweep.dir)).absolute()

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
               ) -> Sequence[JobReturn]:
        from trntrain.cli import reported
        from trntrain.launcher import sweep

        with reported():
            keys = [(num, tuple(o)) for num, o in enumerate(job_overrides, initial_job_idx)]
            points = [self.composed.get(key) or self._compose(*key) for key in keys]
            checked = all(key in self.composed for key in keys)
            decisions = sweep.launch(points, self.sweep_dir(), sweep.Settings(**self.params),
                                     checked=checked)
        return [JobReturn(overrides=d.point.overrides, status=JobStatus.COMPLETED,
                          _return_value=d.job, working_dir=str(d.point.run_dir))
                for d in decisions]
