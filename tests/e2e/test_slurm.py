"""launch/slurm_trn1.sbatch under a real SLURM: slurmctld and slurmd on this machine."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SHORT = ["train.max_steps=6", "train.seq_len=32", "train.global_batch_size=8",
         "logging.progress_bar=false", "data.max_bytes=300000"]
CONF = """ClusterName=trntrain
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
NodeName={host} CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def slurm(tmp_path):
    if os.geteuid() != 0 or not all(shutil.which(b) for b in ("slurmctld", "slurmd", "munged")):
        pytest.skip("needs root and Debian's slurm-wlm (.ci/run installs it)")
    if subprocess.run(["munge", "-n"], capture_output=True).returncode != 0:
        Path("/run/munge").mkdir(exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        if not Path("/etc/munge/munge.key").exists():
            subprocess.run(["mungekey", "-c"], check=True)
        subprocess.run(["munged", "--force"], check=True)
    d = tmp_path / "slurm"
    for sub in ("state", "spool"):
        (d / sub).mkdir(parents=True)
    conf = d / "slurm.conf"
    conf.write_text(CONF.format(host=socket.gethostname(), d=d, cpus=os.cpu_count(),
                                ctld_port=free_port(), d_port=free_port()))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    subprocess.run(["slurmctld", "-f", str(conf)], env=env, check=True)
    subprocess.run(["slurmd", "-f", str(conf)], env=env, check=True)
    deadline = time.monotonic() + 60
    while "idle" not in subprocess.run(["sinfo", "-h", "-o", "%t"], env=env,
                                       capture_output=True, text=True).stdout:
        assert time.monotonic() < deadline, (d / "slurmd.log").read_text()
        time.sleep(0.5)
    yield env
    subprocess.run(["scontrol", "shutdown"], env=env)


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
