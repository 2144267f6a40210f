"""qwen3_tiny on gloo ranks against the single-process run: tp (kv heads sharded and
replicated), sp, pipelines, ZeRO-1, activation checkpointing, and the q and k norms'
gradients, which each tp rank computes from its own heads only."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_config
from trntrain.distributed import World
from trntrain.parallel import comm
from trntrain.trainer import Trainer

STEPS = 10
# qwen3_tiny: 8 query heads of 32 on a width of 128, 2 kv heads, tied embeddings, 4 layers.
QWEN = ("model=qwen3_tiny",)
# 4 micro-batches of 2 sequences per step, so that pipelines have several in flight.
BASE = (*QWEN, f"train.max_steps={STEPS}", "train.eval_every=5", "train.micro_batch_size=2")


def records_of(trainer: Trainer) -> dict:
    records = trainer.fit()
    return {"loss": [r["loss"] for r in records],
            "eval_loss": [r["eval_loss"] for r in records if "eval_loss" in r],
            "grad_norm": [r["grad_norm"] for r in records]}


def train(rank: int, world_size: int, overrides: tuple[str, ...]) -> dict:
    return records_of(Trainer(tiny_config(*BASE, *overrides), World(rank, world_size, rank)))


@pytest.fixture(scope="module")
def reference() -> dict:
    return train(0, 1, ())


def full_gradients(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every gradient of the rank's model, tp shards gathered into the full tensor."""
    grads = {}
    for name, p in trainer.model.named_parameters():
        g = p.grad.detach()
        if hasattr(p, "tp_shard"):
            g = comm.all_gather_dim(g, p.tp_shard[0], trainer.mesh.tp_group)
        grads[name] = g
    return grads


def first_gradients_then_train(rank: int, world_size: int, overrides: tuple[str, ...]) -> dict:
    """The first step's gradients against the single-process model's, then a run."""
    single = Trainer(tiny_config(*BASE), World())
    single.forward_backward(single.train_batches.step(0))
    trainer = Trainer(tiny_config(*BASE, *overrides), World(rank, world_size, rank))
    trainer.forward_backward(trainer.train_batches.step(0))
    gathered = full_gradients(trainer)
    for name, p in single.model.named_parameters():
        torch.testing.assert_close(gathered[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)
    trainer.optimizer.zero_grad(set_to_none=True)
    return records_of(trainer)


def assert_same_run(result: dict, expected: dict) -> None:
    assert result["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert result["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-5)
    # As for Llama (tests/dist/test_tensor_parallel.py): Adam's division by tiny second
    # moments of rarely seen (tied) embedding rows turns round-off into visible
    # differences of the norm while the losses agree to 1e-6.
    assert result["grad_norm"] == pytest.approx(expected["grad_norm"], rel=2e-3)


def tp(size: int, sp: bool = False) -> tuple[str, ...]:
    return (f"parallel.tp={size}", f"parallel.sequence_parallel={str(sp).lower()}")


@pytest.mark.parametrize(("world_size", "overrides"), [
    (2, tp(2)),  # 1 kv head per rank
    (2, tp(2, sp=True)),
    (4, tp(4)),  # 4 ranks > 2 kv heads: each kv head replicated on 2 ranks
    (4, tp(4, sp=True)),
    (4, tp(2, sp=True)),  # tp=2 x dp=2
], ids=lambda v: str(v))
def test_tp_matches_single_process(distributed, reference, world_size, overrides):
    for result in distributed(first_gradients_then_train, world_size, overrides):
        assert_same_run(result, reference)


def pp(stages: int, schedule: str, transport: str, virtual: int = 1) -> tuple[str, ...]:
    return (f"parallel.pp={stages}", f"parallel.schedule={schedule}",
            f"parallel.pp_transport={transport}", f"parallel.virtual_pp={virtual}")


@pytest.mark.parametrize(("world_size", "overrides"), [
    # 4 chunks of one layer; the tied head on the last chunk, the embedding on the first.
    (2, pp(2, "interleaved_1f1b", "isend", 2)),
    (4, (*pp(2, "interleaved_1f1b", "allgather", 2), *tp(2, sp=True))),
    (2, pp(2, "1f1b", "allgather")),
    (2, ("parallel.zero1=true",)),  # dp=2, optimizer state sharded
    (4, ("parallel.zero1=true", *tp(2))),
    (2, (*tp(2), "parallel.activation_checkpointing=selective")),
    (2, (*pp(2, "gpipe", "isend"), "parallel.activation_checkpointing=full")),
], ids=lambda v: str(v))
def test_layout_matches_single_process(distributed, reference, world_size, overrides):
    for result in distributed(train, world_size, overrides):
        assert_same_run(result, reference)


def qk_norm_gradients(rank: int, world_size: int, overrides: tuple[str, ...]) -> dict:
    """The q and k norms' gradients of one step on this tp rank before and after their
    sum over tp, and the single-process model's."""
    single = Trainer(tiny_config(*BASE), World())
    single.forward_backward(single.train_batches.step(0))
    trainer = Trainer(tiny_config(*BASE, *overrides), World(rank, world_size, rank))
    reduce = trainer.tp_grad_reducer.reduce
    trainer.tp_grad_reducer.reduce = lambda: None
    trainer.forward_backward(trainer.train_batches.step(0))
    names = [n for n, _ in trainer.model.named_parameters() if n.endswith("_norm.weight")
             and ".attention." in n]
    params = dict(trainer.model.named_parameters())
    assert all(getattr(params[n], "tp_grad_reduce", False) for n in names)
    own = {n: params[n].grad.clone() for n in names}
    reduce()
    expected = dict(single.model.named_parameters())
    # Lists, not tensors: a tensor is passed to the parent by a file descriptor that
    # vanishes when this worker exits first.
    return {n: (own[n].tolist(), params[n].grad.tolist(), expected[n].grad.tolist())
            for n in names}


@pytest.mark.parametrize(("world_size", "overrides"), [
    (2, tp(2)), (4, tp(4)), (4, tp(4, sp=True))], ids=lambda v: str(v))
def test_qk_norm_gradients_are_summed_over_tp(distributed, world_size, overrides):
    """Each rank's own gradient is a part of the whole (it misses the other ranks' heads);
    summed over tp it is the single-process gradient."""
    for by_name in distributed(qk_norm_gradients, world_size, overrides):
        assert len(by_name) == 2 * 4
        for name, values in by_name.items():
            own, summed, expected = (torch.tensor(v) for v in values)
            assert not torch.allclose(own, expected, rtol=1e-3), name
            torch.testing.assert_close(summed, expected, rtol=1e-5, atol=1e-7, msg=name)
