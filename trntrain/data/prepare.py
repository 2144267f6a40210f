"""`trntrain prepare`: tokenize JSONL, text or parquet files into an indexed dataset
(`<output>.bin` + `<output>.idx`, Megatron-Core's format), on several processes.

The inputs are cut into units (byte ranges of JSONL files, whole text files,
parquet row groups). Each worker tokenizes a unit into a shard of its own under
`<output>.shards/`; the shards are then merged in input order, so the result does
not depend on the number of workers. Every document ends with the end-of-text
token. A plan of the inputs (paths, sizes, modification times) and settings is
kept with the shards and, once done, in `<output>.prepare.json`:

- the output appears complete or not at all (the writer renames it into place);
- re-running with the same plan finds the output up to date and does nothing;
- re-running after an interruption keeps the shards that were finished;
- any change of inputs or settings starts over.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np
from tqdm import tqdm

from trntrain.data.indexed import IndexedDataset, IndexedDatasetWriter, merge, optimal_dtype
from trntrain.data.text import (
    JSONL_SUFFIXES,
    TEXT_SUFFIXES,
    BadLines,
    iter_jsonl,
    read_text,
    tokenize_documents,
)
from trntrain.data.tokenizer import Tokenizer, build_tokenizer
from trntrain.errors import UserError

logger = logging.getLogger(__name__)

PARQUET_SUFFIXES = (".parquet",)
UNIT_BYTES = 64 << 20


@dataclass(frozen=True)
class Settings:
    tokenizer: str = "byte"
    eot_token: str | None = None
    text_key: str = "text"
    on_bad_line: str = "fail"


@dataclass(frozen=True)
class Unit:
    """A piece of one input: a byte range [start, stop) of a JSONL file, a whole text
    file (start = stop = 0), or parquet row group `start`."""

    path: str
    kind: str
    start: int
    stop: int
    size: int  # bytes of input, for the progress bar


def input_files(inputs: list[str]) -> list[Path]:
    from trntrain.data.text import resolve_files

    suffixes = JSONL_SUFFIXES + TEXT_SUFFIXES + PARQUET_SUFFIXES
    files: list[Path] = []
    for spec in inputs:
        files += resolve_files(spec, suffixes, field="input")
    for f in files:
        if f.suffix not in suffixes:
            raise UserError(f"input {f} has an unknown suffix {f.suffix!r}; valid: JSON lines "
                            f"({', '.join(JSONL_SUFFIXES)}), text ({', '.join(TEXT_SUFFIXES)}) "
                            f"or parquet (.parquet).")
    return files


def plan_units(files: list[Path], unit_bytes: int = UNIT_BYTES) -> list[Unit]:
    units = []
    for f in files:
        size = f.stat().st_size
        if f.suffix in JSONL_SUFFIXES:
            bounds = list(range(0, size, unit_bytes)) + [size]
            units += [Unit(str(f), "jsonl", a, b, b - a) for a, b in pairwise(bounds)]
        elif f.suffix in TEXT_SUFFIXES:
            units.append(Unit(str(f), "text", 0, 0, size))
        else:
            groups = _parquet_file(f).metadata.num_row_groups
            units += [Unit(str(f), "parquet", g, g + 1, size // max(groups, 1))
                      for g in range(groups)]
    return units


def _parquet_file(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"input {path}: parquet needs the 'pyarrow' package: "
                        f"pip install 'trntrain[hf]'.") from None
    try:
        return pq.ParquetFile(path)
    except Exception as err:  # noqa: BLE001 - pyarrow's errors do not name the file
        raise UserError(f"input {path} is not a readable parquet file ({err}).") from None


def unit_texts(unit: Unit, settings: Settings, bad: BadLines) -> Iterator[tuple[str, str]]:
    path = Path(unit.path)
    if unit.kind == "jsonl":
        yield from iter_jsonl(path, settings.text_key, bad, unit.start, unit.stop)
    elif unit.kind == "text":
        yield str(path), read_text(path)
    else:
        table = _parquet_file(path).read_row_group(unit.start)
        if settings.text_key not in table.column_names:
            raise UserError(f"input {path}: no column {settings.text_key!r} (--text-key); "
                            f"valid: one of {table.column_names}.")
        for i, text in enumerate(table.column(settings.text_key).to_pylist()):
            if isinstance(text, str):
                yield f"{path.name}:{unit.start}:{i}", text
            else:
                bad.bad(f"{path} row group {unit.start} row {i}",
                        f"{settings.text_key!r} is {type(text).__name__}, not a string")


def tokenize_unit(task: tuple[Unit, str, Settings]) -> tuple[int, str | None, str | None]:
    """Write one unit's documents to the shard `prefix` (kept if already complete);
    returns (malformed lines skipped, the first of them, an error message)."""
    unit, prefix, settings = task
    if IndexedDataset.exists(prefix):
        return 0, None, None
    # Loaded by the parent already: a forked worker finds it in build_tokenizer's cache.
    tokenizer = build_tokenizer(settings.tokenizer, settings.eot_token)
    bad = BadLines(settings.on_bad_line, "--on-bad-line=skip")
    try:
        with IndexedDatasetWriter(prefix, optimal_dtype(tokenizer.vocab_size)) as writer:
            eot = np.array([tokenizer.eot_id], dtype=writer.dtype)
            for _, tokens in tokenize_documents(unit_texts(unit, settings, bad), tokenizer):
                writer.add_document(np.concatenate([tokens.astype(writer.dtype, copy=False), eot]))
    except UserError as err:
        # Workers' exceptions cross a pipe as text; the message is what matters.
        return bad.count, bad.first, str(err)
    return bad.count, bad.first, None


def _fingerprint(files: list[Path], settings: Settings) -> dict:
    return {
        "inputs": [{"path": str(f.resolve()), "size": f.stat().st_size,
                    "mtime_ns": f.stat().st_mtime_ns} for f in files],
        "settings": asdict(settings),
    }


def unit_size(input_bytes: int, workers: int) -> int:
    """Several units per worker, so that they finish together; no more than UNIT_BYTES."""
    return int(min(UNIT_BYTES, max(1 << 20, input_bytes // (4 * workers))))


@dataclass
class PrepareResult:
    output: str
    documents: int
    tokens: int
    input_bytes: int
    seconds: float
    skipped_lines: int
    up_to_date: bool = False


def prepare(inputs: list[str], output: str, settings: Settings, workers: int = 1,
            progress: bool = True, unit_bytes: int | None = None) -> PrepareResult:
    start = time.perf_counter()
    if settings.on_bad_line not in ("fail", "skip"):
        raise UserError(f"--on-bad-line={settings.on_bad_line!r} is invalid; valid: fail or skip.")
    if workers < 1:
        raise UserError(f"--workers={workers} is invalid; valid: an integer >= 1.")
    files = input_files(inputs)
    tokenizer = build_tokenizer(settings.tokenizer, settings.eot_token)  # fail early, once
    plan = _fingerprint(files, settings)
    record = Path(f"{output}.prepare.json")
    input_bytes = sum(f["size"] for f in plan["inputs"])
    unit_bytes = unit_bytes or unit_size(input_bytes, workers)
    if IndexedDataset.exists(output) and record.is_file():
        done = json.loads(record.read_text())
        if done.get("plan") == plan:
            dataset = IndexedDataset(output)
            return PrepareResult(output, dataset.num_documents, dataset.num_tokens, input_bytes,
                                 time.perf_counter() - start, done.get("skipped_lines", 0),
                                 up_to_date=True)
    shards = Path(f"{output}.shards")
    manifest = shards / "plan.json"
    shard_plan = {**plan, "unit_bytes": unit_bytes}
    if not (manifest.is_file() and json.loads(manifest.read_text()) == shard_plan):
        shutil.rmtree(shards, ignore_errors=True)
        shards.mkdir(parents=True)
        manifest.write_text(json.dumps(shard_plan, indent=1))
    units = plan_units(files, unit_bytes)
    tasks = [(u, str(shards / f"shard_{i:06d}"), settings) for i, u in enumerate(units)]
    skipped, first_bad = 0, None
    with tqdm(total=input_bytes, unit="B", unit_scale=True, desc="prepare",
              disable=not progress, mininterval=0.5) as bar, \
            WorkerPool(min(workers, len(tasks))) as pool:
        results = pool.imap(tokenize_unit, tasks) if pool else map(tokenize_unit, tasks)
        for (unit, _, _), (count, first, error) in zip(tasks, results, strict=True):
            if error:
                raise UserError(error)
            skipped += count
            first_bad = first_bad or first
            bar.update(unit.size)
    if tasks:
        merge([prefix for _, prefix, _ in tasks], output)
    else:
        _write_empty(output, tokenizer)
    dataset = IndexedDataset(output)
    if skipped:
        logger.warning("skipped %d malformed line(s), the first at %s", skipped, first_bad)
    tmp = record.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"plan": plan, "skipped_lines": skipped,
                               "documents": dataset.num_documents,
                               "tokens": dataset.num_tokens}, indent=1))
    os.replace(tmp, record)
    shutil.rmtree(shards, ignore_errors=True)
    return PrepareResult(output, dataset.num_documents, dataset.num_tokens, input_bytes,
                         time.perf_counter() - start, skipped)


def _write_empty(output: str, tokenizer: Tokenizer) -> None:
    with IndexedDatasetWriter(output, optimal_dtype(tokenizer.vocab_size)):
        pass


class WorkerPool:
    """A process pool for several workers, none (work in this process) for one."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.pool = None

    def __enter__(self):
        if self.workers > 1:
            # fork where there is one: a spawned worker would spend seconds importing torch.
            # The parent has not encoded anything yet, so no tokenizer thread pool is forked.
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            self.pool = multiprocessing.get_context(method).Pool(self.workers)
        return self.pool

    def __exit__(self, *exc: object) -> None:
        if self.pool is None:
            return
        if exc[0] is None:
            self.pool.close()
        else:
            self.pool.terminate()
        self.pool.join()
