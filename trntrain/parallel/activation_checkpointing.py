"""Activation checkpointing: keep fewer activations, recompute them in backward.

Applied from outside the model, per transformer block:
- `full`: each block keeps only its input; the whole block is recomputed;
- `selective`: only the attention core (softmax(QK^T)V, whose intermediates grow
  with the square of the sequence) is recomputed, as Megatron's selective mode.

On XLA devices (xla, neuron) torch's non-reentrant checkpoint fails on torch 2.9
(it looks up `torch.xla`), and a plain recomputation would be merged back into
the forward pass by the compiler's common-subexpression elimination, keeping the
activations after all. torch-xla's own checkpoint is reentrant and puts an
optimization barrier before the recomputation, which prevents that.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

MODES = ("none", "full", "selective")


def checkpoint_function(device: torch.device) -> Callable:
    """torch-xla's checkpoint on XLA devices, torch's non-reentrant one elsewhere."""
    if device.type == "xla":
        from torch_xla.utils.checkpoint import checkpoint

        return functools.partial(checkpoint, use_reentrant=True)
    from torch.utils.checkpoint import checkpoint

    return functools.partial(checkpoint, use_reentrant=False)


def apply_activation_checkpointing(model: nn.Module, mode: str, device: torch.device
                                   ) -> nn.Module:
    """Wrap the blocks (full) or their attention cores (selective) for `device`."""
    if mode == "none":
        return model
    checkpoint = checkpoint_function(device)
    for block in model.layers.values():
        if mode == "full":
            block.forward = functools.partial(checkpoint, block.forward)
        else:
            attention = block.attention
            attention.attend = functools.partial(checkpoint, attention.attend)
    return model
