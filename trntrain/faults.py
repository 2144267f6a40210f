"""Stopping on request, and faults injected on purpose to test recovery.

SIGTERM (SLURM's notice before a time limit or preemption, Kubernetes' before an
eviction) asks the run to stop: the current step finishes, every rank agrees on
the step to stop after, a checkpoint is written and the process exits with 0.

TRNTRAIN_FAULT=kill:STEP[:RANK] makes rank RANK (default 0) kill itself with
SIGKILL after optimizer step STEP; kill_during_save:STEP[:RANK] does it while the
checkpoint of step STEP is half written, kill_after_log:STEP[:RANK] between the
metrics record of step STEP and its checkpoint; nan:STEP[:RANK] makes that rank's loss NaN
at step STEP; pause:STEP[:RANK] holds that rank at the start of step STEP until it is
asked to stop (SIGTERM): a run caught mid-way, for the scheduler tests. Only in the first
attempt of a torchrun job (TORCHELASTIC_RESTART_COUNT unset or 0): the recovery tests use
them.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from trntrain.distributed import World, host_group
from trntrain.errors import UserError


class NonFiniteError(UserError):
    """Training stopped on a non-finite loss or gradient (train.nonfinite=stop)."""


class StopRequest:
    """Within the context, SIGTERM sets a flag instead of killing the process."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None
        self._vote: tuple[dist.Work, torch.Tensor] | None = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        global _STOP_SIGNALLED
        self.requested = _STOP_SIGNALLED = True

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        if self._vote is not None and exc[0] is None:
            self._vote[0].wait()  # every rank started it: let it finish before teardown

    def agreed(self, world: World) -> bool:
        """True on every rank, at the same call, once any rank was asked to stop.

        The vote is an all-reduce over all ranks started here and read at the next call,
        so it runs during the next step instead of holding up the loop: the stop comes
        one step later than the signal's own step.
        """
        if world.world_size == 1:
            return self.requested
        stop = False
        if self._vote is not None:
            note("all_reduce of the stop request over all ranks")
            work, flag = self._vote
            work.wait()
            stop = bool(flag.item())
        flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32)
        self._vote = None if stop else (
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=host_group(), async_op=True), flag)
        return stop


# Set by the SIGTERM handler: what a `pause` fault waits for.
_STOP_SIGNALLED = False


def _fault() -> tuple[str, int, int] | None:
    spec = os.environ.get("TRNTRAIN_FAULT", "")
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return None
    kind, *args = spec.split(":")
    return kind, int(args[0]), int(args[1]) if len(args) > 1 else 0


def with_nan_fault(loss_fn: Callable[[torch.Tensor, Any], torch.Tensor],
                   current_step: Callable[[], int], world: World
                   ) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """`loss_fn`, or, where TRNTRAIN_FAULT=nan:STEP:RANK names this rank, a loss function
    that returns NaN during step STEP (pipelined or not). Decided once, not per loss."""
    fault = _fault()
    if fault is None or fault[0] != "nan" or fault[2] != world.rank:
        return loss_fn

    def poisoned(logits: torch.Tensor, batch: Any) -> torch.Tensor:
        loss = loss_fn(logits, batch)
        return loss * float("nan") if current_step() == fault[1] else loss

    return poisoned


def inject_fault(point: str, step: int, world: World) -> None:
    """Called at `point` of step `step`: "start" (before the step), "step" (after it),
    "log" (after its metrics record) or "save" (half-way through its checkpoint); acts
    if TRNTRAIN_FAULT names that point, step and this rank. The one hook of the loop."""
    fault = _fault()
    if fault is None:
        return
    kind, at_step, rank = fault
    points = {"kill": "step", "kill_after_log": "log", "kill_during_save": "save",
              "stall": "start", "raise": "start", "pause": "start"}
    if points.get(kind) != point or step != at_step or world.rank != rank:
        return
    if kind == "stall":  # stops making progress: the watchdog's case
        time.sleep(10**6)
    elif kind == "pause":  # mid-run until a stop request, which then takes its usual path
        while not _STOP_SIGNALLED:
            time.sleep(0.05)
    elif kind == "raise":  # fails as a bug in its data or model code would
        raise RuntimeError(f"injected failure on rank {world.rank} at step {step}")
    else:
        os.kill(os.getpid(), signal.SIGKILL)


class Watchdog:
    """Turns a hang into an error: a thread that stops this process when it has made
    no progress for `timeout_s` seconds, naming the step and what it was waiting in.

    Progress is noted at every step and before every collective of trntrain's own
    (comm.py, the gradient buckets, the pipeline transport), so a rank blocked in a
    collective names it, and a rank stuck in its own code names the step's phase.
    Each rank stops itself; torchrun then ends the job.
    """

    def __init__(self, timeout_s: float, world: World) -> None:
        self.timeout_s = timeout_s
        self.world = world
        self.activity = "start-up"
        self.last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="trntrain-watchdog",
                                        daemon=True)

    def progress(self, activity: str) -> None:
        self.activity = activity
        self.last = time.monotonic()

    def _watch(self) -> None:
        interval = min(self.timeout_s / 4, 5.0)
        while not self._stop.wait(interval):
            idle = time.monotonic() - self.last
            if idle > self.timeout_s:
                print(f"trntrain: error: watchdog: rank {self.world.rank} made no progress for "
                      f"{idle:.0f} s (train.watchdog_s={self.timeout_s:g}) in "
                      f"{self.activity}; stopping this rank, torchrun stops the others.",
                      file=sys.stderr, flush=True)
                # The peers that wait for this rank stalled moments later: two more checks
                # let theirs say what they wait in before torchrun ends them.
                time.sleep(2 * interval)
                os._exit(3)

    def __enter__(self) -> Watchdog:
        global WATCHDOG
        if self.timeout_s > 0:
            WATCHDOG = self
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        global WATCHDOG
        self._stop.set()
        WATCHDOG = None


WATCHDOG: Watchdog | None = None


def note(activity: str) -> None:
    """Record progress with the watchdog, if one runs (a string assignment otherwise)."""
    if WATCHDOG is not None:
        WATCHDOG.progress(activity)


PEER_FAILURE_SIGNS = ("Connection reset by peer", "Connection closed by peer", "Broken pipe",
                      "connectFullMesh", "NCCL communicator was aborted")


def is_peer_failure(err: BaseException) -> bool:
    """A collective that failed because another rank died: a consequence, not a cause."""
    return isinstance(err, RuntimeError) and any(s in str(err) for s in PEER_FAILURE_SIGNS)
