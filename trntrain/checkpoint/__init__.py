"""Checkpointers by name (`checkpoint.name`); packages add theirs through the
`trntrain.checkpoint` entry point group."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from trntrain.plugins import Registry


class Checkpointer(ABC):
    """Saves and restores the training state (model, optimizer, data position)."""

    @abstractmethod
    def save(self, directory: Path, state: dict[str, Any]) -> None: ...

    @abstractmethod
    def load(self, directory: Path, state: dict[str, Any]) -> None: ...


class NoCheckpointer(Checkpointer):
    """checkpoint=none: a run that writes no checkpoints and cannot be resumed."""

    def save(self, directory: Path, state: dict[str, Any]) -> None:
        return None

    def load(self, directory: Path, state: dict[str, Any]) -> None:
        raise FileNotFoundError(f"checkpoint=none never writes checkpoints, none in {directory}")


CHECKPOINTERS: Registry[type[Checkpointer]] = Registry("trntrain.checkpoint")
CHECKPOINTERS["none"] = NoCheckpointer

__all__ = ["CHECKPOINTERS", "Checkpointer", "NoCheckpointer"]
