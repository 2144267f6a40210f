"""Checkpointers by name (`checkpoint.name`: dcp, hf, none); packages add theirs
through the `trntrain.checkpoint` entry point group with a Checkpointer subclass."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch
from omegaconf import DictConfig
from torch import nn

from trntrain.plugins import Registry

if TYPE_CHECKING:
    from trntrain.data import StepBatches
    from trntrain.parallel import Mesh
    from trntrain.parallel.comm import Group
    from trntrain.parallel.zero import ShardedOptimizer


@dataclass
class TrainState:
    """What a checkpointer writes and reads, handed to it by the trainer (never the
    trainer itself): the model chunks and their parameters, the optimizer (and its
    sharded layout, if any), the data position, and the layout the shards live in."""

    model_cfg: DictConfig
    chunks: dict[int, nn.Module]  # this rank's pipeline chunks by global index
    params: list[nn.Parameter]  # trainable, each once
    optimizer: torch.optim.Optimizer  # the torch optimizer: per-parameter state
    sharded: ShardedOptimizer | None  # ZeRO-1 / master weights: flat fp32 slices
    data: StepBatches  # the training data position
    global_batch_size: int
    mesh: Mesh
    host_tp_group: Group  # a gloo copy of the tp group, for DCP's DeviceMesh
    is_main: bool
    async_save: bool


class PendingSave(Protocol):
    """An asynchronous save under way (a concurrent.futures.Future will do)."""

    def result(self) -> object:
        """Wait for the save to be complete. Every rank calls it, from the thread that
        started the save: completing may take collectives (DCP's metadata)."""


class Checkpointer(ABC):
    """Writes the training state into a directory and reads it back (every rank calls)."""

    # Whether a run can continue from what it writes (model weights alone cannot).
    resumable: ClassVar[bool] = True

    @abstractmethod
    def save(self, directory: Path, train: TrainState, step: int) -> PendingSave | None:
        """Write the state; an asynchronous save returns what completes it."""

    @abstractmethod
    def load(self, directory: Path, train: TrainState) -> int:
        """Restore the state; returns the step it was saved at."""


class NoCheckpointer(Checkpointer):
    """checkpoint=none: a run that writes no checkpoints and cannot be resumed."""

    resumable = False

    def save(self, directory: Path, train: TrainState, step: int) -> PendingSave | None:
        return None

    def load(self, directory: Path, train: TrainState) -> int:
        raise FileNotFoundError(f"checkpoint=none never writes checkpoints, none in {directory}")


CHECKPOINTERS: Registry[type[Checkpointer]] = Registry("trntrain.checkpoint")
CHECKPOINTERS["none"] = NoCheckpointer


def _register_builtin() -> None:
    from trntrain.checkpoint.dcp import DcpCheckpointer
    from trntrain.checkpoint.hf import HfCheckpointer

    CHECKPOINTERS["dcp"] = DcpCheckpointer
    CHECKPOINTERS["hf"] = HfCheckpointer


_register_builtin()

__all__ = ["CHECKPOINTERS", "Checkpointer", "NoCheckpointer", "PendingSave"]
