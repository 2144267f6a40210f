"""Data sources by name (`data.source`); packages add theirs through the
`trntrain.data` entry point group with a DataSource subclass."""

from __future__ import annotations

from omegaconf import DictConfig

from trntrain.data.base import SPLITS, DataSource
from trntrain.data.blend import BlendSource, blend_entries
from trntrain.data.chat import ChatSource
from trntrain.data.corpus import CorpusSource
from trntrain.data.hf import HFSource
from trntrain.data.indexed_source import IndexedSource
from trntrain.data.loader import Batch, StepBatches
from trntrain.data.preference import PreferenceSource
from trntrain.data.synthetic import SyntheticSource
from trntrain.data.text import JsonlSource, TextSource
from trntrain.data.tokenizer import ByteTokenizer, build_tokenizer
from trntrain.plugins import Registry

DATA_SOURCES: Registry[type[DataSource]] = Registry("trntrain.data")
DATA_SOURCES["corpus"] = CorpusSource
DATA_SOURCES["synthetic"] = SyntheticSource
DATA_SOURCES["indexed"] = IndexedSource
DATA_SOURCES["jsonl"] = JsonlSource
DATA_SOURCES["text"] = TextSource
DATA_SOURCES["hf"] = HFSource
DATA_SOURCES["chat"] = ChatSource
DATA_SOURCES["preference"] = PreferenceSource


def build_data_source(cfg: DictConfig) -> DataSource:
    """The source cfg.data names (or the blend of data.blend's), windows of
    cfg.train.seq_len + 1."""
    t = cfg.train
    if not cfg.data.blend:
        return DATA_SOURCES[cfg.data.source](cfg.data, cfg.model, t.seq_len, t.seed)
    entries = blend_entries(cfg.data)
    # Each component shuffles in its own order: a source named twice is read twice over.
    components = [DATA_SOURCES[d.source](d, cfg.model, t.seq_len, t.seed + 1 + i)
                  for i, (_, d) in enumerate(entries)]
    return BlendSource(cfg.data, components, [w for w, _ in entries])


__all__ = [
    "Batch",
    "BlendSource",
    "ByteTokenizer",
    "DATA_SOURCES",
    "DataSource",
    "SPLITS",
    "StepBatches",
    "build_data_source",
    "build_tokenizer",
]
