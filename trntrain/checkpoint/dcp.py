"""checkpoint=dcp: torch.distributed.checkpoint, every rank writing its own shards.

The files are an ordinary DCP checkpoint (`.metadata` and `__<rank>_0.distcp`)
of the logical state of `state.py`: PyTorch's own tools read them
(`torch.distributed.checkpoint.format_utils`), and any layout loads them. Loading
goes through DCP's reader: tensors, no unpickling of arbitrary objects.
"""

from __future__ import annotations

import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf

from trntrain.checkpoint import Checkpointer
from trntrain.checkpoint.state import apply_state, empty_like_state, state_dict
from trntrain.errors import UserError

if TYPE_CHECKING:
    from trntrain.trainer import Trainer

MODEL_CONFIG = "model.yaml"

# One process (no_dist=True) is intended here; DCP warns about it on every call.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")


def checkpoint_keys(directory: Path) -> set[str]:
    try:
        metadata = dcp.FileSystemReader(str(directory)).read_metadata()
    except Exception as err:  # noqa: BLE001 - any unreadable metadata is the same user error
        raise UserError(f"checkpoint {directory} has no readable DCP metadata ({err}); valid: "
                        f"a directory written by checkpoint=dcp.") from None
    return set(metadata.state_dict_metadata)


class DcpCheckpointer(Checkpointer):
    def save(self, directory: Path, trainer: Trainer, step: int) -> Future | None:
        if trainer.world.is_main:
            # The model's shape travels with the weights, for `trntrain convert`.
            OmegaConf.save(trainer.cfg.model, directory / MODEL_CONFIG)
        state = state_dict(trainer, step)
        no_dist = not dist.is_initialized()
        if trainer.cfg.checkpoint["async"]:
            # DCP stages a private copy before returning; a background thread writes it
            # over a gloo group of its own while the loop goes on with its collectives.
            return dcp.async_save(state, checkpoint_id=str(directory),
                                  process_group=trainer.checkpoint_group, no_dist=no_dist)
        dcp.save(state, checkpoint_id=str(directory), no_dist=no_dist)
        return None

    def load(self, directory: Path, trainer: Trainer) -> int:
        keys = checkpoint_keys(directory)
        with_optimizer = any(k.endswith(".exp_avg") for k in keys)
        with_master = any(k.endswith(".master") for k in keys)
        state = empty_like_state(trainer, with_optimizer, with_master)
        if "data.consumed_samples" not in keys:  # saved before positions were recorded
            del state["data.consumed_samples"]
        missing = sorted(k for k in state if k not in keys)
        if missing:
            raise UserError(
                f"checkpoint {directory} does not fit this model: it lacks {missing[:3]} "
                f"({len(missing)} keys); valid: a checkpoint of the same model.* config.")
        dcp.load(state, checkpoint_id=str(directory), no_dist=not dist.is_initialized())
        return apply_state(trainer, state, with_optimizer)
