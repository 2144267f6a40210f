"""Graphs compiled after warm-up on lazy backends (XLA, Neuron): each is minutes of
neuronx-cc, so a run that keeps compiling spends its hours there. Every compilation
after a phase's warm-up is reported once per new input signature, with what changed,
as `backend.recompile` says: warn (default), error (stop: for checking a config before
a long run) or ignore."""

from __future__ import annotations

import logging
from collections import defaultdict

import torch

from trntrain.errors import UserError

logger = logging.getLogger("trntrain")

POLICIES = ("warn", "error", "ignore")
# Calls of each phase that may compile: the first step creates the gradients, the
# second AdamW's state, the third is the steady state; an evaluation graph is built once.
WARM_CALLS = {"step": 3, "evaluation": 1}

Signature = tuple[tuple[str, tuple[int, ...], str], ...]


def signature(micro_batches: list) -> Signature:
    """(field, shape, dtype) of every tensor of a step's micro-batches (Batch tuples)."""
    return tuple((f"micro-batch {i} {name}", tuple(t.shape), str(t.dtype).removeprefix("torch."))
                 for i, batch in enumerate(micro_batches)
                 for name, t in batch._asdict().items() if isinstance(t, torch.Tensor))


def describe_change(before: Signature | None, after: Signature) -> str:
    if before is None:
        return "no inputs were recorded before it"
    old = {name: (shape, dtype) for name, shape, dtype in before}
    new = {name: (shape, dtype) for name, shape, dtype in after}
    def show(entry: tuple | None) -> str:
        return "absent" if entry is None else f"{entry[0]} {entry[1]}"

    changes = [f"{name} {show(old.get(name))} -> {show(new.get(name))}"
               for name in sorted(set(old) | set(new)) if old.get(name) != new.get(name)]
    if not changes:
        return ("its inputs have the shapes and dtypes of the last compiled call, so "
                "something inside the traced graph changed (a Python number traced as a "
                "constant, a branch on a host value)")
    return "its inputs changed: " + "; ".join(changes)


class RecompileWatch:
    """Follows the compile count around each step and evaluation of a lazy backend."""

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self.calls: dict[str, int] = defaultdict(int)
        self.last: dict[str, Signature] = {}
        self.reported: set[tuple[str, Signature]] = set()

    def observe(self, phase: str, step: int, compiled: int, inputs: Signature) -> None:
        """`compiled` graphs were compiled by this call of `phase` at `step`."""
        self.calls[phase] += 1
        before = self.last.get(phase)
        self.last[phase] = inputs
        if not compiled or self.calls[phase] <= WARM_CALLS[phase] or self.policy == "ignore":
            return
        if (phase, inputs) in self.reported:
            return
        self.reported.add((phase, inputs))
        message = (f"step {step}: the {phase} compiled {compiled} new graph(s) after warm-up; "
                   f"{describe_change(before, inputs)}. Every new graph is a neuronx-cc "
                   f"compilation (minutes) on Trainium: keep shapes static "
                   f"(backend.recompile=ignore silences this, error stops the run)")
        if self.policy == "error":
            raise UserError(message)
        logger.warning(message)
