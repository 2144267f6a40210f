"""Step-time overhead of trntrain against a bare PyTorch training loop.

One process, one model, one fixed batch: `Trainer.train_step` and a hand-written
AdamW loop (forward, fp32 cross-entropy, backward, clip, step, zero_grad) run
on deep copies of the same initial weights. The two loops alternate over
repeats, each repeat changing which one goes first, so drift on a noisy machine
hits both alike. Prints figures; never asserts on time.

    .venv/bin/python tests/bench/bench_step.py
    .venv/bin/python tests/bench/bench_step.py --override model.dim=256 --override model.n_layers=8
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from trntrain.config import compose
from trntrain.distributed import World
from trntrain.trainer import Trainer

Batches = list[tuple[torch.Tensor, torch.Tensor]]


class BareLoop:
    """The least a training step can do: what trntrain's step should cost on one process."""

    def __init__(self, model: nn.Module, optim_cfg, max_grad_norm: float) -> None:
        self.model = model
        params = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": optim_cfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(
            [g for g in groups if g["params"]], lr=optim_cfg.lr, betas=tuple(optim_cfg.betas),
            eps=optim_cfg.eps,
        )
        self.max_grad_norm = max_grad_norm

    def step(self, batches: Batches) -> torch.Tensor:
        loss_sum = 0.0
        for inputs, labels, *_ in batches:
            logits = self.model(inputs)
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
            (loss / len(batches)).backward()
            loss_sum += loss.detach()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum / len(batches)


def check_same_work(cfg, batches: Batches, steps: int) -> tuple[list[float], list[float]]:
    """Losses of `steps` steps of both loops from the same initial weights.

    trntrain's learning rate follows its schedule; the bare loop is given the same
    rate before each step (the only thing this pass adds to it).
    """
    trainer = Trainer(cfg, World(), run_dir=None)
    bare = BareLoop(copy.deepcopy(trainer.model), cfg.optim, cfg.optim.max_grad_norm)
    ours, theirs = [], []
    for _ in range(steps):
        for bare_group, group in zip(bare.optimizer.param_groups, trainer.optimizer.param_groups,
                                     strict=True):
            bare_group["lr"] = group["lr"]
        ours.append(trainer.train_step(batches)[0].item())
        theirs.append(bare.step(batches).item())
    return ours, theirs


def time_steps(step: Callable[[], object], n: int) -> list[float]:
    """Seconds of each of `n` calls of `step` (eager CPU: a call returns when its work is done)."""
    times = []
    for _ in range(n):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per loop per repeat")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per loop first")
    parser.add_argument("--repeats", type=int, default=5, help="alternations of the two loops")
    parser.add_argument("--check-steps", type=int, default=5,
                        help="steps of the same-loss check (0: skip it)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--override", action="append", default=[],
                        help="Hydra override, e.g. model.dim=256 (repeatable)")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = compose(["data=synthetic", *args.override])
    trainer = Trainer(cfg, World(), run_dir=None)
    batches = trainer.train_batches.step(0)
    tokens = sum(batch.labels.numel() for batch in batches)
    print(f"torch {torch.__version__} | {torch.get_num_threads()} threads | "
          f"model {cfg.model.name} dim={cfg.model.dim} n_layers={cfg.model.n_layers} "
          f"({trainer.num_params / 1e6:.2f} M params) | {len(batches)} micro-batch(es), "
          f"{tokens} tokens/step | precision {cfg.train.precision}")

    if args.check_steps > 0:
        ours, theirs = check_same_work(cfg, batches, args.check_steps)
        rel = max(abs(a - b) / abs(b) for a, b in zip(ours, theirs, strict=True))
        verdict = "same" if rel <= 1e-5 else "DIFFERENT"
        print(f"loss check over {args.check_steps} steps: trntrain {ours[-1]:.6f}, "
              f"bare {theirs[-1]:.6f}, max rel diff {rel:.1e} -> {verdict}")

    bare = BareLoop(copy.deepcopy(trainer.model), cfg.optim, cfg.optim.max_grad_norm)
    loops: dict[str, Callable[[], object]] = {
        "bare": lambda: bare.step(batches),
        "trntrain": lambda: trainer.train_step(batches),
    }
    for step in loops.values():
        time_steps(step, args.warmup)

    times: dict[str, list[float]] = {name: [] for name in loops}
    ratios = []
    for r in range(args.repeats):
        order = list(loops) if r % 2 == 0 else list(loops)[::-1]
        medians = {}
        for name in order:
            gc.collect()
            t = time_steps(loops[name], args.steps)
            times[name] += t
            medians[name] = statistics.median(t)
        ratios.append(medians["trntrain"] / medians["bare"])
        print(f"repeat {r + 1} ({' then '.join(order)}): bare {medians['bare'] * 1e3:.2f} ms, "
              f"trntrain {medians['trntrain'] * 1e3:.2f} ms, ratio {ratios[-1]:.3f}")

    print(f"\n{'loop':<10}{'median ms':>11}{'min ms':>9}{'tokens/s':>11}")
    for name, t in times.items():
        median = statistics.median(t)
        print(f"{name:<10}{median * 1e3:>11.2f}{min(t) * 1e3:>9.2f}{tokens / median:>11,.0f}")
    print(f"ratio trntrain/bare: {statistics.median(ratios):.3f} (median of {len(ratios)}; "
          f"range {min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    main()
