"""DPO after a short chat SFT, on every layout: the losses, reward metrics, evaluation
and gradient norms of tp2, pp2 (1f1b, 2 micro-batches), dp2 and dp2 ZeRO-1 equal the
single-process run to 1e-5, with the reference as a frozen copy of the SFT weights
(the copy sharded and pipelined like the policy) and precomputed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_distributed, tiny_config
from trntrain.checkpoint.manager import step_dir_name
from trntrain.data.preference import demo_records
from trntrain.distributed import World
from trntrain.trainer import Trainer

STEPS = 3
KEYS = ("loss", "grad_norm", "rewards_chosen", "rewards_rejected", "reward_margin",
        "logps_chosen", "logps_rejected", "eval_loss", "eval_rewards_chosen")
LAYOUTS = {
    "tp2": ("parallel.tp=2",),
    "pp2_1f1b": ("parallel.pp=2", "parallel.schedule=1f1b"),
    "dp2": (),
    "dp2_zero1": ("parallel.zero1=true",),
}


def sft(rank: int, world_size: int, run_dir: str) -> None:
    cfg = tiny_config("data=chat", "train.seq_len=128", "train.max_steps=4", "checkpoint=hf",
                      "optim.lr=3e-3")
    Trainer(cfg, World(rank, world_size, rank), run_dir=Path(run_dir)).fit()


@pytest.fixture(scope="module")
def dpo(tmp_path_factory) -> tuple[str, ...]:
    """DPO settings from the SFT weights, on 48 of the demo's pairs."""
    root = tmp_path_factory.mktemp("dpo")
    run_distributed(sft, 1, str(root / "sft"))
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in demo_records(48)))
    return ("data=preference", f"data.path={pairs}", "data.val_fraction=0.25", "objective=dpo",
            "train.seq_len=128", "train.global_batch_size=8", "train.micro_batch_size=2",
            f"train.max_steps={STEPS}", f"train.eval_every={STEPS}", "train.eval_batches=1",
            "optim.lr=2e-3", "optim.warmup_steps=0",
            f"checkpoint.init_from={root / 'sft' / 'checkpoints' / step_dir_name(4)}")


def trajectory(rank: int, world_size: int, overrides: tuple[str, ...]) -> list[list[float]]:
    trainer = Trainer(tiny_config(*overrides), World(rank, world_size, rank))
    return [[r[k] for k in KEYS if k in r] for r in trainer.fit()]


@pytest.mark.parametrize("reference", ["model", "precomputed"])
def test_dpo_layouts_equal_the_single_process_run(distributed, dpo, reference):
    base = (*dpo, f"objective.reference={reference}")
    expected = run_distributed(trajectory, 1, base)[0]
    assert len(expected) == STEPS and len(expected[-1]) == len(KEYS)
    assert expected[-1][2] != 0.0  # rewards_chosen: the policy has moved
    for name, layout in LAYOUTS.items():
        got = distributed(trajectory, 2, (*base, *layout))[0]
        for step, (a, b) in enumerate(zip(got, expected, strict=True), start=1):
            assert len(a) == len(b), (name, step)
            for x, y, what in zip(a, b, KEYS, strict=False):
                assert abs(x - y) <= 1e-5 * max(1.0, abs(y)), (name, step, what, x, y)
