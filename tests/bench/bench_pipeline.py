"""Pipeline bubble: measured idle time per stage against the analytical bubble.

For each configuration (pp stages, schedule, virtual stages v, micro-batches m per
step; dp=tp=1, so world size = pp), forked gloo ranks (tests.conftest.run_distributed)
each build a `Trainer`, run --warmup untimed steps and then --steps timed
`train_step`s (ranks aligned by a barrier before each), and report per stage:

- analytical: (p - 1) / (v m + p - 1), which assumes equal forward and backward
  times for every chunk and free transfers;
- table: the fraction of the timetable's ticks (`runner.train_table`) in which this
  rank runs no action; a tick is one unit of time, so it makes the same assumption;
- deps: the same schedule replayed with this run's measured forward and backward
  seconds per chunk, each action starting once its inputs exist (free transfers);
- ticks: the runner's timetable replayed with those seconds, each rank leaving a tick
  only when the neighbours it exchanges with in that tick are done too (the runner
  computes a tick, then exchanges), still with free transfers;
- own: 1 - compute_s / step_s of the rank's `PipelineRunner` (median over steps), the
  runner's own figure; step_s ends at the rank's last exchange, so a later stage
  that finishes early does not count its trailing wait (it waits in the
  gradient-norm all-reduce instead, outside the runner);
- vs slow: 1 - compute_s / (largest step_s over the ranks of that step), the idle
  fraction of the whole pipeline step, comparable with analytical, table, deps and
  ticks.

Backward costs about 2x forward, and the measured figures include transfers; the
last lines say how far measurement and models agree, without hiding disagreement.
Prints figures; never asserts on time. The machine has 2 cores: pp=4 runs 4
single-threaded processes on them, so its waiting includes CPU contention. Run from
the repository root (as a module, so that `tests.conftest` imports):

    .venv/bin/python -m tests.bench.bench_pipeline
    .venv/bin/python -m tests.bench.bench_pipeline --pp 2 --m 4 16 --schedules 1f1b --steps 10
    .venv/bin/python -m tests.bench.bench_pipeline --transport allgather --pp 2 --m 8
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from tests.conftest import run_distributed
from trntrain.config import compose
from trntrain.data import Batch
from trntrain.distributed import World
from trntrain.parallel.pipeline import PipelineRunner
from trntrain.parallel.pipeline_schedule import Action, rank_actions, timetable
from trntrain.trainer import Trainer

BASE_OVERRIDES = [
    "backend=cpu",
    "model.dim=256",
    "model.n_layers=8",
    "model.n_heads=8",
    "model.n_kv_heads=4",
    "model.ffn_hidden_dim=768",
    "train.seq_len=128",
    "train.micro_batch_size=2",
    "train.eval_every=0",
    "logging.progress_bar=false",
    "data.max_bytes=300000",
    "optim.warmup_steps=1",
]


@dataclass(frozen=True)
class Layout:
    pp: int
    schedule: str
    virtual: int
    microbatches: int

    @property
    def name(self) -> str:
        v = f" v={self.virtual}" if self.virtual > 1 else ""
        return f"pp={self.pp} {self.schedule}{v} m={self.microbatches}"

    @property
    def analytical(self) -> float:
        p, v, m = self.pp, self.virtual, self.microbatches
        return (p - 1) / (v * m + p - 1)


# -- measurement --------------------------------------------------------------------------------

class ForwardClock:
    """Wall seconds of each chunk's forward (the last chunk's with the loss), and the
    main thread's CPU seconds in them, by hooks on the runner's chunks and loss."""

    def __init__(self, runner: PipelineRunner) -> None:
        self.wall = dict.fromkeys(runner.chunks, 0.0)
        self.cpu = 0.0
        self._start: tuple[float, float] = (0.0, 0.0)
        for index, module in runner.chunks.items():
            module.register_forward_pre_hook(lambda *_: self.start())
            module.register_forward_hook(lambda *_, chunk=index: self.stop(chunk))
        loss_fn, last = runner.loss_fn, runner.last_chunk

        def timed_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
            self.start()
            loss = loss_fn(logits, batch)
            self.stop(last)
            return loss

        runner.loss_fn = timed_loss

    def start(self) -> None:
        self._start = (time.perf_counter(), time.thread_time())

    def stop(self, chunk: int) -> None:
        self.wall[chunk] += time.perf_counter() - self._start[0]
        self.cpu += time.thread_time() - self._start[1]

    def reset(self) -> None:
        self.wall = dict.fromkeys(self.wall, 0.0)
        self.cpu = 0.0


def bench_layout(rank: int, world_size: int, cfg: DictConfig, warmup: int, steps: int) -> dict:
    """One rank: warm up, then time `steps` steps (the runner's figures and forwards)."""
    trainer = Trainer(cfg, World(rank, world_size, rank))
    runner = trainer.pipeline
    clock = ForwardClock(runner)
    batches = [trainer.train_batches.step(i) for i in range(warmup + steps)]
    records = []
    for i, batch in enumerate(batches):
        clock.reset()
        dist.barrier()
        start = time.perf_counter()
        trainer.train_step(batch)
        elapsed = time.perf_counter() - start
        if i >= warmup:
            records.append({"train_step_s": elapsed, "step_s": runner.step_s,
                            "compute_s": runner.compute_s, "forward_s": dict(clock.wall),
                            "forward_cpu_s": clock.cpu})
    table = runner.train_table
    idle_ticks = sum(a is None for a in table.actions[runner.groups.stage])
    return {"records": records, "table_idle": idle_ticks / table.ticks,
            "in_flight": runner.max_in_flight}


# -- models -------------------------------------------------------------------------------------

def replay_dependencies(layout: Layout, forward: dict[int, float], backward: dict[int, float]
             ) -> list[float]:
    """Idle fraction per rank of the schedule run with these seconds per action on each
    chunk, every action starting once its inputs exist (no ticks, free transfers)."""
    p, v, m = layout.pp, layout.virtual, layout.microbatches
    orders = [rank_actions(layout.schedule, p, v, m, r) for r in range(p)]
    last = p * v - 1
    finish: dict[Action, float] = {}
    free, position, busy = [0.0] * p, [0] * p, [0.0] * p
    while any(position[r] < len(orders[r]) for r in range(p)):
        progressed = False
        for r in range(p):
            if position[r] == len(orders[r]):
                continue
            a = orders[r][position[r]]
            if a.kind == "F":
                deps = [] if a.chunk == 0 else [Action("F", a.chunk - 1, a.microbatch)]
                cost = forward[a.chunk]
            else:
                deps = [Action("F", a.chunk, a.microbatch)]
                if a.chunk < last:
                    deps.append(Action("B", a.chunk + 1, a.microbatch))
                cost = backward[a.chunk]
            if any(d not in finish for d in deps):
                continue
            start = max([free[r], *(finish[d] for d in deps)])
            finish[a] = free[r] = start + cost
            busy[r] += cost
            position[r] += 1
            progressed = True
        if not progressed:
            raise RuntimeError(f"{layout.name}: the schedule deadlocks in simulation")
    makespan = max(free)
    return [1 - b / makespan for b in busy]


def replay_ticks(layout: Layout, forward: dict[int, float], backward: dict[int, float]
                 ) -> list[float]:
    """Idle fraction per rank of the runner's timetable played with these seconds per
    action, each rank leaving a tick once its own action and those of the peers it
    exchanges with in that tick have ended (free transfers, both ends wait)."""
    p, v, m = layout.pp, layout.virtual, layout.microbatches
    table = timetable([rank_actions(layout.schedule, p, v, m, r) for r in range(p)], p, v)
    now, busy = [0.0] * p, [0.0] * p
    for tick in range(table.ticks):
        end = list(now)
        for r in range(p):
            a = table.actions[r][tick]
            if a is not None:
                cost = (forward if a.kind == "F" else backward)[a.chunk]
                end[r] += cost
                busy[r] += cost
        peers: list[set[int]] = [set() for _ in range(p)]
        for t in table.transfers[tick]:
            peers[t.src].add(t.dst)
            peers[t.dst].add(t.src)
        now = [max([end[r], *(end[q] for q in peers[r])]) for r in range(p)]
    makespan = max(now)
    return [1 - b / makespan for b in busy]


# -- report -------------------------------------------------------------------------------------

@dataclass
class StageRow:
    table: float
    dependencies: float
    ticks: float
    own: float
    vs_slowest: float
    backward_ratio: float  # backward / forward seconds of this rank
    cpu_share: float  # CPU seconds / wall seconds of this rank's forwards


@dataclass
class Summary:
    rows: list[StageRow]
    step_s: float  # median over steps of the largest runner step_s
    train_step_s: float  # median over steps of the slowest rank's train_step

    def mean(self, field: str) -> float:
        return statistics.fmean(getattr(row, field) for row in self.rows)


def action_seconds(layout: Layout, by_rank: list[dict]
                   ) -> tuple[dict[int, float], dict[int, float], list[float]]:
    """Median seconds per micro-batch of each chunk's forward and backward, and each
    rank's backward / forward ratio. A rank's backward is its compute_s less its
    forwards, split over its chunks in proportion to their forwards."""
    forward: dict[int, float] = {}
    backward: dict[int, float] = {}
    ratios = []
    for result in by_rank:
        records = result["records"]
        per_chunk = {c: statistics.median(rec["forward_s"][c] for rec in records)
                     / layout.microbatches for c in records[0]["forward_s"]}
        fwd = sum(per_chunk.values())
        bwd = statistics.median(rec["compute_s"] - sum(rec["forward_s"].values())
                                for rec in records) / layout.microbatches
        for c, seconds in per_chunk.items():
            forward[c], backward[c] = seconds, bwd * seconds / fwd
        ratios.append(bwd / fwd)
    return forward, backward, ratios


def summarize(layout: Layout, by_rank: list[dict]) -> Summary:
    steps = list(zip(*(r["records"] for r in by_rank), strict=True))
    slowest = [max(rec["step_s"] for rec in step) for step in steps]
    forward, backward, ratios = action_seconds(layout, by_rank)
    dependencies = replay_dependencies(layout, forward, backward)
    ticks = replay_ticks(layout, forward, backward)
    rows = []
    for r, result in enumerate(by_rank):
        records = result["records"]
        own = statistics.median(1 - rec["compute_s"] / rec["step_s"] for rec in records)
        vs_slowest = statistics.median(1 - rec["compute_s"] / s
                                       for rec, s in zip(records, slowest, strict=True))
        cpu_share = (sum(rec["forward_cpu_s"] for rec in records)
                     / sum(sum(rec["forward_s"].values()) for rec in records))
        rows.append(StageRow(result["table_idle"], dependencies[r], ticks[r], own, vs_slowest,
                             ratios[r], cpu_share))
    train_step = statistics.median(max(rec["train_step_s"] for rec in step) for step in steps)
    return Summary(rows, statistics.median(slowest), train_step)


def print_stages(results: dict[Layout, tuple[list[dict], float]]) -> dict[Layout, Summary]:
    print(f"{'configuration':<31}{'stage':>5}{'analyt.':>8}{'table':>7}{'deps':>7}{'ticks':>7}"
          f"{'own':>7}{'vs slow':>8}{'bwd/fwd':>8}{'cpu':>5}{'step ms':>8}{'train_step':>11}"
          f"{'in-flight':>10}{'wall s':>7}")
    summaries = {}
    for layout, (by_rank, wall) in results.items():
        summary = summaries[layout] = summarize(layout, by_rank)
        for r, row in enumerate(summary.rows):
            line = (f"{layout.name if r == 0 else '':<31}{r:>5}{layout.analytical:>8.3f}"
                    f"{row.table:>7.3f}{row.dependencies:>7.3f}{row.ticks:>7.3f}{row.own:>7.3f}"
                    f"{row.vs_slowest:>8.3f}{row.backward_ratio:>8.2f}{row.cpu_share:>5.2f}")
            if r == 0:
                line += f"{summary.step_s * 1e3:>8.0f}{summary.train_step_s * 1e3:>11.0f}"
            else:
                line += " " * 19
            line += f"{by_rank[r]['in_flight']:>10}"
            print(line + (f"{wall:>7.1f}" if r == 0 else ""))
    return summaries


def print_pipeline(summaries: dict[Layout, Summary]) -> None:
    print(f"{'configuration':<31}{'analyt.':>8}{'deps':>7}{'ticks':>7}{'measured':>9}"
          f"{'meas-analyt':>12}{'meas-deps':>10}{'meas-ticks':>11}")
    for layout, s in summaries.items():
        measured = s.mean("vs_slowest")
        print(f"{layout.name:<31}{layout.analytical:>8.3f}{s.mean('dependencies'):>7.3f}"
              f"{s.mean('ticks'):>7.3f}{measured:>9.3f}{measured - layout.analytical:>+12.3f}"
              f"{measured - s.mean('dependencies'):>+10.3f}{measured - s.mean('ticks'):>+11.3f}")


def agreement(summaries: dict[Layout, Summary]) -> list[str]:
    """Plain statements on how the measured bubble follows the analytical one."""
    measured = {layout: s.mean("vs_slowest") for layout, s in summaries.items()}
    lines = []
    series: dict[tuple[int, str, int], list[Layout]] = {}
    for layout in measured:
        series.setdefault((layout.pp, layout.schedule, layout.virtual), []).append(layout)
    for layouts in series.values():
        if len(layouts) < 2:
            continue
        layouts.sort(key=lambda x: x.microbatches)
        values = [measured[x] for x in layouts]
        falling = all(b < a for a, b in zip(values, values[1:], strict=False))
        first, last = layouts[0], layouts[-1]
        lines.append(
            f"{first.name.rsplit(' m=', 1)[0]}: m {first.microbatches} -> {last.microbatches}: "
            f"analytical {first.analytical:.3f} -> {last.analytical:.3f}, measured "
            f"{values[0]:.3f} -> {values[-1]:.3f}, "
            f"{'falling at every m' if falling else 'NOT falling at every m'}.")
    for layout, value in measured.items():
        if layout.schedule != "interleaved_1f1b":
            continue
        plain = next((x for x in measured if x.schedule == "1f1b" and x.pp == layout.pp
                      and x.microbatches == layout.microbatches), None)
        if plain is None:
            continue
        verdict = ("lower, as predicted" if value < measured[plain]
                   else f"NOT lower, though predicted {layout.analytical:.3f} < "
                        f"{plain.analytical:.3f}")
        lines.append(f"pp={layout.pp} m={layout.microbatches}: interleaved v={layout.virtual} "
                     f"measured {value:.3f} vs 1f1b {measured[plain]:.3f}: {verdict}.")
    shared = [x.name for x, s in summaries.items() if min(r.cpu_share for r in s.rows) < 0.9]
    if shared:
        lines.append(f"cpu below 0.9 (ranks shared cores, with each other or other processes) "
                     f"in: {', '.join(shared)}; their waits time contention too.")
    worst = max(measured, key=lambda x: abs(measured[x] - x.analytical))
    lines.append(
        f"Largest |measured - analytical|: {measured[worst] - worst.analytical:+.3f} at "
        f"{worst.name}. The analytical bubble (like the table's idle ticks) assumes equal "
        "forward and backward times and free transfers; 'deps' drops the first assumption, "
        "'ticks' adds the runner's lock-step exchanges; what is left between 'ticks' and the "
        "measurement is transfer time, timing noise and CPU sharing between the ranks.")
    return lines


def layouts_to_run(args: argparse.Namespace) -> tuple[list[Layout], list[str]]:
    chosen, skipped = [], []
    for pp in args.pp:
        for schedule in args.schedules:
            if schedule == "gpipe":
                counts = args.gpipe_m if pp == 2 else []
            else:
                counts = args.m_pp4 if pp == 4 else args.m
            virtual = args.virtual if schedule == "interleaved_1f1b" else 1
            for m in counts:
                layout = Layout(pp, schedule, virtual, m)
                if schedule == "interleaved_1f1b" and m % pp:
                    skipped.append(f"{layout.name} (m must be a multiple of pp)")
                else:
                    chosen.append(layout)
    return chosen, skipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pp", type=int, nargs="+", default=[2, 4], help="pipeline stages")
    parser.add_argument("--schedules", nargs="+", default=["1f1b", "interleaved_1f1b", "gpipe"],
                        choices=["gpipe", "1f1b", "interleaved_1f1b"])
    parser.add_argument("--m", type=int, nargs="+", default=[2, 4, 8, 16],
                        help="micro-batches per step (every pp but 4)")
    parser.add_argument("--m-pp4", type=int, nargs="+", default=[4, 8],
                        help="micro-batches per step at pp=4")
    parser.add_argument("--gpipe-m", type=int, nargs="+", default=[8],
                        help="micro-batches per step of gpipe (run at pp=2 only)")
    parser.add_argument("--virtual", type=int, default=2, help="v of interleaved_1f1b")
    parser.add_argument("--transport", default="isend", choices=["isend", "allgather"])
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    parser.add_argument("--override", action="append", default=[],
                        help="Hydra override, e.g. model.n_layers=16 (repeatable)")
    args = parser.parse_args()

    chosen, skipped = layouts_to_run(args)
    cfg = compose([*BASE_OVERRIDES, *args.override])
    load_before = os.getloadavg()[0]
    results = {}
    for layout in chosen:
        layout_cfg = compose([
            *BASE_OVERRIDES, *args.override, f"parallel.pp={layout.pp}",
            f"parallel.virtual_pp={layout.virtual}", f"parallel.schedule={layout.schedule}",
            f"parallel.pp_transport={args.transport}",
            f"train.global_batch_size={layout.microbatches * cfg.train.micro_batch_size}",
        ])
        start = time.perf_counter()
        by_rank = run_distributed(bench_layout, layout.pp, layout_cfg, args.warmup, args.steps,
                                  timeout_s=300)
        results[layout] = (by_rank, time.perf_counter() - start)

    m, t = cfg.model, cfg.train
    cores = os.cpu_count()
    print(f"torch {torch.__version__} | {cores} cores, 1 thread per rank, gloo, transport "
          f"{args.transport} | model: dim {m.dim}, {m.n_layers} layers, {m.n_heads} heads, "
          f"{m.n_kv_heads} kv heads, ffn {m.ffn_hidden_dim}, vocab {m.vocab_size} | micro-batch "
          f"{t.micro_batch_size} x seq {t.seq_len}, fp32, dp=tp=1 | {args.warmup} warm-up + "
          f"{args.steps} timed steps, medians | load average (1 min) before "
          f"{load_before:.2f}, after {os.getloadavg()[0]:.2f}")
    if any(layout.pp > cores for layout in chosen):
        print(f"pp > {cores} runs more processes than the {cores} cores: there the waiting "
              "includes CPU contention, not only the pipeline's bubble.")
    for name in skipped:
        print(f"skipped: {name}")
    print("""
Idle fraction per stage. analyt.: (p-1)/(vm+p-1); table: idle ticks of runner.train_table;
both assume equal forward and backward times and free transfers. deps: the schedule replayed
with the measured seconds of each action and its data dependencies only; ticks: the runner's
timetable replayed with those seconds, neighbours waiting for each other at every exchange.
own: 1 - compute_s / step_s of this rank (the runner's figure); vs slow: 1 - compute_s / the
largest step_s of that step (the whole pipeline's idle fraction, like analyt., table, deps and
ticks). bwd/fwd: measured backward / forward seconds. cpu: CPU / wall seconds of this rank's
forwards (below 1: it lost its core to another process). step ms: the largest runner step_s;
train_step: the slowest rank's whole optimizer step. in-flight: most micro-batches held.
""")
    summaries = print_stages(results)
    print("\nWhole pipeline: mean over stages of vs slow (measured) against the models.\n")
    print_pipeline(summaries)
    print()
    for line in agreement(summaries):
        print(line)


if __name__ == "__main__":
    main()
