"""Pipeline parallelism: layers cut into chunks, a static timetable, two transports.

Rank s of the pp group holds the chunks s, s + p, ... (virtual pipeline stages).
Each tick of the timetable (`pipeline_schedule.py`) runs at most one forward or
backward of one chunk on one micro-batch, then exchanges the activations and
gradients that crossed to a neighbouring stage:

- `isend`: batched isend/irecv between the two ranks;
- `allgather`: an all-gather over the 2-rank group of the neighbouring stages,
  each rank contributing what it sends (or zeros), both directions in one
  collective. torch-xla has no usable send/recv; this is how pipelines run there.

Shapes are static (micro-batch, sequence or its tp shard, hidden), known ahead.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from trntrain.data.base import Batch
from trntrain.faults import note
from trntrain.parallel.comm import COMM_STATS, Group, all_gather_single
from trntrain.parallel.pipeline_schedule import (
    Action,
    Transfer,
    forward_only_actions,
    pair_of,
    rank_actions,
    timetable,
)
from trntrain.plugins import Registry


def partition_layers(costs: list[float], chunks: int, head_cost: float) -> list[range]:
    """Contiguous layer ranges, one per chunk, minimising the most expensive chunk;
    the last chunk also runs the output head (`head_cost`)."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][i]: the least possible maximum cost of splitting layers[:i] into k chunks.
    best = [[inf] * (n + 1) for _ in range(chunks + 1)]
    cut = [[0] * (n + 1) for _ in range(chunks + 1)]
    best[0][0] = 0.0
    for k in range(1, chunks + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                cost = prefix[i] - prefix[j] + (head_cost if k == chunks and i == n else 0.0)
                value = max(best[k - 1][j], cost)
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    bounds, i = [], n
    for k in range(chunks, 0, -1):
        bounds.append(range(cut[k][i], i))
        i = cut[k][i]
    return bounds[::-1]


@dataclass
class PipelineGroups:
    """This rank's pipeline coordinates and the groups of its neighbouring-stage pairs."""

    stages: int
    stage: int
    # (lower pp rank, upper pp rank) -> the 2-rank group over this (dp, tp) coordinate.
    pairs: dict[tuple[int, int], Group]
    # pp rank -> global rank, for this (dp, tp) coordinate.
    global_ranks: list[int]


class Arrival:
    """A tensor on its way: `get()` waits for it only when it is needed."""

    def __init__(self, tensor: torch.Tensor, work: dist.Work | None = None) -> None:
        self.tensor = tensor
        self.work = work

    def get(self) -> torch.Tensor:
        if self.work is not None:
            note("a pipeline receive from the neighbouring stage")
            self.work.wait()
            self.work = None
        return self.tensor


class Transport:
    # Whether it runs well on lazy tensors (XLA): torch-xla runs each point-to-point send
    # and receive as a collective_permute of its own followed by a graph sync.
    lazy_ok: bool = True

    def __init__(self, groups: PipelineGroups, shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device) -> None:
        self.groups = groups
        self.shape = shape
        self.dtype = dtype
        self.device = device

    def exchange(self, transfers: list[Transfer], outgoing: dict[Transfer, torch.Tensor]
                 ) -> dict[Transfer, Arrival]:
        """Send `outgoing` (this rank's sends of this tick); return what arrives here."""
        raise NotImplementedError

    def finish(self) -> None:
        """Wait for this step's sends to complete."""


class IsendTransport(Transport):
    """Sends and receives are posted at their tick and waited for only when the data
    is needed (a receive) or at the end of the step (a send): a rank runs ahead of
    its neighbours as far as the data allows, instead of in lock-step with them."""

    lazy_ok = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._sends: list[dist.Work] = []

    def exchange(self, transfers, outgoing):
        me = self.groups.stage
        ops, received, kinds = [], {}, []
        for t in transfers:
            if t.src == me:
                COMM_STATS.record("pp_send", outgoing[t])
                ops.append(dist.P2POp(dist.isend, outgoing[t].contiguous(),
                                      self.groups.global_ranks[t.dst]))
                kinds.append(None)
            elif t.dst == me:
                buffer = torch.empty(self.shape, dtype=self.dtype, device=self.device)
                ops.append(dist.P2POp(dist.irecv, buffer, self.groups.global_ranks[t.src]))
                kinds.append(t)
                received[t] = Arrival(buffer)
        if ops:
            for t, work in zip(kinds, dist.batch_isend_irecv(ops), strict=True):
                if t is None:
                    self._sends.append(work)
                else:
                    received[t].work = work
        return received

    def finish(self) -> None:
        for work in self._sends:
            work.wait()
        self._sends.clear()


class AllGatherTransport(Transport):
    def exchange(self, transfers, outgoing):
        me = self.groups.stage
        received = {}
        by_pair: dict[tuple[int, int], list[Transfer]] = {}
        for t in transfers:
            if me in (t.src, t.dst):
                by_pair.setdefault(pair_of(t, self.groups.stages), []).append(t)
        for pair, pair_transfers in by_pair.items():
            send = next((t for t in pair_transfers if t.src == me), None)
            recv = next((t for t in pair_transfers if t.dst == me), None)
            mine = (outgoing[send].contiguous() if send is not None
                    else torch.zeros(self.shape, dtype=self.dtype, device=self.device))
            out = torch.empty((2, *self.shape), dtype=self.dtype, device=self.device)
            COMM_STATS.record("pp_allgather", out)
            note(f"the pipeline all-gather of stages {pair}")
            all_gather_single(out, mine.unsqueeze(0), group=self.groups.pairs[pair])
            if recv is not None:
                # Slots follow the group's rank order: the lower global rank first.
                peer = recv.src
                slot = int(self.groups.global_ranks[peer] > self.groups.global_ranks[me])
                received[recv] = Arrival(out[slot])
        return received


# parallel.pp_transport -> Transport subclass; packages add theirs through the
# `trntrain.pp_transports` entry point group.
TRANSPORTS: Registry[type[Transport]] = Registry("trntrain.pp_transports")
TRANSPORTS["isend"] = IsendTransport
TRANSPORTS["allgather"] = AllGatherTransport
# parallel.pp_transport=auto: the first of these the backend runs well.
AUTO_TRANSPORTS = ("isend", "allgather")


def transport_for(name: str, lazy_backend: bool) -> str:
    """parallel.pp_transport with auto resolved: isend on eager backends; on lazy ones
    (XLA) a transport built of collectives every rank traces."""
    if name != "auto":
        return name
    return next(t for t in AUTO_TRANSPORTS if TRANSPORTS[t].lazy_ok or not lazy_backend)


def build_transport(name: str, groups: PipelineGroups, shape: tuple[int, ...],
                    dtype: torch.dtype, device: torch.device) -> Transport:
    return TRANSPORTS[name](groups, shape, dtype, device)


class PipelineRunner:
    """Runs one optimizer step's micro-batches through this rank's chunks."""

    def __init__(self, chunks: dict[int, nn.Module], groups: PipelineGroups, schedule: str,
                 virtual: int, microbatches: int, transport: Transport,
                 loss_fn: Callable[[torch.Tensor, Batch], torch.Tensor],
                 autocast: Callable[[], contextlib.AbstractContextManager],
                 cut_graph: Callable[[], None] = lambda: None) -> None:
        self.chunks = chunks
        self.groups = groups
        self.last_chunk = groups.stages * virtual - 1
        self.microbatches = microbatches
        self.transport = transport
        self.loss_fn = loss_fn
        self.autocast = autocast
        # Called after each tick in which this rank computed or exchanged something: on
        # XLA one graph per schedule action (as AWS's pipeline engine), not one per step.
        self.cut_graph = cut_graph
        p, v, m = groups.stages, virtual, microbatches
        self.train_table = timetable([rank_actions(schedule, p, v, m, r) for r in range(p)], p, v)
        self.eval_table = timetable([forward_only_actions(p, v, m, r) for r in range(p)], p, v)
        # Largest number of micro-batches whose forward ran and backward did not yet,
        # as measured in the last step (the activation memory the schedule holds).
        self.max_in_flight = 0
        # Host seconds of the last step spent in forward/backward and in all (the rest
        # is waiting for neighbours and transfers: the measured bubble).
        self.compute_s = 0.0
        self.step_s = 0.0

    def forward_backward(self, micro_batches: list[Batch], tokens: torch.Tensor | None
                         ) -> torch.Tensor:
        """Gradients of the micro-batches' summed losses divided by `tokens` (the trained
        tokens per dp rank); returns that loss on the last stage and zero elsewhere."""
        return self._run(self.train_table, micro_batches, tokens, backward=True)

    @torch.no_grad()
    def forward(self, micro_batches: list[Batch], tokens: torch.Tensor | None) -> torch.Tensor:
        return self._run(self.eval_table, micro_batches, tokens, backward=False)

    def _run(self, table, micro_batches: list[Batch], tokens: torch.Tensor | None,
             backward: bool) -> torch.Tensor:
        me = self.groups.stage
        device = micro_batches[0].inputs.device
        loss_sum = torch.zeros((), device=device)
        inputs: dict[tuple[int, int], torch.Tensor] = {}
        outputs: dict[tuple[int, int], torch.Tensor] = {}
        arrived: dict[tuple[str, int, int], Arrival] = {}
        in_flight = 0
        if backward:
            self.max_in_flight = 0
        compute_s, start = 0.0, time.perf_counter()
        for tick in range(table.ticks):
            action: Action | None = table.actions[me][tick]
            outgoing: dict[Transfer, torch.Tensor] = {}
            if action is not None:
                key = (action.chunk, action.microbatch)
                batch = micro_batches[action.microbatch]
                # What this action needs from a neighbour: waiting for it is bubble.
                needed = None
                if action.kind == "F" and action.chunk > 0:
                    needed = arrived.pop(("F", action.chunk - 1, action.microbatch)).get()
                elif action.kind == "B" and action.chunk < self.last_chunk:
                    needed = arrived.pop(("B", action.chunk + 1, action.microbatch)).get()
                action_start = time.perf_counter()
                if action.kind == "F":
                    if action.chunk == 0:
                        x = batch.inputs
                    else:
                        x = needed
                        x.requires_grad_(backward)
                    with self.autocast():
                        y = self.chunks[action.chunk](x, **batch.model_kwargs())
                        if action.chunk == self.last_chunk:
                            y = self.loss_fn(y, batch) / tokens
                            loss_sum = loss_sum + y.detach()
                    if backward:
                        inputs[key], outputs[key] = x, y
                        in_flight += 1
                        self.max_in_flight = max(self.max_in_flight, in_flight)
                    value = y.detach()
                else:
                    x, y = inputs.pop(key), outputs.pop(key)
                    if action.chunk == self.last_chunk:
                        y.backward()
                    else:
                        y.backward(needed)
                    in_flight -= 1
                    value = x.grad if action.chunk > 0 else None
                for t in table.transfers[tick]:
                    if t.src == me and (t.kind, t.chunk, t.microbatch) == (
                            action.kind, action.chunk, action.microbatch):
                        outgoing[t] = value
                compute_s += time.perf_counter() - action_start
            for t, arrival in self.transport.exchange(table.transfers[tick], outgoing).items():
                arrived[(t.kind, t.chunk, t.microbatch)] = arrival
            if action is not None or any(me in (t.src, t.dst) for t in table.transfers[tick]):
                self.cut_graph()
        self.transport.finish()
        if backward:
            self.compute_s, self.step_s = compute_s, time.perf_counter() - start
        return loss_sum
