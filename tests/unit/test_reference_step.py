"""The trainer's steps against a plain PyTorch loop written here: same weights, same
batches, same AdamW, learning rates and clipping computed by hand."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import tiny_config
from trntrain.distributed import World
from trntrain.optim import lr_factor
from trntrain.trainer import Trainer

LR, WARMUP, MAX_NORM = 2e-3, 2, 0.05


def plain_loop(model, steps, lrs, betas, eps, weight_decay):
    """Forward, mean loss over micro-batches, backward, clip, AdamW: nothing else."""
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": weight_decay},
         {"params": vectors, "weight_decay": 0.0}], lr=lrs[0], betas=betas, eps=eps,
    )
    losses, norms = [], []
    for micro_batches, lr in zip(steps, lrs, strict=True):
        for group in opt.param_groups:
            group["lr"] = lr
        step_loss = 0.0
        for inputs, labels, *_ in micro_batches:
            logits = model(inputs)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
            (loss / len(micro_batches)).backward()
            step_loss += loss.item() / len(micro_batches)
        norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters()))
        scale = min(1.0, MAX_NORM / (norm.item() + 1e-6))
        for p in model.parameters():
            p.grad.mul_(scale)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(step_loss)
        norms.append(norm.item())
    return losses, norms


@pytest.mark.parametrize("micro_batch_size", [8, 4])
def test_two_steps_equal_plain_pytorch_loop(micro_batch_size):
    cfg = tiny_config("train.max_steps=2", f"train.micro_batch_size={micro_batch_size}",
                      f"optim.lr={LR}", f"optim.warmup_steps={WARMUP}",
                      f"optim.max_grad_norm={MAX_NORM}")
    trainer = Trainer(cfg, World())
    reference = copy.deepcopy(trainer.model)
    steps = [trainer.train_batches.step(s) for s in range(2)]
    assert len(steps[0]) == 8 // micro_batch_size

    records = trainer.fit()

    # Warm-up over 2 steps: the rate is LR/2, then LR.
    losses, norms = plain_loop(reference, steps, [LR / 2, LR], betas=(0.9, 0.95), eps=1e-8,
                               weight_decay=0.1)
    assert [r["lr"] for r in records] == pytest.approx([LR / 2, LR], rel=1e-12)
    assert [r["loss"] for r in records] == pytest.approx(losses, rel=1e-6, abs=1e-6)
    assert [r["grad_norm"] for r in records] == pytest.approx(norms, rel=1e-6)
    assert norms[0] > MAX_NORM  # clipping was exercised
    for (name, p), q in zip(trainer.model.named_parameters(), reference.parameters(),
                            strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6, msg=name)


def test_lr_schedule_by_hand():
    cfg = tiny_config("optim.lr=1.0", "optim.warmup_steps=4", "optim.min_lr_ratio=0.1")
    o, total = cfg.optim, 14
    # Warm-up reaches the peak at step warmup-1; cosine from step 4 to the last, 13.
    expected = [0.25, 0.5, 0.75, 1.0] + [
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 9)) for k in range(10)
    ]
    assert [lr_factor(s, o, total) for s in range(total)] == pytest.approx(expected)
    assert lr_factor(total - 1, o, total) == pytest.approx(0.1)
    o.decay = "linear"
    assert lr_factor(4 + 3, o, total) == pytest.approx(0.1 + 0.9 * (1 - 3 / 9))
    o.decay = "constant"
    assert lr_factor(10, o, total) == 1.0


def test_bf16_autocast_trains_close_to_fp32():
    fp32 = Trainer(tiny_config("train.max_steps=5"), World()).fit()
    bf16 = Trainer(tiny_config("train.max_steps=5", "train.precision=bf16_autocast"),
                   World()).fit()
    assert bf16[0]["loss"] == pytest.approx(fp32[0]["loss"], rel=2e-2)
    assert bf16[-1]["loss"] == pytest.approx(fp32[-1]["loss"], rel=3e-2)
    assert bf16[-1]["loss"] != fp32[-1]["loss"]  # autocast really ran in bf16
