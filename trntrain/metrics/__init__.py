"""Metric records and the sinks they go to, chosen by `logging.sinks` (rank 0 only):
console, jsonl (metrics.jsonl), tensorboard (event files in <run.dir>/tensorboard),
wandb and mlflow (offline / local files; extras, never a network call by default).
Packages add sinks through the `trntrain.sinks` entry point group with a Sink subclass."""

from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import DictConfig, OmegaConf

from trntrain.errors import UserError
from trntrain.plugins import Registry
from trntrain.run_dir import METRICS_FILE

logger = logging.getLogger("trntrain")

# Order and format of the console line; other keys go to the other sinks only.
CONSOLE_FIELDS = [
    ("loss", "{:.4f}"), ("eval_loss", "{:.4f}"), ("lr", "{:.2e}"), ("grad_norm", "{:.3f}"),
    ("tokens_per_s", "{:,.0f}"), ("mfu", "{:.1%}"), ("step_time_s", "{:.3f}"),
]


def format_console(record: dict[str, Any], max_steps: int) -> str:
    parts = [f"step {record['step']}/{max_steps}"]
    for key, fmt in CONSOLE_FIELDS:
        if record.get(key) is not None:
            parts.append(f"{key} {fmt.format(record[key])}")
    return " | ".join(parts)


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a record, but the step."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)}


class Sink:
    # Whether it writes into the run directory (runs without one, such as a precompile
    # pass, leave it out).
    writes_files: ClassVar[bool] = True

    @classmethod
    def for_run(cls, run_dir: Path, cfg: DictConfig, max_steps: int) -> Sink:
        """The sink of a run: its directory, its whole config, its number of steps."""
        raise NotImplementedError

    def log(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class ConsoleSink(Sink):
    writes_files = False

    def __init__(self, max_steps: int) -> None:
        self.max_steps = max_steps

    @classmethod
    def for_run(cls, run_dir, cfg, max_steps):
        return cls(max_steps)

    def log(self, record):
        logger.info(format_console(record, self.max_steps))


def write_failed(path: Path, err: OSError) -> UserError:
    return UserError(f"writing {path} failed: {err.strerror or err} (errno {err.errno}); "
                     f"valid: a run directory on a file system with free space that this "
                     f"process may write.")


class JsonlSink(Sink):
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("a", encoding="utf-8")
        except OSError as err:
            raise write_failed(path, err) from None

    @classmethod
    def for_run(cls, run_dir, cfg, max_steps):
        return cls(run_dir / METRICS_FILE)

    def log(self, record):
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in record.items()}
        try:
            self._file.write(json.dumps(clean) + "\n")
            self._file.flush()
        except OSError as err:
            raise write_failed(self.path, err) from None

    def close(self):
        with contextlib.suppress(OSError):  # a failed write was reported already
            self._file.close()


def _require(module: str, sink: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise UserError(f"logging.sinks names {sink!r} but {module} is not installed; valid: "
                        f"pip install 'trntrain[tracking]', or leave {sink} out of "
                        f"logging.sinks.")


class TensorBoardSink(Sink):
    def __init__(self, directory: Path) -> None:
        _require("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(directory))

    @classmethod
    def for_run(cls, run_dir, cfg, max_steps):
        return cls(run_dir / "tensorboard")

    def log(self, record):
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, record["step"])
        self.writer.flush()

    def close(self):
        self.writer.close()


class WandbSink(Sink):
    """Weights & Biases in offline mode: files under <run.dir>/wandb, `wandb sync` later."""

    def __init__(self, run_dir: Path, cfg: DictConfig) -> None:
        _require("wandb", "wandb")
        import wandb

        self.run = wandb.init(mode="offline", dir=str(run_dir), name=run_dir.name,
                              config=OmegaConf.to_container(cfg, resolve=True))

    @classmethod
    def for_run(cls, run_dir, cfg, max_steps):
        return cls(run_dir, cfg)

    def log(self, record):
        self.run.log(scalars(record), step=record["step"])

    def close(self):
        self.run.finish()


class MlflowSink(Sink):
    """MLflow with a local file store under <run.dir>/mlruns."""

    def __init__(self, run_dir: Path, cfg: DictConfig) -> None:
        _require("mlflow", "mlflow")
        import mlflow

        mlflow.set_tracking_uri((run_dir / "mlruns").resolve().as_uri())
        self.mlflow = mlflow
        mlflow.start_run(run_name=run_dir.name)
        flat = OmegaConf.to_container(cfg, resolve=True)
        mlflow.log_params({f"{section}.{k}": v for section, values in flat.items()
                           if isinstance(values, dict) for k, v in values.items()
                           if not isinstance(v, (dict, list))})

    @classmethod
    def for_run(cls, run_dir, cfg, max_steps):
        return cls(run_dir, cfg)

    def log(self, record):
        self.mlflow.log_metrics(scalars(record), step=record["step"])

    def close(self):
        self.mlflow.end_run()


class MetricsLogger:
    """Sends each record to every configured sink."""

    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks

    def log(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.log(record)

    @staticmethod
    def truncate_after(jsonl_path: Path, step: int) -> None:
        """Keep the records up to `step`: a resumed run writes the later ones again, so
        each step is in the file once. A torn last line (a write cut short by a kill or
        a full disk) is dropped; any other unreadable line is an error."""
        if not jsonl_path.is_file():
            return
        lines = [line for line in jsonl_path.read_text(errors="replace").splitlines()
                 if line.strip()]
        kept = []
        for number, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
                record_step = record["step"]
            except (ValueError, KeyError, TypeError):
                if number == len(lines):
                    logger.warning("%s: dropped its torn last line", jsonl_path)
                    break
                raise UserError(f"{jsonl_path} line {number} is not a metrics record; valid: "
                                f"the file as trntrain writes it (one JSON object with a "
                                f"'step' per line), or run.overwrite=true to start it "
                                f"again.") from None
            if record_step <= step:
                kept.append(line)
        try:
            jsonl_path.write_text("".join(line + "\n" for line in kept))
        except OSError as err:
            raise write_failed(jsonl_path, err) from None

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []


# logging.sinks names -> Sink subclasses.
SINKS: Registry[type[Sink]] = Registry("trntrain.sinks")
SINKS["console"] = ConsoleSink
SINKS["jsonl"] = JsonlSink
SINKS["tensorboard"] = TensorBoardSink
SINKS["wandb"] = WandbSink
SINKS["mlflow"] = MlflowSink


def build_metrics_logger(cfg: DictConfig, run_dir: Path | None, is_main: bool,
                         max_steps: int) -> MetricsLogger:
    """The sinks of logging.sinks, on the main rank; those that write files only with a
    run directory."""
    if not is_main:
        return MetricsLogger([])
    sinks = [SINKS[name] for name in cfg.logging.sinks]
    return MetricsLogger([sink.for_run(run_dir, cfg, max_steps) for sink in sinks
                          if run_dir is not None or not sink.writes_files])
