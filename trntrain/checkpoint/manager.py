"""When and where checkpoints are written, committed, verified, pruned and resumed.

Layout of `checkpoint.dir` (default `<run.dir>/checkpoints`):

    step_00000100/        a complete checkpoint: the checkpointer's files and
        checksums.json    CRC-32 of every file, written last
    step_00000200.tmp/    being written (or left by a crash): never read
    latest                the name of the newest complete checkpoint

A save writes `step_N.tmp/`, waits for every rank, records the checksums, renames
the directory to `step_N/` and only then rewrites `latest` (through a temporary
file and a rename): a checkpoint is complete or absent. Loading verifies the
checksums first; a corrupt or truncated checkpoint is reported by file name and
`resume=auto` falls back to the previous complete one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import zlib
from pathlib import Path

import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from trntrain.distributed import broadcast_object
from trntrain.errors import UserError

logger = logging.getLogger("trntrain")

CHECKSUMS = "checksums.json"
LATEST = "latest"
CHECKPOINTS = "checkpoints"  # the default checkpoint.dir, inside the run directory


def checkpoint_dir(cfg: DictConfig, run_dir: Path) -> Path:
    """Where the run in `run_dir` keeps its checkpoints: checkpoint.dir, else
    <run_dir>/checkpoints (also for a config without a checkpoint section)."""
    directory = OmegaConf.select(cfg, "checkpoint.dir", default=None)
    return Path(directory) if directory else Path(run_dir) / CHECKPOINTS


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _crc32(path: Path) -> str:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _write_durably(path: Path, text: str) -> None:
    with path.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _sync_directory(directory: Path) -> None:
    """Make renames and new entries in `directory` survive a power loss."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checksums(directory: Path) -> None:
    sums = {p.relative_to(directory).as_posix(): {"crc32": _crc32(p), "bytes": p.stat().st_size}
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != CHECKSUMS}
    _write_durably(directory / CHECKSUMS, json.dumps(sums, indent=1))


def verify_checksums(directory: Path) -> None:
    """Raise UserError naming the first missing, truncated or corrupt file."""
    listing = directory / CHECKSUMS
    if not listing.is_file():
        raise UserError(f"checkpoint {directory} is incomplete: {listing} is missing; valid: a "
                        f"checkpoint directory written completely by trntrain.")
    for name, expected in json.loads(listing.read_text()).items():
        path = directory / name
        if not path.is_file():
            raise UserError(f"checkpoint file {path} is missing; the checkpoint is incomplete.")
        if path.stat().st_size != expected["bytes"]:
            raise UserError(f"checkpoint file {path} is truncated: {path.stat().st_size} bytes "
                            f"instead of {expected['bytes']}.")
        if _crc32(path) != expected["crc32"]:
            raise UserError(f"checkpoint file {path} is corrupt: its CRC-32 does not match "
                            f"{listing}.")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class CheckpointManager:
    def __init__(self, directory: Path, every: int, keep: int, is_main: bool) -> None:
        self.directory = directory
        self.every = every
        self.keep = keep
        self.is_main = is_main

    def should_save(self, step: int, max_steps: int) -> bool:
        return step == max_steps or (self.every > 0 and step % self.every == 0)

    def begin(self, step: int) -> Path:
        """The temporary directory to write step `step` into (every rank calls this)."""
        tmp = self.directory / f"{step_dir_name(step)}.tmp"
        if self.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        _barrier()
        return tmp

    def commit(self, step: int) -> Path:
        """After every rank wrote into begin()'s directory: make it the latest checkpoint."""
        _barrier()
        final = self.directory / step_dir_name(step)
        if self.is_main:
            tmp = self.directory / f"{step_dir_name(step)}.tmp"
            write_checksums(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _sync_directory(self.directory)
            pointer = self.directory / f"{LATEST}.tmp"
            _write_durably(pointer, final.name + "\n")
            os.replace(pointer, self.directory / LATEST)
            _sync_directory(self.directory)
            self.prune()
        _barrier()
        return final

    def prune(self) -> None:
        if self.keep <= 0:
            return
        complete = self.complete_checkpoints()
        for old in complete[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def complete_checkpoints(self) -> list[Path]:
        """Committed checkpoint directories, oldest first."""
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir()
                      if p.is_dir() and p.name.startswith("step_") and not p.name.endswith(".tmp")
                      and (p / CHECKSUMS).is_file())

    def find_resumable(self) -> Path | None:
        """The newest checkpoint whose files verify, agreed by all ranks (rank 0 checks)."""
        chosen = None
        if self.is_main:
            for candidate in reversed(self.complete_checkpoints()):
                try:
                    verify_checksums(candidate)
                except UserError as err:
                    logger.warning("%s; trying the previous checkpoint", err)
                    continue
                chosen = str(candidate)
                break
        chosen = broadcast_object(chosen)
        return Path(chosen) if chosen else None
