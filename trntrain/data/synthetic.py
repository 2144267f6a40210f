"""Uniform random tokens over the model's vocabulary: for benchmarks and smoke tests."""

from __future__ import annotations

import numpy as np
import torch
from omegaconf import DictConfig

from trntrain.data.base import DataSource


class SyntheticSource(DataSource):
    @classmethod
    def tokenizer_vocab_size(cls, data_cfg: DictConfig, model_cfg: DictConfig) -> int:
        return model_cfg.vocab_size

    def load_streams(self, model_cfg: DictConfig) -> dict[str, np.ndarray]:
        gen = torch.Generator().manual_seed(self.seed)
        total = self.cfg.num_tokens
        tokens = torch.randint(0, model_cfg.vocab_size, (total,), generator=gen,
                               dtype=torch.int32).numpy()
        n_val = max(int(total * self.cfg.val_fraction), self.seq_len + 1)
        return {"train": tokens[n_val:], "val": tokens[:n_val]}
