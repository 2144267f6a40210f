"""Preference tuning on the command line (docs/preference.md): `trntrain train
data=preference objective=...` on the shipped demo pairs writes TRL's reward metrics to
metrics.jsonl, `trntrain report` draws them, and mismatched settings are one error line
before anything runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import cli_in_process

pytestmark = pytest.mark.e2e

TRNTRAIN = str(Path(sys.executable).parent / "trntrain")
REWARDS = ("rewards_chosen", "rewards_rejected", "reward_accuracy", "reward_margin",
           "logps_chosen", "logps_rejected")


def run(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("objective", ["orpo", "simpo"])
def test_reference_free_objectives_learn_the_demo_and_are_reported(tmp_path, objective):
    run_dir = tmp_path / objective
    train = run([TRNTRAIN, "train", "data=preference", f"objective={objective}",
                 "train.max_steps=12", "train.global_batch_size=8", "train.eval_every=12",
                 "train.eval_batches=2", "optim.lr=2e-3", "optim.warmup_steps=0",
                 "logging.every=1", "logging.progress_bar=false", f"run.dir={run_dir}"],
                tmp_path)
    assert train.returncode == 0, train.stderr
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 12 and all(k in r for r in records for k in REWARDS)
    assert records[-1]["reward_accuracy"] > 0.9 and records[-1]["eval_reward_accuracy"] > 0.9
    assert records[-1]["reward_margin"] > records[0]["reward_margin"]

    report = run([TRNTRAIN, "report", str(run_dir)], tmp_path)
    assert report.returncode == 0, report.stderr
    assert (run_dir / "rewards.png").stat().st_size > 10_000
    assert "final reward accuracy" in (run_dir / "summary.txt").read_text()


@pytest.mark.parametrize(("args", "message"), [
    (["objective=dpo"], "objective.name='dpo' is invalid"),
    (["data=preference", "objective=dpo", "objective.reference=cached"],
     "objective.reference='cached' is invalid"),
    (["data=preference", "objective=simpo", "objective.beta=0"], "objective.beta=0"),
    (["data=preference", "objective=dpo", "train.seq_len=64"],
     "preference_demo.jsonl:1: the pair renders to 42 (prompt + chosen)"),
])
def test_bad_preference_settings_are_one_line(tmp_path, monkeypatch, capfd, args, message):
    monkeypatch.chdir(tmp_path)
    status, _, err = cli_in_process(["train", *args, f"run.dir={tmp_path / 'run'}"], capfd)
    assert status == 2
    errors = [line for line in err.splitlines() if line.strip()]
    assert len(errors) == 1 and message in errors[0], err
