"""`data.source=indexed`: a Megatron-Core indexed dataset as a memory-mapped stream.

The .bin holds every document back to back, so each split is one slice of the
memory map and nothing is read before a window is: a terabyte dataset opens in the
time it takes to check its index. The last `data.val_fraction` of the documents
are held out (contiguous, as Megatron's document split). Documents must carry
their end-of-document token, as `trntrain prepare` and Megatron's
`preprocess_data.py --append-eod` write them.
"""

from __future__ import annotations

import numpy as np
from omegaconf import DictConfig

from trntrain.data.base import DataSource
from trntrain.data.indexed import IndexedDataset, bin_path, idx_path
from trntrain.data.tokenizer import build_tokenizer
from trntrain.errors import UserError


class IndexedSource(DataSource):
    @classmethod
    def tokenizer_vocab_size(cls, data_cfg: DictConfig, model_cfg: DictConfig) -> int | None:
        if data_cfg.tokenizer is None:
            return None
        return build_tokenizer(data_cfg.tokenizer, data_cfg.eot_token).vocab_size

    @classmethod
    def marks_document_ends(cls, data_cfg: DictConfig) -> bool:
        # `trntrain prepare` ends each document with its tokenizer's end-of-text token.
        return data_cfg.tokenizer is not None

    @classmethod
    def check_files(cls, data_cfg: DictConfig) -> None:
        if not data_cfg.path:
            raise UserError("data.path is not set; valid: the prefix of an indexed dataset, "
                            "e.g. data/corpus for data/corpus.bin and data/corpus.idx.")
        for path in (idx_path(data_cfg.path), bin_path(data_cfg.path)):
            if not path.is_file():
                raise UserError(f"{path} does not exist; valid: data.path is the prefix of an "
                                f"indexed dataset's two files, PREFIX.bin and PREFIX.idx "
                                f"(without the suffix).")

    def load_streams(self, model_cfg: DictConfig) -> dict[str, np.ndarray]:
        self.check_files(self.cfg)
        if self.cfg.tokenizer is not None:
            self.eot_id = build_tokenizer(self.cfg.tokenizer, self.cfg.eot_token).eot_id
        dataset = IndexedDataset(self.cfg.path)
        docs = dataset.num_documents
        held_out = max(1, round(docs * self.cfg.val_fraction))
        if docs < 2:
            raise UserError(f"data.path={self.cfg.path!r} holds {docs} document(s); valid: at "
                            f"least 2, one or more of them held out for evaluation.")
        first_val = dataset.document_indices[docs - held_out]
        boundary = (int(dataset.sequence_pointers[first_val]) // dataset.dtype.itemsize
                    if first_val < len(dataset) else dataset.num_tokens)
        tokens = np.frombuffer(dataset.tokens, dataset.dtype) if dataset.num_tokens else \
            dataset.tokens
        return {"train": tokens[:boundary], "val": tokens[boundary:]}
