"""The run directory: chosen once for all ranks, written by rank 0 only.

It holds `config.yaml` (the composed, resolved config), `.hydra/` (what Hydra
itself would write: the unresolved config, the overrides and Hydra's own config),
`train.log` and `metrics.jsonl`, so a run directory can be copied and re-run.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from trntrain.errors import UserError

if TYPE_CHECKING:  # torch is not imported by the commands that only read run directories
    from trntrain.distributed import World

logger = logging.getLogger("trntrain")

METRICS_FILE = "metrics.jsonl"


def default_run_dir() -> Path:
    """runs/<timestamp>, or the job's directory inside a Hydra sweep."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return Path(HydraConfig.get().runtime.output_dir)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    candidate = Path("runs") / stamp
    n = 1
    while candidate.exists():
        n += 1
        candidate = Path("runs") / f"{stamp}-{n}"
    return candidate


def agree_run_dir(cfg: DictConfig, world: World) -> Path:
    """run.dir if set, else rank 0's default, broadcast so that every rank uses one path."""
    from trntrain.distributed import broadcast_object

    chosen = Path(cfg.run.dir) if cfg.run.dir else (default_run_dir() if world.is_main else None)
    return Path(broadcast_object(str(chosen) if chosen is not None else None))


def check_run_dir(run_dir: Path, overwrite: bool, checkpoint_dir: Path | None = None) -> None:
    """Refuse to mix a new run into the records of an old one, unless it continues that
    run from one of its checkpoints (`checkpoint_dir`: where a resumable run keeps them)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run.dir={str(run_dir)!r} is a file; valid: a new or empty directory.")
    from trntrain.checkpoint.manager import LATEST

    metrics = run_dir / METRICS_FILE
    resuming = checkpoint_dir is not None and (checkpoint_dir / LATEST).is_file()
    if metrics.exists() and not overwrite and not resuming:
        raise UserError(
            f"run.dir={str(run_dir)!r} already holds a run ({metrics} exists) and no "
            f"checkpoint to continue it from; valid: a new "
            f"directory, or run.overwrite=true to replace that run's logs."
        )


def ensure_writable(directory: Path, key: str) -> None:
    """Create `directory` and write a file in it now, so that an unwritable path ends the
    run before it trains rather than at its first save (UserError naming `key`)."""
    probe = directory / f".trntrain-write-test-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UserError(f"{key}={str(directory)!r} cannot be written: {err.strerror or err}; "
                        f"valid: a directory this process may create and write (not under a "
                        f"file, not read-only).") from None


class RunDirLock:
    """An exclusive lock on a run directory, held by rank 0 for the whole run: a second
    run into the same directory would mix its metrics and checkpoints into this one's.

    It is an flock(2) on `run.lock`, which the kernel releases when the process ends in
    any way, so a lock left by a dead process is never in the way. Where the file system
    has no locks (some NFS mounts), the run goes on with a warning."""

    NAME = "run.lock"

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / self.NAME
        self._file = None

    def acquire(self) -> RunDirLock:
        import fcntl

        handle = self.path.open("a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise UserError(
                f"run.dir={str(self.path.parent)!r} is in use by another run ({holder}); "
                f"valid: another run.dir, or wait for that run to end.") from None
        except OSError as err:
            logger.warning("run.dir %s cannot be locked (%s): a second run started into it "
                           "would not be refused", self.path.parent, err.strerror or err)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                     f"{datetime.datetime.now().isoformat(timespec='seconds')}\n")
        handle.flush()
        self._file = handle
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor releases the flock
            self._file = None


def write_run_dir(run_dir: Path, cfg: DictConfig, overwrite: bool) -> None:
    """Create the run directory with its config files (call on rank 0 only)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for name in (METRICS_FILE, "train.log"):
            (run_dir / name).unlink(missing_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved["run"]["dir"] = str(run_dir)
    OmegaConf.save(OmegaConf.create(resolved), run_dir / "config.yaml")
    hydra_dir = run_dir / ".hydra"
    hydra_dir.mkdir(exist_ok=True)
    OmegaConf.save(cfg, hydra_dir / "config.yaml")
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        OmegaConf.save(OmegaConf.create({"hydra": hydra_cfg}), hydra_dir / "hydra.yaml")
        OmegaConf.save(OmegaConf.create(list(hydra_cfg.overrides.task)),
                       hydra_dir / "overrides.yaml")


class _TqdmHandler(logging.StreamHandler):
    """Console lines that do not tear the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


class _OnceFilter(logging.Filter):
    """Lets a warning or error through the first time its text is seen."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def setup_logging(run_dir: Path | None, world: World, level: str) -> None:
    """Every rank logs to <run.dir>/logs/rank_<r>.log; rank 0 also to the console at
    `level` and to train.log, the others to the console only for warnings. Repeated
    warnings are shown once."""
    root = logging.getLogger("trntrain")
    root.handlers.clear()
    root.filters.clear()
    root.propagate = False
    root.setLevel(level)
    root.addFilter(_OnceFilter())
    prefix = "" if world.world_size == 1 else f"[rank {world.rank}] "
    fmt = logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(message)s", "%H:%M:%S")
    console = _TqdmHandler()
    console.setFormatter(fmt)
    console.setLevel(level if world.is_main else "WARNING")
    root.addHandler(console)
    if run_dir is None:
        return
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    files = [run_dir / "logs" / f"rank_{world.rank}.log"]
    if world.is_main:
        files.append(run_dir / "train.log")
    for path in files:
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(fmt)
        root.addHandler(handler)
