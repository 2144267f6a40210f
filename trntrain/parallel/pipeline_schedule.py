"""Pipeline schedules as static action lists, and the timetable that runs them.

A schedule gives every pipeline rank an ordered list of actions on (model chunk,
micro-batch): F (forward), B (backward). With `virtual_pp` = v, rank s holds the
chunks s, s + p, ..., s + (v - 1) p of the p * v chunks the layers are cut into.

`timetable` turns the per-rank lists into global ticks: in each tick every rank
runs at most one action whose inputs arrived in an earlier tick, and the
transfers those actions produce are exchanged between ticks. The timetable is
static (it depends only on p, v, m and the schedule), so every rank knows every
transfer, its peer and its shape ahead: no handshakes, one fixed sequence of
collectives, as torch-xla needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from trntrain.errors import UserError
from trntrain.plugins import Registry


@dataclass(frozen=True)
class Action:
    kind: str  # "F" or "B"
    chunk: int  # global chunk index, 0 .. p*v - 1
    microbatch: int

    def __repr__(self) -> str:
        return f"{self.kind}{self.chunk}.{self.microbatch}"


@dataclass(frozen=True)
class Transfer:
    """An activation (kind F) or its gradient (kind B) crossing from rank src to dst."""

    kind: str
    src: int
    dst: int
    chunk: int  # the chunk that produced it
    microbatch: int


def _one_f_one_b(forwards: list[Action], backwards: list[Action], warmup: int) -> list[Action]:
    warmup = min(warmup, len(forwards))
    order = forwards[:warmup]
    for i in range(warmup, len(forwards)):
        order += [forwards[i], backwards[i - warmup]]
    return order + backwards[len(forwards) - warmup:]


def gpipe_actions(stages: int, virtual: int, microbatches: int, rank: int) -> list[Action]:
    """Every forward, then every backward."""
    forwards = [Action("F", rank, i) for i in range(microbatches)]
    backwards = [Action("B", rank, i) for i in range(microbatches)]
    return _one_f_one_b(forwards, backwards, microbatches)


def one_f_one_b_actions(stages: int, virtual: int, microbatches: int, rank: int
                        ) -> list[Action]:
    """stages - rank - 1 forwards, then one forward and one backward in turn."""
    forwards = [Action("F", rank, i) for i in range(microbatches)]
    backwards = [Action("B", rank, i) for i in range(microbatches)]
    return _one_f_one_b(forwards, backwards, stages - rank - 1)


def interleaved_actions(stages: int, virtual: int, microbatches: int, rank: int
                        ) -> list[Action]:
    """Megatron's order: p micro-batches through chunk 0, then through chunk 1, ...;
    backward walks the chunks in reverse."""
    p, v, m = stages, virtual, microbatches

    def local(k: int, backward: bool) -> Action:
        chunk = (k // p) % v
        if backward:
            chunk = v - 1 - chunk
        mb = (k // (p * v)) * p + k % p
        return Action("B" if backward else "F", chunk * p + rank, mb)

    forwards = [local(k, False) for k in range(m * v)]
    backwards = [local(k, True) for k in range(m * v)]
    return _one_f_one_b(forwards, backwards, (p - rank - 1) * 2 + (v - 1) * p)


# parallel.schedule -> the ordered actions of one pipeline rank, given (stages, virtual
# stages, micro-batches, rank); packages add theirs through the
# `trntrain.pipeline_schedules` entry point group.
ScheduleFn = Callable[[int, int, int, int], list[Action]]
SCHEDULES: Registry[ScheduleFn] = Registry("trntrain.pipeline_schedules")
SCHEDULES["gpipe"] = gpipe_actions
SCHEDULES["1f1b"] = one_f_one_b_actions
SCHEDULES["interleaved_1f1b"] = interleaved_actions


def rank_actions(schedule: str, stages: int, virtual: int, microbatches: int, rank: int
                 ) -> list[Action]:
    """The ordered actions of pipeline rank `rank` under `schedule`."""
    return SCHEDULES[schedule](stages, virtual, microbatches, rank)


def forward_only_actions(stages: int, virtual: int, microbatches: int, rank: int
                         ) -> list[Action]:
    """Evaluation: every chunk of this rank forwards every micro-batch, in order."""
    return [Action("F", c * stages + rank, mb) for mb in range(microbatches)
            for c in range(virtual)]


@dataclass
class Timetable:
    ticks: int
    # actions[rank][tick]: the action rank runs at that tick, or None (idle).
    actions: list[list[Action | None]]
    # transfers[tick]: what is exchanged after that tick, in one global order.
    transfers: list[list[Transfer]]


def timetable(per_rank: list[list[Action]], stages: int, virtual: int) -> Timetable:
    """Simulate the per-rank orders with their data dependencies (see module doc)."""
    last_chunk = stages * virtual - 1
    done: set[Action] = set()
    position = [0] * stages
    actions: list[list[Action | None]] = [[] for _ in range(stages)]
    transfers: list[list[Transfer]] = []
    total = sum(len(a) for a in per_rank)
    while len(done) < total:
        ran = []
        for rank in range(stages):
            if position[rank] == len(per_rank[rank]):
                actions[rank].append(None)
                continue
            a = per_rank[rank][position[rank]]
            if a.kind == "F":
                ready = a.chunk == 0 or Action("F", a.chunk - 1, a.microbatch) in done
            else:
                ready = (Action("F", a.chunk, a.microbatch) in done
                         and (a.chunk == last_chunk
                              or Action("B", a.chunk + 1, a.microbatch) in done))
            if ready:
                ran.append(a)
                position[rank] += 1
            actions[rank].append(a if ready else None)
        if not ran:
            raise UserError(
                "parallel.schedule: the pipeline schedule cannot make progress with these "
                "settings; valid: parallel.microbatches a multiple of parallel.pp for "
                "interleaved_1f1b."
            )
        done.update(ran)
        tick = []
        for a in ran:
            src = a.chunk % stages
            if a.kind == "F" and a.chunk < last_chunk:
                tick.append(Transfer("F", src, (a.chunk + 1) % stages, a.chunk, a.microbatch))
            elif a.kind == "B" and a.chunk > 0:
                tick.append(Transfer("B", src, (a.chunk - 1) % stages, a.chunk, a.microbatch))
        transfers.append(sorted(tick, key=transfer_order))
        if len(transfers) > 4 * total + 4 * stages:
            raise RuntimeError("pipeline timetable does not terminate")
    return Timetable(len(transfers), actions, transfers)


def pair_of(transfer: Transfer, stages: int) -> tuple[int, int]:
    """The neighbouring-stage pair a transfer crosses, as (lower, upper) rank; the
    wrap-around pair of interleaving is (stages - 1, 0)."""
    a, b = transfer.src, transfer.dst
    if {a, b} == {0, stages - 1} and stages > 2:
        return (stages - 1, 0)
    return (min(a, b), max(a, b))


def transfer_order(t: Transfer) -> tuple:
    # Pairs in increasing order of their lower rank: every rank meets its two pairs in
    # the same global order, so pairwise collectives cannot wait on each other in a cycle.
    lower = min(t.src, t.dst)
    upper = max(t.src, t.dst)
    wrap = upper - lower > 1
    return (upper if wrap else lower, wrap, t.kind, t.chunk, t.microbatch)
