"""A Hugging Face dataset on local disk: a `save_to_disk` directory, or parquet, arrow
or json files. Never the hub: `data.path` must exist here.

Rows give text (`data.text_key`, tokenized when the run starts) or token ids
already (`data.tokens_key`, read as they are).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from trntrain.data.base import DataSource, pack_documents, split_documents
from trntrain.data.text import resolve_files, tokenize_documents
from trntrain.data.tokenizer import build_tokenizer
from trntrain.errors import UserError

# What Dataset.save_to_disk and DatasetDict.save_to_disk leave in their directory.
SAVED_MARKERS = ("state.json", "dataset_dict.json")
FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json"}


def load_local_dataset(path: str | None, split: str):
    """The `datasets.Dataset` at `path` (one split of a DatasetDict)."""
    # Local files only: the library must not look anything up on the hub.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import datasets
    except ImportError:
        raise UserError("data.source=hf needs the 'datasets' package: "
                        "pip install 'trntrain[hf]'.") from None
    saved = path and any((Path(path) / name).is_file() for name in SAVED_MARKERS)
    if saved:
        try:
            dataset = datasets.load_from_disk(str(path))
        except Exception as err:  # noqa: BLE001 - any unreadable directory is the same error
            raise UserError(f"data.path={path!r}: datasets.load_from_disk failed ({err}); "
                            f"valid: a directory written by Dataset.save_to_disk.") from None
    else:
        files = resolve_files(path, tuple(FILE_BUILDERS))
        builders = {FILE_BUILDERS[f.suffix] for f in files}
        if len(builders) != 1:
            raise UserError(f"data.path={path!r} mixes file types {sorted(builders)}; valid: "
                            f"files of one type among {sorted(FILE_BUILDERS)}.")
        try:
            dataset = datasets.load_dataset(builders.pop(), data_files=[str(f) for f in files],
                                            split="train")
        except Exception as err:  # noqa: BLE001
            raise UserError(f"data.path={path!r}: the files do not load as a dataset "
                            f"({err}).") from None
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise UserError(f"data.split={split!r} is not a split of {path}; valid: "
                            f"{sorted(dataset)}.")
        dataset = dataset[split]
    return dataset


def column(dataset, key: str, field: str, path: str) -> Iterator:
    if key not in dataset.column_names:
        raise UserError(f"{field}={key!r} is not a column of {path}; valid: one of "
                        f"{dataset.column_names}.")
    for batch in dataset.iter(batch_size=1024):
        yield from batch[key]


class HFSource(DataSource):
    @classmethod
    def marks_document_ends(cls, data_cfg: DictConfig) -> bool:
        return not data_cfg.tokens_key  # pre-tokenized rows carry no added separator

    @classmethod
    def tokenizer_vocab_size(cls, data_cfg: DictConfig, model_cfg: DictConfig) -> int | None:
        if data_cfg.tokens_key:
            return None  # ids from another tokenizer: checked as they are read
        return build_tokenizer(data_cfg.tokenizer, data_cfg.eot_token).vocab_size

    @classmethod
    def check_files(cls, data_cfg: DictConfig) -> None:
        if not any((Path(data_cfg.path or "") / m).is_file() for m in SAVED_MARKERS):
            resolve_files(data_cfg.path, tuple(FILE_BUILDERS))

    def load_streams(self, model_cfg: DictConfig) -> dict[str, np.ndarray]:
        c = self.cfg
        dataset = load_local_dataset(c.path, c.split)
        if c.tokens_key:
            # Pre-tokenized rows carry their own separators, if any: none is added.
            docs = ((f"{i}", np.asarray(ids))
                    for i, ids in enumerate(column(dataset, c.tokens_key, "data.tokens_key",
                                                   c.path)))
            eot, vocab = None, model_cfg.vocab_size
        else:
            tokenizer = build_tokenizer(c.tokenizer, c.eot_token)
            texts = ((f"{i}", text) for i, text in
                     enumerate(column(dataset, c.text_key, "data.text_key", c.path)))
            docs = tokenize_documents(texts, tokenizer)
            eot, vocab = tokenizer.eot_id, tokenizer.vocab_size
        self.eot_id = eot
        splits = split_documents(docs, c.val_fraction)
        if eot is None:
            return {s: np.concatenate(d) if d else np.empty(0, np.int64)
                    for s, d in splits.items()}
        return {s: pack_documents(d, eot, vocab) for s, d in splits.items()}
