"""The run report: plots and summary.txt from hand-written run directories with known values."""

from __future__ import annotations

import importlib.util
import json
import re
import struct
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from trntrain.errors import UserError
from trntrain.metrics.report import expand_run_dirs, write_report

needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                      reason="matplotlib is not installed")
PLOTS = ["loss.png", "lr.png", "throughput.png", "memory.png"]

# Two runs of four logged steps. By hand:
#   lr=0.001: loss first 5.0, final 3.0; eval best 3.1 (step 2), final 3.2;
#             tokens/s median of [1000, 2000, 3000] = 2000 (step 1 left out); host peak 1.5
#   lr=0.003: loss first 5.0, final 2.0; eval best = final = 2.4; tokens/s median 1500;
#             host peak 1.75
LOSS = {0.001: [5.0, 4.0, 3.5, 3.0], 0.003: [5.0, 3.0, 2.5, 2.0]}
EVAL = {0.001: {2: 3.1, 4: 3.2}, 0.003: {2: 2.8, 4: 2.4}}
TOKENS_PER_S = {0.001: [100.0, 1000.0, 2000.0, 3000.0], 0.003: [50.0, 1000.0, 1500.0, 4000.0]}
HOST_PEAK = {0.001: [1.0, 1.5, 1.25, 1.5], 0.003: [1.0, 1.75, 1.5, 1.5]}


def make_run(run_dir: Path, lr: float) -> Path:
    run_dir.mkdir(parents=True)
    config = {"run": {"dir": str(run_dir)}, "model": {"name": "llama_tiny"},
              "optim": {"name": "adamw", "lr": lr}, "train": {"max_steps": 4}}
    OmegaConf.save(OmegaConf.create(config), run_dir / "config.yaml")
    lines = []
    for i, step in enumerate([1, 2, 3, 4]):
        record = {"step": step, "loss": LOSS[lr][i], "lr": lr * step / 4,
                  "grad_norm": None if step == 3 else 1.0, "tokens_per_s": TOKENS_PER_S[lr][i],
                  "step_time_s": 0.1, "tokens": 64 * step, "mem_host_peak_gib": HOST_PEAK[lr][i],
                  "mem_params_gib": 0.25, "mem_grads_gib": 0.25, "mem_optimizer_gib": 0.5}
        if step in EVAL[lr]:
            record["eval_loss"] = EVAL[lr][step]
        lines.append(json.dumps(record))
    lines.insert(2, "")  # blank lines are skipped
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n\n")
    return run_dir


def make_sweep(sweep_dir: Path) -> Path:
    make_run(sweep_dir / "0", 0.001)
    make_run(sweep_dir / "1", 0.003)
    (sweep_dir / "multirun.yaml").write_text("hydra: {}\n")
    (sweep_dir / ".hydra").mkdir()  # not a job: holds no metrics.jsonl
    return sweep_dir


def summary_rows(out_dir: Path) -> dict[str, dict[str, str]]:
    """The summary table as {label: {column: cell}} (columns are two or more spaces apart)."""
    lines = (out_dir / "summary.txt").read_text().splitlines()
    header = re.split(r"\s{2,}", lines[0].strip())
    rows = {}
    for line in lines[1:]:
        if not line.strip():
            break
        cells = re.split(r"\s{2,}", line.strip())
        assert len(cells) == len(header), line
        rows[cells[0]] = dict(zip(header, cells, strict=True))
    return rows


def assert_pngs(out_dir: Path) -> None:
    for name in PLOTS:
        data = (out_dir / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", name
        assert data[12:16] == b"IHDR", name
        width, height = struct.unpack(">II", data[16:24])
        assert width >= 400 and height >= 300, (name, width, height)
        assert len(data) > 10_000, (name, len(data))  # axes, curves and text, not a blank image


@needs_matplotlib
def test_one_run_writes_plots_and_summary_into_its_directory(tmp_path):
    run = make_run(tmp_path / "run-a", 0.001)
    report = write_report([run])
    out = report.directory
    assert out == run.resolve()
    assert report.summary == (out / "summary.txt").read_text()
    assert_pngs(out)
    rows = summary_rows(out)
    assert list(rows) == ["run-a"]  # one run: labelled by its directory
    row = rows["run-a"]
    assert row["steps"] == "4"
    assert (row["loss first"], row["loss final"]) == ("5.0000", "3.0000")
    assert (row["eval best"], row["eval final"]) == ("3.1000", "3.2000")
    assert row["tokens/s"] == "2,000"
    assert (row["host_peak"], row["params"], row["grads"], row["optimizer"]) == \
        ("1.500", "0.250", "0.250", "0.500")
    assert "lowest" not in (out / "summary.txt").read_text()  # nothing to compare


@needs_matplotlib
def test_sweep_directory_expands_into_jobs_labelled_by_differing_key(tmp_path):
    sweep = make_sweep(tmp_path / "runs" / "sweep-20250101-000000")
    assert expand_run_dirs([sweep]) == [(sweep / "0").resolve(), (sweep / "1").resolve()]
    out = write_report([sweep]).directory
    assert out == sweep.resolve() / "report"
    assert_pngs(out)
    rows = summary_rows(out)
    # run.dir differs too, but names no setting: only optim.lr labels the runs.
    assert list(rows) == ["optim.lr=0.001", "optim.lr=0.003"]
    assert rows["optim.lr=0.003"]["loss final"] == "2.0000"
    assert (rows["optim.lr=0.003"]["eval best"], rows["optim.lr=0.003"]["eval final"]) == \
        ("2.4000", "2.4000")
    assert rows["optim.lr=0.003"]["tokens/s"] == "1,500"
    assert rows["optim.lr=0.003"]["host_peak"] == "1.750"
    text = (out / "summary.txt").read_text()
    assert "lowest final training loss: optim.lr=0.003 (2.0000)" in text
    assert "lowest final eval loss: optim.lr=0.003 (2.4000)" in text


@needs_matplotlib
def test_a_key_older_runs_lack_labels_only_where_the_others_disagree(tmp_path):
    """A run made after a config key was added has it; older runs do not."""
    old, new = make_run(tmp_path / "old", 0.001), make_run(tmp_path / "new", 0.003)
    config = OmegaConf.load(new / "config.yaml")
    config.model.pooling = "layer"
    OmegaConf.save(config, new / "config.yaml")
    assert list(summary_rows(write_report([old, new]).directory)) == [
        "optim.lr=0.001", "optim.lr=0.003"]
    newer = make_run(tmp_path / "newer", 0.003)
    config.model.pooling = "global"
    OmegaConf.save(config, newer / "config.yaml")
    rows = summary_rows(write_report([old, new, newer], out_dir=tmp_path / "three").directory)
    assert list(rows) == ["optim.lr=0.001, model.pooling=<unset>",
                          "optim.lr=0.003, model.pooling=layer",
                          "optim.lr=0.003, model.pooling=global"]


@needs_matplotlib
def test_runs_with_equal_configs_are_labelled_by_directory(tmp_path):
    a, b = make_run(tmp_path / "a", 0.001), make_run(tmp_path / "b", 0.001)
    out = write_report([a, b], out_dir=tmp_path / "cmp").directory
    assert out == tmp_path / "cmp"
    assert list(summary_rows(out)) == ["a", "b"]
    assert write_report([a, b]).directory == tmp_path.resolve() / "report"  # the common parent


def test_sweep_jobs_come_in_numeric_order(tmp_path):
    for job in range(12):
        (tmp_path / str(job)).mkdir()
        (tmp_path / str(job) / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    assert [p.name for p in expand_run_dirs([tmp_path])] == [str(j) for j in range(12)]


@needs_matplotlib
def test_null_values_are_left_out_and_a_null_final_loss_shows_as_nan(tmp_path):
    run = tmp_path / "diverged"
    run.mkdir()
    records = [{"step": 1, "loss": 4.0, "tokens_per_s": None},
               {"step": 2, "loss": 3.0, "tokens_per_s": 10.0, "mem_host_peak_gib": None},
               {"step": 3, "loss": None, "tokens_per_s": 30.0, "mem_host_peak_gib": 2.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    row = summary_rows(write_report([run]).directory)["diverged"]
    assert (row["loss first"], row["loss final"], row["eval best"]) == ("4.0000", "nan", "-")
    assert (row["tokens/s"], row["host_peak"]) == ("20", "2.000")
    assert_pngs(run)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": \n', "line 2.*invalid JSON"),
        ('{"loss": 2.0}\n', "line 1.*integer step"),
        ('[1, 2]\n', "line 1.*integer step"),
        ("\n\n", "holds no records"),
        (None, "does not exist"),
    ],
)
def test_bad_metrics_file_is_a_user_error_naming_it(tmp_path, content, expected):
    run = tmp_path / "bad-run"
    run.mkdir()
    metrics = run / "metrics.jsonl"
    if content is not None:
        metrics.write_text(content)
    with pytest.raises(UserError) as info:
        write_report([run])
    message = str(info.value)
    assert str(metrics.resolve()) in message
    assert re.search(expected, message), message
    assert "valid:" in message and "\n" not in message


def test_missing_matplotlib_says_what_to_install(tmp_path, monkeypatch):
    run = make_run(tmp_path / "run", 0.001)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(UserError, match=re.escape("pip install 'trntrain[tracking]'")):
        write_report([run])


@needs_matplotlib
def test_the_same_setting_in_two_sweeps_is_told_apart_by_directory(tmp_path):
    first, second = make_sweep(tmp_path / "sweep-1"), make_sweep(tmp_path / "sweep-2")
    rows = summary_rows(write_report([first, second]).directory)
    assert list(rows) == ["optim.lr=0.001 (sweep-1/0)", "optim.lr=0.003 (sweep-1/1)",
                          "optim.lr=0.001 (sweep-2/0)", "optim.lr=0.003 (sweep-2/1)"]


@needs_matplotlib
def test_goodput_is_tabulated_and_drawn_per_run(tmp_path):
    sweep = make_sweep(tmp_path / "sweep")
    # By hand: 3 s productive of 12 s in all is 25 %; the other run has no ledger.
    seconds = {"productive": 3.0, "startup": 4.0, "compilation": 2.0, "checkpoint": 1.0,
               "lost_to_restarts": 2.0}
    (sweep / "0" / "goodput.json").write_text(json.dumps({"seconds": seconds}))
    out = write_report([sweep]).directory
    rows = summary_rows(out)
    assert (rows["optim.lr=0.001"]["goodput"], rows["optim.lr=0.003"]["goodput"]) == (
        "25.0%", "-")
    data = (out / "goodput.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
