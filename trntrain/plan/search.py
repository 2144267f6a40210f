"""Layout search: every layout of a model on a cluster that trntrain accepts, planned,
and those that fit ranked by estimated tokens per second.

Candidates: tp a divisor of the cores per node (a tp group stays on NeuronLink), cp a
power of two with tp x cp within the node and chunks of at least MIN_CP_CHUNK tokens
(the all-gather attention on xla and neuron, the ring elsewhere: the default), pp a
divisor of the layers and of the cores left, dp the rest, dividing the global batch;
micro-batches of 1, 2 or 4 sequences; sequence parallelism on or off (tp > 1); ZeRO-1
on or off (always on in effect with bf16 master weights, which the trainer shards
over dp anyway); activation checkpointing none, selective or full; 1F1B, and
interleaved 1F1B over 2 chunks per rank where the layers divide into them. GPipe is
left out: it takes 1F1B's time with more micro-batches in flight. Each candidate goes
through `trntrain.config.validate`, so the search proposes only what `train` runs.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace
from typing import Any

from omegaconf import DictConfig, OmegaConf

from trntrain.config import ConfigError, context_attention, validate
from trntrain.plan import Plan, plan_layout, validate_plan_config
from trntrain.plan.layout import Layout, planned_world_size
from trntrain.plan.memory import sharded_optimizer

MICRO_BATCH_SIZES = (1, 2, 4)
# Context parallelism only where each of a rank's two chunks keeps this many tokens:
# shorter ones exchange keys and values for little memory saved.
MIN_CP_CHUNK = 1024
CHECKPOINTING = ("none", "selective", "full")


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def snapshot(cfg: DictConfig) -> Any:
    """The sections the planner reads as plain objects: attribute access on a DictConfig
    costs microseconds, and a search reads thousands of them."""
    return SimpleNamespace(**{key: OmegaConf.to_object(cfg[key]) for key in
                              ("model", "train", "parallel", "cluster", "plan", "backend")})


def candidates(cfg: DictConfig, world: int) -> list[Layout]:
    """Every layout of the search space that `validate` accepts on `world` processes."""
    m, t, c = cfg.model, cfg.train, cfg.cluster
    trial = cfg.copy()
    found: list[Layout] = []
    first_error: ConfigError | None = None
    node = c.procs_per_node or world
    sizes = [(tp, cp) for tp in divisors(node) for cp in divisors(node // tp)
             if cp & (cp - 1) == 0 and (cp == 1 or t.seq_len // (2 * cp) >= MIN_CP_CHUNK)]
    for tp, cp in sizes:
        for pp in divisors(world // (tp * cp)):
            dp = world // (tp * cp * pp)
            if m.n_layers % pp or t.global_batch_size % dp:
                continue
            schedules = [("1f1b", 1)]
            if pp > 1 and m.n_layers % (2 * pp) == 0:
                schedules.append(("interleaved_1f1b", 2))
            for mbs, (schedule, v), sp in itertools.product(
                    MICRO_BATCH_SIZES, schedules, (False, True) if tp > 1 else (False,)):
                if (t.global_batch_size // dp) % mbs:
                    continue
                p = trial.parallel
                p.tp, p.pp, p.dp, p.sequence_parallel, p.ep, p.cp = tp, pp, None, sp, 1, cp
                p.schedule, p.virtual_pp, p.microbatches = schedule, v, None
                trial.train.micro_batch_size = mbs
                try:
                    validate(trial, world)
                except ConfigError as err:
                    first_error = first_error or err
                    continue
                m_count = t.global_batch_size // (dp * mbs)
                # Expert parallelism: any divisor of dp that divides the experts.
                eps = [e for e in divisors(dp) if getattr(m, "num_experts", None)
                       and m.num_experts % e == 0] or [1]
                for zero1, mode, ep in itertools.product((False, True), CHECKPOINTING, eps):
                    layout = Layout(tp, pp, dp, sp, zero1, mode, schedule, v, m_count, mbs, ep,
                                    cp, context_attention(trial) if cp > 1 else "allgather")
                    if not zero1 and sharded_optimizer(t, layout):
                        continue  # bf16 master weights: sharded either way, listed once
                    found.append(layout)
    if not found and first_error is not None:
        # Nothing passes: most likely a key no layout can fix; say which.
        raise first_error
    return found


def search(cfg: DictConfig) -> list[Plan]:
    """Plans of every valid layout that fits, fastest first (all of them, fastest
    first, where the cluster sets no memory limit)."""
    validate_plan_config(cfg)
    world = planned_world_size(cfg)
    if cfg.cluster.procs_per_node is None:
        raise ConfigError("cluster", cfg.cluster.name, "a cluster with procs_per_node, e.g. "
                          "cluster=trn1_32xlarge cluster.nodes=32",
                          "plan.search enumerates the layouts of a cluster's cores;")
    fast = snapshot(cfg)
    plans = [plan_layout(fast, layout) for layout in candidates(cfg, world)]
    fitting = [p for p in plans if p.fits is not False]
    return sorted(fitting, key=lambda p: -(p.tokens_per_s or 0.0))
