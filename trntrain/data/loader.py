"""Which windows each rank reads at each step: a pure function of (seed, step, rank).

Global sample g of the run is window perm_e[g mod n] of epoch e = g div n, where
perm_e is a permutation drawn from (seed, e). Step s takes the samples
[s*G, (s+1)*G) of the global batch G; data-parallel rank r takes the r-th
contiguous share and splits it into micro-batches. The position in the data is
therefore the step number alone, and every layout of the same global batch sees
the same samples.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from trntrain.data.base import DataSource

Batch = tuple[torch.Tensor, torch.Tensor]


class StepBatches:
    def __init__(self, source: DataSource, split: str, global_batch_size: int,
                 micro_batch_size: int, dp_rank: int, dp_size: int, seed: int,
                 shuffle: bool = True) -> None:
        self.source = source
        self.split = split
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.shuffle = shuffle
        self.num_samples = source.num_samples(split)
        self._perm_epoch: int | None = None
        self._perm: torch.Tensor | None = None

    @property
    def accumulation_steps(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def _window_indices(self, global_indices: torch.Tensor) -> torch.Tensor:
        if not self.shuffle:
            return global_indices % self.num_samples
        out = torch.empty_like(global_indices)
        epochs = global_indices // self.num_samples
        for epoch in epochs.unique().tolist():
            mask = epochs == epoch
            out[mask] = self._permutation(epoch)[global_indices[mask] % self.num_samples]
        return out

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm_epoch != epoch:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm = torch.randperm(self.num_samples, generator=gen)
            self._perm_epoch = epoch
        return self._perm

    def step(self, step: int) -> list[Batch]:
        """This rank's micro-batches (inputs, labels) of optimizer step `step` (0-based)."""
        share = self.global_batch_size // self.dp_size
        first = step * self.global_batch_size + self.dp_rank * share
        windows = self.source.samples(self.split,
                                      self._window_indices(torch.arange(first, first + share)))
        micro = windows.split(self.micro_batch_size)
        return [(w[:, :-1], w[:, 1:]) for w in micro]

    def steps(self, start: int, stop: int) -> Iterator[list[Batch]]:
        for s in range(start, stop):
            yield self.step(s)
