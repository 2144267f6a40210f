"""Model weights alone from a DCP checkpoint (`trntrain generate`): every rank reads the
parameters it holds, its tp slices of them, whatever layout saved the checkpoint, with
no optimizer state and no TrainState.

The checkpoint names every parameter of the plain model with its full shape
(`state.py`), so each rank asks DCP for the full tensors of its own parameters, a few
at a time (`budget_bytes` of them at once), and keeps its slices: no collective, and
no more host memory than its own parameters and one batch of full tensors.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from omegaconf import DictConfig
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from trntrain.checkpoint.dcp import MetadataSafeReader, read_checkpoint_metadata
from trntrain.checkpoint.state import param_key
from trntrain.errors import UserError


@torch.no_grad()
def load_dcp_weights(directory: Path, chunks: Iterable[nn.Module], model_cfg: DictConfig,
                     budget_bytes: int = 1 << 30) -> None:
    """Set this rank's parameters (tp slices where sharded) from the `model.*` tensors of
    the DCP checkpoint in `directory` (UserError: a checkpoint of another model, or an
    unreadable one). Verify its checksums first (`manager.verify_checksums`): only the
    `.metadata` file is checked here."""
    saved = read_checkpoint_metadata(directory).state_dict_metadata
    tied = model_cfg.tie_embeddings
    wanted: list[tuple[nn.Parameter, str, TensorStorageMetadata]] = []
    for chunk in chunks:
        for name, p in chunk.named_parameters(remove_duplicate=False):
            key = f"model.{param_key(name, tied)}"
            full = tuple(getattr(p, "tp_full_shape", p.shape))
            found = saved.get(key)
            if not isinstance(found, TensorStorageMetadata):
                raise UserError(f"checkpoint {directory} has no tensor {key!r}; valid: a "
                                f"checkpoint of this model (model.* as it was saved with).")
            if tuple(found.size) != full:
                raise UserError(f"checkpoint {directory}: {key} has shape {list(found.size)} "
                                f"but the model needs {list(full)}; valid: the model.* "
                                f"settings it was saved with.")
            wanted.append((p, key, found))
    batch: list[tuple[nn.Parameter, str, TensorStorageMetadata]] = []
    size = 0
    for item in wanted:
        nbytes = item[2].size.numel() * item[2].properties.dtype.itemsize
        if batch and size + nbytes > budget_bytes:
            _read(directory, batch)
            batch, size = [], 0
        batch.append(item)
        size += nbytes
    if batch:
        _read(directory, batch)


def _read(directory: Path, batch: list[tuple[nn.Parameter, str, TensorStorageMetadata]]
          ) -> None:
    state = {key: torch.empty(tuple(found.size), dtype=found.properties.dtype)
             for _, key, found in batch}
    try:
        dcp.load(state, storage_reader=MetadataSafeReader(str(directory)), no_dist=True)
    except Exception as err:  # noqa: BLE001 - any unreadable checkpoint is one user error
        failures = getattr(err, "failures", None)
        cause = sorted(failures.items())[0][1][0] if isinstance(failures, dict) and failures \
            else err
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise UserError(f"checkpoint {directory} could not be read ({first}); valid: a "
                        f"complete checkpoint as trntrain wrote it.") from None
    for p, key, _ in batch:
        values = state[key]
        if hasattr(p, "tp_shard"):
            dim, start, length = p.tp_shard
            values = values.narrow(dim, start, length)
        p.copy_(values.to(p.dtype))
