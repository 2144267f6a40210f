"""Chat fine-tuning on the command line, a short version of docs/fine-tuning.md's example:
`trntrain train data=chat` on the shipped demo conversations, then `trntrain generate
--messages` from the run. The loss on the assistant's tokens falls and the reply follows
the training conversations' format (one short line, ended by the end-of-turn token);
a bad conversation ends in one error line naming its file and line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

TRNTRAIN = str(Path(sys.executable).parent / "trntrain")
STEPS = 60


def run(cmd: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_chat_sft_then_generate(tmp_path):
    run_dir = tmp_path / "sft"
    train = run([TRNTRAIN, "train", "data=chat", "model=qwen3_tiny", f"train.max_steps={STEPS}",
                 "train.global_batch_size=8", "train.eval_every=0", "optim.warmup_steps=10",
                 "logging.every=1", "logging.progress_bar=false", "checkpoint=dcp",
                 f"run.dir={run_dir}"],
                tmp_path)
    assert train.returncode == 0, train.stderr
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == STEPS
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)

    messages = tmp_path / "messages.json"
    messages.write_text(json.dumps([{"role": "user", "content": "Shout: green river"}]))
    generated = run([TRNTRAIN, "generate", str(run_dir), "--messages", str(messages),
                     "--max-new-tokens", "64"], tmp_path)
    assert generated.returncode == 0, generated.stderr
    reply = generated.stdout
    # The format of every training reply: one short line, then the end-of-turn token
    # (generation stops there, well before 64 tokens), never another turn's header.
    assert "stopped at an end token" in generated.stderr, (reply, generated.stderr)
    assert 0 < len(reply) < 40 and "\n" not in reply and "<|" not in reply, reply
    assert reply.isupper(), reply  # as every "Shout:" reply of the training data is


def test_a_bad_conversation_is_one_error_line(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "yo"}]}) + "\n"
                    + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    proc = run([TRNTRAIN, "train", "data=chat", f"data.path={path}",
                f"run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 2 and not (tmp_path / "run").exists()
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"trntrain: error: {path}:2: "), lines
    assert "no assistant turn" in lines[0]
