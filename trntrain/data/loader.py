"""Which samples each rank reads at each step: a pure function of the position.

The run reads global samples 0, 1, 2, ... in order (the source maps each to a
window: shuffled by epoch, or blended across sources). Step s takes the global
batch of G samples starting at the position `consumed + (s - resumed) * G`, where
a fresh run starts from 0 and a resumed one from the position its checkpoint
recorded. Data-parallel rank r takes the r-th contiguous share and splits it into
micro-batches, so dp ranks read disjoint samples that together cover the batch,
the ranks of a tp group (same dp rank) read identical ones, and every layout of
the same global batch sees the same samples. Pipeline stages that need neither
the inputs (the first) nor the labels (the last) read nothing. Under context
parallelism the ranks of a cp group read the same samples and each keeps its
zig-zag part of the inputs and labels (positions and documents stay whole: the
model's attention masks need the whole sequence's).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from trntrain.data.base import NOTHING, Batch, DataSource
from trntrain.errors import UserError
from trntrain.parallel.context import shard_sequence


class StepBatches:
    def __init__(self, source: DataSource, split: str, global_batch_size: int,
                 micro_batch_size: int, dp_rank: int, dp_size: int, shuffle: bool = True,
                 inputs: bool = True, labels: bool = True, vocab_size: int | None = None,
                 context: tuple[int, int] = (0, 1)) -> None:
        """vocab_size: check every id read against it (for data whose tokenizer is unknown);
        context: (cp rank, cp), the part of each sequence this rank keeps."""
        self.source = source
        self.split = split
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.shuffle = shuffle
        self.inputs = inputs
        self.labels = labels
        self.vocab_size = vocab_size
        self.cp_rank, self.cp = context
        self.start_step = 0
        self.start_sample = 0

    @property
    def accumulation_steps(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def resume(self, step: int, consumed_samples: int) -> None:
        """Continue after optimizer step `step`, at global sample `consumed_samples`."""
        self.start_step, self.start_sample = step, consumed_samples

    def consumed_samples(self, step: int) -> int:
        """The position after optimizer step `step` (the next global sample to read)."""
        return self.start_sample + (step - self.start_step) * self.global_batch_size

    def step(self, step: int) -> list[Batch]:
        """This rank's micro-batches of optimizer step `step` (0-based)."""
        packed = bool(self.source.cfg.get("document_masking", False)) or self.source.packed
        if not (self.inputs or self.labels or packed):
            return [Batch(NOTHING, NOTHING)] * self.accumulation_steps
        share = self.global_batch_size // self.dp_size
        first = self.consumed_samples(step) + self.dp_rank * share
        batch = self.source.batch(self.split, torch.arange(first, first + share), self.shuffle)
        if self.vocab_size is not None and batch.inputs.numel() and (
                top := int(max(batch.inputs.max(), batch.labels.max()))) >= self.vocab_size:
            raise UserError(
                f"{self.source.describe()}: token id {top} in the {self.split} "
                f"split is outside model.vocab_size={self.vocab_size}; valid: a model whose "
                f"vocabulary covers the data's tokenizer (set model.vocab_size or data.tokenizer)."
            )
        # Stages that neither embed nor score read only the document layout.
        batch = batch._replace(
            inputs=shard_sequence(batch.inputs, self.cp, self.cp_rank) if self.inputs
            else NOTHING,
            labels=shard_sequence(batch.labels, self.cp, self.cp_rank) if self.labels
            else NOTHING)
        return batch.split(self.micro_batch_size)

    def steps(self, start: int, stop: int) -> Iterator[list[Batch]]:
        for s in range(start, stop):
            yield self.step(s)
