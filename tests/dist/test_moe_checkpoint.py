"""MoE checkpoints under expert parallelism: DCP resume bitwise with ep2 and ZeRO-1,
resharded to one process and to ep4, and a Hugging Face export whose experts come from both ep
ranks, loaded by transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralForCausalLM

from tests.conftest import train_in_run_dir, tiny_config
from trntrain.checkpoint.manager import step_dir_name
from trntrain.distributed import World
from trntrain.trainer import Trainer

MOE = ("model=mixtral_tiny", "model.n_layers=2", "train.eval_every=0",
       "train.micro_batch_size=2")
RESUME = (*MOE, "train.max_steps=4", "checkpoint=dcp", "checkpoint.every=2",
          "checkpoint.keep=0")
EP2_ZERO = ("parallel.ep=2", "parallel.zero1=true")


def run(rank: int, world_size: int, run_dir: str, overrides: tuple[str, ...]) -> dict:
    return train_in_run_dir(rank, world_size, run_dir, (*RESUME, *overrides))


def test_resume_under_ep_is_bitwise_and_reshards_to_one_process_and_ep4(distributed, tmp_path):
    straight = distributed(run, 2, str(tmp_path / "a"), EP2_ZERO)
    halfway = tmp_path / "a" / "checkpoints" / step_dir_name(2)
    resumed = distributed(run, 2, str(tmp_path / "b"), (*EP2_ZERO, f"checkpoint.resume={halfway}"))
    for a, b in zip(straight, resumed, strict=True):
        assert sorted(b["loss"]) == [3, 4]
        assert all(b["loss"][s] == a["loss"][s] for s in (3, 4))  # bitwise
        assert b["params"] == a["params"]
    # Each rank held half of the experts.
    experts = [{n.split(".experts.")[1].split(".")[0] for n in r["params"] if ".experts." in n}
               for r in straight]
    assert experts == [{"0", "1", "2", "3"}, {"4", "5", "6", "7"}]
    # The ep2 checkpoint (experts and ZeRO slices from two ranks) continues in one process,
    # and over four ranks with two experts each (ep4, ZeRO-1 slices of another size).
    single = distributed(run, 1, str(tmp_path / "c"), (f"checkpoint.resume={halfway}",))[0]
    ep4 = distributed(run, 4, str(tmp_path / "d"),
                      ("parallel.ep=4", "parallel.zero1=true", f"checkpoint.resume={halfway}"))
    for result in (single, *ep4):
        assert [result["loss"][s] for s in (3, 4)] == pytest.approx(
            [straight[0]["loss"][s] for s in (3, 4)], rel=1e-5)


def export(rank: int, world_size: int, run_dir: str) -> None:
    cfg = tiny_config(*MOE, "train.max_steps=2", "checkpoint=hf", "parallel.ep=2")
    Trainer(cfg, World(rank, world_size, rank), run_dir=Path(run_dir)).fit()


TOKENS = torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(0))


def single_logits(rank: int, world_size: int) -> list:
    trainer = Trainer(tiny_config(*MOE, "train.max_steps=2"), World(rank, world_size, rank))
    trainer.fit()
    with torch.no_grad():
        return trainer.model.eval()(TOKENS).tolist()


def test_ep_export_loads_in_transformers_as_the_trained_model(distributed, tmp_path):
    distributed(export, 2, str(tmp_path / "ep"))
    expected = torch.tensor(distributed(single_logits, 1)[0])
    reference = AutoModelForCausalLM.from_pretrained(
        tmp_path / "ep" / "checkpoints" / step_dir_name(2), torch_dtype=torch.float32)
    assert type(reference) is MixtralForCausalLM
    with torch.no_grad():
        torch.testing.assert_close(reference(TOKENS).logits, expected, rtol=1e-4, atol=1e-5)
