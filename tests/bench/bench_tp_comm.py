"""Communication volume and step time of tensor (tp) and sequence (sp) parallelism.

For each layout tp in {1, 2, 4} (dp=1, world size = tp) x sp in {off, on}, on
`llama_tiny`, forked gloo ranks (tests.conftest.run_distributed) each build a
`Trainer` and:

1. count the bytes of every collective on rank 0 during exactly one
   `train_step` after warm-up (`comm.COMM_STATS`: the logical size of each
   collective's result per rank), split by phase: model forward, vocab-parallel
   cross-entropy, backward, tp gradient reduction, gradient-norm clip;
2. compare them with Megatron-LM's analytical volume for the same shapes: one
   input collective per attention block and one per MLP (copy_to_tp_region: an
   all-reduce backward; under sp, gather_from_sequence_region: an all-gather
   forward, a reduce-scatter backward), one output collective after each
   (all-reduce, or reduce-scatter under sp), the embedding and the head;
3. time `train_step` (median over --steps steps after warm-up, slowest rank of
   each step, ranks aligned by a barrier before each step).

The machine has 2 cores: tp=4 runs 4 single-threaded processes on them, so its
times measure oversubscription, not tensor parallelism. Prints figures; never
asserts on time. Run from the repository root (as a module, so that
`tests.conftest` imports):

    .venv/bin/python -m tests.bench.bench_tp_comm
    .venv/bin/python -m tests.bench.bench_tp_comm --tp 2 --steps 20 --override train.seq_len=256
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from tests.conftest import run_distributed
from trntrain.config import compose
from trntrain.data import Batch
from trntrain.distributed import World
from trntrain.parallel import comm
from trntrain.trainer import Trainer

OPS = ("all_reduce", "all_gather", "reduce_scatter")
# Phases of one train_step, in order; the probe below switches between them.
PHASES = ("forward", "loss", "backward", "tp-grad", "clip")
BASE_OVERRIDES = [
    "model=llama_tiny",
    "backend=cpu",
    "train.seq_len=128",
    "train.global_batch_size=8",
    "train.eval_every=0",
    "logging.progress_bar=false",
    "data.max_bytes=300000",
]
Volume = dict[tuple[str, str], int]  # (phase, op) -> bytes


# -- measurement --------------------------------------------------------------------------------

class PhaseProbe:
    """Attributes COMM_STATS counts to the phases of a train_step.

    Wraps two instance attributes of the trainer (no source change): `loss_fn`
    (entered once the model's forward has run, left before backward) and
    `tp_grad_reducer.reduce` (entered once backward has run). What follows the
    tp reduction (dp reduction, a no-op at dp=1; clip; optimizer) is "clip".
    """

    def __init__(self, trainer: Trainer) -> None:
        self.bytes: Volume = {}
        self.calls: Volume = {}
        self.phase: str | None = None
        self.seen: set[str | None] = set()
        self._last: dict[str, tuple[int, int]] = {}
        loss_fn, reduce = trainer.loss_fn, trainer.tp_grad_reducer.reduce

        def probed_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
            self.mark("loss")
            loss = loss_fn(logits, batch)
            self.mark("backward")
            return loss

        def probed_reduce() -> None:
            self.mark("tp-grad")
            reduce()
            self.mark("clip")

        trainer.loss_fn = probed_loss
        trainer.tp_grad_reducer.reduce = probed_reduce

    def mark(self, phase: str | None) -> None:
        """Credit what moved since the last mark to the current phase; switch to `phase`."""
        now = {op: (comm.COMM_STATS.bytes[op], comm.COMM_STATS.calls[op]) for op in OPS}
        if self.phase is not None:
            for op in OPS:
                key = (self.phase, op)
                self.bytes[key] = self.bytes.get(key, 0) + now[op][0] - self._last[op][0]
                self.calls[key] = self.calls.get(key, 0) + now[op][1] - self._last[op][1]
        self.phase, self._last = phase, now
        self.seen.add(phase)

    def measure(self, step: Callable[[], object]) -> tuple[Volume, Volume]:
        """Bytes and calls by (phase, op) of one call of `step`."""
        self.bytes, self.calls, self.seen = {}, {}, set()
        comm.COMM_STATS.reset()
        comm.COMM_STATS.enabled = True
        try:
            self.mark("forward")
            step()
            self.mark(None)
        finally:
            comm.COMM_STATS.enabled = False
        # If the trainer stops calling the wrapped hooks, the phase split would be wrong.
        assert self.seen == {*PHASES, None}, f"phases seen: {self.seen}"
        return self.bytes, self.calls


def bench_layout(rank: int, world_size: int, cfg: DictConfig, warmup: int, steps: int) -> dict:
    """One rank: warm up, count one step's collectives, then time `steps` steps."""
    trainer = Trainer(cfg, World(rank, world_size, rank))
    probe = PhaseProbe(trainer)
    batches = [trainer.train_batches.step(i) for i in range(warmup + 1 + steps)]
    assert len(batches[0]) == 1, "the phase split assumes one micro-batch per step"
    for i in range(warmup):
        trainer.train_step(batches[i])
    volume, calls = probe.measure(lambda: trainer.train_step(batches[warmup]))
    times = []
    for b in batches[warmup + 1:]:
        dist.barrier()
        start = time.perf_counter()
        trainer.train_step(b)
        times.append(time.perf_counter() - start)
    return {"bytes": volume, "calls": calls, "times": times,
            "params": trainer.num_params}


# -- analytical volumes -------------------------------------------------------------------------

def analytical(cfg: DictConfig, tp: int, sp: bool) -> Volume:
    """Bytes by (phase, op) of one step per rank, as the size of each collective's result."""
    if tp == 1:
        return {}
    m, t = cfg.model, cfg.train
    fp32 = 4
    layers, h = m.n_layers, m.dim
    bsh = t.global_batch_size * t.seq_len * h * fp32  # one (micro-)batch: dp=1, one micro-batch
    bs = t.global_batch_size * t.seq_len * fp32
    col = 2 * layers + 1  # attention and MLP inputs, + the output head's input
    row = 2 * layers + 1  # wo and w2 outputs, + the embedding's output
    v: Volume = {("loss", "all_reduce"): 3 * bs, ("clip", "all_reduce"): fp32}
    if not sp:
        v["forward", "all_reduce"] = row * bsh
        v["backward", "all_reduce"] = col * bsh
    else:
        v["forward", "all_gather"] = col * bsh
        v["forward", "reduce_scatter"] = row * bsh // tp
        v["backward", "reduce_scatter"] = col * bsh // tp
        v["backward", "all_gather"] = row * bsh
    grad_reduce = 0  # elements of tp-replicated parameters whose gradients differ by rank
    if sp:
        grad_reduce += (2 * layers + 1) * h  # attention_norm, ffn_norm per layer; final norm
    kv_heads = m.n_kv_heads or m.n_heads
    if tp > kv_heads:
        grad_reduce += 2 * layers * kv_heads * (h // m.n_heads) * h  # replicated wk, wv
    if grad_reduce:
        v["tp-grad", "all_reduce"] = grad_reduce * fp32
    return v


# -- report -------------------------------------------------------------------------------------

def ring_wire_bytes(measured: Volume, tp: int) -> float:
    """Bytes each rank sends for `measured` under ring algorithms, from result sizes N:
    all-reduce 2(tp-1)/tp N, all-gather (tp-1)/tp N, reduce-scatter (tp-1) N."""
    factor = {"all_reduce": 2 * (tp - 1) / tp, "all_gather": (tp - 1) / tp,
              "reduce_scatter": tp - 1}
    return sum(factor[op] * n for (_, op), n in measured.items())


def ratio(a: int, b: int) -> str:
    if b == 0:
        return "-" if a == 0 else "inf"
    return f"{a / b:.3f}"


def print_volumes(name: str, measured: Volume, calls: Volume, expected: Volume) -> None:
    keys = [(p, op) for p in PHASES for op in OPS
            if measured.get((p, op)) or expected.get((p, op))]
    rows = [(p, op, calls.get((p, op), 0), measured.get((p, op), 0), expected.get((p, op), 0))
            for p, op in keys]
    for op in OPS:
        rows.append(("total", op, sum(r[2] for r in rows if r[1] == op),
                     *(sum(vol.get((p, op), 0) for p in PHASES) for vol in (measured, expected))))
    for phase, op, n, meas, model in rows:
        print(f"{name:<13}{phase:<10}{op:<16}{n:>6}{meas:>13,}{model:>13,}"
              f"{ratio(meas, model):>8}")
        name = ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per layout")
    parser.add_argument("--override", action="append", default=[],
                        help="Hydra override, e.g. train.seq_len=256 (repeatable)")
    args = parser.parse_args()

    results = {}
    for tp in args.tp:
        for sp in (False, True):
            cfg = compose([*BASE_OVERRIDES, *args.override, f"parallel.tp={tp}",
                           f"parallel.sequence_parallel={str(sp).lower()}"])
            start = time.perf_counter()
            by_rank = run_distributed(bench_layout, tp, cfg, args.warmup, args.steps,
                                      timeout_s=300)
            results[tp, sp] = (cfg, by_rank, time.perf_counter() - start)

    cfg = results[args.tp[0], False][0]
    m, t = cfg.model, cfg.train
    print(f"torch {torch.__version__} | {os.cpu_count()} cores, 1 thread per rank, gloo | "
          f"model {m.name}: dim {m.dim}, {m.n_layers} layers, {m.n_heads} heads, "
          f"{m.n_kv_heads} kv heads, ffn {m.ffn_hidden_dim}, vocab {m.vocab_size} | "
          f"batch {t.global_batch_size} x seq {t.seq_len}, one micro-batch, fp32, dp=1")
    print("\nBytes per optimizer step on rank 0, as the size of each collective's result, "
          "against Megatron-LM's\nanalytical volume for the same shapes "
          "(ratio measured / analytical).\n")
    print(f"{'layout':<13}{'phase':<10}{'op':<16}{'calls':>6}{'measured':>13}{'analytical':>13}"
          f"{'ratio':>8}")
    for (tp, sp), (cfg, by_rank, _) in results.items():
        name = f"tp={tp} sp={'on' if sp else 'off'}"
        measured, calls = by_rank[0]["bytes"], by_rank[0]["calls"]
        if tp == 1:
            print(f"{name:<13}{'(no tp group: no collectives)':<32}"
                  f"{sum(measured.values()):>13,}")
            continue
        print_volumes(name, measured, calls, analytical(cfg, tp, sp))
        wire = ring_wire_bytes(measured, tp)
        print(f"{'':<13}sent per rank by ring algorithms: {wire:,.0f} B "
              f"({wire / sum(measured.values()):.3f} x the result sizes above)")
        if any(r["bytes"] != measured for r in by_rank[1:]):
            print(f"{'':<13}(other ranks moved different byte counts)")
        print()

    print("Step time (train_step; per step the slowest rank, ranks aligned by a barrier). "
          "The machine has\n"
          f"{os.cpu_count()} cores: tp=4 oversubscribes them 2:1, so its times measure "
          "contention, not tensor parallelism.\n")
    print(f"{'layout':<13}{'ranks':>6}{'params/rank':>13}{'median ms':>11}{'min ms':>9}"
          f"{'max ms':>9}{'tokens/s':>10}{'wall s':>8}")
    for (tp, sp), (cfg, by_rank, wall) in results.items():
        times = [max(step) for step in zip(*(r["times"] for r in by_rank), strict=True)]
        median = statistics.median(times)
        tokens = cfg.train.global_batch_size * cfg.train.seq_len
        name = f"tp={tp} sp={'on' if sp else 'off'}"
        print(f"{name:<13}{tp:>6}{by_rank[0]['params']:>13,}{median * 1e3:>11.1f}"
              f"{min(times) * 1e3:>9.1f}{max(times) * 1e3:>9.1f}{tokens / median:>10,.0f}"
              f"{wall:>8.1f}")


if __name__ == "__main__":
    main()
