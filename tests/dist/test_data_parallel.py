"""Data parallelism on gloo ranks against the single-process run of the same global batch."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.conftest import tiny_config
from trntrain.distributed import World
from trntrain.parallel import ParallelDims, build_mesh, gradient_buckets
from trntrain.trainer import Trainer

STEPS = 10


def train_losses(rank: int, world_size: int, overrides: list[str]) -> dict:
    cfg = tiny_config(f"train.max_steps={STEPS}", "train.eval_every=5", *overrides)
    trainer = Trainer(cfg, World(rank, world_size, rank))
    records = trainer.fit()
    # Plain lists: a tensor sent through the queue would outlive its forked owner.
    first = next(iter(trainer.model.parameters())).detach().flatten()[:512].tolist()
    return {
        "loss": [r["loss"] for r in records],
        "grad_norm": [r["grad_norm"] for r in records],
        "eval_loss": [r["eval_loss"] for r in records if "eval_loss" in r],
        "first_param": first,
    }


@pytest.fixture(scope="module")
def single_process():
    return train_losses(0, 1, [])


@pytest.mark.parametrize(("world_size", "overrides"), [
    (2, []),
    (2, ["train.micro_batch_size=2"]),  # two accumulation steps per rank
    (4, ["parallel.bucket_mb=0.05"]),   # many small buckets
])
def test_dp_matches_single_process(distributed, single_process, world_size, overrides):
    results = distributed(train_losses, world_size, overrides)
    for rank_result in results:
        assert rank_result["loss"] == pytest.approx(single_process["loss"], rel=1e-5)
        assert rank_result["grad_norm"] == pytest.approx(single_process["grad_norm"], rel=1e-5)
        assert rank_result["eval_loss"] == pytest.approx(single_process["eval_loss"], rel=1e-5)
        assert rank_result["first_param"] == results[0]["first_param"]
    torch.testing.assert_close(torch.tensor(results[0]["first_param"]),
                               torch.tensor(single_process["first_param"]), rtol=1e-5, atol=1e-6)


def test_mesh_layout_tp_innermost_then_dp_then_pp():
    dims = ParallelDims(tp=2, pp=2, dp=3)
    assert dims.group_ranks("tp") == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]
    assert dims.group_ranks("dp") == [[0, 2, 4], [1, 3, 5], [6, 8, 10], [7, 9, 11]]
    assert dims.group_ranks("pp") == [[0, 6], [1, 7], [2, 8], [3, 9], [4, 10], [5, 11]]
    for rank in range(12):
        assert dims.rank_of(*dims.coordinates(rank)) == rank
    assert dims.coordinates(9) == (1, 1, 1)


def _mesh_groups(rank: int, world_size: int) -> list[list[int]]:
    mesh = build_mesh(ParallelDims(tp=2, pp=1, dp=2), rank)
    out = []
    for group in (mesh.tp_group, mesh.dp_group):
        ranks = [None] * 2
        dist.all_gather_object(ranks, rank, group=group)
        out.append(ranks)
    assert mesh.pp_group is None
    return out


def test_mesh_groups_on_gloo(distributed):
    groups = distributed(_mesh_groups, 4)
    assert groups == [[[0, 1], [0, 2]], [[0, 1], [1, 3]], [[2, 3], [0, 2]], [[2, 3], [1, 3]]]


def test_buckets_respect_size_and_dtype():
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (100, 100, 300, 50)]
    params.insert(2, torch.nn.Parameter(torch.zeros(10, dtype=torch.float64)))
    buckets = gradient_buckets(params, bucket_bytes=800)
    assert [[p.numel() for p in b] for b in buckets] == [[100, 100], [10], [300], [50]]
