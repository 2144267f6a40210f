"""Goodput: where a run's wall time went, over every attempt (each start or resume).

Wall time splits into productive step time and named losses:

- startup: process start to the first step (imports, process groups, model build,
  checkpoint load);
- compilation: steps whose time includes a newly compiled graph (XLA, Neuron: the
  first steps of an attempt, and any recompilation later);
- evaluation, checkpoint (time the loop is blocked by a save), data (waiting for
  batches), pipeline_idle (waiting for neighbouring stages), logging (reading values
  back and writing records);
- lost_to_restarts: the productive time of steps an attempt ran after its last
  checkpoint, which the next attempt runs again.

Each attempt appends itself to `<run.dir>/goodput.json`, rewritten after every
optimizer step (rank 0, a write of a few kilobytes, replaced atomically), so that the
steps an attempt reached are known even after a SIGKILL. The fractions of the total add up
to 1 by construction: every second between an attempt's start and its last write is
in exactly one category.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("trntrain")

GOODPUT_FILE = "goodput.json"
CATEGORIES = ("productive", "startup", "compilation", "evaluation", "checkpoint", "data",
              "pipeline_idle", "logging", "lost_to_restarts")
# Trainer phases (time_<phase>_s) that are losses, by their goodput category; the rest of
# a step is productive, or compilation when it compiled a graph.
LOSS_PHASES = {"evaluation": "evaluation", "checkpoint": "checkpoint", "data": "data",
               "pipeline_wait": "pipeline_idle", "logging": "logging"}


def process_start_time() -> float:
    """When this process started (epoch seconds): from /proc on Linux, where the
    interpreter's own start-up and imports count too; else the time of this call."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - uptime + int(fields[19]) / ticks
    except (OSError, IndexError, ValueError):
        return time.time()


class Goodput:
    """The ledger of one attempt, and the attempts of the run before it.

    `start()` marks the first step of this attempt (what came before is startup);
    `reached(...)` splits the time of each optimizer step as soon as it is taken;
    `saved(step)` remembers the productive time up to a saved step, so that a later
    resume from it knows exactly how much productive time the steps after it were.
    """

    def __init__(self, path: Path | None, resume_step: int,
                 started: float | None = None) -> None:
        self.path = path
        self.attempts: list[dict[str, Any]] = self._earlier_attempts(resume_step)
        self.started = process_start_time() if started is None else started
        self.current: dict[str, Any] = {
            "start_step": resume_step, "steps_reached": resume_step, "wall_s": 0.0,
            "seconds": dict.fromkeys(CATEGORIES, 0.0),
            # Productive seconds of this attempt up to each saved step.
            "productive_at_checkpoint": {str(resume_step): 0.0},
        }

    def _earlier_attempts(self, resume_step: int) -> list[dict[str, Any]]:
        """The attempts recorded in the run directory, if this run resumes; the steps the
        last of them ran after `resume_step` become lost_to_restarts."""
        if self.path is None or resume_step == 0 or not self.path.is_file():
            return []
        try:
            attempts = json.loads(self.path.read_text())["attempts"]
        except (OSError, ValueError, KeyError, TypeError):
            logger.warning("%s is unreadable: goodput starts again from this attempt",
                           self.path)
            return []
        last = attempts[-1] if attempts else None
        if last is not None and last["steps_reached"] > resume_step:
            seconds = last["seconds"]
            done = last["productive_at_checkpoint"].get(str(resume_step))
            if done is None:  # resumed from a checkpoint the attempt did not write
                steps = max(last["steps_reached"] - last["start_step"], 1)
                done = seconds["productive"] * (resume_step - last["start_step"]) / steps
            lost = max(seconds["productive"] - done, 0.0)
            seconds["productive"] -= lost
            seconds["lost_to_restarts"] += lost
            last["lost_steps"] = [resume_step + 1, last["steps_reached"]]
        return attempts

    def start(self) -> None:
        """The first step of this attempt begins now: everything before was startup."""
        self.current["seconds"]["startup"] = time.time() - self.started
        self._mark = time.perf_counter()

    def _split(self, phases: dict[str, float], rest: str) -> None:
        """The wall time since the last mark: the loss phases timed in it (seconds by
        trainer phase) to their categories, the remainder to `rest`."""
        now = time.perf_counter()
        wall, self._mark = now - self._mark, now
        seconds = self.current["seconds"]
        for phase, category in LOSS_PHASES.items():
            spent = phases.get(phase, 0.0)
            seconds[category] += spent
            wall -= spent
        seconds[rest] += max(wall, 0.0)

    def reached(self, step: int, phases: dict[str, float], compiled: bool) -> None:
        """Optimizer step `step` is taken. Accounts the time since the last step was taken
        (its logging, evaluation and save, this step's data and compute: productive, or
        compilation if the step compiled a graph) and writes at once, so that a kill right
        after the step still counts it."""
        self._split(phases, "compilation" if compiled else "productive")
        self.current["steps_reached"] = step
        self.write()

    def saved(self, step: int) -> None:
        """A checkpoint of `step` is written: a resume from it loses what came after."""
        self.current["productive_at_checkpoint"][str(step)] = (
            self.current["seconds"]["productive"])
        self.write()

    def finish(self, phases: dict[str, float]) -> None:
        """After the last step: its logging and evaluation, and the final save."""
        self._split(phases, "checkpoint")
        self.write()

    def totals(self) -> dict[str, float]:
        """Seconds by category over every attempt, this one so far included."""
        self.current["wall_s"] = time.time() - self.started
        total = dict.fromkeys(CATEGORIES, 0.0)
        for attempt in [*self.attempts, self.current]:
            for category, seconds in attempt["seconds"].items():
                total[category] += seconds
        return total

    def fraction(self) -> float:
        """Productive seconds over wall seconds of the whole run so far."""
        total = self.totals()
        wall = sum(total.values())
        return total["productive"] / wall if wall > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        total = self.totals()
        wall = sum(total.values())
        return {
            "goodput": total["productive"] / wall if wall > 0 else 0.0,
            "wall_s": wall,
            "seconds": total,
            "fractions": {k: (v / wall if wall > 0 else 0.0) for k, v in total.items()},
            "lost_steps": sum(a["lost_steps"][1] - a["lost_steps"][0] + 1
                              for a in self.attempts if "lost_steps" in a),
            "attempts": [*self.attempts, self.current],
        }

    def write(self) -> None:
        if self.path is None:
            return
        temporary = self.path.with_suffix(".json.tmp")
        try:
            temporary.write_text(json.dumps(self.summary(), indent=1))
            os.replace(temporary, self.path)
        except OSError as err:  # accounting must never stop training
            logger.warning("writing %s failed: %s", self.path, err)
            self.path = None
