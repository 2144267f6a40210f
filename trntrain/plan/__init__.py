"""The planner: memory per core and step time of a layout on a cluster, and a search
over layouts (`trntrain plan`). Pure arithmetic over the composed config: no model is
built, so it answers for a 405 B model as fast as for a tiny one. The formulas and
their sources are in memory.py, step_time.py and docs/plan.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig

from trntrain.config.validate import ConfigError, require
from trntrain.plan.layout import Layout, layout_from_config, planned_world_size
from trntrain.plan.memory import GIB, all_rank_params, in_flight_counts, memory_per_core
from trntrain.plan.step_time import step_time, throughput

FORMATS = ("text", "json")


@dataclass
class Plan:
    layout: Layout
    stage: int  # the pipeline rank that needs the most memory
    memory: dict[str, float]  # bytes by part on that rank
    limit_gib: float | None  # cluster.memory_per_core_gib
    reserved_gib: float  # cluster.reserved_memory_gib: the runtime's, never the trainer's
    in_flight: list[int]  # micro-batches held at the peak, per pipeline rank
    time: dict[str, float] | None  # seconds per step by term; None without cluster figures
    tokens_per_s: float | None = None
    mfu: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def memory_per_core_gib(self) -> float:
        return sum(self.memory.values()) / GIB

    @property
    def budget_gib(self) -> float | None:
        """What the trainer's tensors may use of a core: its memory less the reserve."""
        return None if self.limit_gib is None else self.limit_gib - self.reserved_gib

    @property
    def fits(self) -> bool | None:
        if self.budget_gib is None:
            return None
        return self.memory_per_core_gib <= self.budget_gib

    @property
    def step_time_s(self) -> float | None:
        return None if self.time is None else sum(self.time.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.layout.as_dict(),
            "world_size": self.world_size,
            "memory_per_core_gib": self.memory_per_core_gib,
            "memory_limit_gib": self.limit_gib,
            "memory_reserved_gib": self.reserved_gib,
            "memory_budget_gib": self.budget_gib,
            "fits": self.fits,
            "step_time_s": self.step_time_s,
            "tokens_per_s": self.tokens_per_s,
            "mfu": self.mfu,
            "memory_gib": {k: v / GIB for k, v in self.memory.items()},
            "memory_stage": self.stage,
            "in_flight_microbatches": self.in_flight,
            "time_s": self.time,
        }


def validate_plan_config(cfg: DictConfig) -> None:
    p = cfg.plan
    require(p.format in FORMATS, "plan.format", p.format, f"one of {FORMATS}")
    require(0 < p.compute_efficiency <= 1, "plan.compute_efficiency", p.compute_efficiency,
            "a fraction of the peak in (0, 1]")
    require(p.top > 0, "plan.top", p.top, "a positive number of layouts to show")


def extend_context(cfg: DictConfig) -> str | None:
    """A plan asked for a longer sequence than the model's `max_seq_len` (say 128k tokens
    for `model=llama3_8b`, 8k): plan it with the model's context extended to
    `train.seq_len`, and return the note that says what `train` will need."""
    m, seq_len = cfg.model, cfg.train.seq_len
    if seq_len <= m.max_seq_len:
        return None
    note = (f"note: planned with model.max_seq_len={seq_len} (model {m.name}: "
            f"{m.max_seq_len}); training needs model.max_seq_len={seq_len}")
    if m.get("rope_scaling") is None:
        note += (" and, for positions beyond those the model was trained on, a "
                 "model.rope_scaling (Llama 3.1's: +experiment=llama3_8b_trn1_128k)")
    m.max_seq_len = seq_len
    return note


def plan_layout(cfg: DictConfig, layout: Layout) -> Plan:
    """The plan of `layout` with the model, training and cluster of `cfg`."""
    params = all_rank_params(cfg.model, layout, cfg.train.seq_len,
                             getattr(cfg, "peft", None))
    stage, memory = memory_per_core(cfg, layout, params)
    time = step_time(cfg, layout, max(sum(p.numel for p in ps) for ps in params))
    c = cfg.cluster
    result = Plan(layout, stage, memory, c.memory_per_core_gib, c.reserved_memory_gib,
                  in_flight_counts(layout), time)
    if time is not None:
        result.tokens_per_s, result.mfu = throughput(cfg, layout, sum(time.values()))
    return result


def plan(cfg: DictConfig) -> Plan:
    """The plan of the layout `cfg` asks for (validated on the configured cluster)."""
    from trntrain.config import validate

    validate_plan_config(cfg)
    world = planned_world_size(cfg)
    validate(cfg, world)
    return plan_layout(cfg, layout_from_config(cfg, world))


def fit_warning(cfg: DictConfig, world_size: int) -> str | None:
    """For `trntrain train`: a warning when the planner says the layout (already
    validated) overflows the cluster's memory per core; None when it fits or the
    cluster sets no limit (cluster=local)."""
    if cfg.cluster.memory_per_core_gib is None:
        return None
    result = plan_layout(cfg, layout_from_config(cfg, world_size))
    if result.fits:
        return None
    c = cfg.cluster
    parts = ", ".join(f"{k} {v / GIB:.1f}" for k, v in result.memory.items() if v)
    return (f"the planner estimates {result.memory_per_core_gib:.1f} GiB per core on pipeline "
            f"stage {result.stage} ({parts} GiB) but cluster={c.name} leaves "
            f"{result.budget_gib:g} GiB of its {c.memory_per_core_gib:g} GiB "
            f"(cluster.reserved_memory_gib={c.reserved_memory_gib:g} for the runtime): the run "
            f"will likely fail to allocate; `trntrain plan plan.search=true` with the same "
            f"overrides lists layouts that fit.")


__all__ = ["ConfigError", "Layout", "Plan", "extend_context", "fit_warning", "plan",
           "plan_layout", "validate_plan_config"]
