"""A parallel layout as the planner sees it: the sizes and switches of `parallel` and
`train` that change memory or time, resolved for a world size.

The planner works on this small frozen record rather than on the config, so that a
search can evaluate thousands of layouts without copying configs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from omegaconf import DictConfig

from trntrain.config import (
    context_attention,
    data_parallel_size,
    micro_batch_size,
    microbatches,
)
from trntrain.parallel.mesh import ParallelDims


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    sequence_parallel: bool
    zero1: bool
    activation_checkpointing: str  # none | selective | full
    schedule: str
    virtual_pp: int
    microbatches: int  # per optimizer step on each data-parallel rank
    micro_batch_size: int  # sequences per micro-batch
    ep: int = 1  # expert parallelism, carved out of dp
    cp: int = 1  # context parallelism: each sequence over cp ranks
    cp_attention: str = "allgather"  # allgather | ring; allgather where cp is 1

    @property
    def dims(self) -> ParallelDims:
        """The process mesh of the layout (global ranks of its groups)."""
        return ParallelDims(tp=self.tp, pp=self.pp, dp=self.dp, ep=self.ep, cp=self.cp)

    @property
    def replicas(self) -> int:
        """The ranks holding the same weights and seeing different tokens (dp x cp):
        gradients are reduced, and ZeRO-1 shards, over them."""
        return self.dp * self.cp

    @property
    def world_size(self) -> int:
        return self.dims.world_size

    @property
    def chunks(self) -> int:
        """Model chunks in the pipeline (pp x virtual_pp; 1 without a pipeline)."""
        return self.pp * self.virtual_pp if self.pp > 1 else 1

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def overrides(self) -> list[str]:
        """The command-line overrides that select this layout."""
        return [f"parallel.tp={self.tp}", f"parallel.pp={self.pp}",
                f"parallel.sequence_parallel={str(self.sequence_parallel).lower()}",
                f"parallel.zero1={str(self.zero1).lower()}",
                f"parallel.activation_checkpointing={self.activation_checkpointing}",
                f"parallel.schedule={self.schedule}", f"parallel.virtual_pp={self.virtual_pp}",
                f"train.micro_batch_size={self.micro_batch_size}", f"parallel.ep={self.ep}",
                f"parallel.cp={self.cp}", f"parallel.cp_attention={self.cp_attention}"]


def planned_world_size(cfg: DictConfig) -> int:
    """The processes of the configured cluster; on `local` (any number of processes),
    those the layout asks for: tp x cp x pp x (parallel.dp or 1)."""
    c, p = cfg.cluster, cfg.parallel
    if c.procs_per_node is not None:
        return c.nodes * c.procs_per_node
    return p.tp * p.cp * p.pp * (p.dp or 1)


def layout_from_config(cfg: DictConfig, world_size: int) -> Layout:
    p = cfg.parallel
    return Layout(
        tp=p.tp, pp=p.pp, dp=data_parallel_size(cfg, world_size),
        sequence_parallel=bool(p.sequence_parallel and p.tp > 1), zero1=bool(p.zero1),
        activation_checkpointing=p.activation_checkpointing, schedule=p.schedule,
        virtual_pp=p.virtual_pp if p.pp > 1 else 1,
        microbatches=microbatches(cfg, world_size),
        micro_batch_size=micro_batch_size(cfg, world_size), ep=p.ep, cp=p.cp,
        cp_attention=context_attention(cfg) if p.cp > 1 else "allgather",
    )
