"""Plots and a text summary of one run, or a comparison of several, from their run directories.

Each run directory holds `config.yaml` and `metrics.jsonl` (see trntrain.run_dir); a Hydra
sweep directory holds one such directory per job. `write_report` overlays the runs in
`loss.png`, `lr.png`, `throughput.png` and `memory.png`, draws where their wall time went
in `goodput.png` (from each run's goodput.json) and, for preference objectives, their
rewards in `rewards.png`, and tabulates them in `summary.txt`.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from trntrain.errors import UserError
from trntrain.metrics.goodput import CATEGORIES, GOODPUT_FILE
from trntrain.run_dir import METRICS_FILE

_VALID_DIR = ("a run directory holding metrics.jsonl (as `trntrain train` writes it), or a "
              "sweep directory whose job directories hold one")


@dataclass
class Run:
    path: Path
    config: dict[str, Any]  # flattened: {"optim.lr": 0.001, ...}; empty without config.yaml
    records: list[dict[str, Any]]
    label: str = ""
    # Seconds by goodput category over all attempts (goodput.json); None without one.
    goodput: dict[str, float] | None = None


def read_goodput(run_dir: Path) -> dict[str, float] | None:
    try:
        return json.loads((run_dir / GOODPUT_FILE).read_text())["seconds"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def expand_run_dirs(paths: list[Path]) -> list[Path]:
    """Run directories as given; a sweep directory stands for its jobs, in job order."""
    found: list[Path] = []
    for path in map(Path, paths):
        if (path / METRICS_FILE).is_file() or not path.is_dir():
            found.append(path)
            continue
        jobs = [d for d in path.iterdir() if (d / METRICS_FILE).is_file()]
        # Job directories in numeric order (0, 1, ..., 10); none: read_metrics says what is missing.
        found.extend(sorted(jobs, key=lambda d: (not d.name.isdigit(), len(d.name), d.name))
                     or [path])
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        raise UserError(f"No run directories given to the report; valid: {_VALID_DIR}.")
    return unique


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file, blank lines skipped; UserError if it is not one."""
    if not path.is_file():
        raise UserError(f"{path} does not exist; valid: {_VALID_DIR}.")
    records = []
    text = path.read_text(encoding="utf-8", errors="replace")
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            problem = "" if isinstance(record, dict) and isinstance(record.get("step"), int) \
                else "not a JSON object with an integer step"
        except json.JSONDecodeError as e:
            problem = f"invalid JSON: {e.msg}"
        if problem:
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
        tree = str(e)
    if not isinstance(tree, dict):
        raise UserError(f"{path} is not a readable config ({tree}); valid: the YAML mapping "
                        f"that `trntrain train` writes, or no config.yaml at all.")

    def flatten(node: dict[str, Any], prefix: str) -> dict[str, Any]:
        flat: dict[str, Any] = {}
        for key, value in node.items():
            if isinstance(value, dict) and value:
                flat.update(flatten(value, f"{prefix}{key}."))
            else:
                flat[f"{prefix}{key}"] = value
        return flat

    return flatten(tree, "")


def label_runs(runs: list[Run]) -> None:
    """Label each run by the config values that differ between the runs, else by directory."""
    def ignored(key: str) -> bool:  # paths and logging: they differ without mattering
        return key.startswith(("run.", "logging.")) or key.endswith("dir")

    differing: list[str] = []
    if len(runs) > 1 and all(r.config for r in runs):
        keys = dict.fromkeys(k for r in runs for k in r.config)
        # A key only some runs have (one added to trntrain since the others ran) differs
        # only where the runs that have it disagree.
        differing = [k for k in keys if not ignored(k)
                     and len({repr(r.config[k]) for r in runs if k in r.config}) > 1]
    names = [r.path.name for r in runs]
    if len(set(names)) < len(names):
        parent = Path(os.path.commonpath([r.path for r in runs]))
        names = [r.path.relative_to(parent).as_posix() for r in runs]
    labels = [", ".join(f"{k}={r.config.get(k, '<unset>')}" for k in differing) for r in runs]
    unique = len(set(labels)) == len(labels)  # not so with the same setting in two sweeps
    for run, label, name in zip(runs, labels, names, strict=True):
        run.label = name if not label else label if unique else f"{label} ({name})"


def series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """Steps and finite values of `key` (records without it, or with null, left out)."""
    pairs = [(r["step"], float(r[key])) for r in records
             if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [s for s, _ in pairs], [v for _, v in pairs]


def at(records: list[dict[str, Any]], key: str, index: int) -> float | None:
    """The value of `key` in the first (index 0) or last (-1) record holding it: nan where
    it was logged as null (non-finite), None where no record holds it."""
    values = [r[key] for r in records if key in r]
    return None if not values else (math.nan if values[index] is None else float(values[index]))


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


def _save(plt: Any, fig: Any, axes: list[Any], path: Path, extra: tuple[Any, ...] = ()) -> None:
    """Step axis and grid on each plot, legend (plus `extra` handles) on the first; save."""
    for i, ax in enumerate(axes):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if not ax.has_data():
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        elif i == 0:
            handles = [*ax.get_legend_handles_labels()[0], *extra]
            ax.legend(handles=handles, labels=[h.get_label() for h in handles],
                      fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_runs(runs: list[Run], out_dir: Path) -> None:
    """loss.png, lr.png, throughput.png and memory.png: all runs overlaid, one color each."""
    plt = _pyplot()
    from matplotlib.lines import Line2D

    def draw(ax: Any, key: str, style: str = "-", labelled: bool = True) -> None:
        for i, run in enumerate(runs):
            ax.plot(*series(run.records, key), style, color=f"C{i}",
                    label=run.label if labelled else None)

    fig, ax = plt.subplots(figsize=(8, 5))
    draw(ax, "loss")
    draw(ax, "eval_loss", "o", labelled=False)
    has_eval = any(series(r.records, "eval_loss")[0] for r in runs)
    marker = Line2D([], [], color="gray", marker="o", ls="", label="eval loss (markers)")
    ax.set(title="Training loss (lines) and evaluation loss (markers)", ylabel="loss")
    _save(plt, fig, [ax], out_dir / "loss.png", (marker,) if has_eval else ())
    for name, key, title in [("lr.png", "lr", "Learning rate"),
                             ("throughput.png", "tokens_per_s", "Throughput")]:
        fig, ax = plt.subplots(figsize=(8, 5))
        draw(ax, key)
        ax.set(title=title, ylabel="tokens/s" if key == "tokens_per_s" else key)
        _save(plt, fig, [ax], out_dir / name)

    keys = memory_keys(runs)
    cols = 2 if len(keys) > 1 else 1
    rows = max(1, math.ceil(len(keys) / cols))
    fig, grid = plt.subplots(rows, cols, figsize=(6 * cols, 3.5 * rows), squeeze=False)
    axes = list(grid.flat)[:max(1, len(keys))]
    for spare in list(grid.flat)[len(axes):]:
        spare.remove()
    for key, ax in zip(keys, axes, strict=False):
        draw(ax, key)
        ax.set(title=_short(key), ylabel="GiB")
    fig.suptitle("Memory per rank (mem_*_gib)")
    _save(plt, fig, axes, out_dir / "memory.png")

    if any(series(r.records, "reward_accuracy")[0] for r in runs):
        fig, grid = plt.subplots(2, 2, figsize=(12, 7))
        panels = [(("rewards_chosen", "rewards_rejected"), "rewards (chosen -, rejected --)"),
                  (("reward_margin",), "reward margin"), (("reward_accuracy",), "reward accuracy"),
                  (("logps_chosen", "logps_rejected"), "log-probabilities (chosen -, rejected --)")]
        for ax, (keys, title) in zip(grid.flat, panels, strict=True):
            for key, style in zip(keys, ("-", "--"), strict=False):
                draw(ax, key, style, labelled=key == keys[0])
            ax.set(title=title)
        fig.suptitle("Preference objective: implicit rewards (training steps)")
        _save(plt, fig, list(grid.flat), out_dir / "rewards.png")

    accounted = [r for r in runs if r.goodput]
    if accounted:
        fig, ax = plt.subplots(figsize=(8, 1.5 + 0.5 * len(accounted)))
        left = [0.0] * len(accounted)
        for category in CATEGORIES:
            share = [r.goodput.get(category, 0.0) / sum(r.goodput.values())
                     for r in accounted]
            ax.barh([r.label for r in accounted], share, left=left, label=category)
            left = [a + b for a, b in zip(left, share, strict=True)]
        ax.set(title="Where the wall time went (goodput.json, all attempts)",
               xlabel="fraction of wall time", xlim=(0, 1))
        _save(plt, fig, [ax], out_dir / "goodput.png")


def _short(mem_key: str) -> str:
    return mem_key.removeprefix("mem_").removesuffix("_gib")


def memory_keys(runs: list[Run]) -> list[str]:
    keys = dict.fromkeys(k for r in runs for rec in r.records for k in rec)
    return [k for k in keys if k.startswith("mem_") and k.endswith("_gib")]


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _row(run: Run, mem_keys: list[str]) -> list[str]:
    records = run.records
    tokens_per_s = series(records[1:], "tokens_per_s")[1]  # the first record holds warm-up
    goodput = (run.goodput["productive"] / sum(run.goodput.values())
               if run.goodput and sum(run.goodput.values()) > 0 else None)
    return [run.label, str(max(r["step"] for r in records)),
            _fmt(at(records, "loss", 0), ".4f"), _fmt(at(records, "loss", -1), ".4f"),
            _fmt(min(series(records, "eval_loss")[1], default=None), ".4f"),
            _fmt(at(records, "eval_loss", -1), ".4f"),
            _fmt(statistics.median(tokens_per_s) if tokens_per_s else None, ",.0f"),
            _fmt(goodput, ".1%"),
            *(_fmt(max(series(records, k)[1], default=None), ".3f") for k in mem_keys)]


def summarize(runs: list[Run]) -> str:
    """The summary table, one row per run; for a comparison, the run with the lowest loss."""
    mem_keys = memory_keys(runs)
    table = [["run", "steps", "loss first", "loss final", "eval best", "eval final", "tokens/s",
              "goodput", *map(_short, mem_keys)], *(_row(run, mem_keys) for run in runs)]
    widths = [max(len(row[c]) for row in table) for c in range(len(table[0]))]
    lines = ["  ".join(cell.rjust(w) if c else cell.ljust(w)
                       for c, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip()
             for row in table]
    lines += ["", "tokens/s: median after the first record (warm-up); goodput: productive share "
              "of the wall time over all attempts; memory: peak GiB per rank."]
    for run in runs:
        if (accuracy := at(run.records, "reward_accuracy", -1)) is not None:
            margin, evaluated = (at(run.records, "reward_margin", -1),
                                 at(run.records, "eval_reward_accuracy", -1))
            lines.append(f"{run.label}: final reward accuracy {accuracy:.3f}, margin "
                         f"{_fmt(margin, '.4f')}, eval reward accuracy {_fmt(evaluated, '.3f')}")
    if len(runs) > 1:
        for key, what in [("loss", "final training loss"), ("eval_loss", "final eval loss")]:
            finals = [(v, r.label) for r in runs
                      if (v := at(r.records, key, -1)) is not None and math.isfinite(v)]
            if finals:
                lines.append(f"lowest {what}: {min(finals)[1]} ({min(finals)[0]:.4f})")
        lines += ["", "runs:", *(f"  {r.label.ljust(widths[0])}  {r.path}" for r in runs)]
    return "\n".join(lines) + "\n"


class Report(NamedTuple):
    directory: Path  # where the plots and summary.txt are
    summary: str  # the text of summary.txt


def write_report(run_dirs: list[Path], out_dir: Path | None = None) -> Report:
    """Plots and summary.txt for the runs (or sweeps) given; returns the directory written
    and the summary.

    out_dir defaults to the run directory itself for one run, else `<common parent>/report`.
    """
    paths = expand_run_dirs(run_dirs)
    runs = [Run(p, read_config(p), read_metrics(p / METRICS_FILE), goodput=read_goodput(p))
            for p in paths]
    label_runs(runs)
    if out_dir is None:
        out_dir = paths[0] if len(paths) == 1 else Path(os.path.commonpath(paths)) / "report"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_runs(runs, out_dir)
    summary = summarize(runs)
    (out_dir / "summary.txt").write_text(summary, encoding="utf-8")
    return Report(out_dir, summary)
