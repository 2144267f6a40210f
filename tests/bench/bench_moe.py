"""All-to-all volume and step time of expert parallelism.

For ep in {1, 2, 4} (dp = world size = ep) on `mixtral_tiny`, dropless and with a
capacity factor, forked gloo ranks (tests.conftest.run_distributed) each build a
`Trainer` and:

1. count the bytes of the all-to-alls of exactly one `train_step` after warm-up
   (`comm.COMM_STATS`: the logical size of each result, rows a rank keeps for itself
   included), summed over the ranks, against the analytic volume: per MoE layer and
   micro-batch, four exchanges (dispatch and combine forward, their two backward) of
   every rank's tokens x top_k rows of dim elements (dropless; the E counts, int64,
   exchanged once more forward), or of E x C rows per rank with a capacity C;
   (ep - 1) / ep of it crosses between ranks under uniform routing;
2. time `train_step` (median over --steps steps after warm-up, slowest rank of each
   step, ranks aligned by a barrier before each step).

The machine has 2 cores: ep=4 runs 4 single-threaded processes on them, so its times
measure oversubscription. Prints figures; never asserts. Run from the repository root:

    .venv/bin/python -m tests.bench.bench_moe
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.distributed as dist

from tests.conftest import run_distributed
from trntrain.config import compose
from trntrain.distributed import World
from trntrain.parallel import comm
from trntrain.trainer import Trainer

BASE = ["model=mixtral_tiny", "backend=cpu", "train.seq_len=128", "train.global_batch_size=8",
        "train.micro_batch_size=2", "train.eval_every=0", "logging.progress_bar=false",
        "data.max_bytes=300000"]


def measure(rank: int, world_size: int, overrides: list[str], steps: int) -> dict:
    cfg = compose([*BASE, *overrides, f"parallel.ep={world_size}"])
    trainer = Trainer(cfg, World(rank, world_size, rank))
    batches = trainer.train_batches
    trainer.train_step(batches.step(0))  # warm-up
    comm.COMM_STATS.reset()
    comm.COMM_STATS.enabled = True
    trainer.train_step(batches.step(1))
    comm.COMM_STATS.enabled = False
    volume = comm.COMM_STATS.bytes.get("all_to_all", 0)
    times = []
    for step in range(steps):
        if dist.is_initialized():
            dist.barrier()
        start = time.perf_counter()
        trainer.train_step(batches.step(2 + step))
        times.append(time.perf_counter() - start)
    return {"bytes": volume, "times": times}


def analytic(cfg, ep: int) -> int:
    """All-to-all bytes of one step summed over the ep ranks (see the module docstring)."""
    m, t = cfg.model, cfg.train
    micro = t.global_batch_size // t.micro_batch_size  # over all ranks
    tokens = t.micro_batch_size * t.seq_len
    if m.capacity_factor is None:
        rows = tokens * m.top_k
        per_exchange = rows * m.dim * 4
        counts = m.num_experts * 8
        return m.n_layers * micro * (4 * per_exchange + counts) if ep > 1 else 0
    cap = math.ceil(m.capacity_factor * tokens * m.top_k / m.num_experts)
    return m.n_layers * micro * 4 * m.num_experts * cap * m.dim * 4 if ep > 1 else 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ep", type=int, nargs="*", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as every forked rank: ep=1 in this process compares fairly
    print("| routing | ep | all-to-all bytes / step (all ranks) | analytic | ratio | "
          "crossing ranks | step time (median) |")
    print("|---|---|---|---|---|---|---|")
    for name, overrides in (("dropless", []), ("capacity 1.25", ["model.capacity_factor=1.25"])):
        for ep in args.ep:
            cfg = compose([*BASE, *overrides, f"parallel.ep={ep}"])
            if ep == 1:
                results = [measure(0, 1, overrides, args.steps)]
            else:
                results = run_distributed(measure, ep, overrides, args.steps, timeout_s=900)
            measured = sum(r["bytes"] for r in results)
            expected = analytic(cfg, ep)
            ratio = f"{measured / expected:.4f}" if expected else "-"
            slowest = [max(r["times"][i] for r in results) for i in range(args.steps)]
            crossing = int(expected * (ep - 1) / ep)
            print(f"| {name} | {ep} | {measured:,} | {expected:,} | {ratio} | {crossing:,} | "
                  f"{statistics.median(slowest) * 1e3:.0f} ms |")


if __name__ == "__main__":
    main()
