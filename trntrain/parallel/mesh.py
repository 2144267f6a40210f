"""The process-group mesh: tp innermost, then cp, then dp, then pp outermost (the NxD
order).

rank = ((pp_rank * dp + dp_rank) * cp + cp_rank) * tp + tp_rank, so a tp group is a
run of contiguous ranks (one node's NeuronLink), a cp group the tp-strided ranks next
to it (the same node while tp * cp fits one), and pp spans nodes. Replicated weights
see different tokens on every (dp, cp) rank: their gradients are reduced over the
dp x cp group.

Expert parallelism is carved out of dp: dp_rank = edp_rank * ep + ep_rank, so an ep
group (the ranks that exchange tokens and hold different experts) is ep consecutive
dp ranks at one (pp, tp) coordinate, tp ranks apart, and an edp group (the dp / ep
ranks holding the same experts, over which their gradients are reduced) takes every
ep-th dp rank.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist

AXES = ("pp", "dp", "cp", "tp")  # outermost first


@dataclass(frozen=True)
class ParallelDims:
    tp: int
    pp: int
    dp: int
    ep: int = 1  # divides dp
    cp: int = 1

    @property
    def world_size(self) -> int:
        return self.tp * self.cp * self.pp * self.dp

    def coordinates(self, rank: int) -> tuple[int, int, int]:
        """(pp_rank, dp_rank, tp_rank) of a global rank."""
        return (rank // (self.dp * self.cp * self.tp), (rank // (self.cp * self.tp)) % self.dp,
                rank % self.tp)

    def cp_rank(self, rank: int) -> int:
        return (rank // self.tp) % self.cp

    def rank_of(self, pp_rank: int, dp_rank: int, tp_rank: int, cp_rank: int = 0) -> int:
        return ((pp_rank * self.dp + dp_rank) * self.cp + cp_rank) * self.tp + tp_rank

    def group_ranks(self, *axes: str) -> list[list[int]]:
        """Every group along `axes` (one of 'tp', 'cp', 'dp', 'pp', or several, such as
        'dp', 'cp' for the gradient reduction), each a list of global ranks in order."""
        sizes = {"pp": self.pp, "dp": self.dp, "cp": self.cp, "tp": self.tp}
        varying = [a for a in AXES if a in axes]
        fixed = [a for a in AXES if a not in axes]
        groups = []
        for outer in itertools.product(*(range(sizes[a]) for a in fixed)):
            group = []
            for inner in itertools.product(*(range(sizes[a]) for a in varying)):
                coords = dict(zip(fixed, outer, strict=True)) | dict(
                    zip(varying, inner, strict=True))
                group.append(self.rank_of(**{f"{a}_rank": coords[a] for a in AXES}))
            groups.append(group)
        return groups

    def expert_group_ranks(self, axis: str) -> list[list[int]]:
        """Every group along 'ep' (consecutive dp ranks, different experts) or 'edp'
        (every ep-th dp rank, the same experts), each a list of global ranks."""
        ep, edp = self.ep, self.dp // self.ep
        groups = []
        for pp_rank in range(self.pp):
            for tp_rank in range(self.tp):
                outer, inner = (edp, ep) if axis == "ep" else (ep, edp)
                for i in range(outer):
                    dp_ranks = ([i * ep + k for k in range(inner)] if axis == "ep"
                                else [k * ep + i for k in range(inner)])
                    groups.append([self.rank_of(pp_rank, d, tp_rank) for d in dp_ranks])
        return groups


@dataclass
class Mesh:
    """This rank's coordinates and process groups; a group is None when its size is 1."""

    dims: ParallelDims
    rank: int
    tp_group: dist.ProcessGroup | None
    dp_group: dist.ProcessGroup | None
    pp_group: dist.ProcessGroup | None
    # Context parallelism: the ranks holding the other parts of this rank's sequences.
    cp_group: dist.ProcessGroup | None = None
    # The dp x cp ranks at this (pp, tp) coordinate, which hold the same weights and see
    # different tokens: gradients, token counts and losses are summed over it (the dp
    # group itself when cp is 1).
    dp_cp_group: dist.ProcessGroup | None = None
    # Pipeline: (lower pp rank, upper pp rank) of neighbouring stages -> their 2-rank
    # group at this (dp, cp, tp) coordinate; the wrap-around pair is (pp - 1, 0).
    pp_pairs: dict[tuple[int, int], dist.ProcessGroup] = field(default_factory=dict)
    # First and last pipeline stage at this (dp, cp, tp) coordinate: tied embeddings.
    embedding_group: dist.ProcessGroup | None = None
    # Expert parallelism: the ranks exchanging tokens (different experts), and those
    # holding this rank's experts (their gradients' reduction); None at size 1.
    ep_group: dist.ProcessGroup | None = None
    edp_group: dist.ProcessGroup | None = None

    @property
    def pp_rank(self) -> int:
        return self.dims.coordinates(self.rank)[0]

    @property
    def dp_rank(self) -> int:
        return self.dims.coordinates(self.rank)[1]

    @property
    def tp_rank(self) -> int:
        return self.dims.coordinates(self.rank)[2]

    @property
    def cp_rank(self) -> int:
        return self.dims.cp_rank(self.rank)

    @property
    def dp_cp(self) -> int:
        """The size of the dp x cp group."""
        return self.dims.dp * self.dims.cp


def pair_mesh(dims: ParallelDims, lower: int, upper: int) -> list[list[int]]:
    """The groups that run collectives alongside the pipeline pair (lower, upper) of
    stages: that pair at every (dp, cp, tp) coordinate and, when pp is even, every pair
    starting on a stage of the same parity, so that each rank appears at most once
    (the send/receive groups of neuronx-distributed)."""
    starts = [lower]
    if dims.pp % 2 == 0:
        starts = range(lower % 2, dims.pp, 2)
    return [sorted([stages[s], stages[(s + 1) % dims.pp]])
            for s in starts for stages in dims.group_ranks("pp")]


def build_mesh(dims: ParallelDims, rank: int,
               group_options: Callable[[list[list[int]]], Any] = lambda groups: None) -> Mesh:
    """Create the tp, cp, dp, dp x cp and pp groups. Every rank must call this (new_group
    is collective).

    `group_options(axis_groups)` gives the `pg_options` of a group whose axis has the
    groups `axis_groups` (`Backend.group_options`: the mesh on xla)."""
    groups: dict[str, dist.ProcessGroup | None] = {}
    axes: dict[str, tuple[str, ...]] = {"tp": ("tp",), "cp": ("cp",), "dp": ("dp",),
                                        "pp": ("pp",)}
    if dims.cp > 1 and dims.dp > 1:
        axes["dp_cp"] = ("dp", "cp")
    for name, axis in axes.items():
        mine = None
        axis_groups = dims.group_ranks(*axis)
        for ranks in axis_groups:
            if len(ranks) == 1:
                continue
            group = dist.new_group(ranks, pg_options=group_options(axis_groups))
            if rank in ranks:
                mine = group
        groups[name] = mine
    mesh = Mesh(dims, rank, groups["tp"], groups["dp"], groups["pp"], groups["cp"],
                groups.get("dp_cp", groups["dp"] if dims.cp == 1 else groups["cp"]))
    if dims.ep > 1:
        for axis in ("ep", "edp"):
            axis_groups = dims.expert_group_ranks(axis)
            for ranks in axis_groups:
                if len(ranks) == 1:
                    continue
                group = dist.new_group(ranks, pg_options=group_options(axis_groups))
                if rank in ranks:
                    setattr(mesh, f"{axis}_group", group)
    if dims.pp > 1:
        pairs = [(s, s + 1) for s in range(dims.pp - 1)]
        if dims.pp > 2:
            pairs.append((dims.pp - 1, 0))
        for stages in dims.group_ranks("pp"):
            for a, b in pairs:
                ranks = [stages[a], stages[b]]
                if dims.pp == 2:  # the pair is the pp group: no second group of it
                    if rank in ranks:
                        mesh.pp_pairs[(a, b)] = mesh.embedding_group = mesh.pp_group
                    continue
                group = dist.new_group(sorted(ranks),
                                       pg_options=group_options(pair_mesh(dims, a, b)))
                if rank in ranks:
                    mesh.pp_pairs[(a, b)] = group
                    if {a, b} == {0, dims.pp - 1}:
                        mesh.embedding_group = group
    return mesh
