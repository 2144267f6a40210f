"""Data sources by name (`data.source`); packages add theirs through the
`trntrain.data` entry point group with a DataSource subclass."""

from __future__ import annotations

from omegaconf import DictConfig

from trntrain.data.base import SPLITS, DataSource
from trntrain.data.corpus import CorpusSource
from trntrain.data.loader import Batch, StepBatches
from trntrain.data.synthetic import SyntheticSource
from trntrain.data.tokenizer import ByteTokenizer
from trntrain.plugins import Registry

DATA_SOURCES: Registry[type[DataSource]] = Registry("trntrain.data")
DATA_SOURCES["corpus"] = CorpusSource
DATA_SOURCES["synthetic"] = SyntheticSource


def build_data_source(cfg: DictConfig) -> DataSource:
    """The source named by cfg.data.source, windows of cfg.train.seq_len + 1."""
    return DATA_SOURCES[cfg.data.source](cfg.data, cfg.model, cfg.train.seq_len, cfg.train.seed)


__all__ = [
    "Batch",
    "ByteTokenizer",
    "DATA_SOURCES",
    "DataSource",
    "SPLITS",
    "StepBatches",
    "build_data_source",
]
