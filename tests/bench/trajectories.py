"""Loss trajectories of a few layouts, as JSON: record them before a refactor, compare
after (`--compare FILE` exits 1 unless every loss is bitwise equal).

    .venv/bin/python -m tests.bench.trajectories --out before.json
    .venv/bin/python -m tests.bench.trajectories --compare before.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from tests.conftest import run_distributed, tiny_config
from trntrain.distributed import World
from trntrain.trainer import Trainer

STEPS = ("train.max_steps=8", "train.micro_batch_size=2")
LAYOUTS: dict[str, tuple[int, tuple[str, ...]]] = {
    "default": (1, ()),
    "tp2_pp2": (4, ("parallel.tp=2", "parallel.pp=2")),
    "dp2_zero1": (2, ("parallel.zero1=true",)),
    "bf16": (1, ("train.precision=bf16",)),
    "tp2_sp_bf16_selective": (2, ("parallel.tp=2", "parallel.sequence_parallel=true",
                                  "train.precision=bf16",
                                  "parallel.activation_checkpointing=selective")),
}


def losses(rank: int, world_size: int, overrides: tuple[str, ...], run_dir: str | None
           ) -> list[float]:
    trainer = Trainer(tiny_config(*STEPS, *overrides), World(rank, world_size, rank),
                      run_dir=Path(run_dir) if run_dir else None)
    return [r["loss"] for r in trainer.fit()]


def trajectories() -> dict[str, list[float]]:
    out = {}
    for name, (world_size, overrides) in LAYOUTS.items():
        if world_size == 1:
            out[name] = losses(0, 1, overrides, None)
        else:
            out[name] = run_distributed(losses, world_size, overrides, None)[0]
    with tempfile.TemporaryDirectory() as tmp:  # 4 steps, save, resume, 4 more
        dcp = ("checkpoint=dcp", "checkpoint.every=4")
        losses(0, 1, (*dcp, "train.max_steps=4"), tmp)
        out["resume"] = losses(0, 1, dcp, tmp)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--compare", type=Path)
    args = parser.parse_args()
    got = trajectories()
    if args.out:
        args.out.write_text(json.dumps(got, indent=1))
    print(json.dumps(got, indent=1))
    if args.compare:
        expected = json.loads(args.compare.read_text())
        differing = [k for k in expected if expected[k] != got.get(k)]
        print("bitwise equal" if not differing else f"differing: {differing}")
        sys.exit(1 if differing else 0)


if __name__ == "__main__":
    main()
