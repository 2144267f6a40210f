"""A random file of a random checkpoint damaged (truncated, bytes flipped, replaced by a
pickle that would create a marker file, deleted), then `resume=auto` on 1 and on 2
ranks: the payload never runs, the damaged checkpoint is never resumed from, and the
run either falls back to the intact one or stops with one clear error."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import run_distributed, tiny_config
from trntrain.checkpoint.manager import step_dir_name, write_checksums
from trntrain.distributed import World
from trntrain.errors import UserError
from trntrain.trainer import Trainer

BASE = ("train.micro_batch_size=2", "checkpoint=dcp", "checkpoint.every=2",
        "checkpoint.keep=0")
FILES = (".metadata", "__0_0.distcp", "model.yaml", "checksums.json")


class _Touch:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("pristine") / "run"
    Trainer(tiny_config(*BASE, "train.max_steps=4"), World(), run_dir=run_dir).fit()
    return run_dir


def resume(rank: int, world_size: int, run_dir: str) -> tuple[str, object]:
    trainer = Trainer(tiny_config(*BASE, "train.max_steps=6"), World(rank, world_size, rank),
                      run_dir=Path(run_dir))
    try:
        return "resumed", trainer.resume_step()
    except UserError as err:
        return "error", str(err)


@settings(max_examples=24, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(step=st.sampled_from([2, 4]), name=st.sampled_from(FILES),
       damage=st.sampled_from(["truncate", "flip", "pickle", "delete"]),
       relisted=st.booleans(), world_size=st.sampled_from([1, 2]))
def test_damage_is_never_resumed_from_nor_executed(pristine, tmp_path_factory, step, name,
                                                   damage, relisted, world_size):
    run_dir = tmp_path_factory.mktemp("damaged") / "run"
    shutil.copytree(pristine, run_dir)
    checkpoint = run_dir / "checkpoints" / step_dir_name(step)
    path, marker = checkpoint / name, run_dir.parent / "payload_ran"
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 8])
                         + data[middle + 8:])
    elif damage == "pickle":
        path.write_bytes(pickle.dumps(_Touch(marker)))
    else:
        path.unlink()
    # An attacker who can write the payload can rewrite the listing too: then only the
    # reader itself stands between the file and the code in it.
    attacker = relisted and damage == "pickle" and name != "checksums.json"
    if attacker:
        write_checksums(checkpoint)
    if world_size == 1:
        outcomes = [resume(0, 1, str(run_dir))]
    else:
        outcomes = run_distributed(resume, 2, str(run_dir))
    assert not marker.exists()
    assert len(set(outcomes)) == 1, outcomes  # every rank alike
    kind, value = outcomes[0]
    if kind == "resumed":
        intact = 2 if step == 4 else 4
        assert value == intact, (damage, name, outcomes)
    else:
        assert "\n" not in value and str(checkpoint) in value, value
        assert step == 4 or attacker, value  # the newest was intact: no reason to stop
