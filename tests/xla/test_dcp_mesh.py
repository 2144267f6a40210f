"""DCP of tensor-parallel shards on torch 2.9 (the Trn1 stack), on forked gloo ranks.

torch 2.9's DeviceMesh skips its coordinates for device type `xla`, and DCP's save
planner asks a DTensor's mesh for them: a checkpoint of DTensors on an xla mesh
fails. trntrain saves host copies as DTensors on a `cpu` mesh over gloo instead;
here the trainer's own save and load run that path under tp=2 and reshard to tp=1
and back. (The forked ranks cannot use the XLA device; the failure is the mesh's,
whatever device the local shards are on.)
"""

from __future__ import annotations

from pathlib import Path

import numpy
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

from tests.conftest import tiny_config
from trntrain.checkpoint.manager import step_dir_name
from trntrain.distributed import World
from trntrain.trainer import Trainer

FULL = torch.arange(32, dtype=torch.float32).view(8, 4)


def row_shard(rank: int, mesh: DeviceMesh) -> DTensor:
    """This rank's half of FULL (rows) as a DTensor on `mesh`, built without moving the
    local tensor to the mesh's device (DTensor.from_local would)."""
    spec = DTensorSpec(mesh, (Shard(0),), TensorMeta(FULL.shape, FULL.stride(), FULL.dtype))
    return DTensor(FULL[4 * rank:4 * rank + 4].clone(), spec, requires_grad=False)


def save_on_meshes(rank: int, world_size: int, directory: str) -> dict:
    group = dist.new_group([0, 1])
    out = {}
    xla_mesh = DeviceMesh.from_group(group, "xla")
    try:
        out["xla_coordinate"] = xla_mesh.get_coordinate()
    except AttributeError as err:
        out["xla_coordinate"] = f"AttributeError: {err}"
    try:
        dcp.save({"w": row_shard(rank, xla_mesh)}, checkpoint_id=f"{directory}/xla")
        out["xla_save"] = "saved"
    except CheckpointException as err:  # a BaseException: raised on every rank
        out["xla_save"] = f"{type(err).__name__}: {err}"
    cpu_mesh = DeviceMesh.from_group(group, "cpu")
    out["cpu_coordinate"] = cpu_mesh.get_coordinate()
    dcp.save({"w": row_shard(rank, cpu_mesh)}, checkpoint_id=f"{directory}/cpu")
    return out


def test_a_dtensor_on_an_xla_mesh_has_no_coordinate_and_does_not_save(distributed, tmp_path):
    results = distributed(save_on_meshes, 2, str(tmp_path))
    for rank, result in enumerate(results):
        assert "_coordinate_on_dim" in result["xla_coordinate"]
        assert result["xla_save"] != "saved" and "_coordinate_on_dim" in result["xla_save"]
        assert result["cpu_coordinate"] == [rank]
    assert not (tmp_path / "xla" / ".metadata").exists()
    dcp_to_torch_save(tmp_path / "cpu", tmp_path / "cpu.pt")
    assert torch.equal(torch.load(tmp_path / "cpu.pt", weights_only=True)["w"], FULL)


BASE = ("backend=cpu", "checkpoint=dcp", "train.max_steps=4", "checkpoint.every=0",
        "train.micro_batch_size=2")


def shards(trainer: Trainer) -> dict[str, dict]:
    """Every parameter and AdamW moment this rank holds, with where its tp shard sits
    (as numpy arrays: a tensor would leave a forked rank through shared memory that
    ends with it)."""
    out = {}
    for name, p in trainer.model.named_parameters():
        state = trainer.optimizer.state[p]
        out[name] = {"shard": getattr(p, "tp_shard", None),
                     **{k: v.detach().numpy().copy() for k, v in (
                         ("weight", p), ("exp_avg", state["exp_avg"]),
                         ("exp_avg_sq", state["exp_avg_sq"]))}}
    return out


def train_tp2(rank: int, world_size: int, run_dir: str) -> dict:
    trainer = Trainer(tiny_config(*BASE, "parallel.tp=2"), World(rank, world_size, rank),
                      run_dir=Path(run_dir))
    trainer.fit()
    return shards(trainer)


def load_tp2(rank: int, world_size: int, checkpoint: str) -> dict:
    trainer = Trainer(tiny_config(*BASE, "parallel.tp=2"), World(rank, world_size, rank))
    assert trainer.load_checkpoint(Path(checkpoint)) == 4
    return shards(trainer)


def assemble(by_rank: list[dict], name: str, what: str) -> torch.Tensor:
    """The logical tensor from the tp=2 ranks' shards (a replicated one from rank 0)."""
    shard = by_rank[0][name]["shard"]
    if shard is None:
        return torch.from_numpy(by_rank[0][name][what])
    return torch.cat([torch.from_numpy(r[name][what]) for r in by_rank], dim=shard[0])


def test_the_trainers_save_reshards_tp2_to_tp1_and_back(distributed, tmp_path):
    trained = distributed(train_tp2, 2, str(tmp_path / "tp2"))
    checkpoint = tmp_path / "tp2" / "checkpoints" / step_dir_name(4)

    single = Trainer(tiny_config(*BASE), World(), run_dir=tmp_path / "tp1")
    assert single.load_checkpoint(checkpoint) == 4
    loaded = shards(single)
    assert loaded.keys() == trained[0].keys()
    for name, values in loaded.items():
        for what in ("weight", "exp_avg", "exp_avg_sq"):
            assert torch.equal(torch.from_numpy(values[what]), assemble(trained, name, what))

    # ... and back: the tp=1 trainer's own save, read by tp=2 ranks, gives each its shard.
    single.save_checkpoint(4)
    again = distributed(load_tp2, 2, str(tmp_path / "tp1" / "checkpoints" / step_dir_name(4)))
    for before, after in zip(trained, again, strict=True):
        for name, values in after.items():
            for what in ("weight", "exp_avg", "exp_avg_sq"):
                assert numpy.array_equal(values[what], before[name][what]), (name, what)
