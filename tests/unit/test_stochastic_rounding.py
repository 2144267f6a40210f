"""Pure bf16 with stochastic rounding: the rounding against its definition, the
optimizer against torch's fp32 AdamW, seeded runs bitwise equal, and the memory it
saves measured against the planner."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_config
from trntrain.config import ConfigError, validate
from trntrain.distributed import World
from trntrain.optim import StochasticAdamW, stochastic_round
from trntrain.plan import plan
from trntrain.trainer import Trainer

PURE_BF16 = ("train.precision=bf16", "train.master_weights=false")


def neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values just below and just above each fp32 value (equal if exact)."""
    down = x.to(torch.bfloat16)
    down = torch.where(down.float() > x, torch.nextafter(down, torch.full_like(down, -1e30)),
                       down)
    up = torch.where(down.float() < x, torch.nextafter(down, torch.full_like(down, 1e30)),
                     down)
    return down, up


def test_rounding_picks_a_neighbour_in_proportion_to_its_distance():
    gen = torch.Generator().manual_seed(0)
    x = torch.tensor([1.0 + 2**-10, -3.0 - 3 * 2**-9, 0.5, 1e-20, -7.25], dtype=torch.float32)
    down, up = neighbours(x)
    draws = torch.stack([stochastic_round(x, gen) for _ in range(20_000)]).float()
    assert bool(((draws == down.float()) | (draws == up.float())).all())
    # Unbiased: the mean of the draws is the value itself (to the sampling error).
    spacing = (up.float() - down.float()).clamp(min=1e-30)
    assert torch.allclose((draws.mean(0) - x) / spacing, torch.zeros(5), atol=0.02)
    # Values bf16 holds exactly never move.
    assert bool((draws[:, 2] == 0.5).all() and (draws[:, 4] == -7.25).all())


def test_rounding_is_seeded():
    x = torch.randn(1000)
    one = stochastic_round(x, torch.Generator().manual_seed(5))
    two = stochastic_round(x, torch.Generator().manual_seed(5))
    other = stochastic_round(x, torch.Generator().manual_seed(6))
    assert torch.equal(one, two) and not torch.equal(one, other)


def test_a_step_lands_next_to_torchs_fp32_adamw():
    torch.manual_seed(0)
    weight = torch.randn(64, 32).to(torch.bfloat16)
    grads = [torch.randn(64, 32).to(torch.bfloat16) for _ in range(3)]
    ours = torch.nn.Parameter(weight.clone())
    sr = StochasticAdamW([{"params": [ours], "weight_decay": 0.1}], lr=1e-2,
                         betas=(0.9, 0.95), eps=1e-8, seed=3)
    for grad in grads:
        # The reference: torch's AdamW in fp32 from this step's bf16 weights and moments.
        reference = torch.nn.Parameter(ours.detach().float())
        adamw = torch.optim.AdamW([reference], lr=1e-2, betas=(0.9, 0.95), eps=1e-8,
                                  weight_decay=0.1)
        if sr.state[ours]:
            adamw.state[reference] = {
                "step": sr.state[ours]["step"].clone(),
                "exp_avg": sr.state[ours]["exp_avg"].float(),
                "exp_avg_sq": sr.state[ours]["exp_avg_sq"].float()}
        reference.grad = grad.float()
        adamw.step()
        ours.grad = grad
        sr.step()
        for got, want in [(ours.detach(), reference.detach()),
                          (sr.state[ours]["exp_avg"], adamw.state[reference]["exp_avg"]),
                          (sr.state[ours]["exp_avg_sq"], adamw.state[reference]["exp_avg_sq"])]:
            assert got.dtype == torch.bfloat16
            down, up = neighbours(want)
            # One of the two bf16 neighbours of the fp32 result (1e-6: fp32 round-off).
            close = ((got.float() - down.float()).abs() <= 1e-6 * want.abs() + 1e-30) | (
                (got.float() - up.float()).abs() <= 1e-6 * want.abs() + 1e-30)
            assert close.float().mean() > 0.999


def run(*overrides: str, steps: int = 6) -> list[float]:
    records = Trainer(tiny_config(f"train.max_steps={steps}", *overrides), World()).fit()
    return [r["loss"] for r in records]


def test_seeded_runs_are_bitwise_equal_and_the_rounding_matters():
    stochastic = run(*PURE_BF16)
    assert stochastic == run(*PURE_BF16)
    nearest = run(*PURE_BF16, "train.stochastic_rounding=false")
    assert stochastic != nearest


@pytest.mark.parametrize("zero1", [False, True], ids=["replicated", "zero1"])
def test_bf16_moments_and_no_fp32_master_measured_as_planned(zero1):
    overrides = (*PURE_BF16, f"parallel.zero1={str(zero1).lower()}")
    trainer = Trainer(tiny_config(*overrides, "train.max_steps=1"), World())
    trainer.fit()
    numel = trainer.num_params
    memory = trainer.memory_bytes()
    # Two bf16 moments a weight, plus ZeRO-1's bf16 slice (dp=1: the whole model).
    assert memory["optimizer"] == (3 if zero1 else 2) * 2 * numel
    planned = plan(tiny_config(*overrides)).memory
    assert planned["optimizer_states"] + planned["master_weights"] == memory["optimizer"]
    with_masters = plan(tiny_config("train.precision=bf16",
                                    f"parallel.zero1={str(zero1).lower()}")).memory
    assert with_masters["optimizer_states"] + with_masters["master_weights"] == 12 * numel


def test_stochastic_rounding_needs_a_backend_that_rounds():
    with pytest.raises(ConfigError, match="train.stochastic_rounding"):
        validate(tiny_config(*PURE_BF16, "backend=xla"), 1)
    validate(tiny_config(*PURE_BF16, "backend=xla", "train.stochastic_rounding=false"), 1)
