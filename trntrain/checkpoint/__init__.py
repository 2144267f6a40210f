"""Checkpointers by name (`checkpoint.name`: dcp, hf, none); packages add theirs
through the `trntrain.checkpoint` entry point group with a Checkpointer subclass."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol

from omegaconf import DictConfig

from trntrain.plugins import Registry

if TYPE_CHECKING:
    from trntrain.checkpoint.state import Stateful

# What a checkpointer writes and reads, by part: "trainer" (Progress: the step),
# "model" (ModelState: the chunks, their config and mesh), "optimizer", "lr_schedule",
# "data" (checkpoint/state.py); handed to it by the trainer, never the trainer itself.
States = dict[str, "Stateful"]


class PendingSave(Protocol):
    """An asynchronous save under way (a concurrent.futures.Future will do)."""

    def result(self) -> object:
        """Wait for the save to be complete. Every rank calls it, from the thread that
        started the save: completing may take collectives (DCP's metadata)."""


class Checkpointer(ABC):
    """Writes the training state into a directory and reads it back (every rank calls).
    Built from the `checkpoint` config section."""

    # Whether a run can continue from what it writes (model weights alone cannot).
    resumable: ClassVar[bool] = True

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg

    @abstractmethod
    def save(self, directory: Path, states: States) -> PendingSave | None:
        """Write the state of step states["trainer"].step; an asynchronous save returns
        what completes it."""

    @abstractmethod
    def load(self, directory: Path, states: States) -> None:
        """Restore the parts of `states` (the step included) from `directory`."""


class NoCheckpointer(Checkpointer):
    """checkpoint=none: a run that writes no checkpoints and cannot be resumed."""

    resumable = False

    def save(self, directory: Path, states: States) -> PendingSave | None:
        return None

    def load(self, directory: Path, states: States) -> None:
        raise FileNotFoundError(f"checkpoint=none never writes checkpoints, none in {directory}")


CHECKPOINTERS: Registry[type[Checkpointer]] = Registry("trntrain.checkpoint")
CHECKPOINTERS["none"] = NoCheckpointer


def _register_builtin() -> None:
    from trntrain.checkpoint.dcp import DcpCheckpointer
    from trntrain.checkpoint.hf import HfCheckpointer

    CHECKPOINTERS["dcp"] = DcpCheckpointer
    CHECKPOINTERS["hf"] = HfCheckpointer


_register_builtin()

__all__ = ["CHECKPOINTERS", "Checkpointer", "NoCheckpointer", "PendingSave", "States"]
