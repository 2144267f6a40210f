"""Chat SFT (data=chat: the shipped demo conversations, the byte tokenizer's template,
packed with document masks, the loss on the assistant's tokens) on every layout: the
losses, evaluation losses and gradient norms of tp2, pp2 (1f1b), dp2 with 2 micro-batches
and dp2 ZeRO-1 equal the single-process run, for Llama and Qwen3."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_config
from trntrain.distributed import World
from trntrain.trainer import Trainer

STEPS = 3
# 8 windows of 128 tokens a step (each holding 2 to 5 conversations), 2 per micro-batch:
# 2 micro-batches per dp rank at dp2.
CHAT = ("data=chat", "train.seq_len=128", f"train.max_steps={STEPS}", "train.eval_every=3",
        "train.eval_batches=2", "train.micro_batch_size=2", "optim.lr=3e-3")
LAYOUTS = {
    "tp2": ("parallel.tp=2",),
    "pp2_1f1b": ("parallel.pp=2", "parallel.schedule=1f1b"),
    "dp2_2_microbatches": (),
    "dp2_zero1": ("parallel.zero1=true",),
}


def trajectory(rank: int, world_size: int, overrides: tuple[str, ...]
               ) -> list[tuple[float, ...]]:
    trainer = Trainer(tiny_config(*overrides), World(rank, world_size, rank))
    return [(r["loss"], r.get("eval_loss", 0.0), r["grad_norm"]) for r in trainer.fit()]


@pytest.mark.parametrize("model", ["qwen3_tiny", "llama_tiny"])
def test_chat_sft_losses_equal_the_single_process_run(distributed, model):
    base = (*CHAT, f"model={model}")
    # One thread, as the forked ranks use: a tiny model gains nothing from more, and on a
    # busy 2-core machine OpenMP's spinning threads slow the step ten-fold.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = trajectory(0, 1, base)
    finally:
        torch.set_num_threads(threads)
    assert len(reference) == STEPS and reference[-1][1] > 0  # evaluated at the last step
    for name, layout in LAYOUTS.items():
        got = distributed(trajectory, 2, (*base, *layout))[0]
        assert len(got) == STEPS, name
        for step, (a, b) in enumerate(zip(got, reference, strict=True), start=1):
            for x, y, what in zip(a, b, ("loss", "eval_loss", "grad_norm"), strict=True):
                assert abs(x - y) <= 1e-5 * max(1.0, abs(y)), (name, step, what, x, y)
