"""The real command line: `trntrain train`, `python -m trntrain`, torchrun and sweeps."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import cli_in_process

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
TRNTRAIN = str(BIN / "trntrain")
TORCHRUN = str(BIN / "torchrun")
SHORT = ["train.max_steps=6", "train.seq_len=32", "train.global_batch_size=8",
         "train.eval_every=3", "logging.every=2", "data.max_bytes=300000"]


def run(cmd: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_writes_run_directory(tmp_path):
    run_dir = tmp_path / "run"
    proc = run([TRNTRAIN, "train", *SHORT, f"run.dir={run_dir}"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = records(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 6]
    for row in rows:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= row.keys()
        assert row["tokens_per_s"] > 0
    assert [r["step"] for r in rows if "eval_loss" in r] == [3, 6]
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["train"]["max_steps"] == 6 and config["run"]["dir"] == str(run_dir)
    assert "train.max_steps=6" in (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert (run_dir / ".hydra" / "config.yaml").exists()
    assert "step 6/6" in (run_dir / "train.log").read_text()
    assert "train: 100%" in proc.stderr  # the progress bar
    # Nothing written outside run.dir.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]

    again = run([TRNTRAIN, "train", *SHORT, f"run.dir={run_dir}"], tmp_path)
    assert again.returncode == 2 and "run.overwrite=true" in again.stderr
    assert len(records(run_dir)) == len(rows)


def test_default_corpus_run_learns(tmp_path):
    """The default model and corpus: the loss falls from ln(257) to below 2.5 in 150 steps."""
    proc = run([TRNTRAIN, "train", "train.max_steps=150", "optim.warmup_steps=20",
                "train.eval_every=150", "logging.progress_bar=false", "run.dir=run"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = records(tmp_path / "run")
    assert rows[0]["loss"] > 5.0
    assert rows[-1]["loss"] < 2.5 and rows[-1]["eval_loss"] < 2.5


def test_python_dash_m_and_default_run_dir(tmp_path):
    proc = run([sys.executable, "-m", "trntrain", "train", *SHORT], tmp_path)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert len(records(run_dir)) == 5


def test_torchrun_ranks_share_one_run_dir(tmp_path):
    proc = run([TORCHRUN, "--nproc_per_node=2", "-m", "trntrain", "train", *SHORT], tmp_path)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    rows = records(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 6]  # rank 0 alone writes
    assert "dp=2" in (run_dir / "train.log").read_text()


def test_torchrun_tensor_parallel_with_sequence_parallel(tmp_path):
    single = run([TRNTRAIN, "train", *SHORT, "run.dir=single"], tmp_path)
    assert single.returncode == 0, single.stderr
    proc = run([TORCHRUN, "--nproc_per_node=2", "-m", "trntrain", "train", *SHORT,
                "parallel.tp=2", "parallel.sequence_parallel=true", "run.dir=tp2"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    expected = [r["loss"] for r in records(tmp_path / "single")]
    assert [r["loss"] for r in records(tmp_path / "tp2")] == pytest.approx(expected, rel=1e-5)
    assert "tp=2 (sequence parallel) pp=1 dp=1" in (tmp_path / "tp2" / "train.log").read_text()


def test_torchrun_pipeline_reports_one_loss(tmp_path):
    single = run([TRNTRAIN, "train", *SHORT, "train.micro_batch_size=2", "run.dir=single"],
                 tmp_path)
    assert single.returncode == 0, single.stderr
    proc = run([TORCHRUN, "--nproc_per_node=2", "-m", "trntrain", "train", *SHORT,
                "parallel.pp=2", "parallel.microbatches=4", "run.dir=pp2"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    expected = records(tmp_path / "single")
    got = records(tmp_path / "pp2")
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in expected], rel=1e-5)
    assert [r["eval_loss"] for r in got if "eval_loss" in r] == pytest.approx(
        [r["eval_loss"] for r in expected if "eval_loss" in r], rel=1e-5)
    assert "pp=2 dp=1 | 4 micro-batches of 2" in (tmp_path / "pp2" / "train.log").read_text()


def test_multirun_sweep_writes_one_dir_per_job(tmp_path):
    proc = run([TRNTRAIN, "train", "-m", *SHORT, "optim.lr=1e-3,3e-3"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    (sweep,) = (tmp_path / "runs").iterdir()
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    lrs = [yaml.safe_load((p / "config.yaml").read_text())["optim"]["lr"] for p in jobs]
    assert lrs == [1e-3, 3e-3]
    assert records(jobs[0])[-1]["loss"] != records(jobs[1])[-1]["loss"]


@pytest.mark.parametrize(("args", "message"), [
    (["model=llama_huge"], "model=llama_huge is invalid"),
    (["model.n_kv_heads=3"], "model.n_kv_heads=3 is invalid"),
    (["train.global_batch_size=10", "train.micro_batch_size=4"], "train.global_batch_size=10"),
    (["train.max_steps=0"], "train.max_steps=0 is invalid"),
    (["optim.lr=fast"], "optim.lr='fast' is invalid"),
    (["model.layers=2"], "model.layers is not a key of model"),
])
def test_bad_config_exits_with_one_message(tmp_path, monkeypatch, capfd, args, message):
    monkeypatch.chdir(tmp_path)
    status, out, err = cli_in_process(["train", *args], capfd)
    assert status == 2
    assert message in err
    assert "Traceback" not in err + out
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_bad_layout_fails_before_any_process_group(tmp_path):
    proc = run([TORCHRUN, "--nproc_per_node=2", "-m", "trntrain", "train", "parallel.tp=2",
                "model.n_heads=6", "model.n_kv_heads=3", "model.dim=96"], tmp_path, timeout=60)
    assert proc.returncode != 0
    assert proc.stderr.count("parallel.tp=2 is invalid") == 1
    assert "a divisor or a multiple of model.n_kv_heads=3" in proc.stderr
    assert "init_process_group" not in proc.stderr


def test_bad_config_under_torchrun_is_reported_once(tmp_path):
    if shutil.which(TORCHRUN) is None:
        pytest.skip("torchrun not installed")
    proc = run([TORCHRUN, "--nproc_per_node=2", "-m", "trntrain", "train",
                "train.global_batch_size=3"], tmp_path)
    assert proc.returncode != 0
    assert proc.stderr.count("train.global_batch_size=3 is invalid") == 1


CHECKPOINTED = [*SHORT, "train.max_steps=12", "checkpoint=dcp", "checkpoint.every=5",
                "run.dir=run"]


def test_sigterm_saves_and_exits_zero_then_resumes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([TRNTRAIN, "train", *CHECKPOINTED, "train.max_steps=100000",
                             "checkpoint.every=0", "logging.every=1"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    stopped = records(tmp_path / "run")[-1]["step"]
    assert f"stopped after step {stopped} on SIGTERM" in stderr
    latest = (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{stopped:08d}"
    again = run([TRNTRAIN, "train", *CHECKPOINTED, f"train.max_steps={stopped + 2}",
                 "logging.every=1"], tmp_path)
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stderr
    assert [r["step"] for r in records(tmp_path / "run")][-2:] == [stopped + 1, stopped + 2]


def test_kill_during_save_keeps_the_previous_checkpoint(tmp_path):
    straight = run([TRNTRAIN, "train", *CHECKPOINTED[:-1], "run.dir=straight"], tmp_path)
    assert straight.returncode == 0, straight.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRNTRAIN_FAULT": "kill_during_save:10"}
    killed = subprocess.run([TRNTRAIN, "train", *CHECKPOINTED], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=240)
    assert killed.returncode == -signal.SIGKILL
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_00000005"
    assert (checkpoints / "step_00000010.tmp").is_dir()
    resumed = run([TRNTRAIN, "train", *CHECKPOINTED], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "step_00000005 at step 5" in resumed.stderr
    expected = {r["step"]: r["loss"] for r in records(tmp_path / "straight")}
    got = {r["step"]: r["loss"] for r in records(tmp_path / "run")}
    assert got == expected  # bitwise, with the records of the lost steps rewritten


def test_torchrun_restart_finishes_from_the_latest_checkpoint(tmp_path):
    straight = run([TRNTRAIN, "train", *CHECKPOINTED[:-1], "run.dir=straight"], tmp_path)
    assert straight.returncode == 0, straight.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRNTRAIN_FAULT": "kill:7:1"}
    proc = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", "--max-restarts=1",
                           "-m", "trntrain", "train", *CHECKPOINTED], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "resumed from" in proc.stderr
    got = records(tmp_path / "run")
    assert [r["step"] for r in got] == [r["step"] for r in records(tmp_path / "straight")]
    assert got[-1]["loss"] == pytest.approx(records(tmp_path / "straight")[-1]["loss"],
                                            rel=1e-6)


def test_sweep_then_report_overlays_both_runs(tmp_path):
    sweep = run([TRNTRAIN, "train", "-m", *SHORT, "optim.lr=1e-3,3e-3"], tmp_path)
    assert sweep.returncode == 0, sweep.stderr
    (sweep_dir,) = (tmp_path / "runs").iterdir()
    proc = run([TRNTRAIN, "report", str(sweep_dir)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = sweep_dir / "report"
    for name in ("loss.png", "lr.png", "throughput.png", "memory.png"):
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (report / "summary.txt").read_text()
    assert "optim.lr=0.001" in summary and "optim.lr=0.003" in summary
    assert "lowest final training loss" in proc.stdout
    bad = run([TRNTRAIN, "report", str(tmp_path / "nowhere")], tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_watchdog_ends_a_stalled_job_with_its_message(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRNTRAIN_FAULT": "stall:3:1"}
    start = time.monotonic()
    proc = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "trntrain",
                           "train", *SHORT, "train.watchdog_s=5", "run.dir=run"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert time.monotonic() - start < 60
    assert "watchdog: rank 1 made no progress" in proc.stderr and "in step 3" in proc.stderr
    assert "watchdog: rank 0 made no progress" in proc.stderr
    assert "over ranks [0, 1]" in proc.stderr  # what rank 0 was waiting in


def test_nonfinite_stop_from_the_command_line(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRNTRAIN_FAULT": "nan:4:0"}
    proc = subprocess.run([TRNTRAIN, "train", *SHORT, "run.dir=run"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "trntrain: error: step 4: non-finite gradient norm" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_one_rank_failing_brings_the_job_down_with_its_error_once(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRNTRAIN_FAULT": "raise:3:1"}
    start = time.monotonic()
    proc = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "trntrain",
                           "train", *SHORT, "run.dir=run"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and time.monotonic() - start < 60
    assert proc.stderr.count("RuntimeError: injected failure on rank 1 at step 3") == 1
    assert "trntrain: rank 0 stopped: another rank failed" in proc.stderr
    assert proc.stderr.count("Traceback") <= 2  # the failing rank's, and torchrun's summary
