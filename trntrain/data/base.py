"""DataSource: a plugin that yields token streams, packed into seq_len + 1 windows."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from omegaconf import DictConfig

from trntrain.errors import UserError

SPLITS = ("train", "val")


class DataSource(ABC):
    """One token stream per split; sample i is the window [i*T, i*T + T + 1).

    Windows do not overlap and run across document boundaries, where the
    end-of-text token separates documents, as in GPT-style pretraining.
    """

    def __init__(self, data_cfg: DictConfig, model_cfg: DictConfig, seq_len: int,
                 seed: int) -> None:
        self.cfg = data_cfg
        self.seq_len = seq_len
        self.seed = seed
        self._streams = self.load_streams(model_cfg)
        for split in SPLITS:
            if self.num_samples(split) == 0:
                raise UserError(
                    f"data.source={data_cfg.source}: the {split} split holds "
                    f"{len(self._streams[split])} tokens, too few for one window of "
                    f"train.seq_len + 1 = {seq_len + 1}; give the source more data or lower "
                    f"train.seq_len or data.val_fraction."
                )

    @classmethod
    @abstractmethod
    def tokenizer_vocab_size(cls, cfg: DictConfig) -> int:
        """The number of token ids the source can emit (model.vocab_size must cover it)."""

    @abstractmethod
    def load_streams(self, model_cfg: DictConfig) -> dict[str, torch.Tensor]:
        """One 1-D integer token tensor per split in SPLITS."""

    def num_tokens(self, split: str) -> int:
        return len(self._streams[split])

    def num_samples(self, split: str) -> int:
        return max(len(self._streams[split]) - 1, 0) // self.seq_len

    def samples(self, split: str, indices: torch.Tensor) -> torch.Tensor:
        """Windows (len(indices), seq_len + 1) as int64."""
        offsets = indices[:, None] * self.seq_len + torch.arange(self.seq_len + 1)
        return self._streams[split][offsets].long()
