"""Plots and a text summary of one run, or a comparison of several, from their run directories.

Each run directory holds `config.yaml` and `metrics.jsonl` (see trntrain.run_dir); a Hydra
sweep directory holds one such directory per job. `write_report` overlays the runs in
`loss.png`, `lr.png`, `throughput.png` and `memory.png`, and tabulates them in `summary.txt`.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trntrain.errors import UserError

METRICS_FILE = "metrics.jsonl"
_VALID_DIR = ("a run directory holding metrics.jsonl (as `trntrain train` writes it), or a "
              "sweep directory whose job directories hold one")


@dataclass
class Run:
    path: Path
    config: dict[str, Any]  # flattened: {"optim.lr": 0.001, ...}; empty without config.yaml
    records: list[dict[str, Any]]
    label: str = ""


def expand_run_dirs(paths: list[Path]) -> list[Path]:
    """Run directories as given; a sweep directory stands for its jobs, in job order."""
    found: list[Path] = []
    for path in map(Path, paths):
        jobs = [d for d in sorted(path.iterdir()) if (d / METRICS_FILE).is_file()] \
            if path.is_dir() and not (path / "config.yaml").is_file() else []
        if (path / METRICS_FILE).is_file() or not jobs:
            found.append(path)  # a missing metrics.jsonl is reported by read_metrics
        else:
            found.extend(sorted(jobs, key=lambda d: (not d.name.isdigit(), len(d.name), d.name)))
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        raise UserError(f"No run directories given to the report; valid: {_VALID_DIR}.")
    return unique


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file, blank lines skipped; UserError if it is not one."""
    if not path.is_file():
        raise UserError(f"{path} does not exist; valid: {_VALID_DIR}.")
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            record = e.msg
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            problem = record if isinstance(record, str) else "not an object with an integer step"
            raise UserError(
                f"{path}, line {n}, is not a metrics record ({problem}); valid: one JSON "
                f'object per line with an integer "step" and numeric or null metrics such as '
                f'"loss", as `trntrain train` writes them.')
        records.append(record)
    if not records:
        raise UserError(f"{path} holds no records; valid: a metrics.jsonl with at least one "
                        f"logged step (the run may have stopped before its first logging step).")
    return records


def read_config(run_dir: Path) -> dict[str, Any]:
    """config.yaml flattened to dotted keys; empty if the run directory has none."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    from omegaconf import OmegaConf

    try:
        tree = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as e:
        raise UserError(f"{path} is not a readable config ({e}); valid: the YAML mapping "
                        f"that `trntrain train` writes, or no config.yaml at all.") from None

    def flatten(node: Any, prefix: str) -> dict[str, Any]:
        if not isinstance(node, dict):
            return {prefix: node}
        return {k: v for key, sub in node.items() for k, v in flatten(sub, f"{prefix}{key}.")
                .items()} if node else {}

    return {k.rstrip("."): v for k, v in flatten(tree, "").items()}


def label_runs(runs: list[Run]) -> None:
    """Label each run by the config values that differ between the runs, else by directory."""
    def ignored(key: str) -> bool:  # differ between any two runs without telling them apart
        return key.startswith("run.") or key.endswith("dir")

    differing: list[str] = []
    if len(runs) > 1 and all(r.config for r in runs):
        keys = dict.fromkeys(k for r in runs for k in r.config)
        differing = [k for k in keys if not ignored(k)
                     and len({repr(r.config.get(k, "<unset>")) for r in runs}) > 1]
    names = [r.path.name for r in runs]
    if len(set(names)) < len(names):
        parent = Path(os.path.commonpath([r.path for r in runs]))
        names = [r.path.relative_to(parent).as_posix() for r in runs]
    for run, name in zip(runs, names):
        run.label = ", ".join(f"{k}={run.config.get(k, '<unset>')}" for k in differing) or name


def series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """Steps and finite values of `key` (records without it, or with null, left out)."""
    pairs = [(r["step"], float(r[key])) for r in records
             if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [s for s, _ in pairs], [v for _, v in pairs]


def last(records: list[dict[str, Any]], key: str) -> float | None:
    """The value at the last record holding `key`: nan where it was logged as null
    (non-finite), None where no record holds it."""
    values = [r[key] for r in records if key in r]
    return None if not values else (math.nan if values[-1] is None else float(values[-1]))


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise UserError("The run report draws its plots with matplotlib, which is not "
                        "installed; valid: pip install 'trntrain[tracking]' (or pip install "
                        "matplotlib).") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(plt: Any, fig: Any, axes: list[Any], path: Path) -> None:
    for ax in axes:
        if ax.has_data():
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_runs(runs: list[Run], out_dir: Path) -> None:
    plt = _pyplot()
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, run in enumerate(runs):
        ax.plot(*series(run.records, "loss"), color=f"C{i}", label=run.label)
        ax.plot(*series(run.records, "eval_loss"), "o", color=f"C{i}", markersize=6)
    axes_handles = ax.get_legend_handles_labels()
    if any(series(r.records, "eval_loss")[0] for r in runs):
        ax.legend(handles=[*axes_handles[0], Line2D([], [], color="gray", marker="o", ls="")],
                  labels=[*axes_handles[1], "eval loss (markers)"], fontsize="small")
    ax.set(title="Training loss (lines) and evaluation loss (markers)", ylabel="loss")
    for name, key, title in [("lr.png", "lr", "Learning rate"),
                             ("throughput.png", "tokens_per_s", "Throughput (tokens/s)")]:
        other, oax = plt.subplots(figsize=(8, 5))
        for i, run in enumerate(runs):
            oax.plot(*series(run.records, key), color=f"C{i}", label=run.label)
        oax.set(title=title, ylabel=key)
        _finish(plt, other, [oax], out_dir / name)
    if ax.get_legend() is not None:  # keep the legend with the eval-marker entry
        ax.grid(alpha=0.3)
        ax.set_xlabel("step")
        fig.tight_layout()
        fig.savefig(out_dir / "loss.png", dpi=100)
        plt.close(fig)
    else:
        _finish(plt, fig, [ax], out_dir / "loss.png")

    mem_keys = memory_keys(runs)
    cols = 2 if len(mem_keys) > 1 else 1
    rows = max(1, math.ceil(len(mem_keys) / cols))
    fig, grid = plt.subplots(rows, cols, figsize=(6 * cols, 3.5 * rows), squeeze=False)
    axes = list(grid.flat)
    for key, max_ in zip(mem_keys, axes):
        for i, run in enumerate(runs):
            max_.plot(*series(run.records, key), color=f"C{i}", label=run.label)
        max_.set(title=key.removeprefix("mem_").removesuffix("_gib"), ylabel="GiB")
    for spare in axes[max(1, len(mem_keys)):]:
        spare.remove()
    fig.suptitle("Memory per rank")
    _finish(plt, fig, axes[:max(1, len(mem_keys))], out_dir / "memory.png")


def memory_keys(runs: list[Run]) -> list[str]:
    keys = dict.fromkeys(k for r in runs for rec in r.records for k in rec)
    return [k for k in keys if k.startswith("mem_") and k.endswith("_gib")]


def summarize(runs: list[Run]) -> str:
    """The summary table: one row per run, then the best run of a comparison."""
    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    mem_keys = memory_keys(runs)
    header = ["run", "steps", "loss first", "loss final", "eval best", "eval final", "tokens/s",
              *(k.removeprefix("mem_").removesuffix("_gib") for k in mem_keys)]
    rows = []
    for run in runs:
        loss, evals = series(run.records, "loss")[1], series(run.records, "eval_loss")[1]
        tps = series(run.records[1:], "tokens_per_s")[1]
        first_loss = next((r["loss"] for r in run.records if "loss" in r), None)
        rows.append([run.label, str(max(r["step"] for r in run.records)),
                     fmt(math.nan if first_loss is None and loss else first_loss, ".4f"),
                     fmt(last(run.records, "loss"), ".4f"), fmt(min(evals, default=None), ".4f"),
                     fmt(last(run.records, "eval_loss"), ".4f"),
                     fmt(statistics.median(tps) if tps else None, ",.0f"),
                     *(fmt(max(series(run.records, k)[1], default=None), ".3f")
                       for k in mem_keys)])
    widths = [max(len(row[c]) for row in [header, *rows]) for c in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if c == 0 else cell.rjust(w)
                       for c, (cell, w) in enumerate(zip(row, widths))).rstrip()
             for row in [header, *rows]]
    lines += ["", "tokens/s: median over the records after the first (warm-up); memory: peak GiB "
              "per rank.", "", "runs:"]
    lines += [f"  {run.label.ljust(widths[0])}  {run.path}" for run in runs]
    if len(runs) > 1:
        for key, what in [("loss", "final training loss"), ("eval_loss", "final eval loss")]:
            finals = [(v, r.label) for r in runs
                      if (v := last(r.records, key)) is not None and math.isfinite(v)]
            if finals:
                value, label = min(finals)
                lines.append(f"lowest {what}: {label} ({value:.4f})")
    return "\n".join(lines) + "\n"


def write_report(run_dirs: list[Path], out_dir: Path | None = None) -> Path:
    """Plots and summary.txt for the runs (or sweeps) given; returns the directory written.

    out_dir defaults to the run directory itself for one run, else `<common parent>/report`.
    """
    paths = expand_run_dirs(run_dirs)
    runs = [Run(p, read_config(p), read_metrics(p / METRICS_FILE)) for p in paths]
    label_runs(runs)
    if out_dir is None:
        out_dir = paths[0] if len(paths) == 1 else Path(os.path.commonpath(paths)) / "report"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_runs(runs, out_dir)
    (out_dir / "summary.txt").write_text(summarize(runs), encoding="utf-8")
    return out_dir
