"""The process world as torchrun describes it, and the default process group."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_from_env() -> World:
    """RANK, WORLD_SIZE and LOCAL_RANK as torchrun (or SLURM's srun via torchrun) sets them."""
    return World(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


_host_group: dist.ProcessGroup | None = None
_host_timeout: datetime.timedelta = dist.default_pg_timeout


def init_process_group(world: World, timeout_s: float, **kwargs: Any) -> None:
    """The default group over all ranks; kwargs name the backend (Backend.process_group_kwargs).

    A gloo group over the same ranks carries everything host-side: barriers, the
    SIGTERM vote, object exchange, DCP's planning and metadata (xla and nccl groups
    move device tensors only; xla's barrier does not even wait). It is the only
    world-sized gloo group a run opens: each one costs a socket to every other rank.
    """
    global _host_group, _host_timeout
    if world.world_size > 1 and not dist.is_initialized():
        timeout = _host_timeout = datetime.timedelta(seconds=timeout_s)
        if "init_method" not in kwargs and "TORCHELASTIC_RESTART_COUNT" in os.environ:
            kwargs["store"] = attempt_store(world, timeout)
        dist.init_process_group(rank=world.rank, world_size=world.world_size, timeout=timeout,
                                **kwargs)
        if dist.get_backend() != "gloo":
            _host_group = dist.new_group(backend="gloo", timeout=timeout)


def host_group() -> dist.ProcessGroup | None:
    """The gloo group for host-side tensors and objects (None: the default group is gloo)."""
    return _host_group


def host_copy(group: dist.ProcessGroup | None, axis_groups: list[list[int]]
              ) -> dist.ProcessGroup | None:
    """A gloo group over the ranks of `group`, this rank's group of an axis whose groups
    are `axis_groups`: for host tensors along that axis (the DeviceMesh of DCP's tp
    shards). `group` itself where it is gloo already, None where it is None.

    Collective: every rank calls it with the same `axis_groups` (all groups of the
    axis have the same size, so every rank takes the same branch).
    """
    if group is None or dist.get_backend(group) == "gloo":
        return group
    rank, mine = dist.get_rank(), None
    for ranks in axis_groups:
        if len(ranks) > 1:
            created = dist.new_group(ranks, backend="gloo", timeout=_host_timeout)
            if rank in ranks:
                mine = created
    return mine


def attempt_store(world: World, timeout: datetime.timedelta) -> dist.Store:
    """torchrun's store, under a prefix of its own for each restart of the job.

    After `--max-restarts`, the agent's store still holds the addresses the dead
    attempt's ranks published; without a prefix a new rank may read one and wait
    on a peer that no longer exists.
    """
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          world.world_size, is_master=not agent_store and world.rank == 0,
                          timeout=timeout)
    return dist.PrefixStore(f"trntrain/attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}",
                            store)


def destroy_process_group() -> None:
    global _host_group
    _host_group = None
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier(group=_host_group)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` of rank `src` on every rank (identity without a process group)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_host_group)
    return box[0]
