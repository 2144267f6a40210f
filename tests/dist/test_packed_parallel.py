"""Packed rows with document masks and masked labels on every layout: the losses of tp
(with sp), pp (1f1b), dp with 2 micro-batches and dp ZeRO-1 equal the single-process run,
for Llama and Qwen3; and pre-training data with data.document_masking under tp and pp."""

from __future__ import annotations

import json

import pytest

from tests.conftest import tiny_config
from tests.packed_source import NAME
from trntrain.distributed import World
from trntrain.trainer import Trainer

STEPS = 4
PACKED = ("data=synthetic", f"data.source={NAME}", f"train.max_steps={STEPS}",
          "train.eval_every=2", "train.micro_batch_size=2")
LAYOUTS = {
    "tp2_sp": (2, ("parallel.tp=2", "parallel.sequence_parallel=true")),
    "pp2_1f1b": (2, ("parallel.pp=2", "parallel.schedule=1f1b")),
    "dp2": (2, ()),
    "dp2_zero1": (2, ("parallel.zero1=true",)),
}


def losses(rank: int, world_size: int, overrides: tuple[str, ...]) -> list[tuple[float, ...]]:
    import tests.packed_source  # noqa: F401 - registers the source in this process

    trainer = Trainer(tiny_config(*overrides), World(rank, world_size, rank))
    return [(r["loss"], r.get("eval_loss", 0.0), r["grad_norm"]) for r in trainer.fit()]


@pytest.mark.parametrize("model", ["llama_tiny", "qwen3_tiny"])
def test_packed_losses_equal_the_single_process_run(distributed, model):
    base = (*PACKED, f"model={model}")
    reference = losses(0, 1, base)
    for name, (world, layout) in LAYOUTS.items():
        got = distributed(losses, world, (*base, *layout))[0]
        for step, (a, b) in enumerate(zip(got, reference, strict=True), start=1):
            for x, y, what in zip(a, b, ("loss", "eval_loss", "grad_norm"), strict=True):
                assert abs(x - y) <= 1e-5 * max(1.0, abs(y)), (name, step, what, x, y)


def test_document_masking_of_pretraining_data_on_tp_and_pp(distributed, tmp_path):
    # Documents of 5 to 40 bytes: every window of 32 tokens holds several.
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": "word " * (1 + i % 8) + str(i)}) + "\n"
                            for i in range(400)))
    data = ("data=jsonl", f"data.path={docs}", "train.max_steps=3", "train.micro_batch_size=2")
    base = (*data, "data.document_masking=true")
    reference = losses(0, 1, base)
    unmasked = losses(0, 1, data)
    assert abs(reference[0][0] - unmasked[0][0]) > 1e-4  # the masks change the loss
    for layout in (("parallel.tp=2", "parallel.sequence_parallel=true"), ("parallel.pp=2",)):
        got = distributed(losses, 2, (*base, *layout))[0]
        for a, b in zip(got, reference, strict=True):
            assert abs(a[0] - b[0]) <= 1e-5 * max(1.0, abs(b[0])), (layout, a, b)
