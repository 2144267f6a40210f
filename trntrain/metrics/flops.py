"""Model FLOPs utilisation (MFU): the family's training FLOPs per token (e.g. 6 N +
12 L H Q T for Llama, `trntrain.models.llama.costs`) against a device's peak."""

from __future__ import annotations

from omegaconf import DictConfig

from trntrain.models import family_of


def flops_per_token(model: DictConfig, seq_len: int) -> float:
    return family_of(model).flops_per_token(model, seq_len)


def mfu(tokens_per_s: float, model: DictConfig, seq_len: int, devices: int,
        peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation, or None where the device has no meaningful peak (CPU)."""
    if peak_flops is None:
        return None
    return tokens_per_s * flops_per_token(model, seq_len) / (devices * peak_flops)
