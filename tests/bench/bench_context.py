"""Activation memory and step time of context parallelism (parallel.cp).

For cp in {1, 2, 4} (dp = tp = pp = 1, world size = cp) and each
`parallel.cp_attention` (allgather, ring; cp=1 has none), on `llama_tiny` at one
long sequence (--seq-len tokens, micro-batch 1, one micro-batch per step), forked
gloo ranks (tests.conftest.run_distributed) each build a `Trainer`, then:

1. run one `forward_backward` with every gradient already allocated (as after a
   first micro-batch), so that what the block allocates is activations only, and
   measure per rank:
   - saved: the peak bytes of the tensors autograd saves for backward, with
     `trntrain.metrics.memory.ActivationMemory` (the figure the planner models and
     tests/unit/test_plan.py compares it with). Each storage is attributed to
     where it was saved: the attention core (`layers.attend` and everything in
     `parallel/context.py`), or the innermost model module (Attention: the q, k, v
     projections' input and the rotary embedding; FeedForward; RMSNorm; the
     top-level model: embedding and head), or the loss;
   - alloc: the peak of the CPU allocator's bytes during the block less those at
     its start (weights, gradients, optimizer state and the batch excluded), from
     the allocation events of `torch.profiler` (profile_memory). ActivationMemory
     is blind to what is not saved for backward (kernel temporaries, score blocks,
     received buffers, tensors kept on an autograd context or on the attention
     object rather than saved); alloc sees them;
   - held: tensors reachable from the object the model's `context_parallel.prepare`
     returns (masks, indices, document ids built once per forward for every layer),
     not saved through autograd's hooks.
   This first pass runs cold: after a warm-up step both peaks differ by a few kB.
2. time `train_step` (--warmup untimed steps, the memory pass having warmed up
   already, then --steps timed ones, ranks aligned by a barrier before each; per
   step the slowest rank's wall seconds and the CPU seconds of all ranks, medians
   over steps).

The figures per rank are the largest over the cp ranks. The goal of context
parallelism is 1/cp of the single-process activations; "x cp" is the ratio to cp=1
times cp: 1.00 is exactly 1/cp, and the goal allows 1.10. "Not per token" splits
out what does not shrink with the local tokens: the all-gathered keys and values
(saved, a dimension of the whole sequence), fp32 copies the attention core saves of
lower-precision tensors (only under train.precision=bf16*), bool masks saved, the
tensors held by the attention object, and alloc - saved (transients).

Each rank runs one thread: cp=1 uses one core, and cp=4 runs 4 processes on a
machine with fewer cores, so its wall times measure oversubscription, not context
parallelism; tokens per CPU-second (the CPU time of all ranks) compares the work
whatever the number of cores. Prints figures; never asserts. Run from the
repository root:

    .venv/bin/python tests/bench/bench_context.py
    .venv/bin/python tests/bench/bench_context.py --quick
    .venv/bin/python tests/bench/bench_context.py --seq-len 8192 --cp 1 2 --modes ring
    .venv/bin/python tests/bench/bench_context.py --override train.precision=bf16
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import trntrain.models.layers as model_layers
import trntrain.parallel.context as context_module
from tests.conftest import run_distributed
from trntrain.config import compose
from trntrain.distributed import World
from trntrain.metrics.memory import ActivationMemory
from trntrain.trainer import Trainer

MIB = 2**20
BASE_OVERRIDES = [
    "model=llama_tiny",
    "backend=cpu",
    "train.global_batch_size=1",
    "train.micro_batch_size=1",
    "train.eval_every=0",
    "logging.progress_bar=false",
    "optim.warmup_steps=1",
]
ATTENTION_CORE = "attention core"
MODEL_TOP = "model (embedding, head)"
LOSS = "loss"
NOT_PER_TOKEN = ("whole-seq K/V", "fp32 copies", "bool masks", "held", "transient")


@dataclass(frozen=True)
class Layout:
    cp: int
    mode: str | None  # parallel.cp_attention; None for cp=1

    @property
    def name(self) -> str:
        return "cp=1" if self.cp == 1 else f"cp={self.cp} {self.mode}"

    def overrides(self) -> list[str]:
        if self.cp == 1:
            return ["parallel.cp=1"]
        return [f"parallel.cp={self.cp}", f"parallel.cp_attention={self.mode}"]


# -- measurement --------------------------------------------------------------------------------

@dataclass(frozen=True)
class SavedStorage:
    region: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int


class AttributedActivations(ActivationMemory):
    """ActivationMemory that also keeps, at its peak, which storages were live and
    where each was saved (read from the frames of the saving call)."""

    def __init__(self, top_level: set[int]) -> None:
        super().__init__()
        self.top_level = top_level  # ids of the trainer's model chunks
        self.live: dict[int, SavedStorage] = {}
        self.at_peak: dict[int, SavedStorage] = {}

    def _pack(self, tensor: torch.Tensor) -> Any:
        before = self.current
        holder = super()._pack(tensor)
        if self.current > before:  # a storage counted for the first time
            key = tensor.untyped_storage().data_ptr()
            self.live[key] = SavedStorage(self._region(), tuple(tensor.shape), tensor.dtype,
                                          self.current - before)
            if self.current == self.peak:
                self.at_peak = dict(self.live)
        return holder

    def _release(self, key: int, nbytes: int) -> None:
        super()._release(key, nbytes)
        if key not in self._refs:
            self.live.pop(key, None)

    def _region(self) -> str:
        """The attention core if the save happens under `layers.attend` or in
        parallel/context.py, else the innermost trntrain model module, else the loss."""
        frame = sys._getframe(2)
        while frame is not None:
            code = frame.f_code
            if code.co_filename == context_module.__file__ or (
                    code.co_filename == model_layers.__file__ and code.co_name == "attend"):
                return ATTENTION_CORE
            owner = frame.f_locals.get("self") if "self" in code.co_varnames else None
            if isinstance(owner, nn.Module) and type(owner).__module__.startswith(
                    "trntrain.models"):
                return MODEL_TOP if id(owner) in self.top_level else type(owner).__name__
            frame = frame.f_back
        return LOSS


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Kineto writes a line to file descriptor 2 when a trace starts and another when it
    stops; they would interleave with the table."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)


class AllocationPeak:
    """The peak, within the block, of the bytes the CPU allocator handed out less those
    it took back (on this thread and the autograd engine's: the events the profiler
    records): what the block allocated at most above what existed before it."""

    def __init__(self) -> None:
        self.peak = 0
        self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)

    def __enter__(self) -> AllocationPeak:
        with quiet_stderr():
            self._profile.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        with quiet_stderr():
            self._profile.__exit__(*exc)
        events = [e for e in self._profile.profiler.kineto_results.events()
                  if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
        current = 0
        for event in sorted(events, key=lambda e: e.start_ns()):
            current += event.nbytes()
            self.peak = max(self.peak, current)


def held_storages(obj: object, depth: int = 6, seen: set[int] | None = None
                  ) -> dict[int, int]:
    """Storage address -> bytes of the tensors reachable from `obj` through containers
    and the attributes of trntrain objects (not modules or process groups)."""
    seen = set() if seen is None else seen
    if depth < 0 or id(obj) in seen:
        return {}
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        return {storage.data_ptr(): storage.nbytes()}
    if isinstance(obj, dict):
        children: Any = obj.values()
    elif isinstance(obj, list | tuple | set | frozenset):
        children = obj
    elif isinstance(obj, nn.Module) or not type(obj).__module__.startswith("trntrain"):
        return {}
    elif dataclasses.is_dataclass(obj):
        children = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    else:
        children = [*getattr(obj, "__dict__", {}).values(),
                    *(getattr(obj, s) for s in getattr(type(obj), "__slots__", ())
                      if hasattr(obj, s))]
    found: dict[int, int] = {}
    for child in children:
        found.update(held_storages(child, depth - 1, seen))
    return found


class PrepareProbe:
    """Within the context, the storages reachable from what the model's
    `context_parallel.prepare` returns, read as it returns them (an instance attribute
    wrapped, restored on exit): keeping the objects themselves would keep them alive
    past the point where backward frees them."""

    def __init__(self, model: nn.Module) -> None:
        self.context = getattr(model, "context_parallel", None)
        self.found: dict[int, int] = {}

    def __enter__(self) -> PrepareProbe:
        if self.context is not None:
            prepare = self.context.prepare

            def probe(*args: Any, **kwargs: Any) -> Any:
                result = prepare(*args, **kwargs)
                self.found.update(held_storages(result))
                return result

            self.context.prepare = probe
        return self

    def __exit__(self, *exc: object) -> None:
        if self.context is not None:
            del self.context.prepare  # the class's method again

    def held(self, exclude: set[int]) -> int:
        """Bytes of those storages but for the ones in `exclude` (counted as saved)."""
        return sum(n for key, n in self.found.items() if key not in exclude)


def not_per_token(at_peak: dict[int, SavedStorage], seq_len: int, cp: int,
                  low_precision: bool) -> dict[str, int]:
    """The saved storages (at the peak) that do not shrink with the local tokens, or
    that a lower precision would have halved: the attention core's with a
    whole-sequence dimension under cp > 1, its float32 copies of queries, keys,
    values or outputs when the model computes in a lower precision, and bool masks
    anywhere."""
    parts = dict.fromkeys(NOT_PER_TOKEN[:3], 0)
    for s in at_peak.values():
        if s.dtype == torch.bool:
            parts["bool masks"] += s.nbytes
        elif s.region == ATTENTION_CORE and cp > 1 and seq_len in s.shape:
            parts["whole-seq K/V"] += s.nbytes
        elif (s.region == ATTENTION_CORE and low_precision and s.dtype == torch.float32
              and len(s.shape) >= 4):  # not the (batch, heads, seq) normalisers
            parts["fp32 copies"] += s.nbytes
    return parts


def measure(rank: int, world_size: int, cfg: DictConfig, warmup: int, steps: int) -> dict:
    """One rank: the memory of one forward_backward, then the timed steps."""
    trainer = Trainer(cfg, World(rank, world_size, rank))
    batches = trainer.train_batches
    # Gradients allocated beforehand: their first allocation in backward would count
    # as activation memory otherwise. Kept referenced through the block: the gradient
    # reduction over cp replaces them, and the profiler cannot subtract the release of
    # a block allocated before it started (it warns instead).
    for p in trainer.params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in trainer.params]
    model = trainer.model
    batch = batches.step(0)
    with (PrepareProbe(model) as probe, AllocationPeak() as alloc,
          AttributedActivations({id(model)}) as saved):
        trainer.forward_backward(batch)
    del grads
    held = probe.held(set(saved.at_peak))
    regions: dict[str, int] = {}
    for s in saved.at_peak.values():
        regions[s.region] = regions.get(s.region, 0) + s.nbytes
    low_precision = cfg.train.precision != "fp32"
    parts = not_per_token(saved.at_peak, cfg.train.seq_len, world_size, low_precision)
    parts["held"] = held
    parts["transient"] = max(alloc.peak - saved.peak - held, 0)
    trainer.stepper.zero_grad(set_to_none=True)

    wall, cpu = [], []
    for i in range(warmup + steps):
        step_batch = batches.step(1 + i)
        dist.barrier()
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        trainer.train_step(step_batch)
        if i >= warmup:
            wall.append(time.perf_counter() - start_wall)
            cpu.append(time.process_time() - start_cpu)
    return {"saved": saved.peak, "alloc": alloc.peak, "regions": regions, "parts": parts,
            "wall": wall, "cpu": cpu}


# -- report -------------------------------------------------------------------------------------

@dataclass
class Result:
    layout: Layout
    saved: int  # the largest over the ranks
    alloc: int
    saved_spread: float  # (largest - smallest) / largest over the ranks
    regions: dict[str, int]  # of the rank with the largest saved peak
    parts: dict[str, int]
    step_s: float  # median over steps of the slowest rank
    cpu_s: float  # median over steps of the CPU seconds of all ranks
    seconds: float = field(default=0.0)  # wall seconds of the whole layout's run


def summarize(layout: Layout, by_rank: list[dict], seconds: float) -> Result:
    largest = max(by_rank, key=lambda r: r["saved"])
    saved = [r["saved"] for r in by_rank]
    steps = list(zip(*(r["wall"] for r in by_rank), strict=True))
    cpu = list(zip(*(r["cpu"] for r in by_rank), strict=True))
    return Result(layout, max(saved), max(r["alloc"] for r in by_rank),
                  (max(saved) - min(saved)) / max(saved), largest["regions"], largest["parts"],
                  statistics.median(max(s) for s in steps), statistics.median(sum(c) for c in cpu),
                  seconds)


def times_cp(value: float, reference: float, cp: int) -> float:
    """value / reference x cp: 1.00 where value is exactly reference / cp."""
    return value / reference * cp if reference else float("nan")


def print_memory(results: list[Result]) -> None:
    base = results[0]
    print("Activation memory per rank (MiB; the largest over the ranks). x cp: the ratio to "
          "cp=1 times cp\n(1.00 = exactly 1/cp; the goal allows 1.10). ok: x cp <= 1.10.\n")
    print(f"{'layout':<16}{'saved':>9}{'/cp=1':>7}{'x cp':>6}{'':>5}{'alloc':>9}{'/cp=1':>7}"
          f"{'x cp':>6}{'':>5}{'spread':>8}")
    for r in results:
        cp = r.layout.cp
        saved_x, alloc_x = times_cp(r.saved, base.saved, cp), times_cp(r.alloc, base.alloc, cp)
        print(f"{r.layout.name:<16}{r.saved / MIB:>9.1f}{r.saved / base.saved:>7.3f}"
              f"{saved_x:>6.2f}{'ok' if saved_x <= 1.1 else 'over':>5}"
              f"{r.alloc / MIB:>9.1f}{r.alloc / base.alloc:>7.3f}{alloc_x:>6.2f}"
              f"{'ok' if alloc_x <= 1.1 else 'over':>5}{r.saved_spread:>8.1%}")
    print("\nspread: (largest - smallest) / largest saved peak over the ranks.")


def print_regions(results: list[Result]) -> None:
    base = results[0]
    names = sorted({n for r in results for n in r.regions},
                   key=lambda n: (-base.regions.get(n, 0), n))
    print("\nSaved activations at the peak by where they were saved: MiB (x cp), the rank with "
          "the largest peak.\n")
    print(f"{'saved in':<24}" + "".join(f"{r.layout.name:>18}" for r in results))
    for name in [*names, "total"]:
        cells = []
        for r in results:
            value = sum(r.regions.values()) if name == "total" else r.regions.get(name, 0)
            reference = (sum(base.regions.values()) if name == "total"
                         else base.regions.get(name, 0))
            ratio = times_cp(value, reference, r.layout.cp)
            cells.append(f"{value / MIB:>10.1f} ({ratio:>4.2f})")
        print(f"{name:<24}" + "".join(cells))


def print_not_per_token(results: list[Result]) -> None:
    print("\nNot per token, MiB: whole-seq K/V: saved by the attention core with a dimension "
          "of the whole sequence\n(the all-gathered keys and values); fp32 copies: float32 "
          "tensors the attention core saves of a\nlower-precision model; bool masks: saved; "
          "held: tensors reachable from the attention object\n(masks, indices) not saved "
          "through autograd; transient: alloc - saved - held (kernel temporaries,\nscore "
          "blocks, received buffers, what an autograd context keeps unsaved).\n")
    print(f"{'layout':<16}" + "".join(f"{n:>15}" for n in NOT_PER_TOKEN))
    for r in results:
        print(f"{r.layout.name:<16}"
              + "".join(f"{r.parts.get(n, 0) / MIB:>15.1f}" for n in NOT_PER_TOKEN))


def print_times(results: list[Result], seq_len: int, cores: int) -> None:
    base = results[0]
    print("\nStep time: median over steps of the slowest rank's train_step; CPU: median over "
          "steps of the\nCPU seconds of all ranks (process time, gloo's threads included). "
          "tok/core-s: tokens / (step s x\nmin(ranks, cores)); tok/CPU-s: tokens / CPU s.\n")
    print(f"{'layout':<16}{'ranks':>6}{'step s':>9}{'x cp=1':>8}{'tok/s':>9}{'tok/core-s':>12}"
          f"{'CPU s':>9}{'tok/CPU-s':>11}{'x cp=1':>8}{'run s':>8}")
    for r in results:
        ranks = r.layout.cp
        per_core = seq_len / (r.step_s * min(ranks, cores))
        per_cpu = seq_len / r.cpu_s
        print(f"{r.layout.name:<16}{ranks:>6}{r.step_s:>9.2f}{r.step_s / base.step_s:>8.2f}"
              f"{seq_len / r.step_s:>9.0f}{per_core:>12.0f}{r.cpu_s:>9.2f}{per_cpu:>11.0f}"
              f"{per_cpu / (seq_len / base.cpu_s):>8.2f}{r.seconds:>8.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence")
    parser.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4], help="cp sizes")
    parser.add_argument("--modes", nargs="+", default=["allgather", "ring"],
                        choices=["allgather", "ring"], help="parallel.cp_attention for cp > 1")
    parser.add_argument("--warmup", type=int, default=0,
                        help="untimed steps after the memory pass (itself a warm-up)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per layout")
    parser.add_argument("--quick", action="store_true",
                        help="a smaller run: 1024 tokens, cp 1 and 2, 2 timed steps (unless given)")
    parser.add_argument("--override", action="append", default=[],
                        help="a Hydra override for every layout (repeatable)")
    args = parser.parse_args()
    if args.quick:  # what the command line names explicitly stays
        for name, value in (("seq_len", 1024), ("cp", [1, 2]), ("steps", 2)):
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    layouts = [Layout(1, None)] + [Layout(cp, mode) for cp in sorted(set(args.cp)) if cp > 1
                                   for mode in args.modes]
    # Enough corpus for the steps' sequences whatever the length.
    data_bytes = max(300_000, 16 * (args.warmup + args.steps + 1) * args.seq_len)
    common = [*BASE_OVERRIDES, f"model.max_seq_len={args.seq_len}",
              f"train.seq_len={args.seq_len}", f"data.max_bytes={data_bytes}", *args.override]
    cores = len(os.sched_getaffinity(0))
    load_before = os.getloadavg()[0]

    results = []
    for layout in layouts:
        cfg = compose([*common, *layout.overrides()])
        start = time.perf_counter()
        by_rank = run_distributed(measure, layout.cp, cfg, args.warmup, args.steps,
                                  timeout_s=3600)
        results.append(summarize(layout, by_rank, time.perf_counter() - start))
        print(f"measured {layout.name} in {time.perf_counter() - start:.0f} s", flush=True)

    m, t = cfg.model, cfg.train
    print(f"\ntorch {torch.__version__} | {cores} cores, 1 thread per rank, gloo | model "
          f"{m.name}: dim {m.dim}, {m.n_layers} layers, {m.n_heads} heads, {m.n_kv_heads} kv "
          f"heads, ffn {m.ffn_hidden_dim}, vocab {m.vocab_size}")
    print(f"one sequence of {t.seq_len} tokens per step, {t.precision} | memory pass, then "
          f"{args.warmup} warm-up + {args.steps} timed steps | load average (1 min) before "
          f"{load_before:.2f}, after {os.getloadavg()[0]:.2f}")
    if any(layout.cp > cores for layout in layouts):
        print(f"cp > {cores} runs more single-threaded ranks than the {cores} cores: their wall "
              "times measure oversubscription; compare tok/CPU-s instead.")
    print()
    print_memory(results)
    print_regions(results)
    print_not_per_token(results)
    print_times(results, t.seq_len, cores)


if __name__ == "__main__":
    main()
