"""`trntrain COMMAND [hydra overrides]`: train | models.

`train` is a Hydra application over `conf/config.yaml`, so overrides, `--cfg job`,
`--help` and multirun (`-m`) follow Hydra's grammar. Bad input ends in one
message and exit status 2, before any process group is created where possible.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from trntrain.errors import UserError

if TYPE_CHECKING:
    from trntrain.run_dir import RunDirLock

USAGE = """usage: trntrain COMMAND [overrides ...]

commands:
  train    train a model: trntrain train model=llama_tiny train.max_steps=100
           (Hydra overrides; -m for a sweep; torchrun -m trntrain train ... for several ranks)
  convert  SRC DST [--to hf|dcp]: a run's checkpoint or a DCP checkpoint to a Hugging
           Face directory, or back; --merge [--base DIR]: a LoRA run's adapters merged
           into their base, as a Hugging Face directory
  prepare  INPUT [INPUT ...] --output PREFIX [--tokenizer T] [--workers N]: tokenize
           JSONL, text or parquet files into an indexed dataset (PREFIX.bin + PREFIX.idx)
  report   RUN_DIR [RUN_DIR ...]: plots and a summary; several runs or a sweep overlaid
  sweep    status SWEEP_DIR [--json]: each point of a sweep (train -m, e.g. with
           hydra/launcher=slurm): its overrides, SLURM job and state, last step and loss,
           finished or not
  launch   [--master-addr=HOST] [overrides]: print each node's torchrun command for the
           configured cluster (a dry run: nothing is started); --k8s: the cluster's
           Kubeflow PyTorchJob manifest instead (launch/k8s/pytorchjob.yaml filled in)
  plan     [overrides]: memory per core, step time, tokens/s and MFU of the layout on the
           configured cluster, without running it; plan.search=true ranks every layout
           that fits; plan.format=json
  models   list the model sizes of conf/model with their parameter counts
  generate PATH --prompt TEXT | --messages FILE [--max-new-tokens N] [--temperature T]
           [--top-p P] [--seed S] [--tokenizer T] [--tp N]: text from a Hugging Face model
           directory or a run's latest checkpoint (torchrun -m trntrain generate ... --tp N
           for several ranks)

Run `trntrain train --help` for the config groups and keys."""


def fail(message: str | None) -> None:
    if message is not None:
        print(f"trntrain: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


@contextmanager
def reported(speak: bool = True) -> Iterator[None]:
    """Bad input, a UserError or a Hydra / OmegaConf error, ends in one `trntrain: error:`
    line (printed only when `speak`: one rank of several says it) and exit status 2."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        yield
    except UserError as err:
        fail(str(err) if speak else None)
    except (HydraException, OmegaConfBaseException) as err:
        from trntrain.config.compose_errors import explain

        fail(explain(err) if speak else None)


def train_task(cfg: DictConfig) -> None:
    from trntrain.backend import build_backend
    from trntrain.config import validate
    from trntrain.distributed import (
        barrier,
        destroy_process_group,
        init_process_group,
        world_from_env,
    )
    from trntrain.run_dir import agree_run_dir, setup_logging, write_run_dir
    from trntrain.trainer import Trainer

    world = world_from_env()
    # Every rank composed the same config: let one of them say what is wrong.
    with reported(speak=world.is_main):
        validate(cfg, world.world_size)
        if world.is_main:
            from trntrain.plan import fit_warning

            warning = fit_warning(cfg, world.world_size)
            if warning:
                print(f"trntrain: warning: {warning}", file=sys.stderr, flush=True)
        backend = build_backend(cfg.backend, world.local_rank, cfg.train.precision,
                                cfg.train.master_weights, cfg.parallel.zero1,
                                cfg.train.stochastic_rounding)
        # A precompile pass (neuron_parallel_compile) writes nothing a later run could
        # resume from or append to: no run directory at all.
        keeps_run_dir = not backend.precompiling
        lock = None
        if cfg.run.dir and keeps_run_dir:
            lock = prepare_run_dir(cfg, Path(cfg.run.dir), world.is_main)
    init_process_group(world, cfg.backend.timeout_s, **backend.process_group_kwargs())
    try:
        run_dir = None
        if keeps_run_dir:
            run_dir = agree_run_dir(cfg, world)
            if world.is_main:
                lock = lock or prepare_run_dir(cfg, run_dir, is_main=True)
                write_run_dir(run_dir, cfg, cfg.run.overwrite)
            barrier()  # the directory exists before the other ranks open their log files
        setup_logging(run_dir, world, cfg.logging.level)
        Trainer(cfg, world, run_dir, backend).fit()
    except UserError as err:
        fail(str(err))
    except Exception as err:
        from trntrain.faults import is_peer_failure

        if not is_peer_failure(err):
            raise  # the cause: Hydra prints its traceback, once
        # Another rank failed first and printed its error: one line here, not a wall.
        print(f"trntrain: rank {world.rank} stopped: another rank failed (its error is shown "
              f"above or in its logs/rank_<r>.log)", file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        destroy_process_group()
        if lock is not None:
            lock.release()


def prepare_run_dir(cfg: DictConfig, run_dir: Path, is_main: bool) -> RunDirLock | None:
    """Before training: the run and checkpoint directories writable and no old run's
    records mixed in (every rank checks, so that every rank stops alike), and the run
    directory locked against a second run (rank 0, which holds the lock)."""
    from trntrain.checkpoint import CHECKPOINTERS
    from trntrain.checkpoint.manager import checkpoint_dir
    from trntrain.run_dir import RunDirLock, check_run_dir, ensure_writable

    ensure_writable(run_dir, "run.dir")
    ck = cfg.checkpoint
    if ck.name != "none":
        ensure_writable(checkpoint_dir(cfg, run_dir), "checkpoint.dir" if ck.dir else "run.dir")
    lock = RunDirLock(run_dir).acquire() if is_main else None
    try:
        resumable = CHECKPOINTERS[ck.name].resumable and ck.resume != "never"
        check_run_dir(run_dir, cfg.run.overwrite,
                      checkpoint_dir(cfg, run_dir) if resumable else None)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return lock


def models_command(argv: list[str]) -> None:
    import torch

    from trntrain.config import compose, config_dir
    from trntrain.models import build_model, count_parameters

    names = argv or sorted(p.stem for p in (config_dir() / "model").glob("*.yaml"))
    print(f"{'model':<14}{'parameters':>16}  layers  dim    heads  kv  vocab")
    for name in names:
        cfg = compose([f"model={name}"]).model
        with torch.device("meta"):
            n = count_parameters(build_model(cfg))
        print(f"{name:<14}{n / 1e9:>14.3f} B  {cfg.n_layers:>6}  {cfg.dim:<6} {cfg.n_heads:>5}  "
              f"{cfg.n_kv_heads or cfg.n_heads:>2}  {cfg.vocab_size}")


def check_overrides(overrides: list[str]) -> None:
    from trntrain.config import compose
    from trntrain.distributed import world_from_env

    with reported(speak=world_from_env().is_main):
        compose(overrides)


def convert_command(argv: list[str]) -> None:
    import argparse

    from trntrain.checkpoint.convert import convert

    parser = argparse.ArgumentParser(prog="trntrain convert", description=(
        "Convert a run's latest checkpoint or a DCP checkpoint to a Hugging Face "
        "directory, or a Hugging Face directory to a DCP checkpoint."))
    parser.add_argument("src", type=Path, help="run directory, DCP checkpoint or HF directory")
    parser.add_argument("dst", type=Path, help="new output directory")
    parser.add_argument("--to", choices=("hf", "dcp"), help="target format (default: the other)")
    parser.add_argument("--merge", action="store_true", help=(
        "LoRA: add the adapters of SRC (a LoRA run, its checkpoint, or a PEFT adapter "
        "directory) into their base and write the full Hugging Face model"))
    parser.add_argument("--base", type=Path, help="--merge: the base model directory "
                        "(default: the run's checkpoint.init_from or the adapter's own)")
    args = parser.parse_args(argv)
    if args.merge:
        from trntrain.checkpoint.convert import merge_adapters

        merge_adapters(args.src, args.dst, args.base)
        print(f"wrote the merged model to {args.dst}")
        return
    target = convert(args.src, args.dst, args.to)
    print(f"wrote {target} checkpoint to {args.dst}")


def prepare_command(argv: list[str]) -> None:
    import argparse
    import logging

    from trntrain.data.prepare import Settings, prepare

    parser = argparse.ArgumentParser(prog="trntrain prepare", description=(
        "Tokenize JSON lines (a document per line), text files (a document per file) or "
        "parquet files into a Megatron-Core indexed dataset, PREFIX.bin + PREFIX.idx, for "
        "data=indexed data.path=PREFIX. Every document ends with the end-of-text token. "
        "Re-running is safe: an up-to-date output is kept, an interrupted run resumes."))
    parser.add_argument("inputs", nargs="+", help="files, directories or globs")
    parser.add_argument("--output", "-o", required=True, help="output prefix")
    parser.add_argument("--tokenizer", default="byte", help="byte (default), a tokenizer.json "
                        "(or its directory) or a tiktoken file")
    parser.add_argument("--eot-token", help="the end-of-text token (default: the tokenizer's)")
    parser.add_argument("--text-key", default="text", help="JSON field / parquet column")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes (default: one per core)")
    parser.add_argument("--on-bad-line", default="fail", choices=("fail", "skip"),
                        help="a malformed JSON line stops (fail) or is skipped and counted")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    settings = Settings(args.tokenizer, args.eot_token, args.text_key, args.on_bad_line)
    result = prepare(args.inputs, args.output, settings, args.workers,
                     progress=not args.no_progress)
    state = "up to date" if result.up_to_date else (
        f"{result.input_bytes / 1e6:.1f} MB of input in {result.seconds:.1f} s "
        f"({result.input_bytes / 1e6 / max(result.seconds, 1e-9):.1f} MB/s)")
    print(f"{result.output} (.bin + .idx): {result.documents} documents, {result.tokens} tokens; "
          f"{state}" + (f"; {result.skipped_lines} malformed lines skipped"
                        if result.skipped_lines else ""))


def generate_command(argv: list[str]) -> None:
    from trntrain.generate import generate_main

    generate_main(argv)


def report_command(argv: list[str]) -> None:
    import argparse

    from trntrain.metrics.report import write_report

    parser = argparse.ArgumentParser(prog="trntrain report", description=(
        "Plots (loss, learning rate, throughput, memory) and a summary of one or several run "
        "directories or sweeps, their curves overlaid."))
    parser.add_argument("runs", type=Path, nargs="+", help="run or sweep directories")
    parser.add_argument("--out", type=Path, help="output directory (default: the run's own, "
                        "or <common parent>/report)")
    args = parser.parse_args(argv)
    report = write_report(args.runs, args.out)
    print(report.summary, end="")
    print(f"plots and summary in {report.directory}")


def sweep_command(argv: list[str]) -> None:
    import argparse
    import json
    from dataclasses import asdict

    from trntrain.launcher.sweep import format_status, sweep_status

    parser = argparse.ArgumentParser(prog="trntrain sweep", description=(
        "The points of a sweep directory (trntrain train -m ..., on SLURM with "
        "hydra/launcher=slurm): overrides, SLURM job id and state, last step and loss, "
        "and whether each finished."))
    sub = parser.add_subparsers(dest="action", required=True)
    status = sub.add_parser("status", help="each point's state")
    status.add_argument("sweep_dir", type=Path, help="the sweep's hydra.sweep.dir")
    status.add_argument("--json", action="store_true", help="one JSON object per point")
    args = parser.parse_args(argv)
    rows, reachable = sweep_status(args.sweep_dir)
    if args.json:
        for row in rows:
            print(json.dumps(asdict(row)))
    else:
        print(format_status(rows, reachable), end="")


def kubernetes_manifest(cfg: DictConfig, overrides: list[str]) -> str:
    """launch/k8s/pytorchjob.yaml for the configured cluster: one pod per node, its
    cores, EFA interfaces (cluster.efa_devices) and instance type, the overrides."""
    import yaml

    from trntrain.config import ConfigError, config_dir

    c = cfg.cluster
    if not str(c.name).startswith("trn") or c.efa_devices is None:
        raise ConfigError("cluster", c.name, "a Trainium cluster with procs_per_node and "
                          "efa_devices, e.g. cluster=trn1_32xlarge or cluster=trn1n_32xlarge",
                          "trntrain launch --k8s requests each node's Neuron devices and EFA "
                          "interfaces;")
    template = config_dir().parent / "launch" / "k8s" / "pytorchjob.yaml"
    if not template.is_file():
        raise UserError(f"trntrain launch --k8s reads its template {template}, which this "
                        f"installation lacks; valid: run it from a source checkout.")
    job = yaml.safe_load(template.read_text())
    # A Kubernetes name: lower-case letters, digits and dashes.
    job["metadata"]["name"] = "trntrain-" + "".join(
        ch if ch.isalnum() else "-" for ch in str(cfg.model.name).lower())
    spec = job["spec"]
    spec["elasticPolicy"]["minReplicas"] = spec["elasticPolicy"]["maxReplicas"] = c.nodes
    replicas = spec["pytorchReplicaSpecs"]
    pod = replicas["Master"]["template"]["spec"]  # the Worker's template is the same pod
    if c.nodes > 1:
        replicas["Worker"]["replicas"] = c.nodes - 1
    else:
        del replicas["Worker"]
    container = pod["containers"][0]
    if not any(o.startswith("run.dir=") for o in overrides):
        # Every pod must agree on one directory on the shared file system.
        overrides = [*overrides, f"run.dir=/fsx/runs/{job['metadata']['name']}"]
    container["args"] = [f"--nnodes={c.nodes}", f"--nproc-per-node={c.procs_per_node}",
                         "--max-restarts=3", "-m", "trntrain", "train", *overrides]
    for variable in container["env"]:
        if variable["name"] == "NEURON_RT_NUM_CORES":
            variable["value"] = str(c.procs_per_node)
    container["resources"]["limits"]["vpc.amazonaws.com/efa"] = c.efa_devices
    # Cluster names are instance types with the first dot written as an underscore.
    pod["nodeSelector"]["node.kubernetes.io/instance-type"] = str(c.name).replace("_", ".", 1)
    header = (f"# trntrain launch --k8s: {c.nodes} x {c.name}, {c.procs_per_node} processes "
              f"and {c.efa_devices} EFA interfaces per node (cluster.efa_devices).\n"
              f"# See launch/k8s/pytorchjob.yaml for what each field is for.\n")
    return header + yaml.safe_dump(job, sort_keys=False, width=100)


def launch_command(argv: list[str]) -> None:
    """Print, for every node of the configured cluster, the torchrun command to start
    (with --k8s, the Kubernetes manifest of the job)."""
    import shlex

    from trntrain.config import ConfigError, compose, validate
    from trntrain.plan.layout import planned_world_size

    addr = next((a.split("=", 1)[1] for a in argv if a.startswith("--master-addr=")),
                "$MASTER_ADDR")
    overrides = [a for a in argv if not a.startswith("--")]
    cfg = compose(overrides)
    world_size = planned_world_size(cfg)  # on cluster=local: the processes the layout asks for
    nodes = cfg.cluster.nodes
    if world_size % nodes:
        raise ConfigError("cluster.nodes", nodes, f"a divisor of {world_size}, the processes "
                          f"the layout asks for, or a cluster with procs_per_node",
                          f"cluster={cfg.cluster.name} sets no processes per node;")
    validate(cfg, world_size)
    if "--k8s" in argv:
        print(kubernetes_manifest(cfg, overrides), end="")
        return
    procs = world_size // nodes
    for node in range(nodes):
        rendezvous = (["--standalone"] if nodes == 1 else
                      ["--rdzv-backend=c10d", f"--rdzv-endpoint={addr}:29500",
                       "--rdzv-id=trntrain"])
        command = ["torchrun", f"--nnodes={nodes}", f"--nproc-per-node={procs}", *rendezvous,
                   "-m", "trntrain", "train", *overrides]
        print(f"# node {node} of {nodes} ({cfg.cluster.name})")
        print(" ".join(shlex.quote(c) if not c.startswith("--rdzv-endpoint") else c
                       for c in command))


def plan_command(argv: list[str]) -> None:
    """Print the memory and step-time plan of the configured layout, or a layout search."""
    from trntrain.config import compose
    from trntrain.plan import extend_context, plan
    from trntrain.plan.report import as_json, table, text
    from trntrain.plan.search import search

    cfg = compose(argv)
    note = extend_context(cfg)
    if cfg.plan.search:
        plans = search(cfg)
        print(as_json(plans) if cfg.plan.format == "json" else table(plans, cfg, cfg.plan.top))
    else:
        result = plan(cfg)
        print(as_json(result) if cfg.plan.format == "json" else text(result, cfg))
    if note:  # after the plan: a config the plan refuses gets its one error line alone
        print(note, file=sys.stderr)


def run_hydra(task: Callable[[DictConfig], None], argv: list[str]) -> None:
    import hydra

    from trntrain.config import config_dir, register_configs

    register_configs()
    if not any(arg.startswith("-") for arg in argv):
        # A single run: compose once here to restate Hydra's errors in trntrain's form.
        check_overrides(argv)
    sys.argv = [sys.argv[0], *argv]
    hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")(task)()


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        fail(f"unknown command {command!r}; valid: {', '.join(COMMANDS)} (see trntrain --help).")
    with reported():
        COMMANDS[command](rest)


COMMANDS: dict[str, Callable[[list[str]], None]] = {
    "train": lambda argv: run_hydra(train_task, argv),
    "prepare": prepare_command,
    "convert": convert_command,
    "report": report_command,
    "sweep": sweep_command,
    "launch": launch_command,
    "plan": plan_command,
    "models": models_command,
    "generate": generate_command,
}

if __name__ == "__main__":
    main()
