"""`trntrain plan` for a Qwen3 size from the real command line: a verdict either way."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

TRNTRAIN = str(Path(sys.executable).parent / "trntrain")
QWEN3_8B_4_NODES = ["model=qwen3_8b", "cluster=trn1_32xlarge", "cluster.nodes=4",
                    "parallel.tp=8"]


def plan(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([TRNTRAIN, "plan", *QWEN3_8B_4_NODES, *args], env=env,
                          capture_output=True, text=True, timeout=120)


def test_fp32_adam_on_tp8_does_not_fit():
    # fp32 weights, gradients and Adam's moments of 8.19 B parameters over tp=8: 16 bytes
    # x 8.19e9 / 8 = 15.3 GiB per core before any activation, above the 14 GiB budget.
    proc = plan()
    assert proc.returncode == 0, proc.stderr
    assert "plan: qwen3_8b on 4 x trn1_32xlarge (128 cores)" in proc.stdout
    assert "DOES NOT FIT in 14 GiB" in proc.stdout


def test_bf16_zero1_with_checkpointing_fits():
    proc = plan("train.precision=bf16", "parallel.zero1=true", "parallel.sequence_parallel=true",
                "parallel.activation_checkpointing=full", "train.seq_len=4096",
                "train.global_batch_size=64", "plan.format=json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert (result["tp"], result["pp"], result["dp"]) == (8, 1, 16)
    assert result["fits"] is True
    assert result["memory_per_core_gib"] <= result["memory_budget_gib"] == 14.0
