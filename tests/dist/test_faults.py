"""Non-finite losses under dp=2 x tp=2: every rank skips the same step, or stops."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_config
from trntrain.distributed import World
from trntrain.faults import NonFiniteError, StopRequest
from trntrain.parallel import comm
from trntrain.trainer import Trainer

LAYOUT = ("parallel.tp=2", "train.eval_every=0")


def full_params(trainer: Trainer) -> list[float]:
    out = []
    for p in trainer.model.parameters():
        t = p.detach()
        if hasattr(p, "tp_shard"):
            t = comm.all_gather_dim(t, p.tp_shard[0], trainer.mesh.tp_group)
        out += t.flatten()[:256].tolist()
    return out


def skip_run(rank: int, world_size: int) -> dict:
    trainer = Trainer(tiny_config("train.max_steps=5", "train.nonfinite=skip", *LAYOUT),
                      World(rank, world_size, rank))
    batches = trainer.train_batches
    weights = {}
    for step in range(1, 6):
        trainer.step = step
        loss, norm = trainer.train_step(batches.step(step - 1))
        weights[step] = full_params(trainer)
    # The same run on the data without the bad batch: batches 1, 2, 4, 5.
    without = Trainer(tiny_config("train.max_steps=5", "train.nonfinite=skip", *LAYOUT),
                      World(rank, world_size, rank))
    for index in (0, 1, 3, 4):
        without.step = 100 + index  # outside the injected fault
        without.train_step(batches.step(index))
    return {"skipped": trainer.skipped_steps, "weights": weights,
            "without_bad_batch": full_params(without),
            "final_loss": trainer.reduce_loss(loss), "adam_steps": [
                float(s["step"]) for s in trainer.optimizer.state.values()][:1]}


def test_skip_agreed_by_every_rank(distributed, monkeypatch):
    monkeypatch.setenv("TRNTRAIN_FAULT", "nan:3:1")  # rank 1's loss at step 3
    results = distributed(skip_run, 4)
    for result in results:
        assert result["skipped"] == [3]
        assert result["weights"][3] == result["weights"][2]  # the step changed nothing
        assert result["weights"][4] != result["weights"][3]
        assert torch.isfinite(torch.tensor(result["weights"][5])).all()
        assert result["adam_steps"] == [4.0]  # five steps, one skipped
        assert result["weights"][5] == result["without_bad_batch"]  # bitwise
    assert all(r["weights"] == results[0]["weights"] for r in results)


def stop_run(rank: int, world_size: int, run_dir: str) -> str:
    trainer = Trainer(tiny_config("train.max_steps=6", "checkpoint=dcp", "checkpoint.every=2",
                                  *LAYOUT), World(rank, world_size, rank), run_dir=Path(run_dir))
    with pytest.raises(NonFiniteError) as info:
        trainer.fit()
    return str(info.value)


def test_stop_names_the_step_and_keeps_the_last_good_checkpoint(distributed, monkeypatch,
                                                                 tmp_path):
    monkeypatch.setenv("TRNTRAIN_FAULT", "nan:3:1")
    messages = distributed(stop_run, 4, str(tmp_path / "run"))
    for message in messages:
        assert message.startswith("step 3: non-finite gradient norm")
        assert "first seen in the loss of rank(s) [1]" in message
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_00000002"
    assert not (checkpoints / "step_00000004").exists()


def stop_votes(rank: int, world_size: int) -> list[bool]:
    """Rank 1 is asked to stop during call 3; every rank reports what agreed() says."""
    votes = []
    with StopRequest() as stop:
        for call in range(1, 7):
            if rank == 1 and call == 3:
                stop.requested = True
            votes.append(stop.agreed(World(rank, world_size, rank)))
            if votes[-1]:
                break
    return votes


def test_stop_request_is_agreed_by_every_rank_one_call_later(distributed):
    # The vote started at call 3 (overlapping the next step) is read at call 4.
    assert distributed(stop_votes, 3) == [[False, False, False, True]] * 3
