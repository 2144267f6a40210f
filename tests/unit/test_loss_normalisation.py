"""The loss of a step is the mean over the global batch's trained tokens, against a hand
computation that runs every document of the packed rows alone; and it does not depend on
how the batch is cut into micro-batches (the classic accumulation bug: a mean of
per-micro-batch means weighs a token of a sparsely trained micro-batch more)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import tiny_config
from tests.packed_source import NAME
from trntrain.data.base import IGNORE_INDEX
from trntrain.distributed import World
from trntrain.trainer import Trainer

PACKED = ("data=synthetic", f"data.source={NAME}")


def spans(documents: torch.Tensor) -> list[tuple[int, int]]:
    """(start, stop) of each run of equal document indices in a row."""
    cuts = [0, *((documents[1:] != documents[:-1]).nonzero().flatten() + 1).tolist(),
            len(documents)]
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def alone_loss_sum(model, inputs: torch.Tensor, labels: torch.Tensor,
                   documents: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed loss and trained count of a packed row, each document run on its own."""
    total, count = torch.zeros(()), 0
    for start, stop in spans(documents):
        logits = model(inputs[None, start:stop])[0]
        total = total + F.cross_entropy(logits.float(), labels[start:stop], reduction="sum",
                                        ignore_index=IGNORE_INDEX)
        count += int((labels[start:stop] != IGNORE_INDEX).sum())
    return total, count


@pytest.mark.parametrize("model", ["llama_tiny", "qwen3_tiny"])
def test_step_loss_is_the_mean_over_trained_tokens_of_documents_run_alone(model):
    trainer = Trainer(tiny_config(*PACKED, f"model={model}", "train.micro_batch_size=2"),
                      World())
    batches = trainer.train_batches.step(0)
    assert len(batches) == 4
    loss = trainer.forward_backward(batches)
    got = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}

    trainer.optimizer.zero_grad(set_to_none=True)
    total, count, means = torch.zeros(()), 0, []
    for batch in batches:
        part, part_count = torch.zeros(()), 0
        for r in range(len(batch.inputs)):
            s, c = alone_loss_sum(trainer.model, batch.inputs[r], batch.labels[r],
                                  batch.documents[r])
            part, part_count = part + s, part_count + c
        total, count = total + part, count + part_count
        means.append(float(part) / part_count)
    reference = total / count
    reference.backward()
    torch.testing.assert_close(loss, reference.detach(), rtol=1e-5, atol=1e-6)
    for name, p in trainer.model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    # The data is such that the classic mean of micro-batch means would be wrong.
    assert abs(sum(means) / len(means) - float(reference)) > 1e-3


def test_gradients_do_not_depend_on_the_micro_batch_count():
    grads = []
    for micro in (1, 8):
        trainer = Trainer(tiny_config(*PACKED, f"train.micro_batch_size={micro}"), World())
        loss = trainer.forward_backward(trainer.train_batches.step(0))
        grads.append((loss, {n: p.grad for n, p in trainer.model.named_parameters()}))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-6, atol=1e-7)
    for name, g in grads[0][1].items():
        torch.testing.assert_close(g, grads[1][1][name], rtol=1e-5, atol=1e-7, msg=name)
