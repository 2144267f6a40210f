"""launch/slurm_trn1.sbatch under a real SLURM: slurmctld and slurmd on this machine."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.slurm_cluster import slurm_cluster

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SHORT = ["train.max_steps=6", "train.seq_len=32", "train.global_batch_size=8",
         "logging.progress_bar=false", "data.max_bytes=300000"]


@pytest.fixture
def slurm(tmp_path):
    with slurm_cluster(tmp_path / "slurm") as env:
        yield env


def test_sbatch_trains_on_slurm(slurm, tmp_path):
    env = {**slurm, "PROCS_PER_NODE": "2", "BACKEND": "cpu", "RUN_DIR": str(tmp_path / "run"),
           "TRNTRAIN_VENV": str(BIN.parent), "OMP_NUM_THREADS": "1",
           "NEURON_CACHE": str(tmp_path / "cache"), "NEURON_CACHE_PER_HOST": "1"}
    job = subprocess.run(["sbatch", "--parsable", "--nodes=1", f"--output={tmp_path}/%j.out",
                          str(ROOT / "launch" / "slurm_trn1.sbatch"), *SHORT], cwd=ROOT,
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    deadline = time.monotonic() + 240
    while subprocess.run(["squeue", "-h", "-j", job], env=env, capture_output=True,
                         text=True).stdout.strip():
        assert time.monotonic() < deadline
        time.sleep(1)
    output = (tmp_path / f"{job}.out").read_text()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in records][-1] == 6, output
    assert "dp=2" in (tmp_path / "run" / "train.log").read_text()
    # The node's wrapper gave the run its per-host compile cache, named on the node.
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert f"compile_cache_dir: {tmp_path / 'cache' / socket.gethostname()}" in config
    single = subprocess.run([str(BIN / "trntrain"), "train", *SHORT, "run.dir=single"],
                            cwd=tmp_path, env=env, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    expected = [json.loads(line)["loss"] for line in (tmp_path / "single" / "metrics.jsonl").open()]
    assert [r["loss"] for r in records] == pytest.approx(expected, rel=1e-5)


def test_sbatch_node_wrapper_without_slurm(tmp_path):
    """The script's real path, srun replaced by a plain exec of its command: the
    per-node wrapper names the per-host cache, gives it to the config and starts
    torchrun, which trains."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text('#!/bin/sh\nshift\nexec "$@"\n')  # drop --kill-on-bad-exit
    (fake / "srun").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "PROCS_PER_NODE": "1",
           "BACKEND": "cpu", "RUN_DIR": str(tmp_path / "run"), "OMP_NUM_THREADS": "1",
           "NEURON_CACHE": str(tmp_path / "cache"), "NEURON_CACHE_PER_HOST": "1",
           "TRNTRAIN_VENV": str(BIN.parent)}
    for key in ("SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_JOB_NUM_NODES", "DRY_RUN"):
        env.pop(key, None)
    proc = subprocess.run([str(ROOT / "launch" / "slurm_trn1.sbatch"), *SHORT], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert records[-1]["step"] == 6
    cache = tmp_path / "cache" / socket.gethostname()
    assert f"compile_cache_dir: {cache}" in (tmp_path / "run" / "config.yaml").read_text()
