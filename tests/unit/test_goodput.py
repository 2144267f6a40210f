"""The goodput ledger against hand-made timelines (the clock is driven by the test)."""

from __future__ import annotations

import json

import pytest

from trntrain.metrics import goodput as goodput_module
from trntrain.metrics.goodput import Goodput


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(goodput_module.time, "perf_counter", clock)
    monkeypatch.setattr(goodput_module.time, "time", clock)
    return clock


def run_steps(ledger: Goodput, clock: Clock, steps: range, step_s: float, data_s: float,
              compiled: set[int] = frozenset(), checkpoint_every: int = 0) -> None:
    checkpoint_s = 0.0  # the save after the last step, accounted with the next one
    for step in steps:
        clock.now += step_s
        ledger.reached(step, {"data": data_s, "checkpoint": checkpoint_s}, step in compiled)
        checkpoint_s = 0.0
        if checkpoint_every and step % checkpoint_every == 0:
            clock.now += 0.5
            checkpoint_s = 0.5
            ledger.saved(step)


def test_seconds_split_by_hand(clock, tmp_path):
    ledger = Goodput(tmp_path / "goodput.json", 0, started=clock.now - 7.0)
    ledger.start()
    # Two compiling steps of 3 s, then four of 1 s, each with 0.25 s of data waiting.
    run_steps(ledger, clock, range(1, 3), 3.0, 0.25, compiled={1, 2})
    run_steps(ledger, clock, range(3, 7), 1.0, 0.25)
    ledger.finish({})
    summary = json.loads((tmp_path / "goodput.json").read_text())
    assert summary["seconds"] == pytest.approx({
        "productive": 4 * 0.75, "startup": 7.0, "compilation": 2 * 2.75, "evaluation": 0.0,
        "checkpoint": 0.0, "data": 6 * 0.25, "pipeline_idle": 0.0, "logging": 0.0,
        "lost_to_restarts": 0.0})
    assert summary["wall_s"] == pytest.approx(7.0 + 2 * 3.0 + 4 * 1.0)
    assert summary["goodput"] == pytest.approx(3.0 / 17.0)


def test_a_resume_moves_the_steps_after_the_checkpoint_to_lost(clock, tmp_path):
    path = tmp_path / "goodput.json"
    first = Goodput(path, 0, started=clock.now)
    first.start()
    # Ten 1 s steps, a checkpoint every 4 (0.5 s each), killed after step 10.
    run_steps(first, clock, range(1, 11), 1.0, 0.0, checkpoint_every=4)
    second = Goodput(path, 8, started=clock.now)
    second.start()
    run_steps(second, clock, range(9, 13), 1.0, 0.0)
    second.finish({})
    summary = json.loads(path.read_text())
    earlier = summary["attempts"][0]
    assert earlier["lost_steps"] == [9, 10] and summary["lost_steps"] == 2
    # Steps 9 and 10 of the first attempt: 2 s of productive time, now lost.
    assert summary["seconds"]["lost_to_restarts"] == pytest.approx(2.0)
    assert summary["seconds"]["productive"] == pytest.approx(8.0 + 4.0)
    assert summary["seconds"]["checkpoint"] == pytest.approx(2 * 0.5)
    assert sum(summary["fractions"].values()) == pytest.approx(1.0)


def test_a_fresh_run_ignores_an_old_ledger(clock, tmp_path):
    path = tmp_path / "goodput.json"
    path.write_text("not json")
    ledger = Goodput(path, 0, started=clock.now)
    assert ledger.attempts == []
    # A resumed run with an unreadable ledger starts accounting from itself.
    assert Goodput(path, 5, started=clock.now).attempts == []
