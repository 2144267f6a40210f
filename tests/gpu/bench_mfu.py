"""Tokens/s and MFU of trntrain's training step on one GPU, next to a bare PyTorch loop of
the same model (eager, and under torch.compile), SDPA's flash kernel for both.

Cases: `1b` (Llama 3.2 1B, seq 8192, 4 micro-batches of one sequence, bf16 with fp32
master weights), `8b` (Llama 3 8B, seq 8192, or 4096 on a GPU under 100 GiB, one
sequence, full activation checkpointing, pure bf16 with round-to-nearest AdamW) and
`tiny` (llama_tiny, for CPUs). Each loop runs alone on the device, its memory freed
before the next; a step's time is taken between two device synchronisations, the
median over the timed steps. Writes bench.json and bench.md to --out; never asserts.

    python3 -m tests.gpu.bench_mfu --out results/            # 1b and 8b on cuda
    python3 -m tests.gpu.bench_mfu --cases tiny --device cpu --loops trntrain,bare
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from trntrain.config import compose, micro_batch_size
from trntrain.data import StepBatches, build_data_source
from trntrain.distributed import World
from trntrain.metrics.flops import flops_per_token
from trntrain.parallel import ParallelDims, build_mesh
from trntrain.trainer import Trainer, build_model_chunks

LOOPS = ("trntrain", "bare", "bare_compile")
# trntrain's step against the eager bare loop: at most 3 % slower.
MAX_RATIO = 1.03
# torchtitan's published Llama-3.1-8B figures per H100 GPU, bf16 without float8
# (docs/performance.md of pytorch/torchtitan): 33-39 % MFU.
TORCHTITAN_LLAMA3_8B_H100_MFU = (0.33, 0.39)


@dataclass(frozen=True)
class Case:
    model: str
    seq_len: int
    global_batch: int
    micro_batch: int
    overrides: tuple[str, ...] = ()
    # seq_len on a GPU with less memory than small_gpu_gib (None: the same).
    small_gpu_seq_len: int | None = None
    small_gpu_gib: float = 100.0
    compile_by_default: bool = True
    notes: list[str] = field(default_factory=list)


CASES = {
    "1b": Case("llama3_2_1b", 8192, 4, 1, ("train.precision=bf16",)),
    "8b": Case("llama3_8b", 8192, 1, 1,
               ("train.precision=bf16", "train.master_weights=false",
                "train.stochastic_rounding=false", "parallel.activation_checkpointing=full"),
               small_gpu_seq_len=4096, compile_by_default=False),
    "tiny": Case("llama_tiny", 128, 4, 2),
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-results")),
                        help="folder of bench.json and bench.md (default: $OUT or gpu-results)")
    parser.add_argument("--cases", default="1b,8b", help=f"comma-separated, of {list(CASES)}")
    parser.add_argument("--loops", default=",".join(LOOPS), help=f"comma-separated, of {LOOPS}")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--steps", type=int, default=8, help="timed steps per loop")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed steps per loop first (compilation included)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="skip the loops that would start after this many seconds")
    parser.add_argument("--compile-8b", action="store_true",
                        help="also time the compiled bare loop on 8b (minutes of compilation)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense BF16 peak for MFU (default: the GPU's datasheet figure)")
    parser.add_argument("--override", action="append", default=[],
                        help="Hydra override for every case, e.g. train.seq_len=4096")
    args = parser.parse_args(argv)
    args.cases = [c for c in args.cases.split(",") if c]
    args.loops = [loop for loop in args.loops.split(",") if loop]
    for name in args.cases:
        if name not in CASES:
            parser.error(f"--cases: {name!r} is not one of {list(CASES)}")
    for name in args.loops:
        if name not in LOOPS:
            parser.error(f"--loops: {name!r} is not one of {list(LOOPS)}")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be at least 1 and --warmup at least 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible (use --device cpu)")
    return args


def device_memory_gib(device: str) -> float | None:
    if device != "cuda":
        return None
    return torch.cuda.get_device_properties(0).total_memory / 2**30


def case_config(case: Case, device: str, extra: Sequence[str]) -> DictConfig:
    seq = case.seq_len
    memory = device_memory_gib(device)
    if case.small_gpu_seq_len is not None and memory is not None and memory < case.small_gpu_gib:
        seq = case.small_gpu_seq_len
    return compose(["data=synthetic", f"model={case.model}", f"train.seq_len={seq}",
                    f"train.global_batch_size={case.global_batch}",
                    f"train.micro_batch_size={case.micro_batch}", f"backend={device}",
                    "train.eval_every=0", "logging.progress_bar=false", "train.max_steps=1000",
                    *case.overrides, *extra])


class BareLoop:
    """Forward, fp32 cross-entropy, backward, clip, AdamW, zero_grad: the least a step does.
    bf16 with master weights keeps fp32 copies that AdamW steps, cast back after."""

    def __init__(self, model: nn.Module, cfg: DictConfig) -> None:
        self.model, self.cfg = model, cfg
        t, o = cfg.train, cfg.optim
        self.params = [p for p in model.parameters() if p.requires_grad]
        if t.precision == "bf16":  # the weights; buffers (rope tables) stay fp32
            for p in model.parameters():
                p.data = p.data.to(torch.bfloat16)
        self.masters = ([p.detach().float() for p in self.params]
                        if t.precision == "bf16" and t.master_weights else None)
        stepped = self.masters if self.masters is not None else self.params
        decay = [s for s, p in zip(stepped, self.params, strict=True) if p.ndim >= 2]
        no_decay = [s for s, p in zip(stepped, self.params, strict=True) if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": o.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=o.lr,
                                           betas=tuple(o.betas), eps=o.eps)
        self.autocast = t.precision == "bf16_autocast"

    def step(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        total = torch.zeros((), device=batches[0][0].device)
        for inputs, labels in batches:
            with torch.autocast(inputs.device.type, torch.bfloat16, enabled=self.autocast):
                logits = self.model(inputs)
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
            (loss / len(batches)).backward()
            total += loss.detach()
        if self.masters is not None:
            for master, p in zip(self.masters, self.params, strict=True):
                master.grad = p.grad.float()
                p.grad = None
            torch.nn.utils.clip_grad_norm_(self.masters, self.cfg.optim.max_grad_norm)
            self.optimizer.step()
            with torch.no_grad():
                torch._foreach_copy_(self.params, self.masters)
        else:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.max_grad_norm)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total / len(batches)


def bare_model(cfg: DictConfig, device: torch.device) -> nn.Module:
    """The model trntrain trains, built the same way (same weights, same checkpointing)."""
    mesh = build_mesh(ParallelDims(1, 1, 1), 0)
    return build_model_chunks(cfg, mesh, device)[0]


def first_batches(cfg: DictConfig, device: torch.device
                  ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The micro-batches of trntrain's first step, read as the trainer reads them."""
    data = build_data_source(cfg)
    steps = StepBatches(data, "train", cfg.train.global_batch_size, micro_batch_size(cfg, 1),
                        0, 1)
    return [(b.inputs.to(device), b.labels.to(device)) for b in steps.step(0)]


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def sdpa_flash(device: str) -> contextlib.AbstractContextManager:
    """SDPA restricted to the flash kernel on a GPU (an error, not a fallback, if unusable)."""
    if device != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION])


def time_steps(step: Callable[[], object], n: int, device: str) -> list[float]:
    """Seconds of each of `n` steps, each between two device synchronisations."""
    times = []
    for _ in range(n):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


@contextlib.contextmanager
def measured_memory(device: str) -> Iterator[dict[str, float]]:
    figures: dict[str, float] = {}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    yield figures
    if device == "cuda":
        figures["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        figures["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def run_loop(loop: str, cfg: DictConfig, args: argparse.Namespace) -> dict[str, Any]:
    """Build one loop's model and optimizer, warm it up and time it."""
    device = args.device
    with measured_memory(device) as memory:
        start = time.perf_counter()
        if loop == "trntrain":
            trainer = Trainer(cfg, World(), run_dir=None)
            batches = next(trainer.backend.batches(iter([trainer.train_batches.step(0)])))

            def step() -> object:
                return trainer.train_step(batches)
        else:
            model = bare_model(cfg, torch.device(device))
            if loop == "bare_compile":
                model = torch.compile(model)
            bare = BareLoop(model, cfg)
            pairs = first_batches(cfg, torch.device(device))

            def step() -> object:
                return bare.step(pairs)
        built_s = time.perf_counter() - start
        with sdpa_flash(device):
            start = time.perf_counter()
            time_steps(step, args.warmup, device)
            warmup_s = time.perf_counter() - start
            times = time_steps(step, args.steps, device)
    return {"step_s": times, "median_step_s": statistics.median(times), "build_s": built_s,
            "warmup_s": warmup_s, **memory}


def peak_flops(args: argparse.Namespace) -> float | None:
    if args.peak_tflops is not None:
        return args.peak_tflops * 1e12
    if args.device != "cuda":
        return None
    from trntrain.backend.cuda import peak_bf16_flops

    return peak_bf16_flops(torch.cuda.get_device_name(0))


def summarise(name: str, cfg: DictConfig, loops: dict[str, dict[str, Any]],
              peak: float | None) -> dict[str, Any]:
    """Tokens/s and MFU of each loop, and the ratio trntrain / bare (eager)."""
    t = cfg.train
    tokens = t.global_batch_size * t.seq_len
    per_token = flops_per_token(cfg.model, t.seq_len)
    for figures in loops.values():
        if "median_step_s" in figures:
            figures["tokens_per_s"] = tokens / figures["median_step_s"]
            figures["mfu"] = (None if peak is None
                              else figures["tokens_per_s"] * per_token / peak)
    timed = {k: v["median_step_s"] for k, v in loops.items() if "median_step_s" in v}
    ratio = (timed["trntrain"] / timed["bare"]
             if "trntrain" in timed and "bare" in timed else None)
    return {"case": name, "model": cfg.model.name, "seq_len": t.seq_len,
            "global_batch": t.global_batch_size, "micro_batch": t.micro_batch_size,
            "tokens_per_step": tokens, "flops_per_token": per_token,
            "precision": t.precision, "master_weights": t.master_weights,
            "activation_checkpointing": cfg.parallel.activation_checkpointing,
            "loops": loops, "ratio_trntrain_over_bare": ratio,
            "ratio_within_bound": None if ratio is None else ratio <= MAX_RATIO}


def environment(device: str, peak: float | None) -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "device": device,
                            "peak_bf16_tflops": None if peak is None else peak / 1e12,
                            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if device == "cuda":
        info.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=device_memory_gib(device),
                    cuda=torch.version.cuda)
    return info


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [f"# trntrain MFU benchmark: {env.get('gpu', env['device'])}, torch {env['torch']}, "
             f"{env['time_utc']}", "",
             "| case | seq | tokens/step | loop | step s | tokens/s | MFU | peak GiB |",
             "|---|---|---|---|---|---|---|---|"]
    for case in report["cases"]:
        for loop, f in case["loops"].items():
            if "median_step_s" not in f:
                lines.append(f"| {case['case']} | {case['seq_len']} | {case['tokens_per_step']} "
                             f"| {loop} | {f.get('skipped') or f.get('error')} | | | |")
                continue
            mfu = "" if f["mfu"] is None else f"{100 * f['mfu']:.1f} %"
            peak = f.get("peak_allocated_gib")
            lines.append(f"| {case['case']} | {case['seq_len']} | {case['tokens_per_step']} | "
                         f"{loop} | {f['median_step_s']:.4f} | {f['tokens_per_s']:,.0f} | {mfu} "
                         f"| {'' if peak is None else f'{peak:.1f}'} |")
        if case["ratio_trntrain_over_bare"] is not None:
            lines.append(f"| {case['case']} | | | ratio trntrain / bare | "
                         f"{case['ratio_trntrain_over_bare']:.3f} (bound {MAX_RATIO}) | | | |")
    lo, hi = TORCHTITAN_LLAMA3_8B_H100_MFU
    lines += ["", f"torchtitan, Llama-3.1-8B on H100 without float8: {100 * lo:.0f}-"
              f"{100 * hi:.0f} % MFU per GPU (published)."]
    return "\n".join(lines) + "\n"


def write(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "bench.md").write_text(markdown(report))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    start = time.perf_counter()
    peak = peak_flops(args)
    report: dict[str, Any] = {"environment": environment(args.device, peak), "cases": [],
                              "max_ratio": MAX_RATIO,
                              "torchtitan_llama3_8b_h100_mfu": TORCHTITAN_LLAMA3_8B_H100_MFU}
    configs = {name: case_config(CASES[name], args.device, args.override) for name in args.cases}
    measured: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in args.cases}
    # The eager loops of every case first, the compiled ones (minutes of compilation) last:
    # a spent time budget then costs the least telling figures.
    order = [(n, loop) for loop in args.loops if loop != "bare_compile" for n in args.cases]
    order += [(n, "bare_compile") for n in args.cases if "bare_compile" in args.loops]
    for name, loop in order:
        loops = measured[name]
        if loop == "bare_compile" and not (CASES[name].compile_by_default or args.compile_8b):
            loops[loop] = {"skipped": "not compiled for this case (--compile-8b)"}
        elif args.budget_s is not None and time.perf_counter() - start > args.budget_s:
            loops[loop] = {"skipped": f"time budget of {args.budget_s:.0f} s spent"}
        else:
            try:
                loops[loop] = run_loop(loop, configs[name], args)
            except torch.OutOfMemoryError as err:
                loops[loop] = {"error": f"out of memory: {str(err).splitlines()[0]}"}
            finally:
                free(args.device)
        print(f"{name} {loop}: {loops[loop].get('median_step_s', loops[loop])}", flush=True)
        report["cases"] = [summarise(n, configs[n], {k: measured[n][k] for k in args.loops
                                                     if k in measured[n]}, peak)
                           for n in args.cases]
        write(report, args.out)  # after each loop: a later failure keeps what was measured
    report["seconds"] = time.perf_counter() - start
    write(report, args.out)
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
