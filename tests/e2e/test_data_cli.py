"""`trntrain prepare`, then training on what it wrote: alone, blended, and under
torchrun with a pipeline; bad data files end in one clear error."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest

from tests.e2e.test_cli import TORCHRUN, TRNTRAIN, records, run

pytestmark = pytest.mark.e2e

TRAIN = ["train.max_steps=4", "train.seq_len=32", "train.global_batch_size=8",
         "train.eval_every=4", "logging.every=1", "logging.progress_bar=false"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """An indexed dataset of standard-library modules, prepared on two workers."""
    root = tmp_path_factory.mktemp("data")
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:400]
    with (root / "modules.jsonl").open("w") as f:
        for path in files:
            f.write(json.dumps({"text": path.read_text(errors="replace")}) + "\n")
    proc = run([TRNTRAIN, "prepare", str(root / "modules.jsonl"), "-o", str(root / "modules"),
                "--workers", "2"], root)
    assert proc.returncode == 0, proc.stderr
    assert f"{len(files)} documents" in proc.stdout and "MB/s" in proc.stdout
    again = run([TRNTRAIN, "prepare", str(root / "modules.jsonl"), "-o", str(root / "modules")],
                root)
    assert again.returncode == 0 and "up to date" in again.stdout
    return root / "modules"


def test_train_on_prepared_data_single_and_pipelined(tmp_path, prepared):
    data = ["data=indexed", f"data.path={prepared}"]
    single = run([TRNTRAIN, "train", *TRAIN, *data, f"run.dir={tmp_path / 'single'}"], tmp_path)
    assert single.returncode == 0, single.stderr
    piped = run([TORCHRUN, "--standalone", "--nproc-per-node=2", "-m", "trntrain", "train",
                 *TRAIN, *data, "parallel.pp=2", "optim.eps=1e-6", f"run.dir={tmp_path / 'pp'}"],
                tmp_path)
    assert piped.returncode == 0, piped.stderr
    reference = run([TRNTRAIN, "train", *TRAIN, *data, "optim.eps=1e-6",
                     f"run.dir={tmp_path / 'reference'}"], tmp_path)
    assert reference.returncode == 0, reference.stderr
    losses = lambda d: [r["loss"] for r in records(tmp_path / d)]
    assert losses("pp") == pytest.approx(losses("reference"), abs=1e-5)
    assert losses("single")[0] == pytest.approx(5.6, abs=0.3)  # ln(257): bytes at first


def test_blend_of_prepared_data_and_corpus(tmp_path, prepared):
    blend = "data.blend=[{weight:0.7},{weight:0.3,source:corpus,max_bytes:200000}]"
    proc = run([TRNTRAIN, "train", *TRAIN, "data=indexed", f"data.path={prepared}", blend,
                f"run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len(records(tmp_path / "run")) == 4


def test_damaged_dataset_is_one_clear_error(tmp_path, prepared):
    for suffix in (".bin", ".idx"):
        (tmp_path / f"cut{suffix}").write_bytes(Path(f"{prepared}{suffix}").read_bytes())
    with (tmp_path / "cut.bin").open("r+b") as f:
        f.truncate(1000)
    proc = run([TRNTRAIN, "train", *TRAIN, "data=indexed", f"data.path={tmp_path / 'cut'}",
                f"run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("trntrain: error:")]
    assert len(lines) == 1 and "cut.bin" in lines[0] and "truncated" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr

    proc = run([TRNTRAIN, "train", *TRAIN, "data=indexed", f"data.path={tmp_path / 'none'}"],
               tmp_path)
    assert proc.returncode == 2 and "none.idx does not exist" in proc.stderr, proc.stderr
    assert not (tmp_path / "outputs").exists()
