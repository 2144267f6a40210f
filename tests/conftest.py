"""Shared fixtures: forked gloo workers for distributed tests, small configs."""

from __future__ import annotations

import datetime
import os
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trntrain.config import compose

# A config small enough for a step in milliseconds, reading 200 kB of the corpus.
TINY_OVERRIDES = [
    "train.seq_len=32",
    "train.global_batch_size=8",
    "train.eval_every=0",
    "logging.every=1",
    "logging.progress_bar=false",
    "data.max_bytes=200000",
    "optim.warmup_steps=2",
]


def tiny_config(*overrides: str):
    base = TINY_OVERRIDES
    if any(o.startswith("data=") and o != "data=corpus" for o in overrides):
        base = [o for o in base if not o.startswith("data.max_bytes")]
    return compose([*base, *overrides])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, fn: Callable, world_size: int, port: int, args: tuple,
            results: Any) -> None:
    # A forked child inherits the parent's OpenMP pool and hangs in it unless
    # it drops to one thread before touching torch.
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        results.put((rank, fn(rank, world_size, *args)))
    except BaseException:
        results.put((rank, RuntimeError(f"rank {rank} failed:\n{traceback.format_exc()}")))
        raise
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout_s: float = 120) -> list:
    """Run fn(rank, world_size, *args) on `world_size` forked gloo ranks; results by rank."""
    results = mp.get_context("fork").SimpleQueue()
    ctx = mp.start_processes(_worker, args=(fn, world_size, free_port(), args, results),
                             nprocs=world_size, join=False, start_method="fork")
    deadline = time.monotonic() + timeout_s
    by_rank = {}
    # Drain results while waiting: a large result blocks its sender until it is read.
    while not ctx.join(timeout=0.05):
        while not results.empty():
            rank, value = results.get()
            by_rank[rank] = value
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"distributed test did not finish within {timeout_s} s")
    while not results.empty():
        rank, value = results.get()
        by_rank[rank] = value
    for rank in range(world_size):
        if isinstance(by_rank[rank], Exception):
            raise by_rank[rank]
    return [by_rank[r] for r in range(world_size)]


@pytest.fixture
def distributed() -> Callable[..., list]:
    return run_distributed


def train_in_run_dir(rank: int, world_size: int, run_dir: str, overrides: tuple[str, ...]
                     ) -> dict:
    """A rank's losses by step and the first 64 values of each of its parameters, after
    training tiny_config(*overrides) into run_dir (a checkpoint test's worker)."""
    from pathlib import Path

    from trntrain.distributed import World
    from trntrain.trainer import Trainer

    trainer = Trainer(tiny_config(*overrides), World(rank, world_size, rank),
                      run_dir=Path(run_dir))
    records = trainer.fit()
    params = {name: p.detach().flatten()[:64].tolist() for chunk in trainer.chunks.values()
              for name, p in chunk.named_parameters()}
    return {"loss": {r["step"]: r["loss"] for r in records}, "params": params}


def cli_in_process(args: list[str], capfd: pytest.CaptureFixture) -> tuple[int, str, str]:
    """`trntrain ARGS` run in this process, for commands that must stop before training
    (no interpreter start per case): (exit status, stdout, stderr)."""
    from trntrain.cli import main

    with pytest.raises(SystemExit) as info:
        main(args)
    out, err = capfd.readouterr()
    return info.value.code, out, err
