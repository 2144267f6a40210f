"""Pure bf16 with stochastic rounding on the parallel layouts: data-parallel replicas
draw the same rounding and stay bitwise equal; ZeRO-1 slices and tp shards draw their
own, so every layout follows the single-process run closely but not bit for bit."""

from __future__ import annotations

import hashlib

import pytest
import torch

from tests.conftest import tiny_config
from trntrain.distributed import World
from trntrain.trainer import Trainer

BASE = ("train.precision=bf16", "train.master_weights=false", "train.max_steps=6",
        "train.micro_batch_size=2")
LAYOUTS = {
    "dp2": (),
    "dp2_zero1": ("parallel.zero1=true",),
    "tp2_sp": ("parallel.tp=2", "parallel.sequence_parallel=true"),
    "pp2": ("parallel.pp=2",),
}


def train(rank: int, world_size: int, overrides: tuple[str, ...]) -> dict:
    trainer = Trainer(tiny_config(*BASE, *overrides), World(rank, world_size, rank))
    losses = [r["loss"] for r in trainer.fit()]
    weights = torch.cat([p.detach().float().reshape(-1) for p in trainer.params])
    # A digest, not the tensor: tensors through the result queue share memory the worker
    # takes with it when it exits.
    return {"loss": losses, "weights": hashlib.sha256(weights.numpy().tobytes()).hexdigest()}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layouts_follow_the_single_process_run(distributed, name):
    reference = train(0, 1, ())["loss"]
    results = distributed(train, 2, LAYOUTS[name])
    for result in results:
        # bf16 gradients reduced in another order and, for slices and shards, other
        # rounding draws: measured within 1.3e-4 (dp2) to 4.3e-4 (pp2) over six steps.
        assert result["loss"] == pytest.approx(reference, rel=2e-3), name
    if name == "dp2":  # replicas take the same draws: their weights stay identical
        assert results[0]["weights"] == results[1]["weights"]
