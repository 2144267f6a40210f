"""The reference log-probabilities DPO compares the policy against.

`objective.reference=model`: every step runs a forward of a frozen copy of the initial
weights (sharded and pipelined like the policy), or, under peft=lora, of the policy
itself with its adapters off (no copy at all). `precomputed`: one forward pass over
every pair before the first step, with the policy's initial weights, stored in
`<run.dir>/reference_logps.safetensors` keyed by the data and the reference weights, and
reused on resume; no second model is held during training. Both attach (chosen,
rejected) summed log-probabilities to each micro-batch (`Batch.reference`) on the stage
that scores the labels.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from trntrain.data.base import SPLITS, Batch
from trntrain.errors import UserError
from trntrain.objective.preference import PairLogps
from trntrain.parallel.comm import all_reduce
from trntrain.parallel.pipeline import PipelineRunner

REFERENCE_FILE = "reference_logps.safetensors"


class LogpsForward:
    """(chosen, rejected) summed log-probabilities, (rows, 2), of each micro-batch under
    some weights: `chunks` (this rank's, plain or pipelined), `context` entered around
    the forward (e.g. LoRA adapters off). None on stages without the labels."""

    def __init__(self, chunks: dict[int, nn.Module], pipeline: PipelineRunner | None,
                 policy_logps: Callable[[torch.Tensor, Batch], PairLogps],
                 autocast: Callable[[], contextlib.AbstractContextManager],
                 cut_graph: Callable[[], None],
                 context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
                 ) -> None:
        self.chunks = chunks
        self.policy_logps = policy_logps
        self.autocast = autocast
        self.cut_graph = cut_graph
        self.context = context
        self.pipeline = None
        if pipeline is not None:
            # The policy's schedule and transport, these chunks, a loss that keeps the
            # log-probabilities of each micro-batch instead of reducing them.
            self.pipeline = copy.copy(pipeline)
            self.pipeline.chunks = chunks
            self.pipeline.loss_fn = self._keep
        self._kept: dict[int, torch.Tensor] = {}

    def _logps(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        p = self.policy_logps(logits, batch)
        return torch.stack([p.chosen, p.rejected], dim=-1).float()

    def _keep(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        self._kept[id(batch)] = self._logps(logits, batch)
        return torch.zeros((), device=logits.device)

    @torch.no_grad()
    def __call__(self, micro_batches: list[Batch]) -> list[torch.Tensor | None]:
        training = [c.training for c in self.chunks.values()]
        for chunk in self.chunks.values():
            chunk.eval()
        try:
            with self.context():
                if self.pipeline is not None:
                    self._kept.clear()
                    self.pipeline.forward(micro_batches,
                                          torch.ones((), device=micro_batches[0].pairs.device))
                    return [self._kept.pop(id(b), None) for b in micro_batches]
                (model,) = self.chunks.values()
                out = []
                for batch in micro_batches:
                    with self.autocast():
                        logits = model(batch.inputs, **batch.model_kwargs())
                        out.append(self._logps(logits, batch))
                    self.cut_graph()
                return out
        finally:
            for chunk, was in zip(self.chunks.values(), training, strict=True):
                chunk.train(was)


class ModelReference:
    """The reference computed each step by a forward (a frozen copy, or adapters off)."""

    def __init__(self, forward: LogpsForward) -> None:
        self.forward = forward

    def attach(self, split: str, micro_batches: list[Batch]) -> list[Batch]:
        logps = self.forward(micro_batches)
        return [b if r is None else b._replace(reference=r)
                for b, r in zip(micro_batches, logps, strict=True)]


class PrecomputedReference:
    """The reference looked up by pair index in tables computed once (train and val)."""

    def __init__(self, tables: dict[str, torch.Tensor]) -> None:
        self.tables = tables

    def attach(self, split: str, micro_batches: list[Batch]) -> list[Batch]:
        table = self.tables[split]
        return [b._replace(reference=table[b.pairs]) if b.labels.numel() else b
                for b in micro_batches]


def compute_tables(forward: LogpsForward, num_pairs: dict[str, int],
                   split_steps: Callable[[str], Iterator[list[Batch]]],
                   device: torch.device, groups: list) -> dict[str, torch.Tensor]:
    """Every pair's reference log-probabilities, (pairs, 2) per split, on every rank.

    `split_steps(split)`: this rank's micro-batches of each step over the split's pairs,
    read in order, on the device; each rank fills the pairs it scores, the rest stay
    -inf, and a max over `groups` (dp, pp) gives every rank the whole table."""
    tables = {}
    for split in SPLITS:
        table = torch.full((num_pairs[split], 2), -math.inf, device=device)
        for micro_batches in split_steps(split):
            for batch, logps in zip(micro_batches, forward(micro_batches), strict=True):
                if logps is not None:
                    table[batch.pairs] = logps
        for group in groups:
            if group is not None:
                table = all_reduce(table, group, dist.ReduceOp.MAX)
        tables[split] = table
    return tables


def reference_key(fingerprint: str, model_name: str, precision: str) -> str:
    return f"{fingerprint}:{model_name}:{precision}"


def load_tables(path: Path, data_key: str, ref_key: str, num_pairs: dict[str, int]
                ) -> dict[str, torch.Tensor] | None:
    """The stored tables of `path` (None if there is none); a UserError if they were
    computed for other data or other reference weights."""
    if not path.is_file():
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tables = {split: f.get_tensor(split) for split in SPLITS}
    except (SafetensorError, OSError, KeyError) as err:
        raise UserError(f"{path}: not a readable reference log-probability file ({err}); "
                        f"delete it to compute the reference again.") from None
    if meta.get("data") != data_key or any(
            tuple(tables[s].shape) != (num_pairs[s], 2) for s in SPLITS):
        raise UserError(
            f"{path}: the stored reference log-probabilities were computed for other "
            f"preference data than this run's (data.path, data.tokenizer or train.seq_len "
            f"changed); valid: the data they were computed for, or another run.dir (or "
            f"delete the file to compute them again).")
    if meta.get("reference") != ref_key:
        raise UserError(
            f"{path}: the stored reference log-probabilities were computed with other "
            f"reference weights (checkpoint.init_from, train.seed, model or "
            f"train.precision changed); valid: the same reference, or another run.dir.")
    return tables


def save_tables(path: Path, tables: dict[str, torch.Tensor], data_key: str, ref_key: str
                ) -> None:
    """Written whole or not at all: a temporary file renamed into place."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({s: t.detach().cpu().contiguous() for s, t in tables.items()}, str(tmp),
              metadata={"data": data_key, "reference": ref_key})
    os.replace(tmp, path)


__all__ = ["REFERENCE_FILE", "LogpsForward", "ModelReference", "PrecomputedReference",
           "compute_tables", "load_tables", "save_tables", "reference_key"]
