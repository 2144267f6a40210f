"""Context parallelism's pieces in one process: the zig-zag split, and the tiled attention
core (online softmax over tiles of keys, exact backward) against SDPA with the same
masks; the layouts themselves are in tests/dist/test_context_parallel.py."""

from __future__ import annotations

import pytest
import torch

import trntrain.parallel.context as context
from trntrain.config import ConfigError, compose, validate
from trntrain.models.layers import attend, document_mask
from trntrain.parallel.context import ContextParallel, shard_sequence, zigzag_index


def test_zigzag_gives_each_rank_an_early_and_a_late_chunk_and_covers_the_sequence():
    seq, cp = 16, 4
    parts = [zigzag_index(seq, cp, r).tolist() for r in range(cp)]
    assert parts[0] == [0, 1, 14, 15] and parts[3] == [6, 7, 8, 9]
    assert sorted(i for p in parts for i in p) == list(range(seq))
    # Causal work (keys before each query) is equal on every rank.
    assert len({sum(i + 1 for i in p) for p in parts}) == 1
    x = torch.arange(2 * seq).view(2, seq)
    for r in range(cp):
        assert torch.equal(shard_sequence(x, cp, r), x[:, parts[r]])


def packed_documents(batch: int, seq: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.cumsum((torch.rand(batch, seq, generator=gen) < 0.15).long(), 1)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("tile", [4, 2048])
def test_tiled_attention_equals_sdpa_forward_and_backward(monkeypatch, packed, tile):
    monkeypatch.setattr(context, "KEY_TILE", tile)
    batch, seq, heads, kv_heads, dim = 2, 32, 4, 2, 8
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, seq, h, dim, generator=gen, requires_grad=True)
               for h in (heads, kv_heads, kv_heads))
    documents = packed_documents(batch, seq, 1) if packed else None
    # One rank: its two chunks are the two halves, the tiles those causality allows.
    _, core = ContextParallel(None, "allgather", seq).prepare(None, documents, q.device)
    out = attend(q, k, v, core)
    expected = attend(q, k, v, document_mask(documents) if packed else None)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    grad = torch.randn(out.shape, generator=gen)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(expected, (q, k, v), grad)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_tiled_attention_keeps_fp32_scores_under_bf16_autocast():
    seq = 64
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, seq, 2, 16, generator=gen).bfloat16() for _ in range(3))
    _, core = ContextParallel(None, "allgather", seq).prepare(None, None, q.device)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attend(q, k, v, core)
    exact = attend(q.float(), k.float(), v.float())
    assert out.dtype == torch.bfloat16
    # bf16's rounding of the output only (2^-8 relative), not of every score.
    torch.testing.assert_close(out.float(), exact, rtol=1e-2, atol=4e-3)


@pytest.mark.parametrize("overrides,world,key,words", [
    (("parallel.cp=3", "train.seq_len=128"), 3, "train.seq_len", "multiple of 2 x parallel.cp"),
    (("parallel.cp=2", "parallel.tp=4", "parallel.sequence_parallel=true",
      "train.seq_len=12"), 8, "train.seq_len", "parallel.cp x parallel.tp"),
    (("parallel.cp=2", "parallel.cp_attention=ring", "backend=xla"), 2,
     "parallel.cp_attention", "allgather (or auto) on backend xla"),
    (("parallel.cp_attention=rings",), 1, "parallel.cp_attention", "one of"),
    (("parallel.cp=8", "parallel.tp=8", "cluster=trn1_32xlarge"), 64, "parallel.cp",
     "at most cluster.procs_per_node / parallel.tp = 4"),
    (("parallel.cp=2", "model=mixtral_tiny"), 2, "parallel.cp", "1 for model.family=mixtral"),
    (("parallel.cp=2", "parallel.tp=2"), 2, "parallel.tp", "tp * cp * pp * dp = world size 2"),
])
def test_bad_context_parallel_settings_name_the_key(overrides, world, key, words):
    with pytest.raises(ConfigError) as err:
        validate(compose(list(overrides)), world)
    message = str(err.value)
    assert key in message and words in message, message
    assert "\n" not in message
