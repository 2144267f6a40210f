"""Goodput across a SIGKILL and its resume: the steps run after the last checkpoint are
counted as lost exactly, every second is in one category, and each record carries the
run's goodput so far."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from trntrain.metrics.goodput import CATEGORIES

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SHORT = ["train.seq_len=32", "train.global_batch_size=8", "train.eval_every=4",
         "logging.every=1", "logging.progress_bar=false", "data.max_bytes=200000",
         "optim.warmup_steps=2", "train.max_steps=10", "checkpoint=dcp", "checkpoint.every=3",
         "run.dir=run"]


def train(cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "trntrain", "train", *SHORT, *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=240)


def test_a_kill_and_resume_count_the_lost_steps_exactly(tmp_path):
    # Killed right after optimizer step 8: steps 7 and 8 ran after the checkpoint of
    # step 6 and are run again by the resume.
    killed = train(tmp_path, env={"TRNTRAIN_FAULT": "kill:8"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    first = json.loads((tmp_path / "run" / "goodput.json").read_text())
    assert first["attempts"][0]["steps_reached"] == 8
    resumed = train(tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    ledger = json.loads((tmp_path / "run" / "goodput.json").read_text())
    earlier, last = ledger["attempts"]
    assert earlier["lost_steps"] == [7, 8] and ledger["lost_steps"] == 2
    assert (last["start_step"], last["steps_reached"]) == (6, 10)
    assert ledger["seconds"]["lost_to_restarts"] > 0
    assert set(ledger["fractions"]) == set(CATEGORIES)
    assert sum(ledger["fractions"].values()) == pytest.approx(1.0, abs=0.01)
    assert ledger["seconds"]["startup"] > 0 and ledger["seconds"]["evaluation"] > 0
    assert ledger["seconds"]["checkpoint"] > 0 and ledger["seconds"]["productive"] > 0
    # Eager CPU compiles no graphs.
    assert ledger["seconds"]["compilation"] == 0
    records = [json.loads(line) for line in
               (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 11))
    assert all(0 < r["goodput"] < 1 for r in records)
