"""Checkpoint save and load (checkpoint=dcp) against raw file I/O of the same bytes.

On a ~25 M-parameter Llama (fp32 weights + AdamW moments: ~300 MB per checkpoint,
enough that I/O dominates), after warm-up steps so that AdamW has its state:

1. synchronous save: `Trainer.save_checkpoint` (median of --repeats), split into
   the DCP write (`checkpointer.save`: state dict + `dcp.save`, which fsyncs)
   and the manager's commit (CRC-32 of every file read back, rename, `latest`);
2. load: `Trainer.load_checkpoint` with the files in the page cache (warm) and
   after `posix_fadvise(DONTNEED)` dropped them from it (cold), and `dcp.load`
   alone into fresh tensors (no copy into the model and optimizer);
3. raw baseline: the same number of bytes as one flat uint8 tensor written with
   one `write` + `os.fsync` (DCP's FileSystemWriter fsyncs each file:
   `sync_files` defaults to True and trntrain passes only `checkpoint_id`), also
   without the fsync, and read back with `readinto` into a preallocated tensor
   (its pages already mapped), warm and cold; trntrain's figures are given as a
   fraction of the comparable raw one;
4. asynchronous save (`checkpoint.async=true`): how long `save_checkpoint` blocks
   the caller (the staging copies, each also timed alone), when the background
   write is done, the commit in `CheckpointManager.finish_pending`; and the time of training
   steps run while the write is in flight against steps without it;
5. dp=2 with `parallel.zero1=true` on forked gloo ranks (tests.conftest
   .run_distributed, one thread each): per-rank save, file size and load.

The single-process parts run with --threads intra-op threads (default 1): on
this 2-core machine, often shared with other work, copies run by 2 OpenMP
threads were measured 4-25x slower (0.4-2.8 s instead of 0.1 s for a load)
whenever another process held a core, which swamps the I/O being measured.
Checkpoints go under a temporary directory in /tmp, removed at the end. Read
the figures as rough (the load average is printed). Prints
figures; never asserts on time. Run from the repository root (as a module, so
that `tests.conftest` imports):

    .venv/bin/python -m tests.bench.bench_checkpoint
    .venv/bin/python -m tests.bench.bench_checkpoint --repeats 5 --no-dp --threads 2
    .venv/bin/python -m tests.bench.bench_checkpoint --override model.n_layers=4
"""

from __future__ import annotations

import argparse
import inspect
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from omegaconf import DictConfig
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from tests.conftest import run_distributed
from trntrain.checkpoint.dcp import checkpoint_keys
from trntrain.checkpoint.manager import step_dir_name
from trntrain.checkpoint.state import empty_state_dict, host_state_dict
from trntrain.config import compose
from trntrain.distributed import World
from trntrain.trainer import Trainer

BASE_OVERRIDES = [
    "model.dim=512",
    "model.n_layers=8",
    "model.n_heads=8",
    "model.n_kv_heads=4",
    "model.ffn_hidden_dim=1536",
    "model.vocab_size=264",
    "data=synthetic",
    "backend=cpu",
    "train.seq_len=64",
    "train.global_batch_size=2",
    "train.eval_every=0",
    "logging.progress_bar=false",
    "checkpoint=dcp",
]
WARMUP_STEPS = 2  # the first steps allocate AdamW's state and are slow
MB = 1e6
Timings = dict[str, list[float]]


# -- helpers ------------------------------------------------------------------------------------

def time_calls(obj: object, name: str, timings: Timings) -> None:
    """Wrap the method `name` of the instance `obj` (no source change) so that the
    duration of every call is appended to timings[name]."""
    method = getattr(obj, name)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            timings.setdefault(name, []).append(time.perf_counter() - start)

    setattr(obj, name, timed)


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def drop_page_cache(path: Path) -> None:
    """Evict the (clean, already fsynced) pages of `path`'s files from the page cache."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def tmp_filesystem() -> str:
    """`df -T /tmp` in words: device, type, mount point."""
    lines = subprocess.run(["df", "-T", "/tmp"], capture_output=True, text=True,
                           check=False).stdout.splitlines()
    if len(lines) < 2:
        return "unknown (df -T failed)"
    device, fstype, *_, mount = lines[1].split()
    kind = "RAM (tmpfs)" if fstype == "tmpfs" else "a local block device"
    return f"{device}, {fstype}, mounted on {mount}: {kind}"


def train_steps(trainer: Trainer, n: int) -> list[float]:
    """Run n training steps; the seconds of each."""
    times = []
    for i in range(n):
        batch = trainer.train_batches.step(i)
        times.append(seconds(lambda b=batch: trainer.train_step(b)))
    return times


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# -- measurements -------------------------------------------------------------------------------

def bench_sync(trainer: Trainer, repeats: int) -> dict:
    """Synchronous saves, then loads of the last one (warm, cold, DCP alone)."""
    timings: Timings = {}
    time_calls(trainer.checkpointer, "save", timings)
    time_calls(trainer.checkpoints, "commit", timings)
    steps = [1000 + r for r in range(repeats)]
    for step in steps:
        trainer.save_checkpoint(step)
    path = trainer.checkpoints.directory / step_dir_name(steps[-1])
    out = {"save": trainer.save_blocking_s[-repeats:], "dcp_write": timings["save"],
           "commit": timings["commit"], "bytes": dir_bytes(path),
           "files": sorted(p.name for p in path.iterdir())}

    def load() -> None:
        assert trainer.load_checkpoint(path) == steps[-1]

    out["load_warm"] = [seconds(load) for _ in range(repeats)]
    out["load_cold"] = []
    for _ in range(repeats):
        drop_page_cache(path)
        out["load_cold"].append(seconds(load))
    saved = checkpoint_keys(path)

    def request() -> dict:
        return {k: v for k, v in empty_state_dict(trainer.states).items() if k in saved}

    out["dcp_read"] = [seconds(lambda: dcp.load(request(), checkpoint_id=str(path),
                                                no_dist=True))
                       for _ in range(repeats)]
    return out


def bench_raw(path: Path, nbytes: int, repeats: int) -> dict[str, list[float]]:
    """The same bytes as one flat tensor: write (+ fsync), read back warm and cold into a
    preallocated tensor (a fresh 300 MB one costs ~77k page faults, ~0.1 s, per read)."""
    payload = torch.empty(nbytes, dtype=torch.uint8).random_()

    def write(fsync: bool) -> None:
        with path.open("wb") as f:
            f.write(memoryview(payload.numpy()))
            f.flush()
            if fsync:
                os.fsync(f.fileno())

    buffer = torch.zeros(nbytes, dtype=torch.uint8)  # touched now: no page faults when timed

    def read() -> None:
        with path.open("rb") as f:
            assert f.readinto(memoryview(buffer.numpy())) == nbytes

    out = {"write_nosync": [seconds(lambda: write(False)) for _ in range(repeats)],
           "write_fsync": [seconds(lambda: write(True)) for _ in range(repeats)],
           "read_warm": [seconds(read) for _ in range(repeats)], "read_cold": []}
    for _ in range(repeats):
        drop_page_cache(path)
        out["read_cold"].append(seconds(read))
    path.unlink()
    return out


def bench_staging(trainer: Trainer, repeats: int) -> dict[str, list[float]]:
    """The copy an asynchronous save makes before it returns, alone: building the state
    dict, then DCP's DefaultStager copy (what `dcp.async_save` does given no stager)."""
    out: dict[str, list[float]] = {"state_dict": [], "dcp_stager": []}
    for _ in range(repeats):
        start = time.perf_counter()
        state = host_state_dict(trainer.states)
        t1 = time.perf_counter()
        stager = DefaultStager(StagingOptions(False, False, False, False))
        stager.stage(state)
        t2 = time.perf_counter()
        stager.close()
        out["state_dict"].append(t1 - start)
        out["dcp_stager"].append(t2 - t1)
        del state
    return out


def bench_async(trainer: Trainer, repeats: int, steps: int) -> dict:
    """Asynchronous saves: waited for at once (idle caller), then overlapped with steps."""
    timings: Timings = {}
    time_calls(trainer.checkpoints, "commit", timings)
    out: dict[str, list[float]] = {"blocking": [], "written": [], "commit": [], "total": [],
                                   "steps_without": train_steps(trainer, steps),
                                   "steps_during": [], "steps_after": []}
    written: list[float] = []

    def save(step: int) -> float:
        start = time.perf_counter()
        trainer.save_checkpoint(step)
        out["blocking"].append(trainer.save_blocking_s[-1])
        future = trainer.checkpoints.pending[0]
        future.add_done_callback(lambda _: written.append(time.perf_counter() - start))
        return start

    for r in range(repeats):  # idle caller: wait for the write at once
        start = save(2000 + r)
        trainer.finish_pending_save()
        out["total"].append(time.perf_counter() - start)
        out["written"].append(written[-1])
        out["commit"].append(timings["commit"][-1])

    for r in range(repeats):  # the loop goes on while the write runs
        save(3000 + r)
        future = trainer.checkpoints.pending[0]
        for i in range(steps):
            in_flight = not future.done()
            batch = trainer.train_batches.step(i)
            t = seconds(lambda b=batch: trainer.train_step(b))
            out["steps_during" if in_flight else "steps_after"].append(t)
        trainer.finish_pending_save()
    return out


def bench_dp_rank(rank: int, world_size: int, cfg: DictConfig, run_dir: str, repeats: int
                  ) -> dict:
    """One rank of dp=2 ZeRO-1: synchronous saves, the state gather alone, loads."""
    trainer = Trainer(cfg, World(rank, world_size, rank), run_dir=Path(run_dir))
    train_steps(trainer, WARMUP_STEPS)
    timings: Timings = {}
    time_calls(trainer.checkpointer, "save", timings)
    time_calls(trainer.checkpoints, "commit", timings)
    steps = [1000 + r for r in range(repeats)]
    for step in steps:
        dist.barrier()
        trainer.save_checkpoint(step)
    path = trainer.checkpoints.directory / step_dir_name(steps[-1])
    gather = []
    loads = []
    for _ in range(repeats):
        dist.barrier()
        gather.append(seconds(lambda: host_state_dict(trainer.states)))
    for _ in range(repeats):
        dist.barrier()
        loads.append(seconds(lambda: trainer.load_checkpoint(path)))
    state = host_state_dict(trainer.states)
    return {"save": trainer.save_blocking_s, "dcp_write": timings["save"],
            "commit": timings["commit"], "gather": gather, "load": loads,
            "file_bytes": (path / f"__{rank}_0.distcp").stat().st_size,
            "dir_bytes": dir_bytes(path) if rank == 0 else 0,
            "state_bytes": sum(tensor_bytes(v) for v in state.values()),
            "master_bytes": sum(tensor_bytes(v) for k, v in state.items() if k.endswith(".master"))}


# -- report -------------------------------------------------------------------------------------

def row(what: str, times: list[float], nbytes: int | None, raw: float | None = None,
        note: str = "") -> None:
    """One line: median and min seconds, MB/s at the median, fraction of a raw MB/s."""
    med = median(times)
    rate = nbytes / med / MB if nbytes else None
    rate_s = f"{rate:>9,.0f}" if rate else f"{'':>9}"
    frac = f"{rate / raw:>8.2f}" if rate and raw else f"{'':>8}"
    print(f"{what:<46}{med:>9.3f}{min(times):>9.3f}{rate_s}{frac}  {note}")


def header(title: str) -> None:
    print(f"\n{title}\n{'':<46}{'median s':>9}{'min s':>9}{'MB/s':>9}{'of raw':>8}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="saves / loads per figure")
    parser.add_argument("--steps", type=int, default=3,
                        help="training steps timed per async phase")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads of the single-process parts")
    parser.add_argument("--no-dp", action="store_true", help="skip the dp=2 ZeRO-1 part")
    parser.add_argument("--override", action="append", default=[],
                        help="Hydra override, e.g. model.n_layers=4 (repeatable)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    wall_start = time.perf_counter()
    load_avg = os.getloadavg()[0]
    overrides = [*BASE_OVERRIDES, *args.override]
    root = Path(tempfile.mkdtemp(prefix="bench_checkpoint_", dir="/tmp"))
    try:
        dp = None
        if not args.no_dp:  # forked first, before this process starts its OpenMP threads
            cfg = compose([*overrides, "parallel.zero1=true"])
            dp = run_distributed(bench_dp_rank, 2, cfg, str(root / "dp2"), args.repeats,
                                 timeout_s=300)
            shutil.rmtree(root / "dp2")

        cfg = compose(overrides)
        trainer = Trainer(cfg, World(), run_dir=root / "sync")
        num_params = trainer.num_params
        train_steps(trainer, WARMUP_STEPS)
        sync = bench_sync(trainer, args.repeats)
        staging = bench_staging(trainer, args.repeats)
        del trainer
        shutil.rmtree(root / "sync")
        raw = bench_raw(root / "raw.bin", sync["bytes"], args.repeats)

        trainer = Trainer(compose([*overrides, "checkpoint.async=true"]), World(),
                          run_dir=root / "async")
        train_steps(trainer, WARMUP_STEPS)
        asyn = bench_async(trainer, args.repeats, args.steps)
        del trainer
    finally:
        shutil.rmtree(root, ignore_errors=True)

    # -- print ---------------------------------------------------------------------------------
    m, t = cfg.model, cfg.train
    sync_files = inspect.signature(dcp.FileSystemWriter.__init__).parameters["sync_files"]
    nbytes = sync["bytes"]
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__} | {os.cpu_count()} cores, {threads} intra-op "
          f"thread{'s' if threads != 1 else ''} (dp=2: 1 per rank, gloo) | load average "
          f"{load_avg:.2f} at start, {os.getloadavg()[0]:.2f} at end (other work may share "
          f"the cores)")
    print(f"model: dim {m.dim}, {m.n_layers} layers, {m.n_heads} heads, {m.n_kv_heads} kv heads, "
          f"ffn {m.ffn_hidden_dim}, vocab {m.vocab_size}: {num_params:,} parameters, fp32, "
          f"AdamW | batch {t.global_batch_size} x seq {t.seq_len}")
    print(f"/tmp: {tmp_filesystem()} (not RAM; the VM's virtual disk may be cached by its host)")
    print(f"checkpoint: {nbytes / MB:.1f} MB in {', '.join(sync['files'])} "
          f"(MB = 10^6 bytes; weights + 2 moments = {3 * num_params * 4 / MB:.1f} MB)")
    print(f"fsync: dcp.save(checkpoint_id=...) uses FileSystemWriter(sync_files="
          f"{sync_files.default}) -> every .distcp file and .metadata is fsynced; trntrain's "
          f"commit fsyncs\n  checksums.json, latest and the directory. Raw baseline "
          f"compared with: one write + os.fsync of {nbytes / MB:.1f} MB.")

    raw_write = nbytes / median(raw["write_fsync"]) / MB
    raw_warm = nbytes / median(raw["read_warm"]) / MB
    raw_cold = nbytes / median(raw["read_cold"]) / MB
    header(f"1-3. Synchronous save and load (median of {args.repeats}; 'of raw': MB/s as a "
           f"fraction of the matching raw row)")
    row("save_checkpoint (total)", sync["save"], nbytes, raw_write)
    row("  DCP write: state dict + dcp.save (fsync)", sync["dcp_write"], nbytes, raw_write)
    row("  commit: CRC-32 re-read, rename, latest", sync["commit"], nbytes, None,
        "MB/s: CRC-32 pass")
    row("raw write + fsync", raw["write_fsync"], nbytes, raw_write)
    row("raw write, no fsync (page cache only)", raw["write_nosync"], nbytes)
    row("load_checkpoint, warm page cache", sync["load_warm"], nbytes, raw_warm)
    row("load_checkpoint, cold (fadvise DONTNEED)", sync["load_cold"], nbytes, raw_cold)
    row("  dcp.load alone into fresh tensors, warm", sync["dcp_read"], nbytes, raw_warm)
    row("raw read, warm", raw["read_warm"], nbytes, raw_warm)
    row("raw read, cold (fadvise DONTNEED)", raw["read_cold"], nbytes, raw_cold)

    header(f"4. Asynchronous save, checkpoint.async=true (median of {args.repeats})")
    row("save_checkpoint blocks the caller", asyn["blocking"], nbytes)
    row("  alone: state_dict()", staging["state_dict"], None)
    row("  alone: DCP DefaultStager copy", staging["dcp_stager"], nbytes)
    row("background write done (from the save's start)", asyn["written"], nbytes)
    row("finish_pending_save's commit (CRC-32, rename)", asyn["commit"], nbytes)
    row("total until finish_pending_save returns", asyn["total"], nbytes)
    row("synchronous save_checkpoint, for comparison", sync["save"], nbytes)
    print(f"\ntraining step while an async save is in flight (the loop goes on; {args.steps} "
          f"steps after each of {args.repeats} saves)")
    print(f"{'':<46}{'steps':>6}{'median ms':>11}{'min ms':>9}{'max ms':>9}")
    for name, key in [("no save in flight (before any)", "steps_without"),
                      ("started while the write was in flight", "steps_during"),
                      ("started after it was done", "steps_after")]:
        times = asyn[key]
        if times:
            print(f"{name:<46}{len(times):>6}{median(times) * 1e3:>11.0f}"
                  f"{min(times) * 1e3:>9.0f}{max(times) * 1e3:>9.0f}")
        else:
            print(f"{name:<46}{0:>6}")

    if dp is not None:
        print(f"\n5. dp=2, parallel.zero1=true, forked gloo ranks, synchronous save (median of "
              f"{args.repeats}); checkpoint {dp[0]['dir_bytes'] / MB:.1f} MB in all")
        print(f"{'rank':<6}{'own file MB':>12}{'state MB':>10}{'save s':>8}{'DCP write s':>12}"
              f"{'commit s':>10}{'gather s':>10}{'load s':>8}{'save MB/s':>11}")
        for rank, r in enumerate(dp):
            print(f"{rank:<6}{r['file_bytes'] / MB:>12.1f}{r['state_bytes'] / MB:>10.1f}"
                  f"{median(r['save']):>8.3f}{median(r['dcp_write']):>12.3f}"
                  f"{median(r['commit']):>10.3f}{median(r['gather']):>10.3f}"
                  f"{median(r['load']):>8.3f}{r['file_bytes'] / median(r['save']) / MB:>11,.0f}")
        print("own file: this rank's __<rank>_0.distcp; state: the tensors its state dict "
              "holds (ZeRO-1 gathers the optimizer\nstate over dp, so each rank holds all of it "
              "and DCP's planner writes each tensor from one rank); gather: state_dict() alone.\n"
              f"The state includes optim.*.master, {dp[0]['master_bytes'] / MB:.1f} MB: ZeRO-1's "
              "fp32 master copy, which in fp32 training equals the weights.")
    print(f"\nwall time {time.perf_counter() - wall_start:.0f} s")


if __name__ == "__main__":
    main()
