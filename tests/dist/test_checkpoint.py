"""Checkpoints: exact resume, resharding between layouts, atomicity, corruption."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from tests.conftest import tiny_config
from trntrain.checkpoint.manager import LATEST, step_dir_name
from trntrain.distributed import World
from trntrain.errors import UserError
from trntrain.trainer import Trainer

BASE = ("train.max_steps=20", "train.eval_every=0", "train.micro_batch_size=2",
        "checkpoint=dcp", "checkpoint.every=10", "checkpoint.keep=0")
TP2_PP2 = ("parallel.tp=2", "parallel.pp=2")
DP2_ZERO1 = ("parallel.zero1=true",)


def run(rank: int, world_size: int, run_dir: str, overrides: tuple[str, ...]) -> dict:
    trainer = Trainer(tiny_config(*BASE, *overrides), World(rank, world_size, rank),
                      run_dir=Path(run_dir))
    records = trainer.fit()
    params = {name: p.detach().clone() for chunk in trainer.chunks.values()
              for name, p in chunk.named_parameters()}
    return {"loss": {r["step"]: r["loss"] for r in records},
            "params": {k: v.flatten()[:64].tolist() for k, v in params.items()}}


@pytest.mark.parametrize(("world_size", "layout"), [(4, TP2_PP2), (2, DP2_ZERO1)])
def test_resume_is_bitwise_equal_to_a_straight_run(distributed, tmp_path, world_size, layout):
    straight = distributed(run, world_size, str(tmp_path / "a"), layout)
    halfway = tmp_path / "a" / "checkpoints" / step_dir_name(10)
    assert halfway.is_dir() and (tmp_path / "a" / "checkpoints" / step_dir_name(20)).is_dir()
    resumed = distributed(run, world_size, str(tmp_path / "b"),
                          (*layout, f"checkpoint.resume={halfway}"))
    for a, b in zip(straight, resumed, strict=True):
        assert sorted(b["loss"]) == list(range(11, 21))
        assert all(b["loss"][s] == a["loss"][s] for s in range(11, 21))  # bitwise
        assert b["params"] == a["params"]


def test_checkpoint_reshards_to_other_layouts(distributed, tmp_path):
    straight = distributed(run, 4, str(tmp_path / "a"), TP2_PP2)[0]["loss"]
    halfway = tmp_path / "a" / "checkpoints" / step_dir_name(10)
    for world_size, layout in [(1, ()), (4, ()), (2, ("parallel.tp=2", "parallel.zero1=true"))]:
        target = str(tmp_path / f"to-{world_size}-{'-'.join(layout)}")
        overrides = (*layout, f"checkpoint.resume={halfway}")
        if world_size == 1:
            result = run(0, 1, target, overrides)
        else:
            result = distributed(run, world_size, target, overrides)[0]
        assert [result["loss"][s] for s in range(11, 21)] == pytest.approx(
            [straight[s] for s in range(11, 21)], rel=1e-5)


def test_pytorch_tools_read_the_checkpoint(tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    trained = run(0, 1, str(tmp_path / "run"), ())["params"]
    checkpoint = tmp_path / "run" / "checkpoints" / step_dir_name(20)
    dcp_to_torch_save(checkpoint, tmp_path / "flat.pt")
    state = torch.load(tmp_path / "flat.pt", weights_only=True)
    trainer = Trainer(tiny_config(*BASE, f"checkpoint.resume={checkpoint}"), World(),
                      run_dir=tmp_path / "again")
    trainer.load_checkpoint(checkpoint)
    for name, p in trainer.model.named_parameters():
        assert torch.equal(state[f"model.{name}"], p.detach())
    # The flat file holds the weights the run trained to step 20, every one of them.
    assert {k for k in state if k.startswith("model.")} == {f"model.{n}" for n in trained}
    for name, head in trained.items():
        assert state[f"model.{name}"].flatten()[:64].tolist() == head
    assert int(state["trainer.step"]) == 20
    assert state["optim.layers.0.attention.wq.weight.exp_avg"].shape == (128, 128)


def test_incomplete_and_corrupt_checkpoints_fall_back(tmp_path):
    run(0, 1, str(tmp_path / "run"), ())
    checkpoints = tmp_path / "run" / "checkpoints"
    latest = checkpoints / step_dir_name(20)
    # A save killed midway leaves a .tmp directory: never read.
    shutil.copytree(latest, checkpoints / f"{step_dir_name(30)}.tmp")
    # Truncate the newest complete checkpoint's data file.
    data = next(latest.glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:100])
    trainer = Trainer(tiny_config(*BASE, "train.max_steps=12"), World(), run_dir=tmp_path / "run")
    assert trainer.resume_step() == 10
    assert (checkpoints / LATEST).read_text().strip() == step_dir_name(20)
    explicit = Trainer(tiny_config(*BASE, f"checkpoint.resume={latest}"), World(),
                       run_dir=tmp_path / "other")
    with pytest.raises(UserError, match=rf"{data.name} is truncated"):
        explicit.resume_step()


def test_keep_prunes_old_checkpoints(tmp_path):
    run(0, 1, str(tmp_path / "run"), ("checkpoint.every=5", "checkpoint.keep=2"))
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == [LATEST, step_dir_name(15), step_dir_name(20)]


def test_async_save_equals_sync_save(distributed, tmp_path):
    sync = distributed(run, 2, str(tmp_path / "sync"), DP2_ZERO1)
    asynchronous = distributed(run, 2, str(tmp_path / "async"),
                               (*DP2_ZERO1, "checkpoint.async=true"))
    assert asynchronous[0]["loss"] == sync[0]["loss"]
    for step in (10, 20):
        name = step_dir_name(step)
        a = dcp.FileSystemReader(str(tmp_path / "async" / "checkpoints" / name)).read_metadata()
        b = dcp.FileSystemReader(str(tmp_path / "sync" / "checkpoints" / name)).read_metadata()
        assert a.state_dict_metadata.keys() == b.state_dict_metadata.keys()
    resumed = distributed(run, 2, str(tmp_path / "resumed"), (
        *DP2_ZERO1, f"checkpoint.resume={tmp_path / 'async' / 'checkpoints' / step_dir_name(10)}"))
    assert all(resumed[0]["loss"][s] == sync[0]["loss"][s] for s in range(11, 21))
