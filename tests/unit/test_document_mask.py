"""Packed sequences: a row of several documents, each token seeing its own document only
and rotary positions restarting at each, gives the logits of every document run alone;
under activation checkpointing and tensor / sequence parallelism too."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from tests.conftest import run_distributed
from trntrain.config import compose
from trntrain.models import build_model, materialize
from trntrain.models.layers import document_mask
from trntrain.parallel import ParallelDims, activation_checkpointing, build_mesh
from trntrain.parallel.comm import all_gather_dim

MODELS = ("llama_tiny", "qwen3_tiny")
# Three documents of different lengths, then padding (a fourth document): 32 tokens.
LENGTHS = (7, 12, 9, 4)


def model_of(name: str, mode: str = "none", tp_group=None, sp: bool = False):
    # A larger init std than training's, so that attention is far from uniform and a
    # token seeing another document, or a wrong position, visibly changes the logits.
    cfg = compose([f"model={name}", "model.init_std=0.05"]).model
    with torch.device("meta"):
        model = build_model(cfg, tp_group, sp)
    activation_checkpointing.apply_activation_checkpointing(model, mode, torch.device("cpu"))
    return materialize(model, torch.device("cpu"), seed=5)


def packed(lengths=LENGTHS, seed: int = 0):
    """tokens, positions, documents (1, sum(lengths)) of documents of these lengths."""
    tokens = torch.randint(0, 264, (1, sum(lengths)), generator=torch.Generator().manual_seed(seed))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    documents = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    return tokens, positions, documents


def test_document_mask_is_block_diagonal_causal():
    mask = document_mask(torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 2, 2]]))
    assert mask.shape == (2, 1, 5, 5) and mask.dtype == torch.bool
    expected = torch.tensor([[1, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0],
                             [0, 0, 1, 0, 0],
                             [0, 0, 1, 1, 0],
                             [0, 0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask[0, 0], expected)
    assert torch.equal(mask[1, 0].diagonal(), torch.ones(5, dtype=torch.bool))
    assert not mask[1, 0, 1, 0] and mask[1, 0, 2, 1] and not mask[1, 0, 3, 2]


@pytest.mark.parametrize("name", MODELS)
@torch.no_grad()
def test_packed_documents_equal_each_document_alone(name):
    model = model_of(name)
    tokens, positions, documents = packed()
    logits = model(tokens, positions, documents)
    start = 0
    for n in LENGTHS:
        alone = model(tokens[:, start:start + n])
        torch.testing.assert_close(logits[:, start:start + n], alone, atol=1e-5, rtol=0)
        start += n
    # Without the mask and positions, the later documents see the earlier ones.
    plain = model(tokens)
    assert (plain[:, LENGTHS[0]:] - logits[:, LENGTHS[0]:]).abs().max() > 1e-2


@pytest.mark.parametrize("name", MODELS)
@torch.no_grad()
def test_each_row_has_its_own_documents(name):
    model = model_of(name)
    rows = [packed(LENGTHS, seed=1), packed((20, 12), seed=2)]
    tokens, positions, documents = (torch.cat(parts) for parts in zip(*rows, strict=True))
    logits = model(tokens, positions, documents)
    for row, (t, p, d) in enumerate(rows):
        torch.testing.assert_close(logits[row:row + 1], model(t, p, d), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", MODELS)
@torch.no_grad()
def test_one_document_is_the_plain_causal_model(name):
    model = model_of(name)
    tokens = torch.randint(0, 264, (2, 24), generator=torch.Generator().manual_seed(3))
    positions = torch.arange(24).expand(2, 24)
    plain = model(tokens)
    torch.testing.assert_close(model(tokens, positions), plain, atol=1e-6, rtol=0)
    torch.testing.assert_close(model(tokens, positions, torch.zeros_like(tokens)), plain,
                               atol=1e-5, rtol=0)


def gradients(model, tokens, positions, documents) -> dict[str, torch.Tensor]:
    logits = model(tokens, positions, documents)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.roll(-1, 1).flatten()
                                      ).backward()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("mode", ["full", "selective"])
@pytest.mark.parametrize("name", MODELS)
def test_activation_checkpointing_keeps_the_gradients(name, mode, reentrant, monkeypatch):
    # Reentrant: torch's own, as torch-xla's checkpoint is (the XLA feature tests run that).
    monkeypatch.setattr(activation_checkpointing, "checkpoint_function",
                        lambda device: functools.partial(checkpoint, use_reentrant=reentrant))
    batch = packed()
    expected = gradients(model_of(name), *batch)
    got = gradients(model_of(name, mode), *batch)
    assert expected.keys() == got.keys()
    for key, grad in expected.items():
        torch.testing.assert_close(got[key], grad, atol=0, rtol=0, msg=key)


def _tensor_parallel_difference(rank: int, world_size: int, name: str, sp: bool) -> float:
    """Largest difference of the tp logits (vocabulary shards gathered) from one process's."""
    mesh = build_mesh(ParallelDims(tp=world_size, pp=1, dp=1), rank)
    model = model_of(name, tp_group=mesh.tp_group, sp=sp)
    with torch.no_grad():
        logits = all_gather_dim(model(*packed()), -1, mesh.tp_group)
        expected = model_of(name)(*packed())
    return (logits - expected).abs().max().item()


@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2_sp"])
@pytest.mark.parametrize("name", MODELS)
def test_tensor_and_sequence_parallel_packed_logits(name, sp):
    assert max(run_distributed(_tensor_parallel_difference, 2, name, sp)) < 1e-5
