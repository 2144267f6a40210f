"""checkpoint=dcp on backend=xla (XLA:CPU, one device): host copies in one transfer,
synchronous and asynchronous saves, bitwise resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests.conftest import tiny_config
from trntrain.checkpoint.manager import step_dir_name
from trntrain.distributed import World
from trntrain.trainer import Trainer

BASE = ("backend=xla", "checkpoint=dcp", "train.max_steps=6", "checkpoint.every=3",
        "checkpoint.keep=0", "train.micro_batch_size=2")


def train(run_dir: Path, *overrides: str) -> tuple[Trainer, dict[int, float]]:
    trainer = Trainer(tiny_config(*BASE, *overrides), World(), run_dir=run_dir)
    records = trainer.fit()
    return trainer, {r["step"]: r["loss"] for r in records}


@pytest.mark.parametrize("overrides", [
    (),
    ("checkpoint.async=true",),
    # bf16 weights with fp32 master weights: the sharded optimizer's path at dp=1.
    ("train.precision=bf16", "checkpoint.async=true"),
], ids=["sync", "async", "bf16_master_async"])
def test_xla_saves_and_resumes_bitwise(tmp_path, overrides):
    straight, losses = train(tmp_path / "a", *overrides)
    checkpoints = tmp_path / "a" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == step_dir_name(6)

    # The last checkpoint holds the trained weights exactly (read by DCP's converter).
    dcp_to_torch_save(checkpoints / step_dir_name(6), tmp_path / "flat.pt")
    saved = torch.load(tmp_path / "flat.pt", weights_only=True)
    trained = {key: p.detach().cpu() for key, p in straight.states["model"].named_parameters()}
    for key, weight in trained.items():
        assert torch.equal(saved[f"model.{key}"], weight), key
    if "train.precision=bf16" in overrides:
        assert all(saved[f"model.{key}"].dtype == torch.bfloat16 for key in trained)
        assert any(k.endswith(".master") for k in saved)

    resumed, again = train(tmp_path / "b", *overrides,
                           f"checkpoint.resume={checkpoints / step_dir_name(3)}")
    assert sorted(again) == [4, 5, 6]
    assert all(again[s] == losses[s] for s in again)  # bitwise
    for key, p in resumed.states["model"].named_parameters():
        assert torch.equal(p.detach().cpu(), trained[key]), key


def test_a_save_copies_the_state_to_the_host_in_one_transfer(tmp_path):
    trainer, _ = train(tmp_path, "train.max_steps=2", "checkpoint.every=0")
    backend = trainer.backend
    backend.synchronize()
    transfers, compiles = backend.host_transfer_count(), backend.compile_count()
    trainer.save_checkpoint(3)
    # Weights and both moments of every parameter: one device-to-host transfer, and no
    # graph compiled to produce them.
    assert backend.host_transfer_count() - transfers == 1
    assert backend.compile_count() == compiles
    assert (tmp_path / "checkpoints" / step_dir_name(3)).is_dir()
