"""A real SLURM on this machine for the tests: slurmctld and slurmd (Debian's slurm-wlm,
which .ci/run installs), one node with every core, one partition `debug`."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

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
# Every job's final state, written by slurmctld: the tests' reference for job states.
JobCompType=jobcomp/filetxt
JobCompLoc={d}/jobcomp.log
# A cancelled job's processes get SIGKILL this long after SIGTERM (default 30 s).
KillWait=10
# A requeued job waits this long before it starts again (default 120 s).
AuthInfo=cred_expire=5
# The scheduler looks for startable jobs every second instead of every minute or so.
SchedulerParameters=sched_interval=1,bf_interval=1
NodeName={host} CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def slurm_cluster(d: Path) -> Iterator[dict[str, str]]:
    """Start SLURM with its files in `d`; yields the environment that reaches it
    (SLURM_CONF set). Skips the test where it cannot run (not root, no slurm-wlm)."""
    if os.geteuid() != 0 or not all(shutil.which(b) for b in ("slurmctld", "slurmd", "munged")):
        pytest.skip("needs root and Debian's slurm-wlm (.ci/run installs it)")
    if subprocess.run(["munge", "-n"], capture_output=True).returncode != 0:
        Path("/run/munge").mkdir(exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        if not Path("/etc/munge/munge.key").exists():
            subprocess.run(["mungekey", "-c"], check=True)
        subprocess.run(["munged", "--force"], check=True)
    for sub in ("state", "spool"):
        (d / sub).mkdir(parents=True)
    conf = d / "slurm.conf"
    conf.write_text(CONF.format(host=socket.gethostname(), d=d, cpus=os.cpu_count(),
                                ctld_port=free_port(), d_port=free_port()))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    subprocess.run(["slurmctld", "-f", str(conf)], env=env, check=True)
    subprocess.run(["slurmd", "-f", str(conf)], env=env, check=True)
    try:
        deadline = time.monotonic() + 60
        while "idle" not in subprocess.run(["sinfo", "-h", "-o", "%t"], env=env,
                                           capture_output=True, text=True).stdout:
            assert time.monotonic() < deadline, (d / "slurmd.log").read_text()
            time.sleep(0.5)
        yield env
    finally:
        subprocess.run(["scontrol", "shutdown"], env=env)


def job_records(d: Path) -> dict[str, list[str]]:
    """slurmctld's job completion records, the cluster's own account of its jobs: each
    job's states at the ends of its runs (one per run: a requeued job has several), by
    job id, an array task's as ARRAYID_TASK."""
    states: dict[str, list[str]] = {}
    log = d / "jobcomp.log"
    for line in log.read_text().splitlines() if log.is_file() else []:
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        job = fields["JobId"]
        if fields.get("ArrayTaskId", "").isdigit():
            job = f"{fields['ArrayJobId']}_{fields['ArrayTaskId']}"
        states.setdefault(job, []).append(fields["JobState"])
    return states
