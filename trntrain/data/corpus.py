"""The default corpus: the Python standard library's source files, on every machine."""

from __future__ import annotations

import functools
import sysconfig
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from trntrain.data.base import DataSource, is_validation, pack_documents
from trntrain.data.tokenizer import ByteTokenizer
from trntrain.errors import UserError


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(root: Path) -> list[Path]:
    """Every .py file under root in a fixed order, third-party packages excluded."""
    files = [
        p for p in root.rglob("*.py")
        if not ({"site-packages", "dist-packages"} & set(p.relative_to(root).parts))
    ]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


@functools.lru_cache(maxsize=1)
def stdlib_files() -> tuple[Path, ...]:
    """The default corpus's files, listed once per process (a second of directory walking,
    which processes forked after the first listing inherit)."""
    return tuple(corpus_files(stdlib_root()))


class CorpusSource(DataSource):
    """Byte-level tokens, one document per file, an end-of-text token after each."""

    tokenizer = ByteTokenizer()
    eot_id = tokenizer.eot_id

    @classmethod
    def tokenizer_vocab_size(cls, data_cfg: DictConfig, model_cfg: DictConfig) -> int:
        return cls.tokenizer.vocab_size

    @classmethod
    def marks_document_ends(cls, data_cfg: DictConfig) -> bool:
        return True

    def load_streams(self, model_cfg: DictConfig) -> dict[str, np.ndarray]:
        root = Path(self.cfg.root) if self.cfg.root else stdlib_root()
        if not root.is_dir():
            raise UserError(f"data.root={str(root)!r} is not a directory; valid: a directory "
                             f"of .py files, or null for the Python standard library.")
        files = list(stdlib_files()) if not self.cfg.root else corpus_files(root)
        if not files:
            raise UserError(f"data.root={str(root)!r} holds no .py files; valid: a directory "
                             f"of .py files, or null for the Python standard library.")
        documents: dict[str, list[np.ndarray]] = {"train": [], "val": []}
        # max_bytes is shared between the splits in proportion to val_fraction.
        limit = self.cfg.max_bytes
        budget = {"train": float("inf"), "val": float("inf")} if limit is None else {
            "train": limit * (1 - self.cfg.val_fraction), "val": limit * self.cfg.val_fraction}
        for path in files:
            split = "val" if is_validation(path.relative_to(root).as_posix(),
                                           self.cfg.val_fraction) else "train"
            if budget[split] <= 0:
                continue
            data = path.read_bytes()
            if limit is not None:
                data = data[:int(budget[split])]
                budget[split] -= len(data)
            documents[split].append(self.tokenizer.encode(data))
        tok = self.tokenizer
        return {split: pack_documents(docs, tok.eot_id, tok.vocab_size)
                for split, docs in documents.items()}
