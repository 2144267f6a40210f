"""Hydra sweeps on SLURM: each point a task of an array job that runs
launch/slurm_trn1.sbatch, the point's run directory under the sweep directory, and the
sweep's state read back for `trntrain sweep status`.

The sweep directory holds, besides one run directory per point (Hydra's
`hydra.sweep.subdir`, the point's number by default), `.slurm/`: `point-N.json` (the
point's overrides, run directory, train.max_steps and every job that ran it), `args/N` (the
overrides the job passes to the script, NUL-separated) and `ARRAY_TASK.out` (the job's
output). A point is finished when its metrics.jsonl reaches train.max_steps: re-running
the sweep command submits only the points neither finished nor still queued, and each
resumes from the checkpoints in its own run directory.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from trntrain.errors import UserError
from trntrain.launcher import slurm
from trntrain.run_dir import METRICS_FILE

RECORDS_DIR = ".slurm"


@dataclass
class Settings:
    """The keys of conf/hydra/launcher/slurm.yaml (docs/launching.md)."""

    partition: str | None = None
    time_limit: str | int | None = None
    account: str | None = None
    array_parallelism: int = 8
    signal_delay_s: int = 300
    max_requeues: int = 10
    agents_per_node: int = 1
    precompile: bool = False
    script: str | None = None
    env: dict[str, Any] = field(default_factory=dict)
    sbatch_args: list[str] = field(default_factory=list)

    def check(self) -> None:
        def need(ok: bool, key: str, valid: str) -> None:
            if not ok:
                raise UserError(f"hydra.launcher.{key}={getattr(self, key)!r} is invalid; "
                                f"valid: {valid}.")

        for key in ("array_parallelism", "agents_per_node"):
            value = getattr(self, key)
            need(isinstance(value, int) and not isinstance(value, bool) and value > 0, key,
                 "a positive integer")
        for key in ("signal_delay_s", "max_requeues"):
            value = getattr(self, key)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 0, key,
                 "an integer >= 0")
        need(isinstance(self.sbatch_args, list) and all(
            isinstance(a, str) and a.startswith("-") for a in self.sbatch_args),
            "sbatch_args", "a list of sbatch flags, e.g. ['--qos=high', '--exclude=node7']")
        need(isinstance(self.env, dict), "env", "a mapping of environment variables")
        need(self.script is None or Path(self.script).is_file(), "script",
             "null (trntrain's launch/slurm_trn1.sbatch) or an existing sbatch script")


@dataclass
class PointRecord:
    """What the sweep directory remembers of a point, in .slurm/point-N.json."""

    num: int
    overrides: list[str]
    run_dir: str
    max_steps: int
    jobs: list[str] = field(default_factory=list)


def records_dir(sweep_dir: Path) -> Path:
    return sweep_dir / RECORDS_DIR


def read_record(sweep_dir: Path, num: int) -> PointRecord | None:
    path = records_dir(sweep_dir) / f"point-{num}.json"
    try:
        record = PointRecord(**json.loads(path.read_text()))
        if not (isinstance(record.overrides, list) and isinstance(record.jobs, list)
                and all(isinstance(x, str) for x in [*record.overrides, *record.jobs])
                and isinstance(record.run_dir, str) and isinstance(record.max_steps, int)):
            raise TypeError("a field of another type")
        return record
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as err:
        raise UserError(f"{path} is not a sweep point record ({err}); valid: the file "
                        f"`trntrain train -m hydra/launcher=slurm` wrote, or none.") from None


def read_records(sweep_dir: Path) -> list[PointRecord]:
    nums = sorted(int(p.stem.split("-", 1)[1]) for p in records_dir(sweep_dir).glob("point-*.json")
                  if p.stem.split("-", 1)[1].isdigit())
    return [r for r in (read_record(sweep_dir, n) for n in nums) if r is not None]


def write_record(sweep_dir: Path, record: PointRecord) -> None:
    path = records_dir(sweep_dir) / f"point-{record.num}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(record), indent=1) + "\n")
    os.replace(tmp, path)  # a reader never sees half a record


def progress(run_dir: Path) -> tuple[int | None, float | None]:
    """The last step in the run's metrics.jsonl and the last loss logged; a line cut off
    by a killed job is skipped (the resumed run rewrites it). Reads the file's end only:
    a long run's records run to tens of MB."""
    path = run_dir / METRICS_FILE
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            tail = 1 << 16
            while True:
                f.seek(max(size - tail, 0))
                lines = f.read().decode("utf-8", errors="replace").splitlines()
                if size > tail:
                    lines = lines[1:]  # the first may be the end of a longer line
                step, loss = _last_record(lines)
                if (step is not None and loss is not None) or size <= tail:
                    return step, loss
                tail *= 8
    except OSError:
        return None, None


def _last_record(lines: list[str]) -> tuple[int | None, float | None]:
    step = loss = None
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            continue
        if step is None:
            step = record["step"]
        if isinstance(record.get("loss"), (int, float)) and not isinstance(record["loss"], bool):
            return step, float(record["loss"])
    return step, loss


def is_finished(run_dir: Path, max_steps: int) -> bool:
    step, _ = progress(run_dir)
    return step is not None and step >= max_steps


@dataclass
class Point:
    """A sweep point as this command composed it."""

    num: int
    overrides: list[str]
    run_dir: Path
    cfg: DictConfig
    backend: str  # the option of the backend group (auto, neuron, cpu, ...)

    @property
    def label(self) -> str:
        return f"sweep point #{self.num} ({' '.join(self.overrides) or 'no overrides'})"


def job_shape(cfg: DictConfig, settings: Settings) -> tuple[int, int]:
    """(SLURM nodes, processes per torchrun agent) of a point: one agent per node of the
    `cluster` group, `agents_per_node` of them on each SLURM node."""
    from trntrain.config import ConfigError
    from trntrain.plan.layout import planned_world_size

    nodes, agents = cfg.cluster.nodes, settings.agents_per_node
    world = planned_world_size(cfg)
    if world % nodes:
        raise ConfigError("cluster.nodes", nodes, f"a divisor of {world}, the processes the "
                          f"layout asks for, or a cluster with procs_per_node",
                          f"cluster={cfg.cluster.name} sets no processes per node;")
    if nodes % agents:
        raise UserError(f"hydra.launcher.agents_per_node={agents} is invalid: each SLURM node "
                        f"runs that many of the cluster's cluster.nodes={nodes} torchrun "
                        f"agents; valid: a divisor of {nodes} (1 on a real cluster).")
    return nodes // agents, world // nodes


def check_point(point: Point, settings: Settings) -> None:
    """Everything about a point that can be known before submitting it."""
    from trntrain.checkpoint import CHECKPOINTERS
    from trntrain.config import validate

    cfg = point.cfg
    if cfg.run.dir:
        raise UserError(f"run.dir={cfg.run.dir!r} is invalid in a SLURM sweep: each point "
                        f"runs in its own directory under hydra.sweep.dir; valid: no run.dir.")
    ck = cfg.checkpoint
    if ck.name not in CHECKPOINTERS or not CHECKPOINTERS[ck.name].resumable or \
            ck.resume == "never":
        raise UserError(f"checkpoint={ck.name} (checkpoint.resume={ck.resume}) is invalid in "
                        f"a SLURM sweep: a requeued or resubmitted job resumes from its "
                        f"checkpoints; valid: checkpoint=dcp with checkpoint.resume=auto.")
    if "jsonl" not in cfg.logging.sinks:
        raise UserError(f"logging.sinks={list(cfg.logging.sinks)} is invalid in a SLURM sweep: "
                        f"a point's progress is read from its metrics.jsonl; valid: a list "
                        f"with jsonl.")
    nodes, procs = job_shape(cfg, settings)
    validate(cfg, nodes * settings.agents_per_node * procs)


def plan_points(points: Sequence[Point], sweep_dir: Path, settings: Settings,
                check: Callable[[Point, Settings], None] = check_point) -> None:
    """Check every point (its config, and that the sweep directory's record of the same
    number is the same point) before anything is submitted; UserError naming the point."""
    for point in points:
        try:
            check(point, settings)
        except UserError as err:
            raise UserError(f"{point.label}: {err} Nothing was submitted.") from None
        record = read_record(sweep_dir, point.num)
        if record is not None and record.overrides != point.overrides:
            raise UserError(
                f"{point.label}: hydra.sweep.dir={str(sweep_dir)!r} holds another sweep, whose "
                f"point #{point.num} is {' '.join(record.overrides)}; valid: the same sweep "
                f"command to resume it, or a new hydra.sweep.dir. Nothing was submitted.")


@dataclass
class Decision:
    point: Point
    action: str  # "finished" | "queued" | "submit"
    job: str | None = None
    state: str | None = None


def decide(points: Sequence[Point], sweep_dir: Path, env: dict[str, str]) -> list[Decision]:
    """Which points to submit: neither finished nor with a job SLURM still runs or holds."""
    records = {p.num: read_record(sweep_dir, p.num) for p in points}
    last_jobs = {p.num: r.jobs[-1] for p in points if (r := records[p.num]) and r.jobs}
    states = slurm.job_states(last_jobs.values(), env) or {}
    decisions = []
    for point in points:
        job = last_jobs.get(point.num)
        state = states.get(job) if job else None
        if is_finished(point.run_dir, point.cfg.train.max_steps):
            decisions.append(Decision(point, "finished", job, state))
        elif state in slurm.ACTIVE_STATES:
            decisions.append(Decision(point, "queued", job, state))
        else:
            decisions.append(Decision(point, "submit", job, state))
    return decisions


def default_script() -> Path:
    from trntrain.config import config_dir

    return config_dir().parent / "launch" / "slurm_trn1.sbatch"


def sbatch_flags(settings: Settings, sweep_dir: Path, tasks: Sequence[int], nodes: int
                 ) -> list[str]:
    parallel = min(settings.array_parallelism, len(tasks))
    flags = [f"--array={','.join(map(str, tasks))}%{parallel}",
             f"--job-name=trntrain:{sweep_dir.name}", f"--nodes={nodes}",
             f"--ntasks-per-node={settings.agents_per_node}",
             f"--output={records_dir(sweep_dir)}/%A_%a.out", "--open-mode=append",
             # The job reads its point and settings from the environment given here.
             "--export=ALL", "--requeue"]
    if settings.signal_delay_s:
        flags.append(f"--signal=B:USR1@{settings.signal_delay_s}")
    for key, flag in (("partition", "--partition"), ("time_limit", "--time"),
                      ("account", "--account")):
        value = getattr(settings, key)
        if value is not None:
            flags.append(f"{flag}={value}")
    return flags + list(settings.sbatch_args)


def submit(decisions: Sequence[Decision], sweep_dir: Path, settings: Settings,
           env: dict[str, str]) -> list[str]:
    """Submit the points to submit, one array job per job shape (nodes, processes per
    agent, backend); record each point's job. Returns the array job ids."""
    groups: dict[tuple[int, int, str], list[Point]] = {}
    for d in decisions:
        if d.action == "submit":
            nodes, procs = job_shape(d.point.cfg, settings)
            groups.setdefault((nodes, procs, d.point.backend), []).append(d.point)
    args_dir = records_dir(sweep_dir) / "args"
    args_dir.mkdir(parents=True, exist_ok=True)
    script = str(settings.script or default_script())
    arrays = []
    for (nodes, procs, backend), points in groups.items():
        for point in points:
            args = [*point.overrides, f"run.dir={point.run_dir}"]
            (args_dir / str(point.num)).write_bytes(b"".join(a.encode() + b"\0" for a in args))
        job_env = {**env, **{k: str(v) for k, v in settings.env.items()},
                   "TRNTRAIN_SWEEP_ARGS": str(args_dir), "PROCS_PER_NODE": str(procs),
                   "BACKEND": backend, "MAX_REQUEUES": str(settings.max_requeues),
                   "PRECOMPILE": "1" if settings.precompile else "0"}
        # The jobs run this Python environment's trntrain (on storage the nodes share).
        job_env.setdefault("TRNTRAIN_VENV", sys.prefix)
        array = slurm.submit(script, sbatch_flags(settings, sweep_dir, [p.num for p in points],
                                                  nodes), job_env)
        arrays.append(array)
        for point in points:
            record = read_record(sweep_dir, point.num) or PointRecord(
                point.num, point.overrides, str(point.run_dir), point.cfg.train.max_steps)
            record.max_steps = point.cfg.train.max_steps
            record.jobs.append(f"{array}_{point.num}")
            write_record(sweep_dir, record)
    return arrays


def check(points: Sequence[Point], sweep_dir: Path, settings: Settings,
          env: dict[str, str] | None = None) -> None:
    """Everything that can stop a sweep before it is submitted: the launcher's keys, every
    point, SLURM's answer and the partition. UserError, one line."""
    settings.check()
    plan_points(points, sweep_dir, settings)
    known = slurm.partitions(dict(os.environ if env is None else env))
    if settings.partition is not None and settings.partition not in known:
        raise UserError(f"hydra.launcher.partition={settings.partition!r} is not a partition "
                        f"of this SLURM cluster; valid: one of {', '.join(known) or '(none)'}, "
                        f"or null for the default partition. Nothing was submitted.")


def launch(points: Sequence[Point], sweep_dir: Path, settings: Settings,
           env: dict[str, str] | None = None, out: Callable[[str], None] = print,
           checked: bool = False) -> list[Decision]:
    """Check every point (unless `checked` already), ask SLURM, submit the points that
    need it; one line per point."""
    env = dict(os.environ if env is None else env)
    if not checked:
        check(points, sweep_dir, settings, env)
    records_dir(sweep_dir).mkdir(parents=True, exist_ok=True)
    decisions = decide(points, sweep_dir, env)
    arrays = submit(decisions, sweep_dir, settings, env)
    common, own = split_common([d.point.overrides for d in decisions])
    if common:
        out(f"{sweep_dir}: {len(decisions)} points, all with {' '.join(common)}")
    for d, overrides in zip(decisions, own, strict=True):
        if d.action == "finished":
            what = "finished, not submitted again"
        elif d.action == "queued":
            what = f"job {d.job} is {d.state}, not submitted again"
        else:
            record = read_record(sweep_dir, d.point.num)
            d.job, d.state = (record.jobs[-1] if record else None), "PENDING"
            step, _ = progress(d.point.run_dir)
            what = f"submitted as job {d.job}" + (f", resuming after step {step}" if step else "")
        out(f"#{d.point.num} {' '.join(overrides) or '(no overrides)'}: {what}")
    submitted = sum(d.action == "submit" for d in decisions)
    out(f"{sweep_dir}: {submitted} of {len(decisions)} points submitted"
        + (f" (array job {', '.join(arrays)})" if arrays else "")
        + f"; progress: trntrain sweep status {shlex.quote(str(sweep_dir))}")
    return decisions


@dataclass
class PointStatus:
    num: int
    overrides: list[str]
    run_dir: str
    job: str | None
    state: str
    step: int | None
    max_steps: int | None
    loss: float | None
    finished: bool
    log: str | None  # the job's output (all its runs), where SLURM wrote it


def _local_points(sweep_dir: Path) -> list[PointRecord]:
    """The points of a sweep run by Hydra's local launcher: its job directories."""
    points = []
    for run_dir in sorted((d for d in sweep_dir.iterdir() if d.is_dir() and d.name.isdigit()),
                          key=lambda d: int(d.name)):
        overrides = run_dir / ".hydra" / "overrides.yaml"
        config = run_dir / "config.yaml"
        if not overrides.is_file() or not config.is_file():
            continue
        max_steps = OmegaConf.select(OmegaConf.load(config), "train.max_steps")
        points.append(PointRecord(int(run_dir.name), list(OmegaConf.load(overrides)),
                                  str(run_dir), max_steps))
    return points


def sweep_status(sweep_dir: Path, env: dict[str, str] | None = None
                 ) -> tuple[list[PointStatus], bool]:
    """Each point's state; and whether SLURM answered (False: states are `unknown`)."""
    if not sweep_dir.is_dir():
        raise UserError(f"{sweep_dir} is not a directory; valid: the hydra.sweep.dir of a "
                        f"`trntrain train -m` sweep.")
    records = read_records(sweep_dir)
    local = not records
    if local:
        records = _local_points(sweep_dir)
    if not records:
        raise UserError(f"{sweep_dir} holds no sweep points; valid: the hydra.sweep.dir of a "
                        f"`trntrain train -m` sweep (its .slurm/ records or job directories).")
    states = {} if local else slurm.job_states(
        [r.jobs[-1] for r in records if r.jobs], dict(os.environ if env is None else env))
    rows = []
    for r in records:
        step, loss = progress(Path(r.run_dir))
        job = r.jobs[-1] if r.jobs else None
        if local:
            state = "local"
        elif states is None:
            state = "unknown"
        else:
            state = states.get(job, "unknown") if job else "not submitted"
        log = records_dir(sweep_dir) / f"{job}.out" if job else None
        rows.append(PointStatus(r.num, r.overrides, r.run_dir, job, state, step, r.max_steps,
                                loss, step is not None and r.max_steps is not None
                                and step >= r.max_steps, str(log) if log else None))
    return rows, states is not None


def split_common(overrides: Sequence[Sequence[str]]) -> tuple[list[str], list[list[str]]]:
    """The overrides every point has (none for a single point), and each point's others."""
    common = [o for o in overrides[0] if all(o in other for other in overrides)] \
        if len(overrides) > 1 else []
    return common, [[o for o in own if o not in common] for own in overrides]


def format_status(rows: Sequence[PointStatus], reachable: bool) -> str:
    """A table of the points; the overrides all points share are shown once above it."""
    common, own_overrides = split_common([r.overrides for r in rows])
    lines = []
    if common:
        lines.append(f"all points: {' '.join(common)}")
    table = [("point", "overrides", "job", "state", "step", "loss", "finished")]
    for r, own in zip(rows, own_overrides, strict=True):
        steps = "-" if r.step is None else f"{r.step}/{r.max_steps if r.max_steps else '?'}"
        loss = "-" if r.loss is None or not math.isfinite(r.loss) else f"{r.loss:.4f}"
        table.append((f"#{r.num}", " ".join(own) or "-", r.job or "-", r.state, steps, loss,
                      "yes" if r.finished else "no"))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
              for row in table]
    done = sum(r.finished for r in rows)
    lines.append(f"{done} of {len(rows)} points finished"
                 + ("" if reachable else "; SLURM did not answer, job states unknown"))
    return "\n".join(lines) + "\n"
