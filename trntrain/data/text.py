"""Local text files as documents: JSON lines (`jsonl`, a document per line) and plain
text (`text`, a document per file), tokenized when the run starts.

`data.path` is a file, a directory (its files with the source's suffixes, in
sorted order) or a glob. For corpora too large to tokenize at every start, run
`trntrain prepare` once and train on the `indexed` output.
"""

from __future__ import annotations

import glob
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from trntrain.data.base import DataSource, pack_documents, split_documents
from trntrain.data.tokenizer import Tokenizer, build_tokenizer
from trntrain.errors import UserError

logger = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
TEXT_SUFFIXES = (".txt", ".text", ".md")
ENCODE_BATCH = 512


def resolve_files(path: str | None, suffixes: tuple[str, ...], field: str = "data.path"
                  ) -> list[Path]:
    """The files a path names: itself, a directory's files with `suffixes`, or a glob's."""
    if not path:
        raise UserError(f"{field} is not set; valid: a file, a directory or a glob of "
                        f"{'/'.join(suffixes)} files.")
    p = Path(path).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in suffixes)
    else:
        files = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
    if not files:
        raise UserError(f"{field}={path!r} names no {'/'.join(suffixes)} file; valid: a file, "
                        f"a directory holding such files, or a glob that matches some.")
    return files


class BadLines:
    """Malformed JSONL lines: fail at the first, or skip them and count."""

    def __init__(self, policy: str, skip_setting: str = "data.on_bad_line=skip") -> None:
        self.policy = policy
        self.skip_setting = skip_setting
        self.count = 0
        self.first: str | None = None

    def bad(self, where: str, why: str) -> None:
        if self.policy == "fail":
            raise UserError(f"{where}: {why}; fix the line, or set {self.skip_setting} to skip "
                            f"such lines and count them.")
        self.count += 1
        self.first = self.first or f"{where}: {why}"

    def report(self, what: str) -> None:
        if self.count:
            logger.warning("%s: skipped %d malformed line(s), the first at %s", what,
                           self.count, self.first)


def iter_jsonl(path: Path, text_key: str, bad: BadLines, start: int = 0, stop: int | None = None
               ) -> Iterator[tuple[str, str]]:
    """(key, text) of each line whose byte offset is in [start, stop): a line belongs to
    the range its first byte falls in, so ranges split a file between workers."""
    with path.open("rb") as f:
        if start:
            f.seek(start - 1)
            f.readline()  # finish the line that started before `start`
        line_no = None if start else 0
        while stop is None or f.tell() < stop:
            offset = f.tell()
            raw = f.readline()
            if not raw:
                break
            line_no = line_no + 1 if line_no is not None else None
            where = f"{path}:{line_no}" if line_no is not None else f"{path} at byte {offset}"
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as err:
                bad.bad(where, f"not valid JSON ({err})")
                continue
            if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                bad.bad(where, f"no string field {text_key!r} (data.text_key)")
                continue
            yield f"{path.name}@{offset}", record[text_key]


def tokenize_documents(texts: Iterator[tuple[str, str]], tokenizer: Tokenizer
                       ) -> Iterator[tuple[str, np.ndarray]]:
    """(key, tokens) per document, encoded in batches (the Rust tokenizers thread them)."""
    batch: list[tuple[str, str]] = []
    for item in texts:
        batch.append(item)
        if len(batch) == ENCODE_BATCH:
            yield from _encoded(batch, tokenizer)
            batch = []
    yield from _encoded(batch, tokenizer)


def _encoded(batch: list[tuple[str, str]], tokenizer: Tokenizer
             ) -> Iterator[tuple[str, np.ndarray]]:
    if batch:
        keys, texts = zip(*batch, strict=True)
        yield from zip(keys, tokenizer.encode_batch(list(texts)), strict=True)


class TextDocumentsSource(DataSource):
    """Documents from files, held out for validation by a hash of their key."""

    suffixes: tuple[str, ...] = ()

    @classmethod
    def tokenizer_vocab_size(cls, data_cfg: DictConfig, model_cfg: DictConfig) -> int:
        return build_tokenizer(data_cfg.tokenizer, data_cfg.eot_token).vocab_size

    @classmethod
    def marks_document_ends(cls, data_cfg: DictConfig) -> bool:
        return True

    @classmethod
    def check_files(cls, data_cfg: DictConfig) -> None:
        resolve_files(data_cfg.path, cls.suffixes)

    def documents(self, files: list[Path]) -> Iterator[tuple[str, str]]:
        raise NotImplementedError

    def load_streams(self, model_cfg: DictConfig) -> dict[str, np.ndarray]:
        tokenizer = build_tokenizer(self.cfg.tokenizer, self.cfg.eot_token)
        self.eot_id = tokenizer.eot_id
        files = resolve_files(self.cfg.path, self.suffixes)
        splits = split_documents(tokenize_documents(self.documents(files), tokenizer),
                                 self.cfg.val_fraction)
        return {split: pack_documents(docs, tokenizer.eot_id, tokenizer.vocab_size)
                for split, docs in splits.items()}


class JsonlSource(TextDocumentsSource):
    """One document per line: the string field `data.text_key` of a JSON object."""

    suffixes = JSONL_SUFFIXES

    def documents(self, files: list[Path]) -> Iterator[tuple[str, str]]:
        bad = BadLines(self.cfg.on_bad_line)
        for path in files:
            yield from iter_jsonl(path, self.cfg.text_key, bad)
        bad.report(f"data.path={self.cfg.path}")


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text ({err}); valid: UTF-8 files.") from None


class TextSource(TextDocumentsSource):
    """One document per UTF-8 file."""

    suffixes = TEXT_SUFFIXES

    def documents(self, files: list[Path]) -> Iterator[tuple[str, str]]:
        for path in files:
            yield str(path), read_text(path)
