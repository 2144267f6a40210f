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
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf
from torch.distributed.checkpoint.api import CheckpointException

from trntrain.distributed import barrier, broadcast_object
from trntrain.errors import UserError

if TYPE_CHECKING:
    from trntrain.checkpoint import Checkpointer, PendingSave, States

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


def read_checksums(directory: Path) -> dict[str, dict[str, int | str]]:
    """checksums.json of a checkpoint, checked for shape: file name -> crc32 and bytes.
    A listing that is not that is a damaged checkpoint (UserError)."""
    listing = directory / CHECKSUMS
    if not listing.is_file():
        raise UserError(f"checkpoint {directory} is incomplete: {listing} is missing; valid: a "
                        f"checkpoint directory written completely by trntrain.")
    damaged = UserError(f"checkpoint {directory} is damaged: {listing} is not a listing of "
                        f"its files (name -> crc32, bytes) as trntrain writes it.")
    try:
        sums = json.loads(listing.read_bytes())
    except (OSError, UnicodeDecodeError, ValueError):
        raise damaged from None
    if not isinstance(sums, dict):
        raise damaged
    for name, entry in sums.items():
        inside = (directory / name).resolve().is_relative_to(directory.resolve())
        if not (inside and isinstance(entry, dict) and isinstance(entry.get("crc32"), str)
                and isinstance(entry.get("bytes"), int)):
            raise damaged
    return sums


def verify_listed_file(directory: Path, name: str) -> None:
    """One file of a checkpoint checked against checksums.json: what every rank does
    with `.metadata` before unpickling it, whatever rank 0 concluded of the rest."""
    sums = read_checksums(directory)
    path, expected = directory / name, sums.get(name)
    if expected is None:
        raise UserError(f"checkpoint file {path} is not in {directory / CHECKSUMS}: the "
                        f"checkpoint is damaged.")
    if (not path.is_file() or path.stat().st_size != expected["bytes"]
            or _crc32(path) != expected["crc32"]):
        raise UserError(f"checkpoint file {path} is missing, truncated or corrupt: it does "
                        f"not match {directory / CHECKSUMS}.")


def verify_checksums(directory: Path) -> None:
    """Raise UserError naming the first missing, truncated, corrupt or unlisted file."""
    sums = read_checksums(directory)
    for name, expected in sums.items():
        path = directory / name
        if not path.is_file():
            raise UserError(f"checkpoint file {path} is missing; the checkpoint is incomplete.")
        if path.stat().st_size != expected["bytes"]:
            raise UserError(f"checkpoint file {path} is truncated: {path.stat().st_size} bytes "
                            f"instead of {expected['bytes']}.")
        if _crc32(path) != expected["crc32"]:
            raise UserError(f"checkpoint file {path} is corrupt: its CRC-32 does not match "
                            f"{directory / CHECKSUMS}.")
    for path in sorted(directory.rglob("*")):
        name = path.relative_to(directory).as_posix()
        if path.is_file() and name != CHECKSUMS and name not in sums:
            raise UserError(f"checkpoint file {path} is not in {directory / CHECKSUMS}: the "
                            f"directory was changed after it was written; valid: a checkpoint "
                            f"directory as trntrain wrote it.")


def save_failed(step: int, directory: Path, err: BaseException) -> UserError:
    """The one-line error of a save that could not be written (a full disk, a path this
    process may not write), from an OSError or DCP's CheckpointException wrapping one."""
    cause: BaseException = err
    failures = getattr(err, "failures", None)  # DCP: rank -> (exception, traceback)
    if isinstance(failures, dict) and failures:
        rank, (cause, _) = sorted(failures.items())[0]
        where = f" on rank {rank}"
    else:
        where = ""
    reason = (f"{cause.strerror} (errno {cause.errno})"
              if isinstance(cause, OSError) and cause.strerror else str(cause))
    return UserError(f"the checkpoint of step {step} could not be written into {directory}"
                     f"{where}: {reason}; the previous checkpoints are intact. Valid: a "
                     f"checkpoint.dir on a file system with free space that this process may "
                     f"write.")


def verify_checksums_agreed(directory: Path, is_main: bool) -> None:
    """verify_checksums on rank 0, its verdict raised on every rank alike (a rank that
    went on alone would read what rank 0 refused)."""
    problem = None
    if is_main:
        try:
            verify_checksums(directory)
        except UserError as err:
            problem = str(err)
    problem = broadcast_object(problem)
    if problem is not None:
        raise UserError(problem)


class CheckpointManager:
    def __init__(self, directory: Path, every: int, keep: int, is_main: bool) -> None:
        self.directory = directory
        self.every = every
        self.keep = keep
        self.is_main = is_main
        # An asynchronous save under way and its step: committed by `finish_pending`.
        self.pending: tuple[PendingSave, int] | None = None

    def save(self, step: int, checkpointer: Checkpointer, states: States,
             midway: Callable[[], None] = lambda: None) -> None:
        """Write a checkpoint of `step` with `checkpointer` (every rank): the save before
        it completed first, this one committed now or, if asynchronous, by the next
        `finish_pending`. `midway` runs between writing and committing (fault tests).
        A save that cannot be written is one UserError; its `.tmp` is removed."""
        self.finish_pending()
        try:
            directory = self.begin(step)
            pending = checkpointer.save(directory, states)
            midway()
            if pending is None:
                self.commit(step)
        except (OSError, CheckpointException) as err:
            self.abandon(step)
            raise save_failed(step, self.directory, err) from None
        if pending is not None:
            self.pending = (pending, step)

    def finish_pending(self) -> None:
        """Complete and commit the asynchronous save under way, if any (every rank, on the
        training thread: completing it is collective)."""
        if self.pending is None:
            return
        pending, step = self.pending
        self.pending = None
        try:
            pending.result()
            self.commit(step)
        except (OSError, CheckpointException) as err:
            self.abandon(step)
            raise save_failed(step, self.directory, err) from None

    def should_save(self, step: int, max_steps: int) -> bool:
        return step == max_steps or (self.every > 0 and step % self.every == 0)

    def begin(self, step: int) -> Path:
        """The temporary directory to write step `step` into (every rank calls this)."""
        tmp = self.directory / f"{step_dir_name(step)}.tmp"
        if self.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        barrier()
        return tmp

    def commit(self, step: int) -> Path:
        """After every rank wrote into begin()'s directory: make it the latest checkpoint."""
        barrier()
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
        barrier()
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

    def abandon(self, step: int) -> None:
        """Remove what a failed save of `step` wrote (rank 0; best effort)."""
        if self.is_main:
            shutil.rmtree(self.directory / f"{step_dir_name(step)}.tmp", ignore_errors=True)

    def remove_temporary(self) -> None:
        """Delete the `.tmp` directories of saves that never completed (rank 0, at start)."""
        if self.is_main and self.directory.is_dir():
            for tmp in self.directory.glob("step_*.tmp"):
                logger.info("removing %s, left by a save that did not complete", tmp)
                shutil.rmtree(tmp, ignore_errors=True)

    def find_resumable(self, start_over: bool = False) -> Path | None:
        """The newest checkpoint whose files verify, agreed by all ranks (rank 0 checks).

        None when there is none at all. When there are checkpoints but none verifies,
        the run would silently begin again from step 0 next to its own history: that is
        refused (UserError on every rank) unless `start_over` (run.overwrite=true)."""
        verdict: tuple[str | None, list[str]] = (None, [])
        if self.is_main:
            problems = []
            for candidate in reversed(self.complete_checkpoints()):
                try:
                    verify_checksums(candidate)
                except UserError as err:
                    logger.warning("%s; trying the previous checkpoint", err)
                    problems.append(str(err))
                    continue
                verdict = (str(candidate), problems)
                break
            else:
                verdict = (None, problems)
        chosen, problems = broadcast_object(verdict)
        if chosen is None and problems and not start_over:
            raise UserError(
                f"checkpoint.resume=auto found no usable checkpoint in {self.directory}: all "
                f"{len(problems)} are damaged (newest: {problems[0]}); the run will not "
                f"start again from step 0 beside its own history. Valid: repair or remove the "
                f"damaged checkpoints, checkpoint.resume=<a good checkpoint directory>, or "
                f"run.overwrite=true to start over.")
        return Path(chosen) if chosen else None
