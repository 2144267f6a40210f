"""Checkpointers by name (`checkpoint.name`: dcp, hf, none); packages add theirs
through the `trntrain.checkpoint` entry point group with a Checkpointer subclass."""

from __future__ import annotations

from abc import ABC, abstractmethod
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from trntrain.plugins import Registry

if TYPE_CHECKING:
    from trntrain.trainer import Trainer


class Checkpointer(ABC):
    """Writes the training state into a directory and reads it back (every rank calls)."""

    # Whether a run can continue from what it writes (model weights alone cannot).
    resumable: ClassVar[bool] = True

    @abstractmethod
    def save(self, directory: Path, trainer: Trainer, step: int) -> Future | None:
        """Write the state; an asynchronous save returns the Future of its completion."""

    @abstractmethod
    def load(self, directory: Path, trainer: Trainer) -> int:
        """Restore the state; returns the step it was saved at."""


class NoCheckpointer(Checkpointer):
    """checkpoint=none: a run that writes no checkpoints and cannot be resumed."""

    resumable = False

    def save(self, directory: Path, trainer: Trainer, step: int) -> Future | None:
        return None

    def load(self, directory: Path, trainer: Trainer) -> int:
        raise FileNotFoundError(f"checkpoint=none never writes checkpoints, none in {directory}")


CHECKPOINTERS: Registry[type[Checkpointer]] = Registry("trntrain.checkpoint")
CHECKPOINTERS["none"] = NoCheckpointer


def _register_builtin() -> None:
    from trntrain.checkpoint.dcp import DcpCheckpointer
    from trntrain.checkpoint.hf import HfCheckpointer

    CHECKPOINTERS["dcp"] = DcpCheckpointer
    CHECKPOINTERS["hf"] = HfCheckpointer


_register_builtin()

__all__ = ["CHECKPOINTERS", "Checkpointer", "NoCheckpointer"]
