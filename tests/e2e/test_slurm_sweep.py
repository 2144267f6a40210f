"""Hydra sweeps on a real SLURM (`trntrain train -m hydra/launcher=slurm`): every point an
array task of launch/slurm_trn1.sbatch with two torchrun agents, checked against the same
sweep run locally and against slurmctld's own job records; a point cancelled mid-run and
one requeued by the time-limit notice both resume; bad input stops before submitting."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import cli_in_process
from tests.e2e.slurm_cluster import free_port, job_records, slurm_cluster
from trntrain.launcher.sweep import sweep_status

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
TRNTRAIN = str(Path(sys.executable).parent / "trntrain")
LRS = ("0.001", "0.002", "0.004")
RUN = ["train.max_steps=6", "train.seq_len=32", "train.global_batch_size=8",
       "logging.progress_bar=false", "logging.every=1", "data.max_bytes=300000"]
# Two torchrun agents of one process each: the cluster's two "nodes" as two SLURM tasks
# on this machine's one node.
ON_SLURM = ["cluster.nodes=2", "cluster.procs_per_node=1", "backend=cpu", "checkpoint=dcp",
            "checkpoint.every=2", "hydra.launcher.agents_per_node=2"]
# A site's own script (hydra.launcher.script) around trntrain's: in their first run the
# array tasks listed in PAUSE_TASKS stop at the start of step 4 until a signal arrives,
# so that the test can interrupt them mid-run.
SITE_SCRIPT = """#!/usr/bin/env bash
#SBATCH --exclusive
if [ "${{SLURM_RESTART_COUNT:-0}}" = 0 ] &&
   [[ " ${{PAUSE_TASKS:-}} " == *" $SLURM_ARRAY_TASK_ID "* ]]; then
  export TRNTRAIN_FAULT=pause:4
fi
exec {script} "$@"
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    d = tmp_path_factory.mktemp("slurm")
    with slurm_cluster(d) as env:
        yield d, {**env, "OMP_NUM_THREADS": "1", "NEURON_CACHE": str(d / "cache")}


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"{run_dir}: a step logged twice: {steps}"
    return {r["step"]: r["loss"] for r in records}


def last_step(run_dir: Path) -> int | None:
    try:
        return max(losses(run_dir))
    except (OSError, ValueError):  # not written yet, or a line being written
        return None


def queue(env: dict[str, str]) -> str:
    return subprocess.run(["squeue", "--noheader"], env=env, capture_output=True,
                          text=True, check=True).stdout.strip()


def point_jobs(sweep_dir: Path, num: int) -> list[str]:
    return json.loads((sweep_dir / ".slurm" / f"point-{num}.json").read_text())["jobs"]


def status(sweep_dir: Path, env: dict[str, str]) -> list[tuple[str, bool, int]]:
    proc = subprocess.run([TRNTRAIN, "sweep", "status", str(sweep_dir), "--json"], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert all(Path(r["log"]).is_file() for r in rows), rows  # each job's output
    return [(r["state"], r["finished"], r["step"]) for r in rows]


def down_conf(directory: Path) -> Path:
    """A SLURM whose controller is down: its commands fail at once."""
    conf = directory / "down.conf"
    conf.write_text(f"ClusterName=down\nSlurmctldHost=localhost\nSlurmctldPort={free_port()}\n"
                    f"MessageTimeout=1\n")
    return conf


@pytest.mark.timeout(900)  # about 2 minutes on 2 idle cores
def test_sweep_on_slurm_equals_local_and_resumes_interrupted_points(cluster, tmp_path):
    d, env = cluster
    site = tmp_path / "site.sbatch"
    site.write_text(SITE_SCRIPT.format(script=ROOT / "launch" / "slurm_trn1.sbatch"))
    site.chmod(0o755)
    sweep_dir = tmp_path / "sweep"
    command = [TRNTRAIN, "train", "-m", "hydra/launcher=slurm", f"hydra.sweep.dir={sweep_dir}",
               f"hydra.launcher.script={site}", f"optim.lr={','.join(LRS)}", *ON_SLURM, *RUN]
    first = subprocess.run(command, cwd=tmp_path, env={**env, "PAUSE_TASKS": "1 2"},
                           capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert "3 of 3 points submitted" in first.stdout, first.stdout
    jobs = [point_jobs(sweep_dir, n)[-1] for n in range(3)]
    assert len({job.split("_")[0] for job in jobs}) == 1, jobs  # one array job
    # The reference: the same points run one after another on this machine, one process
    # each, by Hydra's own launcher, while SLURM runs them.
    local = subprocess.Popen([TRNTRAIN, "train", "-m", f"optim.lr={','.join(LRS)}", *RUN,
                              f"hydra.sweep.dir={tmp_path / 'local'}"], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    # Points 1 and 2 stop mid-run (step 3 logged): 1 is cancelled as a user would; 2 gets
    # the notice SLURM sends before a time limit (--signal=B:USR1@...), stops at a
    # checkpoint and requeues itself.
    interrupt = {1: ["scancel", jobs[1]], 2: ["scancel", "--batch", "--signal=USR1", jobs[2]]}
    queued = []

    def interrupt_paused_points() -> bool:
        for num in [n for n in interrupt if last_step(sweep_dir / str(n)) == 3]:
            if num == 1:  # meanwhile the command again: nothing to submit
                queued.append(subprocess.run(command, cwd=tmp_path, env=env,
                                             capture_output=True, text=True))
            subprocess.run(interrupt.pop(num), env=env, check=True)
        return not interrupt and not queue(env)

    wait_for(interrupt_paused_points, "the first array job, its points interrupted", 600)
    (meanwhile,) = queued
    assert meanwhile.returncode == 0, meanwhile.stderr
    for expected in (f"#0 optim.lr={LRS[0]}: finished, not submitted again",
                     f"#1 optim.lr={LRS[1]}: job {jobs[1]} is RUNNING, not submitted again",
                     f"#2 optim.lr={LRS[2]}: job {jobs[2]} is PENDING, not submitted again",
                     "0 of 3 points submitted"):
        assert expected in meanwhile.stdout, meanwhile.stdout
    ends = job_records(d)
    assert [ends[job] for job in jobs[:2]] == [["COMPLETED"], ["CANCELLED"]], ends
    # Point 2 ran twice: its first run ended in the requeue (the state it left: pending).
    assert len(ends[jobs[2]]) == 2 and ends[jobs[2]][0] in ("PENDING", "REQUEUED") \
        and ends[jobs[2]][1] == "COMPLETED", ends
    rows = status(sweep_dir, env)
    assert [row[:2] for row in rows] == [("COMPLETED", True), ("CANCELLED", False),
                                         ("COMPLETED", True)], rows
    stopped = rows[1][2]
    assert 3 < stopped < 6, rows  # the cancelled run saved a checkpoint before it ended

    # The same command again: only the unfinished point goes to SLURM, and resumes.
    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert f"#0 optim.lr={LRS[0]}: finished, not submitted again" in again.stdout
    assert f"#2 optim.lr={LRS[2]}: finished, not submitted again" in again.stdout
    resubmitted = point_jobs(sweep_dir, 1)[-1]
    assert (f"#1 optim.lr={LRS[1]}: submitted as job {resubmitted}, resuming after step "
            f"{stopped}") in again.stdout, again.stdout
    assert point_jobs(sweep_dir, 0) == jobs[:1] and point_jobs(sweep_dir, 2) == jobs[2:]
    wait_for(lambda: not queue(env), "the resubmitted point")
    array = resubmitted.split("_")[0]
    assert {job: s for job, s in job_records(d).items() if job.startswith(f"{array}_")} == {
        resubmitted: ["COMPLETED"]}
    assert status(sweep_dir, env) == [("COMPLETED", True, 6)] * 3

    # Every point, interrupted or not, has the losses of its uninterrupted local run.
    out, err = local.communicate(timeout=300)
    assert local.returncode == 0, err
    for num in range(3):
        run_dir = sweep_dir / str(num)
        expected = losses(tmp_path / "local" / str(num))
        got = losses(run_dir)
        assert list(got) == list(range(1, 7))
        assert list(got.values()) == pytest.approx(list(expected.values()), rel=1e-5), num
        # Two ranks, one per torchrun agent (one process per agent).
        assert "dp=2" in (run_dir / "train.log").read_text()
        assert sorted(p.name for p in (run_dir / "logs").iterdir()) == ["rank_0.log",
                                                                        "rank_1.log"]
    rows, _ = sweep_status(tmp_path / "local")  # the local sweep: no SLURM jobs
    assert [(r.state, r.finished) for r in rows] == [("local", True)] * 3
    # SLURM gone: the states are unknown, the progress still read from the run directories.
    rows, reachable = sweep_status(sweep_dir, {**env, "SLURM_CONF": str(down_conf(tmp_path))})
    assert not reachable and [(r.state, r.finished, r.step) for r in rows] == [
        ("unknown", True, 6)] * 3

    report = subprocess.run([TRNTRAIN, "report", str(sweep_dir)], env=env,
                            capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    summary = report.stdout.splitlines()
    for num, lr in enumerate(LRS):
        final = losses(sweep_dir / str(num))[6]
        assert any(f"optim.lr={lr}" in line and f"{final:.4f}" in line for line in summary), \
            report.stdout


@pytest.mark.parametrize("case", ["sweep_dir", "invalid_point", "uncomposable_point",
                                  "unreachable", "partition"])
def test_bad_sweep_input_is_one_line_and_submits_nothing(case, cluster, tmp_path, monkeypatch,
                                                         capfd):
    d, env = cluster
    sweep_dir = tmp_path / "sweep"
    args = ["train", "-m", "hydra/launcher=slurm", f"hydra.sweep.dir={sweep_dir}",
            "optim.lr=1e-3,2e-3", *ON_SLURM, *RUN]
    # The other cases get a cluster whose controller is down: those that must stop before
    # asking SLURM anything would otherwise end in `not reachable`.
    monkeypatch.setenv("SLURM_CONF", env["SLURM_CONF"] if case == "partition"
                       else str(down_conf(tmp_path)))
    expected = {
        "sweep_dir": r"hydra\.sweep\.dir=runs/sweep-\$\{now:%Y%m%d-%H%M%S\} is invalid with "
                     r"hydra/launcher=slurm: .*; valid: a fixed directory .*",
        "invalid_point": r"sweep point #1 \(.*parallel\.tp=3.*\): "
                         r"parallel\.tp=3 is invalid: .*Nothing was submitted\.",
        "uncomposable_point": r"sweep point #1 \(optim\.lr=abc .*\): optim\.lr='abc' is "
                              r"invalid: .*; valid: a value of type float\. Nothing was "
                              r"submitted\.",
        "unreachable": r"SLURM is not reachable: sinfo failed: .*; valid: run it where SLURM's "
                       r"client commands reach a running slurmctld .*",
        "partition": r"hydra\.launcher\.partition='gpu' is not a partition of this SLURM "
                     r"cluster; valid: one of debug, or null for the default partition\. "
                     r"Nothing was submitted\.",
    }[case]
    if case == "sweep_dir":
        args.remove(f"hydra.sweep.dir={sweep_dir}")
        monkeypatch.chdir(tmp_path)
    elif case == "invalid_point":
        args.append("parallel.tp=1,3")
    elif case == "uncomposable_point":
        args[args.index("optim.lr=1e-3,2e-3")] = "optim.lr=1e-3,abc"
    elif case == "partition":
        args.append("hydra.launcher.partition=gpu")
    code, out, err = cli_in_process(args, capfd)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(f"trntrain: error: {expected}", lines[0]), err
    assert not (sweep_dir / ".slurm").exists() and not queue(env)
    if case != "partition":  # refused before the sweeper made its directory
        assert not sweep_dir.exists()
    assert not (tmp_path / "runs").exists()


def test_sweep_status_of_a_directory_without_points_is_one_line(tmp_path, capfd):
    code, _, err = cli_in_process(["sweep", "status", str(tmp_path)], capfd)
    assert code == 2
    assert err == (f"trntrain: error: {tmp_path} holds no sweep points; valid: the "
                   f"hydra.sweep.dir of a `trntrain train -m` sweep (its .slurm/ records or "
                   f"job directories).\n")


def test_job_states_read_from_scontrol_and_sacct_lines():
    """The two formats job_states reads, as SLURM 22.05 prints them: scontrol's one line
    per job (a pending array's tasks as one record with a range) and sacct's JobID|State
    (steps skipped, `CANCELLED by UID` as CANCELLED), which this machine cannot produce
    without slurmdbd."""
    from trntrain.launcher.slurm import _from_sacct, _from_scontrol

    scontrol = ("JobId=4813 JobName=trntrain:lr ArrayJobId=4812 ArrayTaskId=0 JobState=RUNNING "
                "Reason=None\n"
                "JobId=4812 JobName=trntrain:lr ArrayJobId=4812 ArrayTaskId=2-3,5%2 "
                "JobState=PENDING Reason=JobArrayTaskLimit\n"
                "JobId=4790 JobName=other JobState=COMPLETED Reason=None\n")
    assert _from_scontrol(scontrol) == {"4812_0": "RUNNING", "4812_2": "PENDING",
                                        "4812_3": "PENDING", "4812_5": "PENDING",
                                        "4790": "COMPLETED"}
    sacct = ("4812_1|COMPLETED\n4812_1.batch|COMPLETED\n4812_1.0|COMPLETED\n"
             "4812_4|CANCELLED by 0\n4790|TIMEOUT\n")
    assert _from_sacct(sacct) == {"4812_1": "COMPLETED", "4812_4": "CANCELLED",
                                  "4790": "TIMEOUT"}
