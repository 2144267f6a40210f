"""Run economics on the XLA code path: a graph compiled after warm-up is reported once
with the step and what changed (or stops the run with backend.recompile=error), the
default run reports nothing, and compilation is its own item of goodput."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from tests.conftest import tiny_config
from trntrain.data import DATA_SOURCES, Batch
from trntrain.data.corpus import CorpusSource
from trntrain.distributed import World
from trntrain.errors import UserError
from trntrain.trainer import Trainer

GLOBAL_BATCH = 8  # tiny_config's train.global_batch_size
SHRINK_FROM_STEP = 6


class ShrinkingSource(CorpusSource):
    """The corpus, but from step 6 on its training rows are `length` tokens instead of
    32: a shape change well after warm-up, as a data source with a short tail would make.
    (Each test shrinks to its own length: the graphs of a shape compiled by an earlier
    test stay in this process's cache.)"""

    length = 0

    def batch(self, split: str, indices: torch.Tensor, shuffle: bool = True) -> Batch:
        batch = super().batch(split, indices, shuffle)
        if split == "train" and int(indices.min()) >= (SHRINK_FROM_STEP - 1) * GLOBAL_BATCH:
            return Batch(batch.inputs[:, :self.length], batch.labels[:, :self.length])
        return batch


def shrinking(monkeypatch, length: int) -> tuple[str, ...]:
    monkeypatch.setitem(DATA_SOURCES, "shrinking", ShrinkingSource)
    monkeypatch.setattr(ShrinkingSource, "length", length)
    return ("data.source=shrinking",)


def recompile_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "after warm-up" in r.getMessage()]


def test_a_shape_change_after_warm_up_is_reported_once(monkeypatch, caplog):
    cfg = tiny_config(*shrinking(monkeypatch, 24), "backend=xla", "train.max_steps=9")
    with caplog.at_level(logging.WARNING, logger="trntrain"):
        records = Trainer(cfg, World()).fit()
    (message,) = recompile_warnings(caplog)
    assert message.startswith(f"step {SHRINK_FROM_STEP}: the step compiled")
    assert "micro-batch 0 inputs (8, 32) int64 -> (8, 24) int64" in message
    assert "micro-batch 0 labels (8, 32) int64 -> (8, 24) int64" in message
    assert len(records) == 9  # warn: the run goes on


def test_recompile_error_stops_the_run_with_the_message(monkeypatch):
    cfg = tiny_config(*shrinking(monkeypatch, 16), "backend=xla", "train.max_steps=9",
                      "backend.recompile=error")
    with pytest.raises(UserError, match=f"step {SHRINK_FROM_STEP}: the step compiled .* "
                                        r"inputs \(8, 32\) int64 -> \(8, 16\) int64"):
        Trainer(cfg, World()).fit()


def test_the_default_run_reports_nothing_and_counts_compile_time(caplog, tmp_path):
    # Rows of 40 tokens: graphs no other test of this process compiled.
    cfg = tiny_config("backend=xla", "train.max_steps=8", "train.eval_every=3",
                      "train.seq_len=40", "checkpoint=dcp", "checkpoint.every=4")
    with caplog.at_level(logging.WARNING, logger="trntrain"):
        records = Trainer(cfg, World(), run_dir=tmp_path).fit()
    assert recompile_warnings(caplog) == []
    assert records[-1]["xla_compiles"] > 0 and records[-1]["xla_compile_s"] > 0
    ledger = json.loads((tmp_path / "goodput.json").read_text())
    # The first steps compile their graphs: on XLA that time is its own item.
    assert ledger["seconds"]["compilation"] > 0 and ledger["seconds"]["productive"] > 0
    assert sum(ledger["fractions"].values()) == pytest.approx(1.0, abs=0.01)
