"""A model family from another installed package, found through the `trntrain.models`
entry point group, trains under torchrun with tp=2 and pp=2 with the losses of one
process: nothing in trntrain/ names it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
FIXTURE = Path(__file__).parent.parent / "fixtures" / "extfamily"
TRAIN = ["-m", "trntrain", "train", "model=llama_tiny", "model.family=parallel_llama",
         "model.name=parallel_tiny", "train.max_steps=4", "train.seq_len=32",
         "train.global_batch_size=8", "train.micro_batch_size=2", "train.eval_every=0",
         "logging.every=1", "data.max_bytes=200000"]


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").open()]


def test_an_installed_family_trains_under_tp_and_pp(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(FIXTURE, source)
    site = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(site), str(source)], capture_output=True, text=True, timeout=300)
    if install.returncode != 0 and "setuptools" in install.stderr:
        pytest.skip("setuptools is not importable here to build the fixture")
    assert install.returncode == 0, install.stderr
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get(
        "PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, *TRAIN, f"run.dir={tmp_path / 'one'}"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    parallel = subprocess.run(
        [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=4", *TRAIN, "parallel.tp=2",
         "parallel.pp=2", f"run.dir={tmp_path / 'four'}"], env=env, capture_output=True,
        text=True, timeout=300)
    assert parallel.returncode == 0, parallel.stderr
    assert losses(tmp_path / "four") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    # A family of its own: its losses are not Llama's.
    llama = subprocess.run([sys.executable, *[a for a in TRAIN if "family" not in a],
                            f"run.dir={tmp_path / 'llama'}"], env=env, capture_output=True,
                           text=True, timeout=300)
    assert llama.returncode == 0, llama.stderr
    assert losses(tmp_path / "llama")[0] != losses(tmp_path / "one")[0]
