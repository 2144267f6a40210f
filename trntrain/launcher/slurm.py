"""SLURM's client commands (sinfo, sbatch, squeue, scontrol, sacct), each failure as one
UserError line.

Job ids are SLURM's array form, `ARRAYID_TASK`, which every command here accepts and
which stays the same when a task is requeued.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping

from trntrain.errors import UserError

# States in which a job still holds or waits for nodes: its point is not submitted again.
ACTIVE_STATES = frozenset({
    "PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED",
    "CONFIGURING", "COMPLETING", "STOPPED", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD",
})
TIMEOUT_S = 60.0
_VALID_CLIENT = ("valid: run it where SLURM's client commands reach a running slurmctld "
                 "(`sinfo` answers), e.g. a login node of the cluster")


class SlurmError(UserError):
    """A SLURM command that could not run or failed."""


def run(args: list[str], env: Mapping[str, str] | None = None, check: bool = True
        ) -> subprocess.CompletedProcess[str]:
    """Run a SLURM client command; SlurmError when it is missing, hangs or (with `check`)
    fails, naming the command and the last line it printed."""
    if shutil.which(args[0], path=(env or os.environ).get("PATH")) is None:
        raise SlurmError(f"SLURM is not reachable: {args[0]} is not on PATH; {_VALID_CLIENT}.")
    try:
        proc = subprocess.run(args, env=None if env is None else dict(env),
                              capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise SlurmError(f"SLURM is not reachable: `{' '.join(args[:2])}` did not answer "
                         f"within {TIMEOUT_S:.0f} s; {_VALID_CLIENT}.") from None
    if check and proc.returncode != 0:
        raise SlurmError(f"`{' '.join(args[:2])}` failed: {last_line(proc.stderr)}")
    return proc


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no message)"


def partitions(env: Mapping[str, str] | None = None) -> list[str]:
    """The cluster's partitions; SlurmError, one line, when SLURM does not answer."""
    proc = run(["sinfo", "--noheader", "--format=%R"], env, check=False)
    if proc.returncode != 0:
        raise SlurmError(f"SLURM is not reachable: sinfo failed: {last_line(proc.stderr)}; "
                         f"{_VALID_CLIENT}.")
    return sorted(set(proc.stdout.split()))


def submit(script: str, flags: Iterable[str], env: Mapping[str, str]) -> str:
    """sbatch the script with `flags`; the job id (of an array: the array's id)."""
    proc = run(["sbatch", "--parsable", *flags, script], env, check=False)
    if proc.returncode != 0:
        raise SlurmError(f"sbatch refused the job: {last_line(proc.stderr)}; nothing was "
                         f"submitted.")
    job = proc.stdout.strip().split(";")[0]  # `ID;CLUSTER` on a federation
    if not job.isdigit():
        raise SlurmError(f"sbatch answered {proc.stdout.strip()!r}, not a job id.")
    return job


def _expand_tasks(spec: str) -> list[str]:
    """ArrayTaskId of a pending array's record, e.g. `1,3-5%2`, as its task ids."""
    tasks: list[str] = []
    for part in spec.split("%")[0].split(","):
        if "-" in part:
            low, high = part.split("-", 1)
            tasks.extend(str(t) for t in range(int(low), int(high) + 1))
        elif part:
            tasks.append(part)
    return tasks


def _from_scontrol(text: str) -> dict[str, str]:
    states: dict[str, str] = {}
    for line in text.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        state = fields.get("JobState")
        if not state:
            continue
        array, tasks = fields.get("ArrayJobId"), fields.get("ArrayTaskId")
        if array and tasks:
            for task in _expand_tasks(tasks):
                states[f"{array}_{task}"] = state
        elif "JobId" in fields:
            states[fields["JobId"]] = state
    return states


def _from_sacct(text: str) -> dict[str, str]:
    states: dict[str, str] = {}
    for line in text.splitlines():
        job, _, state = line.partition("|")
        if job and state and "." not in job:  # steps (ID.batch, ID.0) are not jobs
            # `CANCELLED by 0`: the state alone.
            states[job] = state.split()[0]
    return states


def job_states(jobs: Iterable[str], env: Mapping[str, str] | None = None
               ) -> dict[str, str] | None:
    """SLURM's state of each job (`ARRAYID_TASK` or a plain id) it still knows: from the
    controller (jobs that run, wait or ended in the last MinJobAge seconds), then from
    accounting (sacct, where slurmdbd keeps it). None when SLURM does not answer."""
    wanted = set(jobs)
    states: dict[str, str] = {}
    for array in sorted({job.split("_")[0] for job in wanted}):
        try:
            proc = run(["scontrol", "--oneliner", "show", "job", array], env, check=False)
        except SlurmError:
            return None
        if proc.returncode == 0:
            states.update({j: s for j, s in _from_scontrol(proc.stdout).items() if j in wanted})
        elif "Invalid job id" not in proc.stderr:  # not a job it forgot: no answer
            return None
    missing = sorted(wanted - set(states))
    if missing:
        try:
            acct = run(["sacct", "--noheader", "--parsable2", "--allocations",
                        "--format=JobID,State", f"--jobs={','.join(missing)}"], env, check=False)
        except SlurmError:
            acct = None
        # Without slurmdbd, sacct fails: what the controller knows is all there is.
        if acct is not None and acct.returncode == 0:
            states.update({j: s for j, s in _from_sacct(acct.stdout).items() if j in wanted})
    return states
