"""Preference objectives on pairs of responses: DPO (with its IPO and hinge losses and
conservative label smoothing), ORPO and SimPO.

Each takes the summed log-probabilities of a pair's chosen and rejected responses (and
their trained token counts) and returns the per-pair loss and the per-pair rewards
(the implicit rewards TRL logs). The formulas, with Δ the policy's chosen-minus-rejected
log-ratio against the reference:

- DPO sigmoid: -(1 - ε) log σ(βΔ) - ε log σ(-βΔ)  (ε: label_smoothing, conservative DPO)
- DPO hinge:   max(0, 1 - βΔ)
- DPO ipo:     (Δ̄ - 1 / (2β))², Δ̄ with each log-ratio divided by its response's length
               (TRL's normalisation, confirmed by the IPO authors)
- ORPO:        -log P̄(chosen) - β log σ(log odds(chosen) - log odds(rejected)), with
               P̄ = exp(mean token log-probability) and odds(p) = p / (1 - p)
- SimPO:       -(1 - ε) log σ(β(ℓ̄c - ℓ̄r) - γ) - ε log σ(-(β(ℓ̄c - ℓ̄r) - γ)), ℓ̄ the mean
               token log-probability
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from trntrain.data.base import IGNORE_INDEX
from trntrain.data.preference import CHOSEN, REJECTED

LOSS_TYPES = ("sigmoid", "ipo", "hinge")
REFERENCES = ("model", "precomputed")
# The per-step metrics, as TRL names them (rewards/chosen, ...) with underscores.
METRICS = ("rewards_chosen", "rewards_rejected", "reward_accuracy", "reward_margin",
           "logps_chosen", "logps_rejected")


class PairLogps(NamedTuple):
    """Per pair: summed log-probabilities of the responses' trained tokens, and counts."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    def means(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.chosen / self.chosen_tokens.clamp(min=1),
                self.rejected / self.rejected_tokens.clamp(min=1))


def pair_logps(token_logps: torch.Tensor, labels: torch.Tensor, documents: torch.Tensor
               ) -> PairLogps:
    """Sum the token log-probabilities (rows, seq) of each row's chosen and rejected
    documents over their trained labels."""
    trained = labels != IGNORE_INDEX
    chosen = trained & (documents == CHOSEN)
    rejected = trained & (documents == REJECTED)
    zero = torch.zeros_like(token_logps)
    return PairLogps(torch.where(chosen, token_logps, zero).sum(-1),
                     torch.where(rejected, token_logps, zero).sum(-1),
                     chosen.sum(-1).to(token_logps.dtype), rejected.sum(-1).to(token_logps.dtype))


def smoothed_sigmoid_loss(x: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    loss = -F.logsigmoid(x)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-x)
    return loss


def dpo_loss(policy: PairLogps, reference: torch.Tensor, beta: float, loss_type: str,
             label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, chosen reward, rejected reward) per pair; `reference`: (pairs, 2) summed
    log-probabilities of the reference model (chosen, rejected)."""
    chosen_ratio = policy.chosen - reference[:, 0]
    rejected_ratio = policy.rejected - reference[:, 1]
    if loss_type == "sigmoid":
        loss = smoothed_sigmoid_loss(beta * (chosen_ratio - rejected_ratio), label_smoothing)
    elif loss_type == "hinge":
        loss = torch.relu(1 - beta * (chosen_ratio - rejected_ratio))
    elif loss_type == "ipo":
        delta = (chosen_ratio / policy.chosen_tokens.clamp(min=1)
                 - rejected_ratio / policy.rejected_tokens.clamp(min=1))
        loss = (delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; valid: {LOSS_TYPES}")
    return loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def log1m_exp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 and far below it."""
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(policy: PairLogps, beta: float
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    chosen, rejected = policy.means()
    log_odds = (chosen - rejected) - (log1m_exp(chosen) - log1m_exp(rejected))
    loss = -chosen - beta * F.logsigmoid(log_odds)
    return loss, beta * chosen.detach(), beta * rejected.detach()


def simpo_loss(policy: PairLogps, beta: float, gamma: float, label_smoothing: float = 0.0
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    chosen, rejected = policy.means()
    loss = smoothed_sigmoid_loss(beta * (chosen - rejected) - gamma, label_smoothing)
    return loss, beta * chosen.detach(), beta * rejected.detach()


class PreferenceObjective:
    """Summed per-pair loss of a micro-batch of preference rows (one pair per row); the
    step divides it by the global batch's pairs per dp rank, so the step's loss is the
    mean over pairs on every layout."""

    def __init__(self, cfg: DictConfig, token_losses) -> None:
        self.cfg = cfg
        self.token_losses = token_losses
        # Sums of the metrics over the pairs seen since the trainer last reset it.
        self.stats: dict[str, torch.Tensor] | None = {}

    @property
    def needs_reference(self) -> bool:
        return self.cfg.name == "dpo"

    def count(self, batch) -> torch.Tensor:
        return torch.tensor(float(batch.labels.shape[0]), device=batch.labels.device)

    def policy_logps(self, logits: torch.Tensor, batch) -> PairLogps:
        return pair_logps(-self.token_losses(logits, batch.labels), batch.labels,
                          batch.documents)

    def loss(self, logits: torch.Tensor, batch) -> torch.Tensor:
        policy = self.policy_logps(logits, batch)
        c = self.cfg
        if c.name == "dpo":
            loss, chosen, rejected = dpo_loss(policy, batch.reference, c.beta, c.loss_type,
                                              c.label_smoothing)
        elif c.name == "orpo":
            loss, chosen, rejected = orpo_loss(policy, c.beta)
        else:
            loss, chosen, rejected = simpo_loss(policy, c.beta, c.gamma, c.label_smoothing)
        if self.stats is not None:
            values = {
                "rewards_chosen": chosen, "rewards_rejected": rejected,
                "reward_accuracy": (chosen > rejected).float(),
                "reward_margin": chosen - rejected,
                "logps_chosen": policy.chosen.detach(),
                "logps_rejected": policy.rejected.detach(),
            }
            for name, value in values.items():
                self.stats[name] = self.stats.get(name, 0) + value.sum()
            self.stats["pairs"] = self.stats.get("pairs", 0) + torch.ones_like(loss).sum()
        return loss.sum()
