"""MoE models on gloo ranks against the single-process run: expert parallelism (dropless
all-to-all with uneven splits, and with a capacity factor), with ZeRO-1, tp and pp, and
the routing metrics."""

from __future__ import annotations

import pytest

from tests.conftest import run_distributed, tiny_config
from trntrain.distributed import World
from trntrain.trainer import Trainer

STEPS = 10
# mixtral_tiny with 2 layers: 8 experts, top-2; 4 micro-batches of 2 sequences per step.
BASE = ("model=mixtral_tiny", "model.n_layers=2", f"train.max_steps={STEPS}",
        "train.micro_batch_size=2",
        "train.eval_every=3")
METRICS = ("moe_aux_loss", "moe_dropped_fraction", "moe_load_imbalance")


def train(rank: int, world_size: int, overrides: tuple[str, ...]) -> dict:
    records = Trainer(tiny_config(*BASE, *overrides), World(rank, world_size, rank)).fit()
    out = {"loss": [r["loss"] for r in records],
           "eval_loss": [r["eval_loss"] for r in records if "eval_loss" in r],
           "grad_norm": [r["grad_norm"] for r in records]}
    out.update({k: [r[k] for r in records] for k in METRICS})
    return out


def assert_same_run(result: dict, expected: dict) -> None:
    for key in ("loss", "eval_loss", *METRICS):
        assert result[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), key
    assert result["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-4)


def single(overrides: tuple[str, ...]) -> dict:
    """The single-process run, in a forked one-thread worker (this process's threads
    would compete for the two cores)."""
    return run_distributed(train, 1, overrides)[0]


@pytest.fixture(scope="module")
def reference() -> dict:
    return single(())


def ep(size: int) -> tuple[str, ...]:
    return (f"parallel.ep={size}",)


@pytest.mark.parametrize(("world_size", "overrides"), [
    (2, ep(2)),  # dp=2, the experts split 4 + 4
    (2, (*ep(2), "parallel.zero1=true")),
    (4, (*ep(2), "parallel.tp=2")),  # experts replicated over tp, attention sharded
    (4, (*ep(2), "parallel.pp=2", "parallel.schedule=1f1b")),
    (4, ep(4)),  # dp=4: 2 experts per rank
    (4, (*ep(2), "parallel.dp=4", "parallel.zero1=true")),  # ep=2 x edp=2
], ids=lambda v: str(v))
def test_dropless_expert_parallel_matches_single_process(distributed, reference, world_size,
                                                        overrides):
    for result in distributed(train, world_size, overrides):
        assert_same_run(result, reference)
    # Nothing dropped, and routing measured.
    assert reference["moe_dropped_fraction"] == [0.0] * STEPS
    assert all(x > 1.0 for x in reference["moe_load_imbalance"])


CAPACITY = ("model.capacity_factor=1.0",)


@pytest.fixture(scope="module")
def capacity_reference() -> dict:
    return single(CAPACITY)


@pytest.mark.parametrize(("world_size", "overrides"), [
    (2, (*CAPACITY, *ep(2))),
    (2, CAPACITY),  # ep=1 over dp=2: the same rule per rank
], ids=lambda v: str(v))
def test_capacity_expert_parallel_matches_single_process(distributed, capacity_reference,
                                                         world_size, overrides):
    for result in distributed(train, world_size, overrides):
        assert_same_run(result, capacity_reference)
    assert all(x > 0 for x in capacity_reference["moe_dropped_fraction"])


def test_qwen3_moe_expert_parallel_matches_single_process(distributed):
    qwen = ("model=qwen3_moe_tiny",)
    expected = single(qwen)
    for result in distributed(train, 2, (*qwen, *ep(2))):
        assert_same_run(result, expected)
