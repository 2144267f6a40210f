"""A data source of packed rows with ragged documents and masked labels, for tests of
document masking and loss normalisation independent of any chat template.

Each row holds documents of random lengths (positions restarting at 0, one document
index each), then padding (its own document, labels ignored); within documents a
random share of the labels is ignored, different in every row, so that a mean of
per-micro-batch means differs from the mean over the global batch's trained tokens.
"""

from __future__ import annotations

import numpy as np
import torch
from omegaconf import DictConfig

from trntrain.data import DATA_SOURCES
from trntrain.data.base import IGNORE_INDEX, Batch, DataSource

NAME = "test_packed"
WINDOWS = 64


def row(seed: int, index: int, seq_len: int, vocab: int) -> tuple[Batch, list[tuple[int, int]]]:
    """One packed row (batch of 1) and its documents as (start, stop) ranges."""
    gen = torch.Generator().manual_seed(seed * 100_003 + index)
    inputs = torch.randint(0, vocab, (seq_len,), generator=gen)
    labels = torch.randint(0, vocab, (seq_len,), generator=gen)
    positions = torch.zeros(seq_len, dtype=torch.int64)
    documents = torch.zeros(seq_len, dtype=torch.int64)
    keep = torch.rand(seq_len, generator=gen) < (0.1 + 0.8 * torch.rand((), generator=gen))
    labels = labels.masked_fill(~keep, IGNORE_INDEX)
    spans, start, doc = [], 0, 0
    padding = int(torch.randint(0, seq_len // 4, (), generator=gen))
    while start < seq_len - padding:
        length = min(int(torch.randint(1, seq_len // 2, (), generator=gen)),
                     seq_len - padding - start)
        positions[start:start + length] = torch.arange(length)
        documents[start:start + length] = doc
        spans.append((start, start + length))
        start, doc = start + length, doc + 1
    positions[start:] = torch.arange(seq_len - start)
    documents[start:] = doc
    labels[start:] = IGNORE_INDEX
    batch = Batch(inputs[None], labels[None], positions[None], documents[None])
    return batch, spans


class PackedTestSource(DataSource):
    packed = True

    @classmethod
    def tokenizer_vocab_size(cls, data_cfg: DictConfig, model_cfg: DictConfig) -> int:
        return model_cfg.vocab_size

    def load_streams(self, model_cfg: DictConfig) -> dict[str, np.ndarray]:
        self.vocab = model_cfg.vocab_size
        return {split: np.zeros(WINDOWS * self.seq_len, np.int64) for split in ("train", "val")}

    def num_samples(self, split: str) -> int:
        return WINDOWS

    def batch(self, split: str, indices: torch.Tensor, shuffle: bool = True) -> Batch:
        offset = 0 if split == "train" else WINDOWS
        windows = self._orders[split].windows(indices, shuffle)
        rows = [row(self.seed, offset + int(i), self.seq_len, self.vocab)[0] for i in windows]
        fields = zip(*(r[:4] for r in rows), strict=True)  # inputs ... documents
        return Batch(*(torch.cat(parts) for parts in fields))


DATA_SOURCES[NAME] = PackedTestSource
