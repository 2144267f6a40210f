"""Activation checkpointing: keep fewer activations, recompute them in backward.

Applied from outside the model, per transformer block:
- `full`: each block keeps only its input; the whole block is recomputed;
- `selective`: only the attention core (softmax(QK^T)V, whose intermediates grow
  with the square of the sequence) is recomputed, as Megatron's selective mode.
"""

from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint

MODES = ("none", "full", "selective")


def apply_activation_checkpointing(model: nn.Module, mode: str) -> nn.Module:
    if mode == "none":
        return model
    for block in model.layers.values():
        if mode == "full":
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
        else:
            attention = block.attention
            attention.attend = functools.partial(checkpoint, attention.attend,
                                                 use_reentrant=False)
    return model
