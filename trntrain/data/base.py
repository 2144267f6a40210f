"""DataSource: a plugin that yields token streams, packed into seq_len + 1 windows."""

from __future__ import annotations

import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np
import torch
from omegaconf import DictConfig

from trntrain.data.indexed import optimal_dtype
from trntrain.errors import UserError

SPLITS = ("train", "val")
# A label the loss does not count (torch's cross_entropy default ignore_index).
IGNORE_INDEX = -100
NOTHING = torch.empty(0, dtype=torch.int64)


class Batch(NamedTuple):
    """Rows of token ids and their next-token labels, (rows, seq_len) each.

    Packed data (several documents per row) also carries each token's position within
    its document and its document's index in the row: attention then stays within a
    document and rotary positions restart at each. None: one causal sequence per row.
    """

    inputs: torch.Tensor
    labels: torch.Tensor  # IGNORE_INDEX where the loss does not count
    positions: torch.Tensor | None = None
    documents: torch.Tensor | None = None
    # Preference rows (data=preference): each row's pair index in its split, and the
    # reference log-probabilities of its (chosen, rejected) responses, (rows, 2), once
    # the objective has attached them.
    pairs: torch.Tensor | None = None
    reference: torch.Tensor | None = None

    def model_kwargs(self) -> dict[str, torch.Tensor]:
        """What the model takes besides the inputs (nothing for unpacked rows, so
        families without document masking train on them)."""
        if self.documents is None:
            return {}
        return {"positions": self.positions, "documents": self.documents}

    def split(self, size: int) -> list[Batch]:
        """Micro-batches of `size` rows (an empty field stays empty in each)."""
        count = max(len(t) for t in self if t is not None) // size

        def parts(t: torch.Tensor | None) -> list:
            if t is None:
                return [None] * count
            return list(t.split(size)) if t.numel() else [t] * count

        return [Batch(*fields) for fields in zip(*(parts(t) for t in self), strict=True)]


class EpochOrder:
    """Global sample g -> window perm_e[g mod n] of epoch e = g div n, perm_e drawn from
    (seed, e): every epoch visits each window once, in its own seeded order."""

    def __init__(self, num_windows: int, seed: int) -> None:
        self.num_windows = num_windows
        self.seed = seed
        self._epoch: int | None = None
        self._perm: torch.Tensor | None = None

    def windows(self, samples: torch.Tensor, shuffle: bool) -> torch.Tensor:
        if not shuffle:
            return samples % self.num_windows
        out = torch.empty_like(samples)
        epochs = samples // self.num_windows
        for epoch in epochs.unique().tolist():
            mask = epochs == epoch
            out[mask] = self._permutation(epoch)[samples[mask] % self.num_windows]
        return out

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._epoch != epoch:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm = torch.randperm(self.num_windows, generator=gen)
            self._epoch = epoch
        return self._perm


class DataSource(ABC):
    """One token stream per split; window i is the stream's [i*T, i*T + T + 1).

    Windows do not overlap and run across document boundaries, where the
    end-of-text token separates documents, as in GPT-style pretraining. A stream
    is a 1-D numpy array of any integer dtype: in memory, or a memory map of a
    file that may be far larger than memory.
    """

    def __init__(self, data_cfg: DictConfig, model_cfg: DictConfig, seq_len: int,
                 seed: int) -> None:
        self.cfg = data_cfg
        self.model_cfg = model_cfg
        self.seq_len = seq_len
        self.seed = seed
        self._streams = self.load_streams(model_cfg)
        self._orders = {split: EpochOrder(self.num_samples(split), seed) for split in SPLITS}
        for split in SPLITS:
            if self.num_samples(split) == 0:
                raise UserError(
                    f"{self.describe()}: the {split} split holds {self.num_tokens(split)} "
                    f"tokens, too few for one window of train.seq_len + 1 = {seq_len + 1}; give "
                    f"the source more data or lower train.seq_len or data.val_fraction."
                )

    @classmethod
    @abstractmethod
    def tokenizer_vocab_size(cls, data_cfg: DictConfig, model_cfg: DictConfig) -> int | None:
        """The number of token ids the source can emit (model.vocab_size must cover it),
        or None where only the data can tell (ids are then checked as they are read)."""

    # Whether every sample is a packed row of whole documents (with positions and
    # document indices) rather than a window of a stream.
    packed = False
    # The token that ends each document of the stream (data.document_masking cuts
    # windows into documents after it); None where the stream does not mark them.
    eot_id: int | None = None

    @property
    def ids_unchecked(self) -> bool:
        """Whether the ids must be checked as they are read (no tokenizer vouches for them)."""
        return self.tokenizer_vocab_size(self.cfg, self.model_cfg) is None

    @classmethod
    def check_files(cls, data_cfg: DictConfig) -> None:
        """Raise a UserError if the files the config names are missing: a cheap check,
        run before any process group is created (their contents are checked on load)."""
        return None  # sources that read no files have nothing to check

    @abstractmethod
    def load_streams(self, model_cfg: DictConfig) -> dict[str, np.ndarray]:
        """One 1-D integer token array per split in SPLITS."""

    def describe(self) -> str:
        path = self.cfg.get("path")
        return f"data.source={self.cfg.source}" + (f" ({path})" if path else "")

    def num_tokens(self, split: str) -> int:
        return len(self._streams[split])

    def num_samples(self, split: str) -> int:
        return max(self.num_tokens(split) - 1, 0) // self.seq_len

    def windows(self, split: str, indices: torch.Tensor) -> torch.Tensor:
        """Windows (len(indices), seq_len + 1) as int64, by window index."""
        stream, width = self._streams[split], self.seq_len + 1
        rows = [stream[i * self.seq_len: i * self.seq_len + width] for i in indices.tolist()]
        if not rows:
            return torch.empty(0, width, dtype=torch.int64)
        return torch.from_numpy(np.stack(rows).astype(np.int64, copy=False))

    def samples(self, split: str, indices: torch.Tensor, shuffle: bool = True) -> torch.Tensor:
        """Global samples (any index >= 0, epochs after the first reshuffled) as windows."""
        return self.windows(split, self._orders[split].windows(indices, shuffle))

    @classmethod
    def marks_document_ends(cls, data_cfg: DictConfig) -> bool:
        """Whether the stream of this config ends each document with `eot_id` (what
        data.document_masking needs); checked before the run."""
        return False

    def batch(self, split: str, indices: torch.Tensor, shuffle: bool = True) -> Batch:
        """Global samples as inputs and next-token labels; with data.document_masking,
        each window's documents (cut after each end-of-text token) attend only to
        themselves, their positions restarting at 0."""
        windows = self.samples(split, indices, shuffle)
        inputs, labels = windows[:, :-1], windows[:, 1:]
        if not self.cfg.get("document_masking", False):
            return Batch(inputs, labels)
        documents, positions = document_layout(inputs, self.eot_id)
        return Batch(inputs, labels, positions, documents)


def document_layout(inputs: torch.Tensor, eot_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(document index, position within the document) of each token of rows that hold
    documents each ended by `eot_id` (the end-of-text token belongs to the document it
    ends; a row may start or stop inside one)."""
    ends = inputs == eot_id
    starts = torch.zeros_like(ends)
    starts[:, 1:] = ends[:, :-1]
    documents = starts.cumsum(dim=1)
    index = torch.arange(inputs.shape[1]).expand_as(inputs)
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return documents, index - first


def split_documents(documents: Iterable[tuple[str, np.ndarray]], val_fraction: float
                    ) -> dict[str, list[np.ndarray]]:
    """Each document's tokens into the split its key falls in (see is_validation)."""
    splits: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    for key, tokens in documents:
        splits["val" if is_validation(key, val_fraction) else "train"].append(tokens)
    return splits


def pack_documents(documents: Iterable[np.ndarray], eot_id: int, vocab_size: int) -> np.ndarray:
    """One stream: each document's tokens followed by the end-of-text token."""
    dtype = optimal_dtype(vocab_size)
    eot = np.array([eot_id], dtype=dtype)
    pieces = [p for doc in documents for p in (doc.astype(dtype, copy=False), eot)]
    return np.concatenate(pieces) if pieces else np.empty(0, dtype=dtype)


def is_validation(key: str, val_fraction: float) -> bool:
    """Held out by a hash of the document's key (a path, path:line): stable whichever
    other documents exist."""
    return zlib.crc32(key.encode()) % 10_000 < val_fraction * 10_000
