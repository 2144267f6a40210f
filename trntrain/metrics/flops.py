"""Model FLOPs per token and utilisation (MFU) against a device's peak.

FLOPs per token of training = 6 N + 12 L H Q T (PaLM, appendix B): N the
parameters of the matrix multiplications (the input embedding is a lookup, the
output head a matmul), L layers, H heads of size Q (H Q = the model width), T the
sequence length; 6 = 2 (multiply-add) x 3 (forward, two backward products), the
second term the attention scores and their weighting.
"""

from __future__ import annotations

from omegaconf import DictConfig


def kv_dim(model: DictConfig) -> int:
    """Width of the k and v projections: kv heads (n_heads without GQA) x head size."""
    return (model.n_kv_heads or model.n_heads) * (model.dim // model.n_heads)


def matmul_parameters(model: DictConfig) -> int:
    per_layer = model.dim * (model.dim + 2 * kv_dim(model)) + model.dim * model.dim
    per_layer += 3 * model.dim * model.ffn_hidden_dim
    return model.n_layers * per_layer + model.vocab_size * model.dim


def flops_per_token(model: DictConfig, seq_len: int) -> float:
    return 6 * matmul_parameters(model) + 12 * model.n_layers * model.dim * seq_len


def mfu(tokens_per_s: float, model: DictConfig, seq_len: int, devices: int,
        peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation, or None where the device has no meaningful peak (CPU)."""
    if peak_flops is None:
        return None
    return tokens_per_s * flops_per_token(model, seq_len) / (devices * peak_flops)
