"""DPO training: the reference (frozen copy, precomputed, LoRA's base) and resumption."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import tiny_config
from trntrain.checkpoint.manager import step_dir_name
from trntrain.data.preference import demo_records
from trntrain.distributed import World
from trntrain.errors import UserError
from trntrain.objective.reference import REFERENCE_FILE, LogpsForward, ModelReference
from trntrain.plan.layout import layout_from_config
from trntrain.plan.memory import stage_memory
from trntrain.trainer import Trainer

DPO = ("data=preference", "data.val_fraction=0.2", "objective=dpo", "train.seq_len=128",
       "train.global_batch_size=4",
       "optim.lr=2e-3", "optim.warmup_steps=0", "train.max_steps=4", "train.eval_every=4",
       "train.eval_batches=2")
METRICS = ("loss", "rewards_chosen", "rewards_rejected", "reward_margin", "logps_chosen",
           "eval_loss", "eval_reward_margin")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> str:
    """64 of the demo's pairs (a precomputed reference scores each once)."""
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in demo_records(64)))
    return f"data.path={path}"


def trajectory(records: list[dict]) -> list[float]:
    return [r[k] for r in records for k in METRICS if k in r]


@pytest.fixture(scope="module")
def frozen_copy_run(pairs):
    trainer = Trainer(tiny_config(*DPO, pairs), World())
    assert trainer.reference.forward.chunks is not trainer.chunks
    return trajectory(trainer.fit())


def test_precomputed_reference_equals_the_frozen_copy(frozen_copy_run, pairs):
    trainer = Trainer(tiny_config(*DPO, pairs, "objective.reference=precomputed"), World())
    tables = trainer.reference.tables
    assert tables["train"].shape == (trainer.data.num_samples("train"), 2)
    assert torch.isfinite(tables["train"]).all() and torch.isfinite(tables["val"]).all()
    assert trajectory(trainer.fit()) == pytest.approx(frozen_copy_run, rel=1e-6, abs=1e-7)


def test_learns_the_demo_preference(pairs):
    trainer = Trainer(tiny_config(*DPO, pairs, "train.max_steps=8", "train.eval_every=8",
                                  "train.global_batch_size=8"), World())
    records = trainer.fit()
    assert records[0]["loss"] == pytest.approx(0.6931, abs=1e-4)  # policy == reference
    assert records[-1]["reward_accuracy"] > 0.9 and records[-1]["eval_reward_accuracy"] > 0.9
    assert records[-1]["loss"] < 0.4


def test_lora_reference_is_the_base_with_adapters_off(pairs):
    lora = (*DPO, pairs, "peft=lora", "peft.allow_random_base=true", "optim.lr=1e-2")
    implicit = Trainer(tiny_config(*lora), World())
    assert implicit.reference.forward.chunks is implicit.chunks  # no copy of the weights
    explicit = Trainer(tiny_config(*lora), World())
    explicit.reference = ModelReference(LogpsForward(
        explicit.frozen_copy(), None, explicit.objective.policy_logps,
        lambda: explicit.backend.autocast("fp32"), lambda: None))
    a, b = trajectory(implicit.fit()), trajectory(explicit.fit())
    assert a == pytest.approx(b, rel=1e-6, abs=1e-7)
    assert a[METRICS.index("rewards_chosen")] == 0.0  # step 1: adapters at zero
    assert any(abs(v) > 1e-3 for v in a[len(METRICS):])  # and then the adapters moved


def test_precomputed_tables_are_stored_reused_on_resume_and_checked(pairs, tmp_path):
    common = (*DPO, pairs, "objective.reference=precomputed", "checkpoint=dcp",
              "checkpoint.every=2", "checkpoint.keep=0")
    straight = Trainer(tiny_config(*common), World(), run_dir=tmp_path / "a")
    stored = tmp_path / "a" / REFERENCE_FILE
    assert stored.is_file()
    losses = [r["loss"] for r in straight.fit()]

    # The resumed run reads the table instead of computing it from moved weights.
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / REFERENCE_FILE).write_bytes(stored.read_bytes())
    halfway = tmp_path / "a" / "checkpoints" / step_dir_name(2)
    resumed = Trainer(tiny_config(*common, f"checkpoint.resume={halfway}"), World(),
                      run_dir=tmp_path / "b")
    for split in ("train", "val"):
        assert torch.equal(resumed.reference.tables[split], straight.reference.tables[split])
    assert [r["loss"] for r in resumed.fit()] == losses[2:]
    for a, b in zip(straight.params, resumed.params, strict=True):
        assert torch.equal(a, b)

    with pytest.raises(UserError, match="computed for other preference data") as err:
        Trainer(tiny_config(*common, "train.seq_len=160"), World(), run_dir=tmp_path / "a")
    assert "\n" not in str(err.value) and REFERENCE_FILE in str(err.value)
    with pytest.raises(UserError, match="computed with other reference weights"):
        Trainer(tiny_config(*common, "train.seed=5"), World(), run_dir=tmp_path / "a")


@pytest.mark.parametrize("overrides", [(), ("train.precision=bf16",),
                                       ("objective.reference=precomputed",),
                                       ("peft=lora", "peft.allow_random_base=true")])
def test_planner_counts_the_reference_copy_the_trainer_holds(pairs, overrides):
    cfg = tiny_config(*DPO, pairs, *overrides)
    trainer = Trainer(cfg, World())
    reference = getattr(trainer.reference, "forward", None)
    held = 0
    if reference is not None and reference.chunks is not trainer.chunks:
        held = sum(p.numel() * p.element_size() for c in reference.chunks.values()
                   for p in c.parameters())
    planned = stage_memory(cfg, layout_from_config(cfg, 1), 0)["reference_weights"]
    assert planned == held
    assert (held > 0) == (overrides in ((), ("train.precision=bf16",)))
