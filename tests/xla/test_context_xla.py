"""Context parallelism's all-gather attention core (the default on xla and neuron) on
XLA:CPU, one device: its tiles of keys, online softmax and backward give eager CPU's
output and gradients, with document masks, and the second call compiles nothing."""

from __future__ import annotations

import torch

import trntrain.parallel.context as context
from trntrain.models.layers import attend
from trntrain.parallel.context import ContextParallel


def core_outputs(device: torch.device, packed: bool) -> list[torch.Tensor]:
    batch, seq = 2, 64
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, seq, h, 16, generator=gen) for h in (4, 2, 2))
    grad = torch.randn(batch, seq, 4, 16, generator=gen)
    documents = torch.cumsum((torch.rand(batch, seq, generator=gen) < 0.1).long(), 1)
    q, k, v = (t.to(device).requires_grad_() for t in (q, k, v))
    _, core = ContextParallel(None, "allgather", seq).prepare(
        None, documents.to(device) if packed else None, device)
    out = attend(q, k, v, core)
    grads = torch.autograd.grad(out, (q, k, v), grad.to(device))
    return [t.cpu() for t in (out, *grads)]


def test_all_gather_core_on_xla_equals_eager_and_compiles_once(monkeypatch):
    import torch_xla
    import torch_xla.debug.metrics as met

    monkeypatch.setattr(context, "KEY_TILE", 16)  # two tiles per chunk
    # Packed rows: some tiles hide a row entirely (its normaliser must stay finite).
    packed = True
    device = torch_xla.device()
    eager = core_outputs(torch.device("cpu"), packed)
    lazy = core_outputs(device, packed)
    for a, b in zip(lazy, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    compiled = met.metric_data("CompileTime")[0]
    core_outputs(device, packed)
    assert met.metric_data("CompileTime")[0] == compiled
