"""What a step minimises (`objective` config group): next-token cross-entropy
(`causal_lm`) or a preference objective on pairs (`dpo`, `orpo`, `simpo`:
`preference.py`), with the reference log-probabilities DPO compares against
(`reference.py`).

An objective gives the step two things per micro-batch: `loss(logits, batch)`, summed
over its units (trained tokens, or pairs), and `count(batch)`, the number of those
units; the step divides each rank's summed loss by the global batch's units per dp
rank, so the loss is the same mean on every layout.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from trntrain.data.base import IGNORE_INDEX
from trntrain.objective.preference import PreferenceObjective
from trntrain.parallel.tensor_parallel import (
    vocab_parallel_cross_entropy,
    vocab_parallel_token_losses,
)

OBJECTIVES = ("causal_lm", "dpo", "orpo", "simpo")
PREFERENCE_OBJECTIVES = ("dpo", "orpo", "simpo")


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy summed over the trained labels (not IGNORE_INDEX), in fp32."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum",
                           ignore_index=IGNORE_INDEX)


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of every position, (rows, seq), 0 where not trained."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none",
                           ignore_index=IGNORE_INDEX).view(labels.shape)


class CausalLM:
    """Summed cross-entropy over a micro-batch's trained tokens."""

    needs_reference = False
    stats = None

    def __init__(self, summed_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                 ) -> None:
        self.summed_loss = summed_loss

    def count(self, batch) -> torch.Tensor:
        return (batch.labels != IGNORE_INDEX).sum()

    def loss(self, logits: torch.Tensor, batch) -> torch.Tensor:
        return self.summed_loss(logits, batch.labels)


def build_objective(cfg: DictConfig | None, vocab_start: int | None, tp_group
                    ) -> CausalLM | PreferenceObjective:
    """The objective of `cfg` (the objective group; None: causal_lm). Under tp the
    losses are computed from this rank's vocabulary slice of the logits, which starts at
    `vocab_start`, without gathering them."""
    if tp_group is None or vocab_start is None:
        summed, per_token = causal_lm_loss, token_losses
    else:
        def summed(logits, labels):
            return vocab_parallel_cross_entropy(logits, labels, vocab_start, tp_group)

        def per_token(logits, labels):
            return vocab_parallel_token_losses(logits, labels, vocab_start, tp_group)
    if cfg is None or cfg.name == "causal_lm":
        return CausalLM(summed)
    return PreferenceObjective(cfg, per_token)


__all__ = ["OBJECTIVES", "PREFERENCE_OBJECTIVES", "CausalLM", "PreferenceObjective",
           "build_objective", "causal_lm_loss", "token_losses"]
