"""The command line under hostile and unlucky conditions: a second run into a live run
directory, unwritable paths, a full disk, kills at random moments. Each ends in one
`trntrain: error:` line and exit status 2, or in intact data."""

from __future__ import annotations

import json
import os
import random
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import cli_in_process

pytestmark = pytest.mark.e2e

TRNTRAIN = str(Path(sys.executable).parent / "trntrain")
SHORT = ["train.seq_len=32", "train.global_batch_size=8", "train.eval_every=0",
         "logging.every=1", "logging.progress_bar=false", "data.max_bytes=200000",
         "optim.warmup_steps=2"]
CHECKPOINTED = [*SHORT, "train.max_steps=12", "checkpoint=dcp", "checkpoint.every=3",
                "checkpoint.keep=0"]


def run(args: list[str], cwd: Path, env: dict | None = None, **kwargs
        ) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([TRNTRAIN, "train", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=240, **kwargs)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("trntrain: error:")]
    assert len(errors) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_second_run_into_a_live_run_directory_is_refused(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([TRNTRAIN, "train", *SHORT, "train.max_steps=100000",
                              "checkpoint=dcp", "checkpoint.every=2", "run.dir=run"],
                             cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        latest = tmp_path / "run" / "checkpoints" / "latest"
        deadline = time.monotonic() + 120
        while not latest.exists():
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.2)
        second = run([*SHORT, "train.max_steps=4", "checkpoint=dcp", "run.dir=run"], tmp_path)
        assert_one_line_error(second, "is in use by another run", f"pid {first.pid}")
    finally:
        first.kill()
        first.wait()
    # The kernel released the dead process's lock: the next run resumes its checkpoint
    # (the newest complete one: the kill may have come between a commit and `latest`).
    latest_step = int((tmp_path / "run" / "checkpoints" / "latest").read_text()[5:])
    third = run([*SHORT, f"train.max_steps={latest_step + 10}", "checkpoint=dcp",
                 "run.dir=run"], tmp_path)
    assert third.returncode == 0, third.stderr
    resumed = re.search(r"resumed from \S+ at step (\d+)", third.stderr)
    assert resumed and int(resumed.group(1)) in (latest_step, latest_step + 2), third.stderr


def test_unwritable_run_and_checkpoint_paths_fail_before_training(tmp_path):
    (tmp_path / "a_file").write_text("")
    under_file = run([*SHORT, "train.max_steps=2", "run.dir=a_file/run"], tmp_path)
    assert_one_line_error(under_file, "run.dir='a_file/run' cannot be written")
    uncreatable = run([*SHORT, "train.max_steps=2", "run.dir=run", "checkpoint=dcp",
                       "checkpoint.dir=/proc/trntrain/checkpoints"], tmp_path)
    assert_one_line_error(uncreatable, "checkpoint.dir='/proc/trntrain/checkpoints' cannot be "
                                       "written")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # stopped before step 1


def _file_size_limit(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past it fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_save_that_cannot_be_written_is_one_line_and_leaves_no_temporary(tmp_path):
    """Files may not grow past 256 kB: the config and metrics fit, a checkpoint shard
    of the tiny model (about 1.5 MB) does not, as on a full disk."""
    proc = run([*CHECKPOINTED, "run.dir=run"], tmp_path, preexec_fn=_file_size_limit(256_000))
    # torch's serializer reports the failed write in its own words ("unexpected pos").
    assert_one_line_error(proc, "the checkpoint of step 3 could not be written into",
                          "the previous checkpoints are intact")
    checkpoints = tmp_path / "run" / "checkpoints"
    assert not list(checkpoints.glob("*.tmp")) and not (checkpoints / "latest").exists()
    assert [r["step"] for r in records(tmp_path / "run")] == [1, 2, 3]
    again = run([*CHECKPOINTED, "train.max_steps=4", "run.dir=run", "run.overwrite=true"],
                tmp_path)
    assert again.returncode == 0, again.stderr


def test_metrics_hold_every_step_once_after_kills_at_random_moments(tmp_path):
    """Kills after a step, between a record and its checkpoint, and half-way through a
    save, at random steps, then resumes: metrics.jsonl ends with every step once, and
    the losses equal an uninterrupted run's bit for bit."""
    straight = run([*CHECKPOINTED, "run.dir=straight"], tmp_path)
    assert straight.returncode == 0, straight.stderr
    rng = random.Random(int(os.environ.get("TRNTRAIN_TEST_SEED", "0")) or None)
    kills = 0
    for _ in range(3):
        point = rng.choice(["kill", "kill_after_log", "kill_during_save"])
        step = rng.choice([3, 6, 9] if point == "kill_during_save" else range(1, 12))
        proc = run([*CHECKPOINTED, "run.dir=run"], tmp_path,
                   env={"TRNTRAIN_FAULT": f"{point}:{step}"})
        if proc.returncode == -signal.SIGKILL:
            kills += 1
        elif "no checkpoint to continue it from" in proc.stderr:
            # Killed before its first checkpoint: nothing to resume, the user starts over.
            proc = run([*CHECKPOINTED, "run.dir=run", "run.overwrite=true"], tmp_path,
                       env={"TRNTRAIN_FAULT": f"{point}:{step}"})
            assert proc.returncode in (0, -signal.SIGKILL), proc.stderr
            kills += proc.returncode != 0
        else:  # the fault's step was before the resume point: the run finished
            assert proc.returncode == 0, proc.stderr
    assert kills >= 1
    final = run([*CHECKPOINTED, "run.dir=run"], tmp_path)
    assert final.returncode == 0, final.stderr
    expected = records(tmp_path / "straight")
    got = records(tmp_path / "run")
    assert [r["step"] for r in got] == list(range(1, 13))
    assert [r["loss"] for r in got] == [r["loss"] for r in expected]


def test_a_run_whose_checkpoints_are_all_damaged_does_not_start_over(tmp_path):
    first = run([*CHECKPOINTED, "train.max_steps=6", "run.dir=run"], tmp_path)
    assert first.returncode == 0, first.stderr
    for listing in (tmp_path / "run" / "checkpoints").glob("step_*/checksums.json"):
        listing.write_text("{not json")
    again = run([*CHECKPOINTED, "run.dir=run"], tmp_path)
    assert_one_line_error(again, "found no usable checkpoint", "run.overwrite=true")
    assert [r["step"] for r in records(tmp_path / "run")] == list(range(1, 7))
    over = run([*CHECKPOINTED, "train.max_steps=2", "run.dir=run", "run.overwrite=true"],
               tmp_path)
    assert over.returncode == 0, over.stderr
    assert [r["step"] for r in records(tmp_path / "run")] == [1, 2]


@pytest.mark.parametrize(("override", "message"), [
    ("+train.newkey=1", "train.newkey=1 is invalid: not a key of the config"),
    ("train.global_batch_size=100000000000000000000",
     "train.global_batch_size=100000000000000000000 is invalid"),
    ("data.blend=[{weight: inf},{weight: 1}]", "data.blend[0].weight=inf is invalid"),
    ("data.blend=[{weight: 1e-9},{weight: 1}]", "data.blend[0].weight=1e-09 is invalid: it is "
                                                "so small"),
])
def test_validation_gaps_are_one_line_errors(tmp_path, monkeypatch, capfd, override, message):
    monkeypatch.chdir(tmp_path)
    status, out, err = cli_in_process(["train", *SHORT, "train.max_steps=2", override], capfd)
    assert_one_line_error(subprocess.CompletedProcess([], status, out, err), message)
